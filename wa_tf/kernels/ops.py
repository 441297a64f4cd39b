"""The fused kernels as Python functions; the ops themselves check their arguments.

Every function here calls its op in the library :mod:`wa_tf.kernels.dispatch`
loads, and raises RuntimeError (saying why) where that library is unavailable;
callers that may run without it check :func:`wa_tf.kernels.usable` first.
"""

import tensorflow as tf

from wa_tf.kernels.dispatch import ops, plain


@plain
def fake_quant(x, scale, qmin, qmax, codes_dtype=None):
    """``clip(round(x / scale), qmin, qmax) * scale`` in one pass, as TensorFlow computes it.

    Args:
      x: Float tensor.
      scale: Its step: one value, or one per index of `x`'s first axis (any
        shape with that many elements).
      qmin, qmax: The code limits.
      codes_dtype: None, or tf.int8 / tf.int16 to also return the codes.

    Returns:
      The fake-quantized tensor, or (it, codes) with `codes_dtype`.  No gradient
      is defined: :mod:`wa_tf.quantization.quantizers` gives it its straight-through one.
    """
    scale = tf.reshape(scale, [-1])
    if codes_dtype is None:
        return ops().wa_fake_quant(x, scale, qmin=float(qmin), qmax=float(qmax))
    return ops().wa_fake_quant_codes(x, scale, qmin=float(qmin), qmax=float(qmax),
                                          Tcodes=codes_dtype)


@plain
def quantize(x, scale, qmin, qmax, codes_dtype):
    """The codes of :func:`fake_quant` (``clip(round(x / scale), qmin, qmax)``) alone.

    Args:
      x: Float tensor.
      scale: Its step: one value, or one per index of `x`'s first axis.
      qmin, qmax: The code limits.
      codes_dtype: tf.int8 or tf.int16.

    Returns:
      The codes, of `x`'s shape (NaN codes as 0).  No gradient.
    """
    return ops().wa_quantize(x, tf.reshape(scale, [-1]), qmin=float(qmin), qmax=float(qmax),
                              Tcodes=codes_dtype)


@plain
def from_codes(codes, scale):
    """``cast(codes) * scale`` in one pass (the values :func:`fake_quant` coded).

    Args:
      codes: int8 or int16 tensor.
      scale: float32/float64 step: one value, or one per index of the codes' first
        axis (any shape with that many elements).

    Returns:
      A tensor of the codes' shape and the scale's dtype.  No gradient.
    """
    return ops().wa_from_codes(codes, tf.reshape(scale, [-1]))


@plain
def min_max(x, per_axis=False):
    """``(reduce_min(x), reduce_max(x))`` in one pass, as TensorFlow computes them.

    Args:
      x: Float tensor.
      per_axis: One (min, max) per index of `x`'s first axis rather than one in all.

    Returns:
      (min, max), scalars or vectors of `x`'s first dimension; NaN both where
      a NaN was reduced, (+inf, -inf) for an empty reduction.  No gradient.
    """
    return ops().wa_min_max(x, per_axis=bool(per_axis))


def _geometry(stride, pad_top, pad_left, n_h, n_w):
    return {"stride": int(stride), "pad_top": int(pad_top), "pad_left": int(pad_left),
            "n_h": int(n_h), "n_w": int(n_w)}


@plain
def tile_transform(x, mat, stride, pad_top, pad_left, n_h, n_w):
    """``P X P^T`` for every q x q tile ``X`` of `x` at `stride`, in the Winograd layout.

    Args:
      x: (N, H, W, C) tensor.
      mat: (p, q) transform P.
      stride: Distance between tile origins.
      pad_top, pad_left: Tile (th, tw) starts at row ``th*stride - pad_top``,
        column ``tw*stride - pad_left``; pixels outside `x` read 0.
      n_h, n_w: Tiles per column and per row.

    Returns:
      (p*p, N*n_h*n_w, C) tensor, ``z[a*p + b, (n*n_h + th)*n_w + tw, c] = (P X P^T)[a, b]``.
    """
    return ops().wa_tile_transform(x, mat, **_geometry(stride, pad_top, pad_left, n_h, n_w))


@plain
def tile_transform_adjoint(z, mat, stride, pad_top, pad_left, n_h, n_w, height, width):
    """The adjoint of :func:`tile_transform`: ``P^T Z P`` per tile, added into an image.

    Args:
      z: (p*p, N*n_h*n_w, C) tensor in the layout :func:`tile_transform` returns.
      mat: (p, q) transform P.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.
      height, width: Size of the result; tile pixels outside it are dropped.

    Returns:
      (N, height, width, C) tensor.
    """
    return ops().wa_tile_transform_adjoint(
        z, mat, height=int(height), width=int(width),
        **_geometry(stride, pad_top, pad_left, n_h, n_w))


@plain
def tile_transform_adjoint_codes(codes, scale, mat, stride, pad_top, pad_left, n_h, n_w,
                                 height, width):
    """:func:`tile_transform_adjoint` of ``z = from_codes(codes, scale)``, decoded tile by tile.

    The same values as decoding first (:func:`from_codes`), without the decoded
    z in memory.

    Args:
      codes: int8 or int16 (p*p, N*n_h*n_w, C) codes of z.
      scale: Their step: one value, or one per position (p*p).
      mat: (p, q) transform P.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.
      height, width: Size of the result, as :func:`tile_transform_adjoint`.

    Returns:
      (N, height, width, C) tensor.  No gradient.
    """
    return ops().wa_tile_transform_adjoint_codes(
        codes, tf.reshape(scale, [-1]), mat, height=int(height), width=int(width),
        **_geometry(stride, pad_top, pad_left, n_h, n_w))


@plain
def tile_transform_weight_grad(x, mat, dm, stride, pad_top, pad_left, n_h, n_w, scale=None,
                               qmin=0.0, qmax=0.0):
    """``sum over tiles of V^T dM`` per position, V = :func:`tile_transform` of `x`, not kept.

    The gradient of ``V @ U`` (per position, ``tf.matmul``) with respect to U:
    ``tf.matmul(V, dm, transpose_a=True)``, without V in memory.  With `scale`,
    V is first fake-quantized as :func:`wa_tf.quantization.quantizers.fake_quant` does it
    (one value or one per position; `qmin`, `qmax` the code limits).

    Args:
      x: (N, H, W, C) tensor.
      mat: (p, q) transform P.
      dm: (p*p, N*n_h*n_w, K) gradient of ``V @ U``.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.
      scale: None, or the quantization step (1 or p*p values).
      qmin, qmax: The code limits (with `scale`).

    Returns:
      (p*p, C, K) tensor.
    """
    scale = tf.zeros([0], x.dtype) if scale is None else tf.reshape(scale, [-1])
    return ops().wa_tile_transform_weight_grad(
        x, mat, dm, scale, qmin=float(qmin), qmax=float(qmax),
        **_geometry(stride, pad_top, pad_left, n_h, n_w))


@plain
def tile_transform_backprop(dz, x, mat, stride, pad_top, pad_left, n_h, n_w, mat_grad=True):
    """The gradients of :func:`tile_transform` (x, mat) for the incoming gradient `dz`.

    Returns:
      (dx, dmat), dmat None unless `mat_grad`.
    """
    geo = dict(_geometry(stride, pad_top, pad_left, n_h, n_w), height=int(x.shape[1]),
               width=int(x.shape[2]))
    if mat_grad:
        return tuple(ops().wa_tile_transform_grad(dz, x, mat, **geo))
    return ops().wa_tile_transform_adjoint(dz, mat, **geo), None


@plain
def tile_transform_adjoint_backprop(dx, codes, scale, mat, stride, pad_top, pad_left, n_h,
                                    n_w):
    """The gradients of :func:`tile_transform_adjoint` (z, mat) with z kept as integer codes.

    Equals the registered gradient of :func:`tile_transform_adjoint` at
    ``z = from_codes(codes, scale)`` (:func:`from_codes`), but decodes z tile
    by tile inside the kernel: the decoded z is never in memory.

    Args:
      dx: (N, height, width, C) incoming gradient.
      codes: int8 or int16 (p*p, N*n_h*n_w, C) codes of z.
      scale: Their step: one value, or one per position (p*p).
      mat: (p, q) transform P.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.

    Returns:
      (dz, dmat): dz in z's layout, dmat of `mat`'s shape.
    """
    return tuple(ops().wa_tile_transform_adjoint_grad_codes(
        dx, codes, tf.reshape(scale, [-1]), mat, **_geometry(stride, pad_top, pad_left, n_h,
                                                              n_w)))
