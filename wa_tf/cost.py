"""What a 3x3 convolution costs at inference: analytic counts or a measured table.

One interface, :class:`CostModel` with ``cost(layer, candidate)``, answers "how
long does this layer take at inference" for a :class:`LayerSpec` (input
``H x W x C_in``, ``C_out`` filters, kernel ``r``, stride 1) and a
:class:`Candidate` (the direct convolution, ``normal``, or Winograd
F(m x m, r x r), at FP32 or an integer bit-width).  Two sources sit behind it
(:func:`get_cost_model` picks one):

* :class:`AnalyticCost` (``"analytic"``, the default): counts, no measurement.
* :class:`TableCost` (``"measured"`` or a JSON path): a lookup table of
  milliseconds, written by ``bin/latency_table.py`` on the machine it runs on,
  or by users for a device of their own (a phone with its own kernels).

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

Layers, candidates and architectures
------------------------------------
:func:`searchable_layers` lists the 3x3 convolutions of the residual blocks
of ``wa_tf.models.resnet18_like`` (``layer1.0.conv1`` ... ``layer4.1.conv2``;
not the stem, the 1x1 shortcuts or the classifier) with their input shapes;
:func:`allowed_candidates` offers Winograd F(m) only where the output has at
least one whole ``m x m`` tile (so the padded input holds a ``t x t`` tile):
no F6 on the 4x4 maps of the last stage, as the uniform model does.
:func:`model_cost` totals an architecture, ``{layer name: {"conv":
"normal"|"static"|"flex", "tile_size": 2|4|6, "bits": None|2..16}}``; static
and flex cost the same at inference (their transforms are both constants then).

The table format is described in :class:`TableCost`.
"""

import dataclasses
import json
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from wa_tf import transforms
from wa_tf.choices import CONV_MODES, MAX_BITS, MIN_BITS, valid_bits
from wa_tf.transforms import is_int

NORMAL = "normal"
WINOGRAD = "winograd"
ALGORITHMS = (NORMAL, WINOGRAD)
# The search space's candidate names: the direct convolution and F(m x m, 3 x 3).
CANDIDATE_NAMES = ("normal", "F2", "F4", "F6")
FP32_BYTES = 4
TABLE_FORMAT = "wa_tf.latency_table"
TABLE_VERSION = 1
# `get_cost_model("measured")` reads this file (bin/latency_table.py's default --output).
DEFAULT_TABLE = "latency_table.json"
_CANDIDATE_KEY = re.compile(r"^(normal|F(\d+))(?:/int(\d+))?$")


def _check_bits(bits):
    if bits is not None and not valid_bits(bits):
        raise ValueError(f"bits must be None (FP32) or an integer in {MIN_BITS}..{MAX_BITS}; "
                         f"got {bits!r}")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A stride-1 convolution to cost: input ``height x width x in_channels``.

    Attributes:
      height: Input (and, with 'same' padding, output) height.
      width: Input width.
      in_channels: C_in.
      out_channels: C_out (filters).
      kernel_size: Odd square kernel size r.
      name: The layer's name in the model (``layer1.0.conv1``), or None;
        tables are looked up by name first, then by :attr:`shape_key`.
      tile_sizes: The Winograd tile sizes the model offers at this layer
        (:func:`wa_tf.models.searchable_layers`), or None to decide by
        shape (:func:`tile_fits`).
    """
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel_size: int = 3
    name: Optional[str] = None
    tile_sizes: Optional[Tuple[int, ...]] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        for field in ("height", "width", "in_channels", "out_channels", "kernel_size"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ValueError(f"LayerSpec.{field} must be a positive integer; got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"LayerSpec.kernel_size must be odd; got {self.kernel_size}")

    @property
    def shape_key(self) -> str:
        """The table key of this shape: ``'HxWxC_in-C_out-rxr'``, e.g. ``'16x16x64-64-3x3'``."""
        r = self.kernel_size
        return f"{self.height}x{self.width}x{self.in_channels}-{self.out_channels}-{r}x{r}"

    def describe(self) -> str:
        """The name and shape, for messages."""
        return f"{self.name} ({self.shape_key})" if self.name else self.shape_key


@dataclasses.dataclass(frozen=True)
class Candidate:
    """How a layer is computed: the algorithm, its tile size and the bit-width.

    Attributes:
      algorithm: 'normal' (direct convolution, im2row + GEMM) or 'winograd'.
      tile_size: Output tile size m of F(m x m, r x r); None for 'normal'.
      bits: None for FP32, else the integer bit-width 2..16.
    """
    algorithm: str
    tile_size: Optional[int] = None
    bits: Optional[int] = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"Candidate.algorithm must be one of {', '.join(ALGORITHMS)}; "
                             f"got {self.algorithm!r}")
        if self.algorithm == NORMAL and self.tile_size is not None:
            raise ValueError(f"a normal convolution has no tile size; got {self.tile_size!r}")
        if self.algorithm == WINOGRAD and (not is_int(self.tile_size) or self.tile_size < 1):
            raise ValueError("a Winograd candidate needs a positive integer tile_size; "
                             f"got {self.tile_size!r}")
        _check_bits(self.bits)

    @classmethod
    def parse(cls, name: str, bits: Optional[int] = None) -> "Candidate":
        """A candidate from its name, 'normal' or 'F<m>' (``'F4'``), or a table key ``'F4/int8'``.

        Args:
          name: 'normal', 'F2', 'F4', 'F6' (any m), optionally with '/int<bits>'.
          bits: The bit-width when `name` has none (None: FP32).

        Raises:
          ValueError: On an unknown name, or bits given twice.
        """
        match = _CANDIDATE_KEY.match(str(name))
        if not match:
            raise ValueError(f"unknown candidate {name!r}: use normal or F<m> (F2, F4, F6), "
                             "optionally followed by /int<bits>")
        if match.group(3) is not None:
            if bits is not None:
                raise ValueError(f"candidate {name!r} already names its bit-width")
            bits = int(match.group(3))
        if match.group(2) is None:
            return cls(NORMAL, None, bits)
        return cls(WINOGRAD, int(match.group(2)), bits)

    @classmethod
    def from_choice(cls, choice: Mapping) -> "Candidate":
        """A candidate from an architecture entry ``{"conv", "tile_size", "bits"}``.

        'static' and 'flex' are both Winograd: they cost the same at inference.
        """
        if not isinstance(choice, Mapping) or "conv" not in choice:
            raise ValueError('an architecture entry must be {"conv": "normal"|"static"|"flex", '
                             f'"tile_size": 2|4|6, "bits": null|2..16}}; got {choice!r}')
        conv = choice["conv"]
        if conv not in CONV_MODES:
            raise ValueError(f"conv must be one of {', '.join(CONV_MODES)}; got {conv!r}")
        bits = choice.get("bits")
        if conv == "normal":
            return cls(NORMAL, None, bits)
        return cls(WINOGRAD, choice.get("tile_size"), bits)

    @property
    def name(self) -> str:
        """'normal' or 'F<m>'."""
        return NORMAL if self.algorithm == NORMAL else f"F{self.tile_size}"

    @property
    def key(self) -> str:
        """The table key: the name, then '/int<bits>' unless FP32 (``'F4'``, ``'F4/int8'``)."""
        return self.name if self.bits is None else f"{self.name}/int{self.bits}"

    def with_bits(self, bits: Optional[int]) -> "Candidate":
        """The same algorithm at another bit-width."""
        return dataclasses.replace(self, bits=bits)


def candidates(names: Sequence[str] = CANDIDATE_NAMES,
               bits: Sequence[Optional[int]] = (None,)) -> List[Candidate]:
    """Every candidate of `names` ('normal', 'F2'...) at every bit-width of `bits`."""
    return [Candidate.parse(n, b) for n in names for b in bits]


def tile_fits(layer: LayerSpec, tile_size: int) -> bool:
    """Whether F(m x m) has at least one whole output tile: ``H >= m`` and ``W >= m``.

    Equivalently, the 'same'-padded input ``H + r - 1`` holds one ``t x t`` input
    tile.  F6 on a 4x4 map would compute a 6x6 tile for 16 outputs; F4 on it
    computes exactly one tile.  A layer of a model (with ``tile_sizes``) offers
    what the model offers there.
    """
    if layer.tile_sizes is not None:
        return tile_size in layer.tile_sizes
    return layer.height >= tile_size and layer.width >= tile_size


def is_allowed(layer: LayerSpec, candidate: Candidate) -> bool:
    """Whether `candidate` is offered for `layer` (see :func:`tile_fits`)."""
    return candidate.algorithm == NORMAL or tile_fits(layer, candidate.tile_size)


def allowed_candidates(layer: LayerSpec, names: Sequence[str] = CANDIDATE_NAMES,
                       bits: Sequence[Optional[int]] = (None,)) -> List[Candidate]:
    """The candidates of `names` x `bits` offered for `layer`, in that order."""
    return [c for c in candidates(names, bits) if is_allowed(layer, c)]


# ----------------------------------------------------------------------------
# Analytic counts


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
    _check_bits(bits)
    return FP32_BYTES if bits is None else bits / 8


def op_scale(bits: Optional[int]) -> float:
    """Cost of one operation relative to FP32: 1 for None, ``bits / 32`` for integers."""
    return bytes_per_element(bits) / FP32_BYTES


class CostModel:
    """What a layer costs at inference; subclasses implement :meth:`cost`.

    Attributes:
      unit: The unit of the costs, for reports.
      description: One line saying where the costs come from.
    """
    unit = ""
    description = ""

    def cost(self, layer: LayerSpec, candidate: Candidate) -> float:
        """The inference cost of `layer` computed as `candidate`.

        Raises:
          ValueError: If the model cannot cost this pair (a table lacks it,
            or the candidate is not offered for the layer).
        """
        raise NotImplementedError


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


def _table_error(path, message):
    return ValueError(f"latency table {path}: {message}")


def _positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value > 0


def validate_table(table: Mapping, path: str = "<table>") -> None:
    """Checks a latency table's structure; raises ValueError naming the first problem.

    See :class:`TableCost` for the format.
    """
    if not isinstance(table, Mapping):
        raise _table_error(path, "must be a JSON object")
    if table.get("format") != TABLE_FORMAT:
        raise _table_error(path, f'"format" must be "{TABLE_FORMAT}"; got {table.get("format")!r}')
    if table.get("version") != TABLE_VERSION:
        raise _table_error(path, f'"version" must be {TABLE_VERSION}; got {table.get("version")!r}')
    metadata = table.get("metadata")
    if not isinstance(metadata, Mapping):
        raise _table_error(path, '"metadata" must be an object')
    if not isinstance(metadata.get("device"), str) or not metadata["device"].strip():
        raise _table_error(path, '"metadata.device" must be a non-empty string naming the device')
    for key in ("date", "wa_tf_version"):
        if key in metadata and not isinstance(metadata[key], str):
            raise _table_error(path, f'"metadata.{key}" must be a string')
    if metadata.get("derive_bits", "none") not in ("none", "analytic"):
        raise _table_error(path, '"metadata.derive_bits" must be "none" or "analytic"; '
                           f'got {metadata["derive_bits"]!r}')
    latency = table.get("latency_ms")
    if not isinstance(latency, Mapping) or not latency:
        raise _table_error(path, '"latency_ms" must be a non-empty object keyed by batch size')
    for batch, layers in latency.items():
        if not re.fullmatch(r"[1-9]\d*", str(batch)):
            raise _table_error(path, f'"latency_ms" keys must be batch sizes ("1", "8"); '
                               f"got {batch!r}")
        if not isinstance(layers, Mapping) or not layers:
            raise _table_error(path, f'"latency_ms.{batch}" must be a non-empty object of layers')
        for layer, entries in layers.items():
            where = f"latency_ms.{batch}.{layer}"
            if not isinstance(entries, Mapping) or not entries:
                raise _table_error(path, f'"{where}" must be a non-empty object of candidates')
            for key, value in entries.items():
                try:
                    Candidate.parse(key)
                except ValueError as e:
                    raise _table_error(path, f'"{where}": {e}') from None
                if not _positive_number(value):
                    raise _table_error(path, f'"{where}.{key}" must be a positive number of '
                                       f"milliseconds; got {value!r}")
    batch_sizes = metadata.get("batch_sizes")
    if batch_sizes is not None and sorted(str(b) for b in batch_sizes) != sorted(latency):
        raise _table_error(path, f'"metadata.batch_sizes" {batch_sizes} does not match the '
                           f'batch sizes of "latency_ms" ({", ".join(latency)})')


def load_table(path: str) -> Dict:
    """Reads and validates a latency table (:class:`TableCost`'s format)."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"latency table {path} does not exist (bin/latency_table.py "
                         "writes one)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _table_error(path, f"cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise _table_error(path, f"is not valid JSON: {e}") from None
    validate_table(table, path)
    return table


def write_table(table: Mapping, path: str) -> None:
    """Validates `table` and writes it as indented JSON to `path`."""
    validate_table(table, path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
        f.write("\n")


class TableCost(CostModel):
    """Costs looked up in a JSON table of measured milliseconds.

    The format (``bin/latency_table.py`` writes it; a user may write one for
    a device and kernels of their own)::

        {
          "format": "wa_tf.latency_table",
          "version": 1,
          "metadata": {
            "device": "Pixel 7, Arm NN kernels",        # required
            "date": "2026-11-29T19:50:00+00:00",        # optional, ISO 8601
            "wa_tf_version": "0.1.0",                   # optional
            "batch_sizes": [1, 8],                      # optional; must match latency_ms
            "derive_bits": "analytic"                   # optional, default "none"
          },
          "latency_ms": {                               # batch size -> layer -> candidate
            "1": {
              "layer1.0.conv1": {"normal": 0.41, "F2": 0.35, "F4": 0.30, "F6": 0.33,
                                 "F4/int8": 0.12},
              "16x16x64-64-3x3": {"normal": 0.20, "F4": 0.11}
            }
          }
        }

    Layers are keyed by their model name or by :attr:`LayerSpec.shape_key`
    (``HxWxC_in-C_out-rxr``; the name is looked up first).  Candidates are keyed
    by :attr:`Candidate.key`: ``normal``, ``F<m>`` for FP32, with ``/int<bits>``
    for an integer bit-width.  A value is the latency of one call on a batch
    of that size, in milliseconds.  With ``"derive_bits": "analytic"`` (tables
    measured in FP32 only), a missing integer entry is the FP32 entry times
    the analytic ratio ``AnalyticCost(bits) / AnalyticCost(FP32)``; otherwise a
    missing entry is an error that names it and the file.

    Args:
      path: The JSON file (with `table`: only named in messages).
      batch_size: Which batch size's latencies to use.
      table: The table's contents, already read: `path` is not opened.

    Raises:
      ValueError: One line naming the file and what is wrong with it, or a
        batch size it lacks.
    """
    unit = "ms"

    def __init__(self, path: str, batch_size: int = 1, table: Optional[Mapping] = None):
        self.path = str(path)
        if table is None:
            self.table = load_table(self.path)
        else:
            validate_table(table, self.path)
            self.table = table
        metadata = self.table["metadata"]
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        batches = self.table["latency_ms"]
        if str(batch_size) not in batches:
            raise _table_error(self.path, f"has no latencies at batch size {batch_size} "
                               f"(it has {', '.join(sorted(batches, key=int))})")
        self.batch_size = batch_size
        self.metadata = metadata
        self._entries = batches[str(batch_size)]
        self._derive = metadata.get("derive_bits", "none") == "analytic"
        self._analytic = AnalyticCost(batch_size=batch_size)
        self.description = (f"measured: {self.path} ({metadata['device']}, batch {batch_size}"
                            + (f", {metadata['date']}" if "date" in metadata else "") + ")")

    def _lookup(self, layer, key):
        for layer_key in (layer.name, layer.shape_key):
            if layer_key is not None and key in self._entries.get(layer_key, {}):
                return self._entries[layer_key][key]
        return None

    def cost(self, layer: LayerSpec, candidate: Candidate) -> float:
        value = self._lookup(layer, candidate.key)
        if value is not None:
            return float(value)
        if self._derive and candidate.bits is not None:
            fp32 = candidate.with_bits(None)
            base = self._lookup(layer, fp32.key)
            if base is not None:
                ratio = self._analytic.cost(layer, candidate) / self._analytic.cost(layer, fp32)
                return float(base) * ratio
        raise _table_error(self.path, f"no entry for layer {layer.describe()}, candidate "
                           f"{candidate.key!r}, batch size {self.batch_size}: measure it, or "
                           "leave the candidate out of the search")


def get_cost_model(source: str = "analytic", table: Optional[str] = None,
                   batch_size: int = 1) -> CostModel:
    """The cost model named by `source`, as the ``--cost_model`` flag takes it.

    Args:
      source: 'analytic'; 'measured' (the table ``bin/latency_table.py``
        wrote: `table`, default ``latency_table.json``); or the path of a
        JSON table in :class:`TableCost`'s format.
      table: The table 'measured' reads.
      batch_size: The batch size: of a table's latencies, or the analytic
        model's (the weights are read once per batch).

    Raises:
      ValueError: On an unknown source, or a table that is missing or invalid.
    """
    if source == "analytic":
        return AnalyticCost(batch_size=batch_size)
    if source == "measured":
        path = table or DEFAULT_TABLE
        if not os.path.exists(path):
            raise ValueError(f"cost model 'measured' reads the table of bin/latency_table.py; "
                             f"{path} does not exist (run bin/latency_table.py "
                             f"--output={path} first)")
        return TableCost(path, batch_size)
    if isinstance(source, str) and (source.endswith(".json") or os.path.isfile(source)):
        return TableCost(source, batch_size)
    raise ValueError(f"cost model must be analytic, measured or the path of a .json latency "
                     f"table; got {source!r}")


# ----------------------------------------------------------------------------
# The model's search space


def searchable_layers(width_multiplier: float = 0.5,
                      input_shape: Sequence[int] = (32, 32, 3)) -> List[LayerSpec]:
    """The searchable 3x3 convolutions of ``resnet18_like``, in model order.

    The 3x3 convolutions of the residual blocks (``layer<s>.<b>.conv1/2``) as
    :func:`wa_tf.models.searchable_layers` describes them: not the stem
    (``conv1``), the 1x1 shortcuts or the classifier.

    Args:
      width_multiplier: The model's width multiplier (``--mult``).
      input_shape: The model's input (height, width, channels).

    Returns:
      One :class:`LayerSpec` per layer, named, with its input shape.
    """
    from wa_tf import models  # pylint: disable=import-outside-toplevel
    return [LayerSpec(*layer.input_shape, layer.filters, 3, name=layer.name,
                      tile_sizes=tuple(layer.tile_sizes))
            for layer in models.searchable_layers(width_multiplier, tuple(input_shape))]


def uniform_architecture(layers: Sequence[LayerSpec], conv: str = "normal",
                         tile_size: int = 4, bits: Optional[int] = None) -> Dict[str, Dict]:
    """Every layer of `layers` with the same choice, as an architecture dict.

    Where `tile_size` does not fit a layer (:func:`tile_fits`), the largest
    tile size of 2, 4, 6 that fits and is no larger is used (F6 -> F4 on the
    last stage, as the uniform model does).
    """
    if conv not in CONV_MODES:
        raise ValueError(f"conv must be one of {', '.join(CONV_MODES)}; got {conv!r}")
    _check_bits(bits)
    architecture = {}
    for layer in layers:
        m = tile_size
        if conv != "normal":
            fitting = [s for s in (2, 4, 6) if s <= tile_size and tile_fits(layer, s)]
            if not fitting:
                raise ValueError(f"no Winograd tile size up to {tile_size} fits "
                                 f"{layer.describe()}")
            m = fitting[-1]
        architecture[layer.name] = {"conv": conv, "tile_size": m, "bits": bits}
    return architecture


def _read_architecture(architecture):
    from wa_tf.architecture import load_architecture  # pylint: disable=import-outside-toplevel
    return load_architecture(architecture).to_dict()


def layer_costs(architecture: Union[Mapping, str], layers: Sequence[LayerSpec],
                cost_model: Optional[CostModel] = None) -> Dict[str, float]:
    """Each layer's cost under `architecture` (a dict or the path of its JSON file).

    Args:
      architecture: ``{layer name: {"conv", "tile_size", "bits"}}`` covering
        exactly the names of `layers`.
      layers: The searchable layers (:func:`searchable_layers`).
      cost_model: Default :class:`AnalyticCost`.

    Raises:
      ValueError: On a missing or unknown layer name, a bad entry, a candidate
        not offered for its layer, or a cost the model lacks.
    """
    architecture = _read_architecture(architecture)
    cost_model = cost_model or AnalyticCost()
    names = [layer.name for layer in layers]
    missing = [n for n in names if n not in architecture]
    unknown = [n for n in architecture if n not in names]
    if missing or unknown:
        raise ValueError("the architecture must name every searchable layer once: "
                         + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                     + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    costs = {}
    for layer in layers:
        try:
            candidate = Candidate.from_choice(architecture[layer.name])
        except ValueError as e:
            raise ValueError(f"architecture entry {layer.name}: {e}") from None
        if not is_allowed(layer, candidate):
            raise ValueError(f"architecture entry {layer.name}: {candidate.name} does not fit "
                             f"its {layer.height}x{layer.width} input")
        costs[layer.name] = cost_model.cost(layer, candidate)
    return costs


def model_cost(architecture: Union[Mapping, str], layers: Sequence[LayerSpec],
               cost_model: Optional[CostModel] = None) -> float:
    """The total cost of the searchable layers under `architecture` (:func:`layer_costs`)."""
    return sum(layer_costs(architecture, layers, cost_model).values())
