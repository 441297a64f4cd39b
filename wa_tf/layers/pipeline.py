"""The Winograd pipeline as functions: tiles, transforms, U, the element-wise stage, untiling.

A stride-1 convolution (cross-correlation, as ``tf.nn.conv2d``) through
F(m x m, r x r)::

    Y = A_t [(G g G^T) * (B_t d B_t^T)] A_t^T

Layout, chosen for speed on CPUs and GPUs: the t x t Winograd positions are the
*leading* axis of every Winograd-domain tensor (row-major, position a*t + b),
so each transform is two small GEMMs (:func:`apply_transform`) and the
element-wise stage is ``t^2`` batched GEMMs ``[N*tiles, C_in] x [C_in, C_out]``:

    x (N, H, W, C) --tiles--> D (t^2, N*P*C) --B_t . B_t^T--> V (t^2, N*P, C)
    g (r, r, C, K) --kron(G, G) @ g--> U (t^2, C, K)
    M = V @ U (t^2, N*P, K) --A_t . A_t^T--> (m^2, N*P*K) --untile--> y

On CPUs the tile stages run as :mod:`wa_tf.kernels`' fused kernels: tiles and
``B_t d B_t^T`` in one pass, ``A_t M A_t^T`` and untiling in one pass, each the
other's gradient.  Otherwise (XLA, GPUs, other dtypes, no compiler) they are
TensorFlow ops: the tiles are gathered in one pass (a gather of C-channel rows
whose gradient is a gather too, not TensorFlow's scatter-add), each transform
is two GEMMs, and the output is untiled by one transpose.

:func:`winograd_conv` is the pipeline, with a hook on each Winograd-domain stage
(:func:`winograd_conv_transformed` the same from a precomputed U, as an
exported model runs it).
"""

from typing import Callable, Optional

import tensorflow as tf

from wa_tf import kernels
from wa_tf.transforms import is_int, tile_geometry

kernels.load_if_built()


def lazy_quantizers():
    """:mod:`wa_tf.quantization.quantizers`, imported on first use: it imports TF-MOT
    (seconds), which float layers never need."""
    from wa_tf.quantization import quantizers  # pylint: disable=import-outside-toplevel
    return quantizers


def use_fused_kernels(x, t):
    """Whether the tile stages of `x`'s pipeline (tile size t) run as :mod:`wa_tf.kernels`.

    They need the spatial size at trace time (it sets the kernels' attributes).
    """
    return (is_int(x.shape[1]) and is_int(x.shape[2]) and t <= kernels.MAX_TRANSFORM_SIZE
            and kernels.usable(x.dtype))


def input_tile_geometry(x, m, r, padding):
    """(stride, pad_top, pad_left, n_h, n_w): the input tiles of `x` as the kernels take them."""
    geo = tile_geometry(x.shape[1], x.shape[2], m, r, padding)
    return m, geo.pad_top, geo.pad_left, geo.n_h, geo.n_w


def static_dim(x, axis):
    """Static size of `axis` when known, else a scalar tensor."""
    size = x.shape[axis]
    return size if size is not None else tf.shape(x)[axis]


def apply_transform(mat, x):
    """Applies the 2-D transform ``Z = mat X mat^T`` to tiles stored column-major.

    ``x`` has shape (q*q, X) with ``x[j*q + i] = X[i, j]`` (positions leading,
    the tile's column index first); the result has shape (p*p, X) with
    ``out[a*p + b] = Z[a, b]`` (row-major) for ``mat`` of shape (p, q).

    Two GEMMs with ``mat`` on the left and one transpose in between: the
    first contracts the leading index j, the transpose brings i to the front
    for the second.  Against one GEMM with ``kron(mat, mat)`` this has a third
    of the FLOPs at t = 6, and the gradient with respect to ``mat`` is a
    plain GEMM rather than a (q*q x X) x (X x p*p) reduction, which matters
    for trainable transforms (bench/layer_bench.py).  Batched matmuls with a
    broadcast ``mat`` were slower still.
    """
    p, q = mat.shape
    y = tf.matmul(mat, tf.reshape(x, [q, -1]))  # (b, i, X): contracts j
    y = tf.transpose(tf.reshape(y, [p, q, -1]), [1, 0, 2])  # (i, b, X)
    y = tf.matmul(mat, tf.reshape(y, [q, -1]))  # (a, b, X): contracts i
    return tf.reshape(y, [p * p, -1])


def _gather_rows(params, indices, inverse):
    """``params[indices]`` (rows, R for a zero row) with a gradient that is a gather too.

    TensorFlow's gradient of a gather is a scatter-add (``unsorted_segment_sum``),
    several times slower on CPUs than a gather.  Here row p of the gradient is
    ``sum_s dz[inverse[s, p]]``, where ``inverse`` lists, for each row of
    ``params``, the (at most ``inverse.shape[0]``) output rows it was copied to.

    Args:
      params: (R, X) tensor.
      indices: (Z,) int32 rows of ``params`` to gather, R for a row of zeros.
      inverse: (S, R) int32 rows of the result, Z for none.

    Returns:
      (Z, X) tensor.
    """
    @tf.custom_gradient
    def gather(params):
        source = tf.concat([params, tf.zeros_like(params[:1])], 0)

        def grad(dz):
            parts = tf.gather(tf.concat([dz, tf.zeros_like(dz[:1])], 0), inverse)
            return tf.reduce_sum(parts, 0) if inverse.shape[0] != 1 else parts[0]
        return tf.gather(source, indices), grad
    return gather(params)


def _tile_indices(n, height, width, m, r, padding):
    """Row indices of :func:`extract_tiles`' gather and of its gradient.

    Returns:
      (indices, inverse, geometry): ``indices`` (t*t * N*n_h*n_w,) rows of the
      input flattened to (N*H*W, C), N*H*W for padding, in the order of the
      tiles (position j*t + i, then n, tile row, tile column); ``inverse``
      ((extra+1)^2, N*H*W) the tiles' rows that each input pixel was copied to.
    """
    t = m + r - 1
    geo = tile_geometry(height, width, m, r, padding)
    _, _, n_h, n_w, pad_top, pad_left, extra = geo
    tiles = n_h * n_w
    pixels = n * height * width
    # Input row of row i of tile row th (i, th), input column of column j of tile column tw (j, tw).
    rows = tf.range(t)[:, None] + tf.range(n_h)[None, :] * m - pad_top
    cols = tf.range(t)[:, None] + tf.range(n_w)[None, :] * m - pad_left
    inside = (((cols >= 0) & (cols < width))[:, None, None, :]
              & ((rows >= 0) & (rows < height))[None, :, :, None])  # (j, i, th, tw)
    spatial = cols[:, None, None, :] + rows[None, :, :, None] * width
    spatial = tf.reshape(tf.where(inside, spatial, -1), [t * t, 1, tiles])
    indices = tf.where(spatial >= 0, spatial + tf.range(n)[None, :, None] * (height * width),
                       pixels)
    # Pixel (y, x) lies in tiles th = (y + pad_top) // m - s, s = 0..extra (and so for x).
    shift = tf.range(extra + 1)[:, None]
    y, x = tf.range(height)[None, :] + pad_top, tf.range(width)[None, :] + pad_left
    th, tw = y // m - shift, x // m - shift  # (s, H), (s, W)
    i, j = y - th * m, x - tw * m
    ok_h = (th >= 0) & (th < n_h) & (i < t)
    ok_w = (tw >= 0) & (tw < n_w) & (j < t)
    position = j[None, :, None, :] * t + i[:, None, :, None]  # (s_h, s_w, H, W)
    tile = th[:, None, :, None] * n_w + tw[None, :, None, :]
    inverse = (position[:, :, None] * (n * tiles) + tile[:, :, None]
               + tf.range(n)[None, None, :, None, None] * tiles)  # (s_h, s_w, N, H, W)
    inside = (ok_h[:, None, :, None] & ok_w[None, :, None, :])[:, :, None]
    inverse = tf.where(inside, inverse, t * t * n * tiles)
    return tf.reshape(indices, [-1]), tf.reshape(inverse, [(extra + 1) ** 2, -1]), geo


def extract_tiles(x, m, r, padding):
    """Gathers the overlapping t x t input tiles of a Winograd convolution.

    One gather of C-channel rows (padding reads a zero row) whose gradient is
    a gather too (:func:`_gather_rows`): a single pass over the tiles each way,
    where pads, splits and a 6-D transpose took several.

    Args:
      x: (N, H, W, C) input.
      m: Output tile size.
      r: Filter size.
      padding: 'same' or 'valid'.

    Returns:
      (D, geometry) with D of shape (t*t, N * n_h * n_w * C), position-major
      with the tile's column index first (``D[j*t + i]`` holds row i, column j,
      as :func:`apply_transform` expects), and geometry from :func:`tile_geometry`.
    """
    t = m + r - 1
    n, height, width, c = (static_dim(x, i) for i in range(4))
    indices, inverse, geo = _tile_indices(n, height, width, m, r, padding)
    tiles = _gather_rows(tf.reshape(x, [-1, c]), indices, inverse)
    return tf.reshape(tiles, [t * t, -1]), geo


def untile(y, m, n, n_h, n_w, k, out_h, out_w):
    """Assembles output tiles: (m*m, N*n_h*n_w*K) column-major -> (N, out_h, out_w, K).

    ``y[j*m + i]`` holds output row i, column j of every tile.
    """
    y = tf.reshape(y, [m, m, n, n_h, n_w, k])
    y = tf.transpose(y, [2, 3, 1, 4, 0, 5])
    y = tf.reshape(y, [n, n_h * m, n_w * m, k])
    if (isinstance(out_h, int) and isinstance(n_h, int) and out_h == n_h * m
            and isinstance(out_w, int) and isinstance(n_w, int) and out_w == n_w * m):
        return y
    # tf.slice, not y[...]: its gradient is a pad, a strided slice's is far slower.
    return tf.slice(y, [0, 0, 0, 0], [-1, out_h, out_w, -1])


def winograd_weights(kernel, g):
    """The Winograd-domain weights ``U = G g G^T`` of a kernel.

    Args:
      kernel: (r, r, C, K) kernel in Conv2D layout.
      g: (t, r) transform G.

    Returns:
      U of shape (t*t, C, K), position ``a*t + b`` leading.
    """
    r, _, c, k = kernel.shape
    t = g.shape[0]
    # One GEMM with kron(G, G), row a*t + b, column i*r + j: the kernel's
    # (r*r, C*K) view is free, where apply_transform's two GEMMs needed two
    # transposes of the whole kernel (and two more in the gradient).
    kron = tf.reshape(g[:, None, :, None] * g[None, :, None, :], [t * t, r * r])
    return tf.reshape(_kron_matmul(kron, tf.reshape(kernel, [r * r, c * k])), [t * t, c, k])


@tf.custom_gradient
def _kron_matmul(kron, kernel):
    """``kron @ kernel`` for (t*t, r*r) x (r*r, C*K), with a faster gradient for ``kron``.

    TensorFlow's gradient ``dU kernel^T`` reduces over the long C*K axis in a
    layout oneDNN handles poorly; ``(kernel dU^T)^T`` is the same product.
    At C*K = 65 536 on a 2-core CPU the kernel's and G's gradients together
    take about two thirds of the time (``bench/kernel_bench.py
    --layer=4x4x256``).  Only a flex layer's G needs it: a static layer's
    graph prunes it.
    """
    def grad(du):
        dkron = tf.transpose(tf.matmul(kernel, du, transpose_b=True))
        return dkron, tf.matmul(kron, du, transpose_a=True)
    return tf.matmul(kron, kernel), grad


def kept(tensor, coded=None):
    """A function giving `tensor` back in a backward pass, for a custom gradient to keep.

    With ``coded = (codes, scale)`` (:func:`wa_tf.quantization.quantizers.fake_quant_codes`
    of a quantized tensor) only the integer codes are kept, int8 up to 8 bits:
    a quarter of float32, decoded to exactly the same values.
    """
    if coded is None:
        return lambda: tf.identity(tensor)
    from_codes = lazy_quantizers().from_codes
    codes, scale = coded
    return lambda: from_codes(codes, scale)


def _no_quantization(stage, tensor):
    del stage
    return tensor


def winograd_conv(x, kernel, a_t, b_t, g, tile_size: int, padding: str = "same",
                  quantize: Optional[Callable[[str, tf.Tensor], tf.Tensor]] = None):
    """A stride-1 convolution through the Winograd pipeline F(m x m, r x r).

    ``y = A_t [(G g G^T) * (B_t d B_t^T)] A_t^T`` over the t x t tiles ``d`` of
    ``x``, in the layout of the module docstring; with exact transforms it
    equals ``tf.nn.conv2d(x, kernel, 1, padding.upper())``.

    Args:
      x: (N, H, W, C) input.
      kernel: (r, r, C, K) kernel in Conv2D layout.
      a_t, b_t, g: The transforms A_t (m, t), B_t (t, t) and G (t, r).
      tile_size: Output tile size m.
      padding: 'same' or 'valid'.
      quantize: Optional hook ``quantize(stage, tensor) -> tensor`` applied to
        each Winograd-domain tensor of :data:`STAGES` as it is computed: U
        (t*t, C, K), V (t*t, N*P, C) and the element-wise stage M (t*t, N*P, K),
        P tiles per image.  :class:`WinogradConv2D` fake-quantizes them here.

    Returns:
      (N, H', W', K) output.
    """
    quantize = quantize or _no_quantization
    # Weights to the Winograd domain: U = G g G^T, (t*t, C, K).
    u = quantize("weights_winograd", winograd_weights(kernel, g))
    return winograd_conv_transformed(x, u, a_t, b_t, tile_size, padding, quantize)


def winograd_conv_transformed(x, u, a_t, b_t, tile_size: int, padding: str = "same",
                              quantize: Optional[Callable[[str, tf.Tensor], tf.Tensor]] = None):
    """:func:`winograd_conv` from Winograd-domain weights ``U`` computed beforehand.

    The inference pipeline once ``U = G g G^T`` is known (as in an exported
    model, :func:`wa_tf.deploy.export.export_saved_model`): input transform, the
    element-wise stage and the output transform only.

    Args:
      x: (N, H, W, C) input.
      u: (t*t, C, K) Winograd-domain weights (:func:`winograd_weights`),
        already quantized where the pipeline quantizes them.
      a_t, b_t: The transforms A_t (m, t) and B_t (t, t).
      tile_size: Output tile size m.
      padding: 'same' or 'valid'.
      quantize: Optional stage hook as in :func:`winograd_conv`; called for
        ``input_winograd`` and ``hadamard`` only.

    Returns:
      (N, H', W', K) output.
    """
    quantize = quantize or _no_quantization
    # Input to the Winograd domain: V = B_t d B_t^T, (t*t, N*P, C).
    v = winograd_input(x, b_t, tile_size, padding, quantize)
    # Element-wise stage, summed over input channels: t*t GEMMs.
    mm = quantize("hadamard", tf.matmul(v, u))
    return winograd_output(mm, a_t, x, tile_size, padding)


def winograd_input(x, b_t, tile_size: int, padding: str = "same",
                   quantize: Optional[Callable[[str, tf.Tensor], tf.Tensor]] = None):
    """The input in the Winograd domain, ``V = B_t d B_t^T`` over the tiles ``d`` of ``x``.

    Args:
      x: (N, H, W, C) input.
      b_t: The transform B_t (t, t).
      tile_size: Output tile size m.
      padding: 'same' or 'valid'.
      quantize: Optional stage hook as in :func:`winograd_conv` (``input_winograd``).

    Returns:
      V, (t*t, N*P, C), P tiles per image.
    """
    quantize = quantize or _no_quantization
    m, t = tile_size, b_t.shape[0]
    if use_fused_kernels(x, t):
        v = kernels.tile_transform(x, b_t, *input_tile_geometry(x, m, t - m + 1, padding))
        return quantize("input_winograd", v)
    d, _ = extract_tiles(x, m, t - m + 1, padding)
    v = apply_transform(b_t, d)
    return quantize("input_winograd", tf.reshape(v, [t * t, -1, static_dim(x, 3)]))


def winograd_output(mm, a_t, x, tile_size: int, padding: str = "same"):
    """The output ``A_t M A_t^T`` of the element-wise stage ``M``, untiled.

    Args:
      mm: M, (t*t, N*P, K).
      a_t: The transform A_t (m, t).
      x: The (N, H, W, C) input of the convolution (its shape is used).
      tile_size: Output tile size m.
      padding: 'same' or 'valid'.

    Returns:
      (N, H', W', K) output.
    """
    m, t = tile_size, a_t.shape[1]
    n, k = static_dim(x, 0), mm.shape[-1]
    geo = tile_geometry(static_dim(x, 1), static_dim(x, 2), m, t - m + 1, padding)
    if use_fused_kernels(x, t):
        # Y = P^T M P per tile with P = A_t^T, written into the output.
        return kernels.tile_transform_adjoint(mm, tf.transpose(a_t), m, 0, 0, geo.n_h,
                                              geo.n_w, geo.out_h, geo.out_w)
    # Output transform Y = A_t M A_t^T, then untile and crop.
    # M is row-major, read as column-major: the output tiles come out
    # transposed, (j, i), which untile undoes for free in its transpose.
    y = apply_transform(a_t, tf.reshape(mm, [t * t, -1]))
    return untile(y, m, n, geo.n_h, geo.n_w, k, geo.out_h, geo.out_w)
