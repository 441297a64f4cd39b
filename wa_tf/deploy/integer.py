"""The integer pipeline of a quantized Winograd-aware layer, and its file format.

A trained, quantized :class:`~wa_tf.layers.WinogradConv2D` is written per layer
to an ``.npz`` file that an integer Winograd kernel can consume
(:mod:`wa_tf.deploy.integer_export` writes it from a TF-MOT-quantized model), and
:func:`run_layer` runs that file in integer arithmetic with numpy: the integer
pipeline.  It computes the fake-quantized layer's inference exactly; the model
itself computes in float32, so where an intermediate value lies within float32
round-off of a rounding tie, the two can round it to neighbouring codes, and
the output transform amplifies that difference.  At 8 bits this was seen only
with per-tap ranges, on about 4e-5 of the outputs of trained layers (the others
within one output step); at 16 bits the round-off is comparable to a step and
agreement is only statistical.  This module needs numpy only.

Quantization convention (:func:`wa_tf.quantization.quantizers.fake_quant`): a tensor ``x``
with scale ``s`` and bit-width ``b`` has codes
``q = clip(round_half_even(x / s), -2^(b-1), 2^(b-1) - 1)`` and value ``q * s``.

File format (``format = 'wa_tf.winograd_layer/1'``).  Positions of the
Winograd domain are indexed ``[a, b]`` for tap (row a, column b) of the
``t x t`` tile, ``t = m + r - 1``:

=======================  =================  ==========================================
key                      dtype, shape       meaning
=======================  =================  ==========================================
format                   str                ``'wa_tf.winograd_layer/1'``
layer                    str                layer name
tile_size                int                m of F(m x m, r x r)
kernel_size              int                r
tile_input_size          int                t = m + r - 1
in_channels, filters     int                C, K
padding                  str                ``'same'`` (pad (r-1)/2) or ``'valid'``
flex, per_tap            bool               learned transforms; per-tap stage scales
<X>_bits                 int                bit-width b of tensor X (see below)
<X>_scale                float32 ()         scale s of tensor X; ``(t, t)`` for the
                                            three Winograd stages when per_tap
kernel_codes             int8/16 (r,r,C,K)  quantized kernel g (Conv2D layout)
G_codes                  int8/16 (t, r)     quantized G
B_t_codes                int8/16 (t, t)     quantized B_t
A_t_codes                int8/16 (m, t)     quantized A_t
U_codes                  int8/16 (t,t,C,K)  Winograd-domain weights U = G_q g_q G_q^T,
                                            precomputed once (as the layer does, in
                                            float32) and quantized with the
                                            ``weights_winograd`` scale
bias                     float32 (K,)       only when the layer has a bias (float)
=======================  =================  ==========================================

with X in ``input, kernel, G, B_t, A_t, weights_winograd, input_winograd,
hadamard, output``.  Codes use int8 up to 8 bits and int16 up to 16 bits.
``kernel_codes`` and ``G_codes`` are what ``U_codes`` was computed from; an
inference kernel needs only ``U_codes``.

Integer pipeline of :func:`run_layer` (``acc`` are int64 accumulators; each
requantisation ``q = clip(round_half_even(acc * M))`` uses the real
multiplier ``M`` = scale of the accumulator / scale of the stage: in float32
for V and M (:func:`requantize_f32`, as the training graph and a vector
kernel compute them), in float64 for y)::

    x_q = quantize(x, input)                                  # NHWC codes
    d   = t x t tiles of x_q (stride m, zero padding)
    V   = requant(B_t_q d B_t_q^T,  s_Bt^2 s_in / s_input_winograd[a, b])
    M   = requant(sum_c V[., c] U[., c, .],  s_iw[a, b] s_ww[a, b] / s_hadamard[a, b])
    Y   = A_t_q (M * w) A_t_q^T                               # per m x m output tile
    y_q = requant(Y + bias / s_Y,  s_Y / s_output)

With per-tap hadamard scales, the output transform sums taps of different
scales: ``w[a, b] = round(2^F s_hadamard[a, b] / max s_hadamard)`` are
fixed-point tap weights (F up to 30 bits, so that every partial sum stays
below 2^53: exact in int64 and in float64 alike, which lets a vector kernel
run this stage in double) and ``s_Y = s_At^2 max(s_hadamard) 2^-F``; per-tensor
scales use ``w = 1`` and ``F = 0``, an exact integer transform.
"""

import os
from typing import Dict, Tuple

import numpy as np

from wa_tf.transforms import STAGES, tile_geometry

FORMAT = "wa_tf.winograd_layer/1"
# Every quantized tensor of the pipeline, in order.
TENSORS = ("input", "kernel", "G", "B_t", "A_t", *STAGES, "output")
_MAX_FRACTION_BITS = 30


def qrange(bits: int) -> Tuple[int, int]:
    """(qmin, qmax) of signed ``bits``-bit codes."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_from_range(range_, bits: int) -> np.ndarray:
    """The float32 scale :func:`wa_tf.quantization.quantizers.fake_quant` derives from a range.

    Computed in float32 as the quantizer does in a TensorFlow graph (a
    ``tf.function``, ``model.fit`` / ``predict``, a SavedModel), where the
    division of the range by the constant ``(qmax - qmin) / 2`` becomes a
    multiplication by its reciprocal; codes then match the model bit for bit.
    """
    range_ = np.asarray(range_, np.float32)
    qmin, qmax = qrange(bits)
    scale = np.maximum(range_ * np.float32(1.0 / ((qmax - qmin) / 2.0)), np.float32(1e-8))
    return np.where(range_ > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize(x, scale, bits: int) -> np.ndarray:
    """Int64 codes of float ``x`` (float32 division and half-to-even rounding, as TF)."""
    qmin, qmax = qrange(bits)
    q = np.rint(np.asarray(x, np.float32) / np.asarray(scale, np.float32))
    return np.clip(q, qmin, qmax).astype(np.int64)


def requantize(acc, multiplier, bits: int) -> np.ndarray:
    """Codes ``clip(round_half_even(acc * multiplier))`` of a wide accumulator, in float64."""
    qmin, qmax = qrange(bits)
    return np.clip(np.rint(acc * np.asarray(multiplier, np.float64)), qmin, qmax).astype(np.int64)


def requantize_f32(acc, multiplier, bits: int) -> np.ndarray:
    """:func:`requantize` in float32: ``clip(rint(float32(acc) * float32(multiplier)))``.

    The Winograd-domain stages' rule: three IEEE float32 roundings, which a
    vector kernel repeats exactly 8 lanes at a time (the training graph computes
    these stages in float32 too).
    """
    qmin, qmax = qrange(bits)
    scaled = (np.asarray(acc).astype(np.float32)
              * np.asarray(multiplier, np.float64).astype(np.float32))
    return np.clip(np.rint(scaled), qmin, qmax).astype(np.int64)


def affine_requantize(codes, scale, offset, lo: int, hi: int) -> np.ndarray:
    """Codes ``clip(rint(codes * scale + offset), lo, hi)``, per channel (last axis), in float64.

    A layer's output codes rescaled onto the next tensor's: the batch norm (and
    ReLU: ``lo = 0``) that a native layer fuses, one multiply and one add, each
    rounded in float64 (``scale = a s_Y / s_Z``, ``offset = b / s_Z`` for a
    per-channel ``a y + b``).
    """
    z = np.rint(np.asarray(codes, np.float64) * np.asarray(scale, np.float64)
                + np.asarray(offset, np.float64))
    return np.clip(z, lo, hi).astype(np.int64)


def _code_dtype(bits):
    return np.int8 if bits <= 8 else np.int16


def encode_layer(name: str, tile_size: int, kernel_size: int, padding: str, flex: bool,
                 per_tap: bool, bits: Dict[str, int], scales: Dict[str, np.ndarray],
                 kernel, G, B_t, A_t, u, bias=None) -> Dict[str, np.ndarray]:
    """Quantizes a layer's float weights, transforms and U into the file's arrays.

    Args:
      name: Layer name.
      tile_size, kernel_size: m and r.
      padding: 'same' or 'valid'.
      flex, per_tap: Recorded as they are.
      bits: Bit-width per tensor of :data:`TENSORS`.
      scales: Float32 scale per tensor of :data:`TENSORS`; the Winograd stages
        scalar, or per tap of shape (t*t,) (position ``a*t + b``) or (t, t).
      kernel, G, B_t, A_t: The float (unquantized) values the layer quantizes.
      u: The float32 Winograd-domain weights ``U = G_q g_q G_q^T`` (t*t, C, K)
        exactly as the layer computes them: quantized with the
        ``weights_winograd`` scale, they are the very integers the model uses.
      bias: Optional float bias.

    Returns:
      A dict for :func:`save` (and :func:`run_layer`).
    """
    m, r = int(tile_size), int(kernel_size)
    t = m + r - 1
    kernel = np.asarray(kernel, np.float32)
    arrays = {"format": np.array(FORMAT), "layer": np.array(name), "tile_size": np.array(m),
              "kernel_size": np.array(r), "tile_input_size": np.array(t),
              "in_channels": np.array(kernel.shape[2]), "filters": np.array(kernel.shape[3]),
              "padding": np.array(padding), "flex": np.array(bool(flex)),
              "per_tap": np.array(bool(per_tap))}
    for tensor in TENSORS:
        scale = np.asarray(scales[tensor], np.float32)
        if tensor in STAGES and scale.size > 1:
            scale = scale.reshape(t, t)
        arrays[f"{tensor}_bits"] = np.array(int(bits[tensor]))
        arrays[f"{tensor}_scale"] = scale
    for tensor, value in (("kernel", kernel), ("G", G), ("B_t", B_t), ("A_t", A_t)):
        b = int(bits[tensor])
        arrays[f"{tensor}_codes"] = quantize(value, arrays[f"{tensor}_scale"], b).astype(
            _code_dtype(b))
    if bias is not None:
        arrays["bias"] = np.asarray(bias, np.float32)
    # U_codes after the scalars: the order of the arrays in every .npz, so files stay
    # byte-identical.
    scale, b = arrays["weights_winograd_scale"], int(bits["weights_winograd"])
    c, k = kernel.shape[2:]
    codes = quantize(np.asarray(u, np.float32).reshape(t, t, c, k),
                     scale[:, :, None, None] if scale.ndim else scale, b)
    arrays["U_codes"] = codes.astype(_code_dtype(b))
    return arrays


def per_tap(scale, t):
    """A scale as a float64 (t, t) array (broadcast when per tensor)."""
    return np.broadcast_to(np.asarray(scale, np.float64).reshape(-1)
                           if np.size(scale) > 1 else np.float64(scale), (t * t,)).reshape(t, t)


def save(arrays: Dict[str, np.ndarray], path: str) -> str:
    """Writes a layer's arrays (uncompressed ``.npz``; ``.npz`` is appended when missing).

    Returns:
      The path written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)
    return path if path.endswith(".npz") else path + ".npz"


def load_layer_npz(path: str) -> Dict:
    """Reads a layer file into :func:`as_layer`'s dict.

    Raises:
      ValueError: if the file is not a ``wa_tf.winograd_layer/1`` file.
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return as_layer(arrays, path)


def as_layer(arrays: Dict, source: str = "arrays") -> Dict:
    """The file's arrays with scalars as Python ints, bools and strings.

    Accepts the arrays of :func:`encode_layer` (or
    :func:`wa_tf.deploy.integer_export.layer_arrays`) or an already converted dict.

    Raises:
      ValueError: if ``arrays`` is not a ``wa_tf.winograd_layer/1`` layer.
    """
    if "format" not in arrays or str(arrays["format"]) != FORMAT:
        raise ValueError(f"{source} is not a {FORMAT} layer file")
    layer = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.ndim == 0 and value.dtype.kind in "USb":
            layer[key] = bool(value) if value.dtype.kind == "b" else str(value)
        elif value.ndim == 0 and value.dtype.kind in "iu" and not key.endswith("_codes"):
            layer[key] = int(value)
        else:
            layer[key] = value
    return layer


def _tiles(codes, m, r, padding):
    """t x t tiles with stride m: (N, H, W, C) -> (t, t, N, n_h, n_w, C), and out size."""
    n, height, width, c = codes.shape
    t = m + r - 1
    geo = tile_geometry(height, width, m, r, padding)
    if geo.out_h < 1 or geo.out_w < 1:
        raise ValueError(f"x: spatial size {height}x{width} is smaller than the kernel")
    # Whole tiles cover the padded input: (n_h - 1) m + t >= height + 2 pad.
    padded = np.zeros((n, (geo.n_h - 1) * m + t, (geo.n_w - 1) * m + t, c), codes.dtype)
    padded[:, geo.pad_top:geo.pad_top + height, geo.pad_left:geo.pad_left + width] = codes
    windows = np.lib.stride_tricks.sliding_window_view(padded, (t, t), axis=(1, 2))
    windows = windows[:, ::m, ::m]  # (N, n_h, n_w, C, t, t)
    return np.transpose(windows, (4, 5, 0, 1, 2, 3)), (geo.out_h, geo.out_w)


def fraction_bits(layer):
    """Fixed-point bits F of the per-tap output transform (0 when per tensor)."""
    if np.size(layer["hadamard_scale"]) == 1:
        return 0
    a_max = int(np.max(np.abs(layer["A_t_codes"].astype(np.int64))))
    m_max = 2 ** (layer["hadamard_bits"] - 1)
    bound = a_max ** 2 * m_max * layer["tile_input_size"] ** 2
    # Below 2^53: the output transform is exact in float64 as well as in int64.
    return max(0, min(_MAX_FRACTION_BITS, 53 - bound.bit_length()))


def multipliers(layer) -> Dict[str, np.ndarray]:
    """The requantisation constants of the three stages, as the reference uses them.

    Returns:
      A dict with float64 ``input_winograd`` and ``hadamard`` (t, t) multipliers,
      int64 ``tap_weights`` (t, t) and their ``fraction_bits``, the output
      transform's scale ``s_y``, the float64 ``output`` multiplier and
      ``bias`` (K,) in units of ``s_y`` (zeros when the layer has none).
    """
    layer = _checked(layer)
    t = layer["tile_input_size"]
    s_v = per_tap(layer["input_winograd_scale"], t)
    s_m = per_tap(layer["hadamard_scale"], t)
    frac = fraction_bits(layer)
    s_ref = s_m.max()
    s_y = layer["A_t_scale"].astype(np.float64) ** 2 * s_ref * 2.0 ** -frac
    bias = (layer["bias"].astype(np.float64) / s_y if "bias" in layer
            else np.zeros(layer["filters"], np.float64))
    return {"input_winograd": (layer["B_t_scale"].astype(np.float64) ** 2
                               * layer["input_scale"].astype(np.float64) / s_v),
            "hadamard": s_v * per_tap(layer["weights_winograd_scale"], t) / s_m,
            "tap_weights": np.rint(s_m / s_ref * 2.0 ** frac).astype(np.int64),
            "fraction_bits": frac, "s_y": s_y,
            "output": s_y / layer["output_scale"].astype(np.float64), "bias": bias}


def _checked(layer):
    return load_layer_npz(layer) if isinstance(layer, (str, os.PathLike)) else as_layer(layer)


def input_transform(layer, x_codes) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Stage 1: the Winograd-domain input codes ``V`` of int input codes.

    Args:
      layer: A layer file's path or arrays.
      x_codes: Integer NHWC codes of the layer's input quantizer.

    Returns:
      ``(V, (out_h, out_w))``: int64 codes (t, t, N, n_h, n_w, C) and the output size.
    """
    layer = _checked(layer)
    m, r = layer["tile_size"], layer["kernel_size"]
    b_t = layer["B_t_codes"].astype(np.int64)
    d, out_size = _tiles(np.asarray(x_codes, np.int64), m, r, layer["padding"])
    # B_t d B_t^T in int64, requantised per tap.
    acc = np.einsum("ai,bj,ij...->ab...", b_t, b_t, d, optimize=True)
    mult = multipliers(layer)["input_winograd"]
    return requantize_f32(acc, mult[:, :, None, None, None, None],
                      layer["input_winograd_bits"]), out_size


def hadamard(layer, v) -> np.ndarray:
    """Stage 2: the element-wise stage's codes ``M`` (t, t, N, n_h, n_w, K) of ``V``.

    Summed over input channels: t*t integer GEMMs with ``U_codes``.
    """
    layer = _checked(layer)
    t = layer["tile_input_size"]
    v = np.asarray(v, np.int64)
    u = layer["U_codes"].astype(np.int64)
    acc = np.matmul(v.reshape(t, t, -1, v.shape[-1]), u).reshape(v.shape[:-1] + u.shape[-1:])
    mult = multipliers(layer)["hadamard"]
    return requantize_f32(acc, mult[:, :, None, None, None, None], layer["hadamard_bits"])


def output_transform(layer, mm, out_size) -> np.ndarray:
    """Stage 3: the output codes (N, H', W', K) of ``M``, cropped to ``out_size``.

    With fixed-point tap weights when per tap (exact when per tensor), plus
    the bias, requantised with the output scale.
    """
    layer = _checked(layer)
    m = layer["tile_size"]
    a_t = layer["A_t_codes"].astype(np.int64)
    consts = multipliers(layer)
    weights = consts["tap_weights"]
    acc = np.einsum("ia,jb,ab...->ij...", a_t, a_t,
                    np.asarray(mm, np.int64) * weights[:, :, None, None, None, None],
                    optimize=True)
    # (m, m, N, n_h, n_w, K) -> (N, n_h*m, n_w*m, K), cropped.
    n, n_h, n_w, k = acc.shape[2:]
    acc = np.transpose(acc, (2, 3, 0, 4, 1, 5)).reshape(n, n_h * m, n_w * m, k)
    acc = acc[:, :out_size[0], :out_size[1]]
    if "bias" in layer:
        acc = acc + consts["bias"]
    return requantize(acc, consts["output"], layer["output_bits"])


def run_layer_codes(layer, x) -> Tuple[np.ndarray, np.float32]:
    """Runs one layer file on float input in integer arithmetic.

    Args:
      layer: A path to a layer file, or its arrays (:func:`load_layer_npz`,
        :func:`encode_layer`).
      x: Float NHWC input, as the layer's input quantizer receives it.

    Returns:
      ``(codes, scale)``: int64 output codes (N, H', W', K) of the output
      quantizer and its scale.
    """
    layer = _checked(layer)
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != layer["in_channels"]:
        raise ValueError(f"x must be NHWC with {layer['in_channels']} channels, got shape "
                         f"{x.shape}")
    x_q = quantize(x, layer["input_scale"], layer["input_bits"])
    v, out_size = input_transform(layer, x_q)
    codes = output_transform(layer, hadamard(layer, v), out_size)
    return codes, layer["output_scale"]


def run_layer(layer, x) -> np.ndarray:
    """:func:`run_layer_codes`, dequantized: the layer's float32 output."""
    codes, scale = run_layer_codes(layer, x)
    return (codes * np.float64(scale)).astype(np.float32)
