"""Analytic inference cost: counted operations and bytes, no measurement.

The analytic cost
-----------------
For one image and ``'same'`` padding, with ``t = m + r - 1`` and
``P = ceil(H/m) * ceil(W/m)`` tiles (partial tiles at the border are paid in
full)::

    cost = s(bits) * (MACS + OP_WEIGHT * OPS)
           + BYTE_WEIGHT * (ACTIVATION_BYTES + WEIGHT_BYTES / batch)

* ``MACS``, the multiply-accumulates of the main stage:

  - normal (im2row + GEMM): ``H W C_in C_out r^2``;
  - Winograd, the element-wise stage as ``t^2`` GEMMs: ``P t^2 C_in C_out``.

* ``OPS``, the transforms' additions and multiplications, counted from the
  actual matrices of :func:`wa_tf.transforms.winograd_matrices`.  Applying a
  ``p x q`` matrix to a vector costs ``sum_rows (nnz - 1)`` additions plus one
  multiplication per entry other than 0 and +-1 (:func:`transform_ops`); the
  2-D transform ``M X M^T`` applies it to ``q`` columns and then ``p`` rows:

  - input ``B_t d B_t^T``: ``2 t * ops(B_t)`` per tile and input channel;
  - output ``A_t M A_t^T``: ``(t + m) * ops(A_t)`` per tile and output channel;
  - weights ``G g G^T``: free, ``U`` is computed once when the model is
    deployed (:func:`operation_counts` reports it apart, never in the cost);
  - normal: none (im2row is a copy, paid in bytes).

  Each addition or multiplication counts as one multiply-accumulate: the
  transforms are short, irregular passes that run at no better throughput
  than a GEMM's fused multiply-adds.  So F(2x2, 3x3)'s input transform is 32
  additions per tile and channel, its output transform 24 (Lavin & Gray's
  figures); F6's matrices have far more entries that are not +-1.

* ``BYTES``: every tensor the layer reads or writes, once, at the bit-width's
  element size ``bytes(bits)``; the weights are read once per batch:

  - normal: activations: input ``H W C_in``, im2row patches ``H W r^2 C_in``,
    output ``H W C_out``; weights ``r^2 C_in C_out``;
  - Winograd: activations: input ``H W C_in``, tiles ``P t^2 C_in`` (the
    ``(t/m)^2`` inflation of overlapping tiles) and their transform ``V`` (as
    many), the element-wise product ``P t^2 C_out`` and the output tiles
    ``P m^2 C_out``; weights: the Winograd-domain ``U``, ``t^2 C_in C_out``
    (``t^2 / r^2`` times the kernel: 4x for F4, which makes Winograd lose on
    the small maps and wide layers of the last stage at batch 1).

* Bit-width scaling: FP32 is the unit, ``s(None) = 1`` and ``bytes(None) = 4``;
  an integer bit-width ``b`` scales both operations and bytes by ``b / 32``
  (``s(b) = b/32``, ``bytes(b) = b/8``), as SIMD lanes and memory traffic both
  scale with the element size: INT8 is 4x cheaper than FP32, INT16 2x.

* Weights: ``OP_WEIGHT = 1``; ``BYTE_WEIGHT = 1`` multiply-accumulate per
  byte moved (one FP32 element = 4), a compute-to-bandwidth ratio between a
  cache-resident desktop CPU and a phone's.  Both are arguments of
  :class:`AnalyticCost`, as is the batch size (default 1).

The unit is one FP32 multiply-accumulate per image.  At 16x16x64 -> 64, FP32,
batch 1, this gives normal 10.3 M, F2 5.6 M, F4 4.1 M, F6 5.0 M: F4 is
cheapest; F6 has no fewer multiplies there (3 x 3 tiles cover 18 x 18 outputs
for 16 x 16) and 1.8x F4's transform operations.
"""

import dataclasses
import math
from typing import Dict, Optional

import numpy as np

from wa_tf import transforms
from wa_tf.search.cost.spec import (
    NORMAL,
    Candidate,
    CostModel,
    LayerSpec,
    check_optional_bits,
    is_allowed,
)
from wa_tf.transforms import is_int

FP32_BYTES = 4


def transform_ops(matrix: np.ndarray) -> Dict[str, int]:
    """Additions and multiplications of applying `matrix` to one vector.

    A row with ``k`` nonzeros takes ``k - 1`` additions; every entry other than
    0 and +-1 takes one multiplication (powers of two included: the count does
    not assume shifts).

    Returns:
      ``{"adds": int, "mults": int}``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    nonzero = matrix != 0
    adds = int(np.maximum(nonzero.sum(axis=1) - 1, 0).sum())
    mults = int((nonzero & (np.abs(matrix) != 1)).sum())
    return {"adds": adds, "mults": mults}


def _transform_2d_ops(matrix):
    """Operations of ``M X M^T`` for one (q x q) tile: M on q columns, then on p rows."""
    p, q = matrix.shape
    one = transform_ops(matrix)
    return (p + q) * (one["adds"] + one["mults"])


@dataclasses.dataclass(frozen=True)
class OperationCounts:
    """What one image costs one layer, before weighting (see the module docstring).

    Attributes:
      macs: Multiply-accumulates of the GEMM (im2row) or element-wise stage.
      input_transform_ops: Additions + multiplications of ``B_t d B_t^T``.
      output_transform_ops: Those of ``A_t M A_t^T``.
      weight_transform_ops: Those of ``G g G^T``, once per deployment, not per
        image: never part of the cost.
      activation_elements: Elements of the activations read or written
        (input, im2row patches or tiles, Winograd-domain tensors, output).
      weight_elements: Elements of the weights read: the kernel, or ``U``.
      tiles: Winograd tiles ``P`` (0 for normal).
    """
    macs: int
    input_transform_ops: int
    output_transform_ops: int
    weight_transform_ops: int
    activation_elements: int
    weight_elements: int
    tiles: int

    @property
    def elements(self) -> int:
        """Elements moved for one image at batch 1 (activations and weights)."""
        return self.activation_elements + self.weight_elements

    @property
    def transform_ops(self) -> int:
        """Per-image transform operations (input and output)."""
        return self.input_transform_ops + self.output_transform_ops


def operation_counts(layer: LayerSpec, candidate: Candidate) -> OperationCounts:
    """Counts one image's operations and elements moved (see the module docstring).

    Raises:
      ValueError: If `candidate` is not offered for `layer` (:func:`is_allowed`).
    """
    if not is_allowed(layer, candidate):
        raise ValueError(f"{candidate.name} is not offered for {layer.describe()}: its "
                         f"{candidate.tile_size}x{candidate.tile_size} output tile does not fit")
    h, w, c, k, r = (layer.height, layer.width, layer.in_channels, layer.out_channels,
                     layer.kernel_size)
    if candidate.algorithm == NORMAL:
        activations = h * w * c + h * w * r * r * c + h * w * k
        return OperationCounts(h * w * c * k * r * r, 0, 0, 0, activations, r * r * c * k, 0)
    m = candidate.tile_size
    t = m + r - 1
    a_t, b_t, g = transforms.winograd_matrices(m, r)
    tiles = math.ceil(h / m) * math.ceil(w / m)
    macs = tiles * t * t * c * k
    input_ops = tiles * c * _transform_2d_ops(b_t)
    output_ops = tiles * k * _transform_2d_ops(a_t)
    weight_ops = c * k * _transform_2d_ops(g)
    activations = h * w * c + 2 * tiles * t * t * c + tiles * t * t * k + tiles * m * m * k
    return OperationCounts(macs, input_ops, output_ops, weight_ops, activations, t * t * c * k,
                           tiles)


def bytes_per_element(bits: Optional[int]) -> float:
    """4 for FP32 (None), ``bits / 8`` for an integer bit-width."""
    check_optional_bits(bits)
    return FP32_BYTES if bits is None else bits / 8


def op_scale(bits: Optional[int]) -> float:
    """Cost of one operation relative to FP32: 1 for None, ``bits / 32`` for integers."""
    return bytes_per_element(bits) / FP32_BYTES


class AnalyticCost(CostModel):
    """Counted cost, in FP32 multiply-accumulate equivalents per image (module docstring).

    Args:
      op_weight: Weight of a transform addition or multiplication, relative
        to one multiply-accumulate.
      byte_weight: Weight of one byte moved, in multiply-accumulates.
      batch_size: Images per call: the weights are read once per call.
    """
    unit = "FP32 MAC-equivalents per image"

    def __init__(self, op_weight: float = 1.0, byte_weight: float = 1.0, batch_size: int = 1):
        for name, value in (("op_weight", op_weight), ("byte_weight", byte_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                    not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        self.op_weight = float(op_weight)
        self.byte_weight = float(byte_weight)
        self.batch_size = int(batch_size)
        self.description = (f"analytic: MACs + {self.op_weight:g} x transform ops, scaled by "
                            f"bits/32, + {self.byte_weight:g} x bytes moved, batch "
                            f"{self.batch_size}")

    def breakdown(self, layer: LayerSpec, candidate: Candidate) -> Dict[str, float]:
        """The weighted terms: ``{"macs", "transforms", "bytes", "total"}``."""
        counts = operation_counts(layer, candidate)
        scale = op_scale(candidate.bits)
        terms = {
            "macs": scale * counts.macs,
            "transforms": scale * self.op_weight * counts.transform_ops,
            "bytes": self.byte_weight * bytes_per_element(candidate.bits) * (
                counts.activation_elements + counts.weight_elements / self.batch_size),
        }
        terms["total"] = sum(terms.values())
        return terms

    def cost(self, layer: LayerSpec, candidate: Candidate) -> float:
        return self.breakdown(layer, candidate)["total"]


# ----------------------------------------------------------------------------
# Lookup tables
