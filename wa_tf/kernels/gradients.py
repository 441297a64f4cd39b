"""The registered gradients of the fused kernels' ops.

Imported by :mod:`wa_tf.kernels` for its side effect: TensorFlow looks
gradients up by op type, so they must be registered before any tape or
``tf.gradients`` meets these ops (the kernels' own gradient ops have none).
"""

import tensorflow as tf

from wa_tf.kernels.dispatch import ops
from wa_tf.kernels.ops import tile_transform_backprop


def _geometry_of(op):
    return {name: op.get_attr(name) for name in ("stride", "pad_top", "pad_left", "n_h", "n_w")}


def _wants_mat_grad(op):
    # Tapes say which inputs need no gradient (a static transform's): the
    # plain kernel then does, without the transform's gradient.
    return 1 not in (getattr(op, "skip_input_indices", None) or ())


@tf.RegisterGradient("WaTileTransform")
def _tile_transform_grad(op, dz):
    x, mat = op.inputs
    return tile_transform_backprop(dz, x, mat, **_geometry_of(op),
                                   mat_grad=_wants_mat_grad(op))


@tf.RegisterGradient("WaTileTransformAdjoint")
def _tile_transform_adjoint_grad(op, dx):
    z, mat = op.inputs
    geo = _geometry_of(op)
    if _wants_mat_grad(op):
        return ops().wa_tile_transform_adjoint_grad(dx, z, mat, **geo)
    return ops().wa_tile_transform(dx, mat, **geo), None


tf.no_gradient("WaTileTransformGrad")
tf.no_gradient("WaTileTransformWeightGrad")
tf.no_gradient("WaFakeQuant")
tf.no_gradient("WaFakeQuantCodes")
tf.no_gradient("WaMinMax")
tf.no_gradient("WaFromCodes")
tf.no_gradient("WaTileTransformAdjointGrad")
tf.no_gradient("WaTileTransformAdjointGradCodes")
tf.no_gradient("WaTileTransformAdjointCodes")
tf.no_gradient("WaQuantize")
