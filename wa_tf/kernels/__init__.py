"""Fused CPU kernels for the Winograd pipeline's memory-bound stages, with a pure-TF fallback.

TensorFlow runs the input transform (gather the overlapping tiles, then
``B_t d B_t^T``) and the output transform (``A_t M A_t^T``, then untile) as
several memory-bound passes.  The kernels do each in one pass over the tiles,
vectorized over channels: :func:`tile_transform` (``tile_transform.cc``) and its
adjoint :func:`tile_transform_adjoint` (``tile_adjoint.cc``), each the other's
gradient, plus the gradients with respect to the transform and, without V in
memory, to U (``tile_weight_grad.cc``; shared pieces in ``tile_common.h`` and
``tile_rows.h``; docs/kernels.md).  ``fake_quant.cc`` is
:func:`wa_tf.quantization.quantizers.fake_quant` in one pass instead of five
(:func:`fake_quant`), with the same results bit for bit.

The package is in three layers:

- :mod:`~wa_tf.kernels.library`: compiling the library for this CPU (or the
  target ``WA_TF_KERNELS_MARCH`` names) into a cache, with a timeout and a
  remembered failure;
- :mod:`~wa_tf.kernels.dispatch`: loading it, and whether the kernels run here
  (``WA_TF_KERNELS=0``, :func:`disabled`, GPUs, XLA, SavedModel writing);
- :mod:`~wa_tf.kernels.ops` and :mod:`~wa_tf.kernels.gradients`: the ops as
  Python functions, and their registered gradients.

Sums inside the kernels run in a fixed order for a given thread count, so two
runs with the same inputs give the same bits.
"""

from wa_tf.kernels import gradients  # noqa: F401  (registers the ops' gradients)
from wa_tf.kernels.dispatch import (
    available,
    build_error,
    disabled,
    load_if_built,
    saved_with_kernels,
    unavailable_reason,
    usable,
)
from wa_tf.kernels.library import build, cache_dir, failure_path, library_path, target
from wa_tf.kernels.ops import (
    fake_quant,
    from_codes,
    min_max,
    quantize,
    tile_transform,
    tile_transform_adjoint,
    tile_transform_adjoint_backprop,
    tile_transform_adjoint_codes,
    tile_transform_backprop,
    tile_transform_weight_grad,
)

MAX_TRANSFORM_SIZE = 16  # the kernels' largest transform (p, q): F(m, r) with m + r - 1 <= 16

__all__ = [
    "MAX_TRANSFORM_SIZE", "available", "build", "build_error", "cache_dir", "disabled",
    "failure_path", "fake_quant", "from_codes", "library_path", "load_if_built", "min_max",
    "quantize", "saved_with_kernels", "target", "tile_transform", "tile_transform_adjoint",
    "tile_transform_adjoint_backprop", "tile_transform_adjoint_codes",
    "tile_transform_backprop", "tile_transform_weight_grad", "unavailable_reason", "usable",
]
