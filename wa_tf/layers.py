"""WinogradConv2D: a Winograd-aware 2-D convolution layer for tf_keras.

The layer computes a stride-1 convolution (cross-correlation, as
``tf.nn.conv2d``) through the Winograd pipeline F(m x m, r x r)::

    Y = A_t [(G g G^T) * (B_t d B_t^T)] A_t^T

so that quantization error inside the pipeline can be trained around.  In
``flex`` mode the transforms ``A_t``, ``B_t`` and ``G`` are trainable.

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
is two GEMMs, and the output is untiled by one transpose.  For the backward
pass the layer keeps U and M and recomputes the tiles and V (and a flex
layer's output-transform intermediate), each several times the size of the
input.

:func:`winograd_conv` is the pipeline as a function, with a hook on each
Winograd-domain stage (:func:`winograd_conv_transformed` the same from a
precomputed U, as an exported model runs it); :class:`WinogradConv2D` is the layer that owns the
weights, transforms and stage quantizers and calls it.
"""

import contextlib
import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras

from wa_tf import kernels, transforms
from wa_tf.choices import check_bits
from wa_tf.transforms import STAGES, check_tile_size, is_int, tile_geometry

kernels.load_if_built()


def _quantizers():
    """:mod:`wa_tf.quantizers`, imported on first use: it imports TF-MOT (seconds), which
    float layers never need."""
    from wa_tf import quantizers  # pylint: disable=import-outside-toplevel
    return quantizers


def _fused(x, t):
    """Whether the tile stages of `x`'s pipeline (tile size t) run as :mod:`wa_tf.kernels`.

    They need the spatial size at trace time (it sets the kernels' attributes).
    """
    return (is_int(x.shape[1]) and is_int(x.shape[2]) and t <= kernels.MAX_TRANSFORM_SIZE
            and kernels.usable(x.dtype))


def _input_tiles(x, m, r, padding):
    """(stride, pad_top, pad_left, n_h, n_w): the input tiles of `x` as the kernels take them."""
    geo = tile_geometry(x.shape[1], x.shape[2], m, r, padding)
    return m, geo.pad_top, geo.pad_left, geo.n_h, geo.n_w


def _dim(x, axis):
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


def _as_pair(value, name):
    if is_int(value):
        return int(value), int(value)
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


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
    n, height, width, c = (_dim(x, i) for i in range(4))
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


def _kept(tensor, coded=None):
    """A function giving `tensor` back in a backward pass, for a custom gradient to keep.

    With ``coded = (codes, scale)`` (:func:`wa_tf.quantizers.fake_quant_codes`
    of a quantized tensor) only the integer codes are kept, int8 up to 8 bits:
    a quarter of float32, decoded to exactly the same values.
    """
    if coded is None:
        return lambda: tf.identity(tensor)
    from_codes = _quantizers().from_codes
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
    model, :func:`wa_tf.export.export_saved_model`): input transform, the
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
    if _fused(x, t):
        v = kernels.tile_transform(x, b_t, *_input_tiles(x, m, t - m + 1, padding))
        return quantize("input_winograd", v)
    d, _ = extract_tiles(x, m, t - m + 1, padding)
    v = apply_transform(b_t, d)
    return quantize("input_winograd", tf.reshape(v, [t * t, -1, _dim(x, 3)]))


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
    n, k = _dim(x, 0), mm.shape[-1]
    geo = tile_geometry(_dim(x, 1), _dim(x, 2), m, t - m + 1, padding)
    if _fused(x, t):
        # Y = P^T M P per tile with P = A_t^T, written into the output.
        return kernels.tile_transform_adjoint(mm, tf.transpose(a_t), m, 0, 0, geo.n_h,
                                              geo.n_w, geo.out_h, geo.out_w)
    # Output transform Y = A_t M A_t^T, then untile and crop.
    # M is row-major, read as column-major: the output tiles come out
    # transposed, (j, i), which untile undoes for free in its transpose.
    y = apply_transform(a_t, tf.reshape(mm, [t * t, -1]))
    return untile(y, m, n, geo.n_h, geo.n_w, k, geo.out_h, geo.out_w)


@dataclasses.dataclass(frozen=True)
class WinogradQuantization:
    """How a :class:`WinogradConv2D` fake-quantizes its Winograd domain.

    The layer quantizes the Winograd-domain weights and input, the
    element-wise stage (:data:`STAGES`, each with an
    :class:`~wa_tf.quantizers.EMAQuantizer`) and static transforms.  Its
    config form is the dict ``{'bits': b, 'per_tap': p, 'warmup': w}``.

    Attributes:
      bits: Bit-width, 2 to 16.
      per_tap: One range per Winograd position (t*t of them) for each stage.
      warmup: The stage quantizers take their range from the incoming batch
        until they have statistics, at inference too.
    """

    bits: int
    per_tap: bool = False
    warmup: bool = False

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits, "quantization bits"))
        object.__setattr__(self, "per_tap", bool(self.per_tap))
        object.__setattr__(self, "warmup", bool(self.warmup))

    @classmethod
    def get(cls, value) -> Optional["WinogradQuantization"]:
        """None, a WinogradQuantization, or its config dict, as a WinogradQuantization or None.

        Raises:
          ValueError: for anything else, or a dict without ``bits`` or with
            other keys.
        """
        if value is None or isinstance(value, cls):
            return value
        fields = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(value, Mapping) or "bits" not in value or set(value) - fields:
            raise ValueError("quantization must be None, a WinogradQuantization or a dict with "
                             f"'bits' and optional 'per_tap', 'warmup'; got {value!r}")
        return cls(**value)

    def get_config(self) -> dict:
        """The config (and SavedModel) form: ``{'bits', 'per_tap', 'warmup'}``."""
        return dataclasses.asdict(self)


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class WinogradConv2D(tf_keras.layers.Layer):
    """A Winograd-aware 2-D convolution, F(m x m, r x r), stride 1.

    The layer's ``kernel`` has the shape and layout of a
    ``tf_keras.layers.Conv2D`` kernel, ``(r, r, C_in, filters)``, so weights copy
    between the two by name and shape.  The transforms ``A_t`` (m, t), ``B_t``
    (t, t) and ``G`` (t, r) are variables initialised from
    :func:`wa_tf.transforms.winograd_matrices`, trainable iff ``flex``.

    Example:
      >>> inputs = tf_keras.Input((32, 32, 16))
      >>> y = WinogradConv2D(32, tile_size=4, flex=True)(inputs)

    Args:
      filters: Number of output channels.
      kernel_size: Odd filter size r (an int or a square pair).
      tile_size: Output tile size m of F(m x m, r x r).
      flex: Learn the transforms (True) or keep them static (False).
      padding: 'same' or 'valid', as ``Conv2D``.
      use_bias: Add a bias after the convolution.
      kernel_initializer: Initializer of ``kernel``.
      kernel_regularizer: Regularizer of ``kernel``.
      bias_initializer: Initializer of ``bias``.
      points: Interpolation points for the transforms (see
        :func:`wa_tf.transforms.winograd_matrices`); None for the defaults.
      recompute: Recompute the whole Winograd pipeline in the backward pass
        instead of keeping its intermediate tensors: less memory, more compute.
        Works with quantization (the recomputation reuses the step's ranges).
        Without it the backward pass still recomputes the cheap stages (the
        tiles and the input transform, and a flex layer's output-transform
        intermediate) and keeps U and the element-wise stage M.
      strides: Must be 1 (accepted for Conv2D compatibility).
      dilation_rate: Must be 1 (accepted for Conv2D compatibility).
      quantization: None, or a :class:`WinogradQuantization` (or its dict
        form ``{'bits': int, 'per_tap': bool, 'warmup': bool}``) to
        fake-quantize the Winograd-domain weights, the Winograd-domain input
        and the element-wise stage, and static (``flex=False``) transforms.  Set by
        :func:`wa_tf.quantization.quantize_model`; the input, the kernel, flex
        transforms and the output are quantized by its QuantizeConfig.
      **kwargs: Standard layer arguments (name, dtype, trainable).
    """

    def __init__(self, filters: int, kernel_size=3, tile_size: int = 4, flex: bool = True,
                 padding: str = "same", use_bias: bool = False,
                 kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 bias_initializer="zeros", points: Optional[Sequence[float]] = None,
                 recompute: bool = False, strides=1, dilation_rate=1,
                 quantization=None, **kwargs):
        super().__init__(**kwargs)
        if not is_int(filters) or filters < 1:
            raise ValueError(f"filters must be a positive integer, got {filters!r}")
        kh, kw = _as_pair(kernel_size, "kernel_size")
        if kh != kw or kh % 2 == 0 or kh < 1:
            raise ValueError(
                f"kernel_size must be odd and square (e.g. 3 or (3, 3)), got {kernel_size!r}")
        if _as_pair(strides, "strides") != (1, 1):
            raise ValueError(f"strides must be 1 for a Winograd convolution, got {strides!r} "
                             "(use a pooling layer before the convolution instead)")
        if _as_pair(dilation_rate, "dilation_rate") != (1, 1):
            raise ValueError(f"dilation_rate must be 1 for a Winograd convolution, "
                             f"got {dilation_rate!r}")
        check_tile_size(tile_size, "tile_size")
        padding = str(padding).lower()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        quantization = WinogradQuantization.get(quantization)
        self.filters = int(filters)
        self.kernel_size = (kh, kw)
        self.tile_size = int(tile_size)
        self.flex = bool(flex)
        self.padding = padding
        self.use_bias = bool(use_bias)
        self.kernel_initializer = tf_keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
        self.bias_initializer = tf_keras.initializers.get(bias_initializer)
        self.points = None if points is None else [float(p) for p in points]
        self.recompute = bool(recompute)
        self.quantization = quantization
        # Validates points now, so bad input fails at construction.
        self._matrices = transforms.winograd_matrices(self.tile_size, kh, self.points)
        self.input_spec = tf_keras.layers.InputSpec(ndim=4)
        self.stage_quantizers = {}
        self.transform_quantizer = None
        self._frozen_weights = None

    @property
    def tile_input_size(self) -> int:
        """t = m + r - 1, the input tile size."""
        return self.tile_size + self.kernel_size[0] - 1

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("WinogradConv2D needs a known number of input channels")
        r = self.kernel_size[0]
        self.input_spec = tf_keras.layers.InputSpec(ndim=4, axes={-1: channels})
        self.kernel = self.add_weight(
            "kernel", shape=(r, r, channels, self.filters), initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer, trainable=True, dtype=self.dtype)
        a_t, b_t, g = self._matrices
        for name, value in (("A_t", a_t), ("B_t", b_t), ("G", g)):
            setattr(self, name, self.add_weight(
                name, shape=value.shape, initializer=tf_keras.initializers.Constant(value),
                trainable=self.flex, dtype=self.dtype))
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight("bias", shape=(self.filters,),
                                        initializer=self.bias_initializer, trainable=True,
                                        dtype=self.dtype)
        if self.quantization:
            self._build_stage_quantizers(int(channels))
        super().build(input_shape)

    def _build_stage_quantizers(self, channels):
        EMAQuantizer, MaxAbsQuantizer = _quantizers().EMAQuantizer, _quantizers().MaxAbsQuantizer
        q = self.quantization
        # Static transforms are constants: the layer quantizes them from their
        # own range (as the reference's quantize-once-and-freeze).  Not in the
        # QuantizeConfig: TF-MOT's wrapper makes every weight it quantizes trainable.
        if not self.flex:
            self.transform_quantizer = MaxAbsQuantizer(q.bits)
        t2 = self.tile_input_size ** 2
        axis = 0 if q.per_tap else None
        shapes = {"weights_winograd": (t2, channels, self.filters),
                  "input_winograd": (t2, None, channels),
                  "hadamard": (t2, None, self.filters)}
        for stage in STAGES:
            quantizer = EMAQuantizer(num_bits=q.bits, axis=axis, warmup=q.warmup)
            self.stage_quantizers[stage] = (
                quantizer, quantizer.build(tf.TensorShape(shapes[stage]), stage, self))

    def _stage_ranges(self, training, ranges, codes=None):
        """A stage hook for :func:`winograd_conv` that updates each stage's range and records it.

        For the stages named in `codes` (a dict), it also records the quantized
        tensor's integer codes and scale there, ``codes[stage] = (codes, scale)``.
        """
        fake_quant, fake_quant_codes = _quantizers().fake_quant, _quantizers().fake_quant_codes

        def quantize(stage, x):
            if stage not in self.stage_quantizers:
                return x
            quantizer, variables = self.stage_quantizers[stage]
            ranges[stage] = quantizer.update_range(x, training, variables)
            if codes is not None and stage in codes:
                y, stage_codes, scale = fake_quant_codes(x, ranges[stage], quantizer.num_bits)
                codes[stage] = (stage_codes, scale)
                return y
            return fake_quant(x, ranges[stage], quantizer.num_bits)
        return quantize

    def _fixed_ranges(self, ranges):
        """A stage hook that quantizes with ranges recorded by `_stage_ranges`."""
        fake_quant = _quantizers().fake_quant

        def quantize(stage, x):
            if stage not in ranges:
                return x
            return fake_quant(x, ranges[stage], self.stage_quantizers[stage][0].num_bits)
        return quantize

    def _recomputed(self, x, weights, training):
        """The pipeline with a gradient that recomputes it instead of storing it.

        Only the inputs and the (tiny) stage ranges are kept for the backward
        pass.  Unlike ``tf.recompute_grad``, the recomputation reuses the ranges
        of the forward pass, so quantizer state is updated once per step.
        """
        ranges = {}

        @tf.custom_gradient
        def run(x, *weights):
            y = self._winograd(x, *weights, quantize=self._stage_ranges(training, ranges))

            def grad(dy):
                # The dependency on dy keeps the executor from recomputing every
                # layer as soon as the forward pass ends, which would hold all
                # recomputed tensors at once (tf.recompute_grad does the same).
                with tf.control_dependencies([dy]):
                    inputs = [tf.identity(v) for v in (x, *weights)]
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    y2 = self._winograd(*inputs, quantize=self._fixed_ranges(ranges))
                return tape.gradient(y2, inputs, output_gradients=dy)
            return y, grad
        return run(x, *weights)

    def _winograd(self, x, kernel, a_t, b_t, g, quantize):
        return winograd_conv(x, kernel, a_t, b_t, g, self.tile_size, self.padding, quantize)

    def _pipeline_transform(self, transform, training):
        """A transform as the pipeline takes it: cast, and quantized when static."""
        transform = tf.cast(transform, self.compute_dtype)
        if self.transform_quantizer is None:
            return transform
        return self.transform_quantizer(transform, training, {})

    def winograd_weights(self, kernel=None, g=None):
        """The layer's Winograd-domain weights ``U = G g G^T``, (t*t, C, K).

        Computed as the layer's pipeline computes them (before the
        ``weights_winograd`` stage quantizer), so in a graph they are the very
        values the layer uses.

        Args:
          kernel: The kernel to transform; default the layer's ``kernel``.  For
            a layer inside a TF-MOT QuantizeWrapper pass the wrapper's
            fake-quantized kernel (:func:`wa_tf.quantization.inference_weight`):
            the wrapped layer's attribute holds a tensor of the wrapper's last call.
          g: The transform G; default the layer's (quantized from its own range
            when static and quantized, as the layer does).  Flex transforms of a
            wrapped layer are quantized by the wrapper: pass them likewise.

        Returns:
          U, a (t*t, C, K) tensor.
        """
        kernel = tf.cast(self.kernel if kernel is None else kernel, self.compute_dtype)
        g = self._pipeline_transform(self.G, False) if g is None else tf.cast(g, self.compute_dtype)
        return winograd_weights(kernel, g)

    def inference_winograd_weights(self, kernel=None, g=None):
        """The Winograd-domain weights as the layer's inference pass uses them.

        :meth:`winograd_weights` followed, for a quantized layer, by the
        ``weights_winograd`` stage quantizer in inference mode (its frozen
        range), as a call with ``training=False`` computes them.

        Args:
          kernel: As :meth:`winograd_weights`.
          g: As :meth:`winograd_weights`.

        Returns:
          U, a (t*t, C, K) tensor.
        """
        u = self.winograd_weights(kernel, g)
        return self._stage_ranges(False, {})("weights_winograd", u)

    @contextlib.contextmanager
    def frozen_winograd_weights(self, u):
        """Within the context, inference calls use ``u`` instead of computing ``U = G g G^T``.

        For exporting a model (:func:`wa_tf.export.export_saved_model`): the
        graphs traced inside the context read ``u`` (typically a variable holding
        :meth:`inference_winograd_weights`) and do only the input transform,
        the element-wise stage and the output transform on each call; the
        kernel and ``G`` are not read.

        Args:
          u: (t*t, C, K) tensor or variable.

        Yields:
          None.

        Raises:
          ValueError: if ``u`` does not have the shape of the layer's U.
        """
        if not self.built:
            raise ValueError(f"layer {self.name!r} must be built before freezing its weights")
        expected = (self.tile_input_size ** 2, self.kernel.shape[2], self.filters)
        if tuple(u.shape) != expected:
            raise ValueError(f"u must have shape {expected} for layer {self.name!r}, "
                             f"got {tuple(u.shape)}")
        # object.__setattr__: a variable set as a Keras attribute would be
        # tracked as one of the layer's weights and change its checkpoints.
        object.__setattr__(self, "_frozen_weights", u)
        try:
            yield
        finally:
            object.__setattr__(self, "_frozen_weights", None)

    def call(self, inputs, training=None):
        # A plain signature: TF-MOT's QuantizeWrapperV2 passes `training` only
        # to a `call` whose argspec names it, and a decorated `call` hides it.
        return self._call(inputs, training)

    # No autograph: the pipeline has no tensor-dependent Python control flow,
    # and converting it made every symbolic call (each model clone in TF-MOT's
    # quantize_apply) several times slower.
    @tf.autograph.experimental.do_not_convert
    def _call(self, inputs, training):
        x = tf.convert_to_tensor(inputs, dtype=self.compute_dtype)
        if self._frozen_weights is not None:
            if training is True:
                raise ValueError(f"layer {self.name!r} has frozen Winograd-domain weights "
                                 "(inference only) and cannot be called with training=True")
            a_t, b_t = (self._pipeline_transform(w, training) for w in (self.A_t, self.B_t))
            y = winograd_conv_transformed(
                x, tf.cast(self._frozen_weights, self.compute_dtype), a_t, b_t, self.tile_size,
                self.padding, self._stage_ranges(training, {}))
        else:
            y = self._pipeline(x, training)
        if self.use_bias:
            y = y + tf.cast(self.bias, y.dtype)
        return y

    def _pipeline(self, x, training):
        """The whole pipeline, U included."""
        # Read the weights through attributes: TF-MOT's QuantizeWrapperV2
        # replaces them with their fake-quantized tensors before each call.
        weights = [tf.cast(self.kernel, self.compute_dtype)] + [
            self._pipeline_transform(w, training) for w in (self.A_t, self.B_t, self.G)]
        if self.recompute:
            return self._recomputed(x, weights, training)
        kernel, a_t, b_t, g = weights
        ranges = {}
        fused = _fused(x, self.tile_input_size)
        # The tensors the backward pass keeps, as integer codes where quantized:
        # U always, M only for a flex layer's A_t gradient (the fused pipeline
        # codes M in any case, below).
        codes = dict.fromkeys(("weights_winograd", "hadamard") if self.flex and not fused
                              else ("weights_winograd",))
        quantize = self._stage_ranges(training, ranges, codes)
        u = quantize("weights_winograd", winograd_weights(kernel, g))
        mm = self._input_recomputed(x, b_t, u, quantize, ranges, codes)
        if fused and "hadamard" in self.stage_quantizers:
            quantizer, variables = self.stage_quantizers["hadamard"]
            ranges["hadamard"] = quantizer.update_range(mm, training, variables)
            return self._output_from_codes(mm, ranges["hadamard"], quantizer.num_bits, a_t, x)
        return self._output_recomputed(quantize("hadamard", mm), a_t, x, codes)

    def _output_from_codes(self, mm, range_, num_bits, a_t, x):
        """The fused output transform of M quantized with `range_`, read as integer codes.

        M's fake-quantized float values are never written: the kernel decodes
        the codes (int8 up to 8 bits, a quarter of float32) tile by tile, to the
        very values :func:`wa_tf.quantizers.fake_quant` gives.  The gradient
        with respect to M is the straight-through one (the output transform's
        gradient); a flex layer's A_t gradient reads the same codes.
        """
        quantize_codes = _quantizers().quantize_codes
        m, t = self.tile_size, a_t.shape[1]
        geo = tile_geometry(_dim(x, 1), _dim(x, 2), m, t - m + 1, self.padding)
        tiles = (m, 0, 0, geo.n_h, geo.n_w)

        @tf.custom_gradient
        def run(mm, a_t):
            codes, scale = quantize_codes(mm, range_, num_bits)
            at_t = tf.transpose(a_t)
            y = kernels.tile_transform_adjoint_codes(codes, scale, at_t, *tiles, geo.out_h,
                                                     geo.out_w)

            def grad(dy):
                if not self.flex:
                    return kernels.tile_transform(dy, at_t, *tiles), None
                dmm, dmat = kernels.tile_transform_adjoint_backprop(dy, codes, scale, at_t,
                                                                    *tiles)
                return dmm, tf.transpose(dmat)
            return y, grad
        return run(mm, a_t)

    def _output_recomputed(self, mm, a_t, x, codes):
        """:func:`winograd_output` whose A_t gradient recomputes the transform's intermediate.

        Only flex layers need it: the gradient with respect to M alone keeps
        nothing but A_t.  A quantized M is kept as its integer codes (int8 up
        to 8 bits), a quarter of its float32 size, and decoded whole (the fused
        pipeline reads them in its kernels instead, :meth:`_output_from_codes`).
        """
        if not self.flex:
            return winograd_output(mm, a_t, x, self.tile_size, self.padding)
        kept_mm = _kept(mm, codes.get("hadamard"))

        @tf.custom_gradient
        def run(mm, a_t):
            def grad(dy):
                with tf.control_dependencies([dy]):
                    mm2 = kept_mm()
                    a_t2 = tf.identity(a_t)
                with tf.GradientTape() as tape:
                    tape.watch([mm2, a_t2])
                    y2 = winograd_output(mm2, a_t2, x, self.tile_size, self.padding)
                return tape.gradient(y2, [mm2, a_t2], output_gradients=dy)
            return winograd_output(mm, a_t, x, self.tile_size, self.padding), grad
        return run(mm, a_t)

    def _input_recomputed(self, x, b_t, u, quantize, ranges, codes):
        """``V U`` with ``V`` (and the tiles) recomputed in the backward pass, not kept.

        The tiles, the input transform's intermediate and V are each t^2/m^2
        times the input (2.25x for F4); recomputing them from ``x`` (which the
        previous layer usually keeps anyway) costs one gather and two small GEMMs.
        The recomputation quantizes V with the forward pass's range.
        """
        def stage(x, b_t, hook):
            return winograd_input(x, b_t, self.tile_size, self.padding, hook)

        kept_u = _kept(u, codes.get("weights_winograd"))

        @tf.custom_gradient
        def run(x, b_t, u):
            v = stage(x, b_t, quantize)

            def grad(dm):
                # As in _recomputed: recompute only once dm exists.
                with tf.control_dependencies([dm]):
                    x2, b_t2, u2 = tf.identity(x), tf.identity(b_t), kept_u()
                if _fused(x, b_t.shape[0]):
                    # V never in memory: dU from x block by block, dx (and dB_t) from
                    # dV, through the fake quantization's straight-through gradient.
                    dv = tf.matmul(dm, u2, transpose_b=True)
                    geometry = _input_tiles(x, self.tile_size, self.kernel_size[0],
                                            self.padding)
                    du = kernels.tile_transform_weight_grad(
                        x2, b_t2, dm, *geometry, **self._input_quantization(ranges, x.dtype))
                    dx, db_t = kernels.tile_transform_backprop(dv, x2, b_t2, *geometry,
                                                               mat_grad=self.flex)
                    return dx, db_t, du
                with tf.GradientTape() as tape:
                    tape.watch([x2, b_t2])
                    v2 = stage(x2, b_t2, self._fixed_ranges(ranges))
                du = tf.matmul(v2, dm, transpose_a=True)
                dv = tf.matmul(dm, u2, transpose_b=True)
                sources = [x2, b_t2] if self.flex else [x2]
                dx, *db_t = tape.gradient(v2, sources, output_gradients=dv)
                return dx, (db_t[0] if db_t else None), du
            return tf.matmul(v, u), grad
        return run(x, b_t, u)

    def _input_quantization(self, ranges, dtype):
        """How the forward pass quantized V: ``{scale, qmin, qmax}``, empty when it did not."""
        if "input_winograd" not in ranges:
            return {}
        code_limits, quant_scale = _quantizers().code_limits, _quantizers().quant_scale
        bits = self.stage_quantizers["input_winograd"][0].num_bits
        qmin, qmax = code_limits(bits)
        return {"scale": quant_scale(ranges["input_winograd"], bits, dtype), "qmin": qmin,
                "qmax": qmax}

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape).as_list()
        n, h, w = input_shape[:3]
        if self.padding == "valid":
            r = self.kernel_size[0]
            h = None if h is None else h - r + 1
            w = None if w is None else w - r + 1
        return tf.TensorShape([n, h, w, self.filters])

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "tile_size": self.tile_size,
            "flex": self.flex,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "kernel_initializer": tf_keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": tf_keras.regularizers.serialize(self.kernel_regularizer),
            "bias_initializer": tf_keras.initializers.serialize(self.bias_initializer),
            "points": self.points,
            "recompute": self.recompute,
            "quantization": None if self.quantization is None else self.quantization.get_config(),
        })
        return config
