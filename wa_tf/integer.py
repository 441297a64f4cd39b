"""Deployment form of a quantized Winograd-aware layer and its integer reference.

A trained, quantized :class:`~wa_tf.layers.WinogradConv2D` (wrapped by
:func:`wa_tf.quantization.quantize_model`) is written per layer to an ``.npz``
file that an integer Winograd kernel can consume, and :func:`run_layer` runs
that file in integer arithmetic with numpy.  It computes the fake-quantized
layer's inference exactly; the model itself computes in float32, so where an
intermediate value lies within float32 round-off of a rounding tie, the two can
round it to neighbouring codes, and the output transform amplifies that
difference.  At 8 bits this was seen only with per-tap ranges, on about 4e-5
of the outputs of trained layers (the others within one output step, the
acceptance bar); at 16 bits the round-off is comparable to a step and
agreement is only statistical.

Quantization convention (:func:`wa_tf.quantizers.fake_quant`): a tensor ``x``
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
multiplier ``M`` = scale of the accumulator / scale of the stage, here in
float64, where an integer kernel uses a fixed-point multiplier)::

    x_q = quantize(x, input)                                  # NHWC codes
    d   = t x t tiles of x_q (stride m, zero padding)
    V   = requant(B_t_q d B_t_q^T,  s_Bt^2 s_in / s_input_winograd[a, b])
    M   = requant(sum_c V[., c] U[., c, .],  s_iw[a, b] s_ww[a, b] / s_hadamard[a, b])
    Y   = A_t_q (M * w) A_t_q^T                               # per m x m output tile
    y_q = requant(Y + bias / s_Y,  s_Y / s_output)

With per-tap hadamard scales, the output transform sums taps of different
scales: ``w[a, b] = round(2^F s_hadamard[a, b] / max s_hadamard)`` are
fixed-point tap weights (F up to 30 bits, so the accumulator stays within
int64) and ``s_Y = s_At^2 max(s_hadamard) 2^-F``; per-tensor scales use
``w = 1`` and ``F = 0``, an exact integer transform.
"""

import os
from typing import Dict, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from wa_tf.layers import WinogradConv2D
from wa_tf.quantization import INPUT_QUANT_SUFFIX, float_weight, input_quant_layer, weight_name
from wa_tf.quantizers import EMAQuantizer, MaxAbsQuantizer

FORMAT = "wa_tf.winograd_layer/1"
# Every quantized tensor of the pipeline, in order.
TENSORS = ("input", "kernel", "G", "B_t", "A_t", "weights_winograd", "input_winograd",
           "hadamard", "output")
STAGES = ("weights_winograd", "input_winograd", "hadamard")
_MAX_FRACTION_BITS = 30


def qrange(bits: int) -> Tuple[int, int]:
    """(qmin, qmax) of signed ``bits``-bit codes."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_from_range(range_, bits: int) -> np.ndarray:
    """The float32 scale :func:`wa_tf.quantizers.fake_quant` derives from a range.

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
    """Codes ``clip(round_half_even(acc * multiplier))`` of a wide accumulator."""
    qmin, qmax = qrange(bits)
    return np.clip(np.rint(acc * np.asarray(multiplier, np.float64)), qmin, qmax).astype(np.int64)


def _code_dtype(bits):
    return np.int8 if bits <= 8 else np.int16


def _base_arrays(name: str, tile_size: int, kernel_size: int, padding: str, flex: bool,
              per_tap: bool, bits: Dict[str, int], scales: Dict[str, np.ndarray],
              kernel, G, B_t, A_t, bias=None) -> Dict[str, np.ndarray]:
    """Quantizes float weights and transforms into the file's arrays (but ``U_codes``).

    Args:
      name: Layer name.
      tile_size, kernel_size: m and r.
      padding: 'same' or 'valid'.
      flex, per_tap: Recorded as they are.
      bits: Bit-width per tensor of :data:`TENSORS`.
      scales: Float32 scale per tensor of :data:`TENSORS`; the Winograd stages
        scalar, or per tap of shape (t*t,) (position ``a*t + b``) or (t, t).
      kernel, G, B_t, A_t: The float (unquantized) values the layer quantizes.
      bias: Optional float bias.

    Returns:
      A dict for ``np.savez``.
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
    return arrays


def _u_codes(arrays, u) -> Dict[str, np.ndarray]:
    """``U_codes`` from U = G_q g_q G_q^T as the layer computes it (float32).

    Quantized with the ``weights_winograd`` scale, these are the very integers
    the model uses.
    """
    t, (c, k) = int(arrays["tile_input_size"]), arrays["kernel_codes"].shape[2:]
    scale = arrays["weights_winograd_scale"]
    bits = int(arrays["weights_winograd_bits"])
    codes = quantize(np.asarray(u, np.float32).reshape(t, t, c, k),
                     scale[:, :, None, None] if scale.ndim else scale, bits)
    return {"U_codes": codes.astype(_code_dtype(bits))}


def _per_tap(scale, t):
    """A scale as a float64 (t, t) array (broadcast when per tensor)."""
    return np.broadcast_to(np.asarray(scale, np.float64).reshape(-1)
                           if np.size(scale) > 1 else np.float64(scale), (t * t,)).reshape(t, t)


def _save(arrays: Dict[str, np.ndarray], path: str) -> str:
    """Writes a layer's arrays (uncompressed ``.npz``); returns the path written."""
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

    Accepts the arrays of :func:`layer_arrays` or an
    already converted dict.

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
    if padding == "same":
        out_h, out_w, pad = height, width, (r - 1) // 2
    else:
        out_h, out_w, pad = height - r + 1, width - r + 1, 0
    if out_h < 1 or out_w < 1:
        raise ValueError(f"x: spatial size {height}x{width} is smaller than the kernel")
    n_h, n_w = -(-out_h // m), -(-out_w // m)
    # Whole tiles cover the padded input: (n_h - 1) m + t >= height + 2 pad.
    padded = np.zeros((n, (n_h - 1) * m + t, (n_w - 1) * m + t, c), codes.dtype)
    padded[:, pad:pad + height, pad:pad + width] = codes
    windows = np.lib.stride_tricks.sliding_window_view(padded, (t, t), axis=(1, 2))
    windows = windows[:, ::m, ::m]  # (N, n_h, n_w, C, t, t)
    return np.transpose(windows, (4, 5, 0, 1, 2, 3)), (out_h, out_w)


def _fraction_bits(layer):
    """Fixed-point bits F of the per-tap output transform (0 when per tensor)."""
    if np.size(layer["hadamard_scale"]) == 1:
        return 0
    a_max = int(np.max(np.abs(layer["A_t_codes"].astype(np.int64))))
    m_max = 2 ** (layer["hadamard_bits"] - 1)
    bound = a_max ** 2 * m_max * layer["tile_input_size"] ** 2
    return max(0, min(_MAX_FRACTION_BITS, 62 - bound.bit_length()))


def run_layer_codes(layer, x) -> Tuple[np.ndarray, np.float32]:
    """Runs one layer file on float input in integer arithmetic.

    Args:
      layer: A path to a layer file, or its arrays (:func:`load_layer_npz`,
        :func:`layer_arrays`).
      x: Float NHWC input, as the layer's input quantizer receives it.

    Returns:
      ``(codes, scale)``: int64 output codes (N, H', W', K) of the output
      quantizer and its scale.
    """
    layer = load_layer_npz(layer) if isinstance(layer, (str, os.PathLike)) else as_layer(layer)
    x = np.asarray(x)
    m, r, t = layer["tile_size"], layer["kernel_size"], layer["tile_input_size"]
    if x.ndim != 4 or x.shape[-1] != layer["in_channels"]:
        raise ValueError(f"x must be NHWC with {layer['in_channels']} channels, got shape "
                         f"{x.shape}")
    f64 = np.float64
    s = {tensor: layer[f"{tensor}_scale"].astype(f64) for tensor in TENSORS}
    bits = {tensor: layer[f"{tensor}_bits"] for tensor in TENSORS}
    b_t, a_t = (layer[f"{k}_codes"].astype(np.int64) for k in ("B_t", "A_t"))
    u = layer["U_codes"].astype(np.int64)

    x_q = quantize(x, layer["input_scale"], bits["input"])
    d, (out_h, out_w) = _tiles(x_q, m, r, layer["padding"])  # (t, t, N, n_h, n_w, C)
    # Input transform: B_t d B_t^T in int64, requantised per tap.
    acc = np.einsum("ai,bj,ij...->ab...", b_t, b_t, d, optimize=True)
    s_v = _per_tap(s["input_winograd"], t)
    v = requantize(acc, (s["B_t"] ** 2 * s["input"] / s_v)[:, :, None, None, None, None],
                   bits["input_winograd"])
    # Element-wise stage summed over input channels: t*t integer GEMMs.
    acc = np.matmul(v.reshape(t, t, -1, v.shape[-1]), u).reshape(v.shape[:-1] + u.shape[-1:])
    s_m = _per_tap(s["hadamard"], t)
    mult = s_v * _per_tap(s["weights_winograd"], t) / s_m
    mm = requantize(acc, mult[:, :, None, None, None, None], bits["hadamard"])
    # Output transform with fixed-point tap weights (exact when per tensor).
    frac = _fraction_bits(layer)
    s_ref = s_m.max()
    weights = np.rint(s_m / s_ref * 2.0 ** frac).astype(np.int64)
    acc = np.einsum("ia,jb,ab...->ij...", a_t, a_t, mm * weights[:, :, None, None, None, None],
                    optimize=True)
    # (m, m, N, n_h, n_w, K) -> (N, n_h*m, n_w*m, K), cropped.
    n, n_h, n_w, k = acc.shape[2:]
    acc = np.transpose(acc, (2, 3, 0, 4, 1, 5)).reshape(n, n_h * m, n_w * m, k)
    acc = acc[:, :out_h, :out_w]
    s_y = s["A_t"] ** 2 * s_ref * 2.0 ** -frac
    if "bias" in layer:
        acc = acc + layer["bias"].astype(f64) / s_y
    return requantize(acc, s_y / s["output"], bits["output"]), layer["output_scale"]


def run_layer(layer, x) -> np.ndarray:
    """:func:`run_layer_codes`, dequantized: the layer's float32 output."""
    codes, scale = run_layer_codes(layer, x)
    return (codes * np.float64(scale)).astype(np.float32)


# --------------------------------------------------------------------------
# Export from a TF-MOT-quantized model
# --------------------------------------------------------------------------


def _ema_scale(quantizer, variables, what):
    """Bits and float32 scale of a frozen EMAQuantizer."""
    if float(variables["initialized_var"].numpy()) <= 0:
        raise ValueError(f"the {what} quantizer has no range yet: train or calibrate the model "
                         "(one training-mode batch) before exporting")
    lo = variables["min_var"].numpy().astype(np.float32)
    hi = variables["max_var"].numpy().astype(np.float32)
    range_ = np.maximum(-np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0)))
    return quantizer.num_bits, scale_from_range(range_, quantizer.num_bits)


def _quantizer_scale(quantizer, variables, value, what):
    """Bits and float32 scale a wa_tf quantizer applies at inference."""
    if isinstance(quantizer, EMAQuantizer):
        return _ema_scale(quantizer, variables, what)
    if isinstance(quantizer, MaxAbsQuantizer):
        range_ = np.max(np.abs(np.asarray(value, np.float32)))
        return quantizer.num_bits, scale_from_range(range_, quantizer.num_bits)
    raise ValueError(f"the {what} quantizer is a {type(quantizer).__name__}; "
                     "only EMAQuantizer and MaxAbsQuantizer can be exported")


def _is_wrapper(layer):
    return isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)


def _input_quantizer(wrapper):
    """The wrapped ``<layer>_input_quant`` layer feeding ``wrapper``."""
    inbound = input_quant_layer(wrapper)
    if inbound is None or not _is_wrapper(inbound):
        raise ValueError(f"layer {wrapper.layer.name!r} has no input quantizer "
                         f"'{wrapper.layer.name}{INPUT_QUANT_SUFFIX}' in front of it; "
                         "quantize the model with wa_tf.quantization.quantize_model")
    return inbound


class _Recorder:
    """Stands in for a stage quantizer and keeps the tensor it is given."""

    def __init__(self, quantizer):
        self._quantizer = quantizer
        self.inputs = None

    def __getattr__(self, name):
        attr = getattr(self._quantizer, name)
        if not callable(attr):
            return attr

        def recorded(inputs, *args, **kwargs):
            self.inputs = inputs
            return attr(inputs, *args, **kwargs)
        return recorded

    def __call__(self, inputs, *args, **kwargs):
        self.inputs = inputs
        return self._quantizer(inputs, *args, **kwargs)


def _winograd_weights(wrappers) -> list:
    """The float32 U = G_q g_q G_q^T each wrapped layer quantizes, (t*t, C, K).

    Taken from the layers' own computation (one inference call on a dummy
    input each, in one graph as the model is deployed), not recomputed: the
    range of U is its own extreme element, which then lies exactly on a
    rounding tie, so a different summation order could round it the other way.
    """
    stages = [wrapper.layer.stage_quantizers["weights_winograd"] for wrapper in wrappers]
    recorders = [_Recorder(quantizer) for quantizer, _ in stages]

    @tf.function
    def winograd_weights():
        for wrapper in wrappers:
            r = wrapper.layer.kernel_size[0]
            channels = float_weight(wrapper, "kernel").shape[2]
            wrapper(tf.zeros((1, r, r, channels), wrapper.dtype), training=False)
        return [tf.identity(recorder.inputs) for recorder in recorders]

    for wrapper, recorder, (_, variables) in zip(wrappers, recorders, stages):
        wrapper.layer.stage_quantizers["weights_winograd"] = (recorder, variables)
    try:
        return [u.numpy() for u in winograd_weights()]
    finally:
        for wrapper, stage in zip(wrappers, stages):
            wrapper.layer.stage_quantizers["weights_winograd"] = stage


def _check_wrapper(wrapper):
    if not (_is_wrapper(wrapper) and isinstance(wrapper.layer, WinogradConv2D)):
        name = getattr(wrapper, "name", repr(wrapper))
        raise ValueError(f"layer_or_wrapper must be the TF-MOT QuantizeWrapper of a "
                         f"WinogradConv2D (from wa_tf.quantization.quantize_model), got "
                         f"{type(wrapper).__name__} {name!r}")
    if not wrapper.layer.quantization:
        raise ValueError(f"layer {wrapper.layer.name!r} has no Winograd-stage quantization")


def layer_arrays(layer_or_wrapper) -> Dict[str, np.ndarray]:
    """The file's arrays for a quantized WinogradConv2D (see the module docstring).

    Args:
      layer_or_wrapper: The TF-MOT ``QuantizeWrapper`` of a WinogradConv2D in a
        model from :func:`wa_tf.quantization.quantize_model`; a bare layer gets a
        clear error (it lacks the input, kernel and output quantizers).

    Raises:
      ValueError: for a float or unwrapped layer, a missing input quantizer or
        quantizers without ranges.
    """
    _check_wrapper(layer_or_wrapper)
    arrays = _arrays(layer_or_wrapper)  # checks every range before running the layer
    arrays.update(_u_codes(arrays, _winograd_weights([layer_or_wrapper])[0]))
    return arrays


def _arrays(wrapper):
    """The file's arrays except ``U_codes``."""
    layer = wrapper.layer
    bits, scales = {}, {}
    input_quant = _input_quantizer(wrapper)
    bits["input"], scales["input"] = _ema_scale(
        input_quant._output_quantizers[0],  # pylint: disable=protected-access
        input_quant._output_quantizer_vars, "input")  # pylint: disable=protected-access
    values = {}
    quantized = {weight_name(w): (w, q, v)
                 for w, q, v in wrapper._weight_vars}  # pylint: disable=protected-access
    for name in ("kernel", "A_t", "B_t", "G"):
        if name in quantized:
            weight, quantizer, variables = quantized[name]
        elif name != "kernel" and layer.transform_quantizer is not None:
            weight, quantizer, variables = float_weight(wrapper, name), \
                layer.transform_quantizer, {}
        else:
            raise ValueError(f"the {name} of layer {layer.name!r} is not quantized")
        values[name] = np.asarray(weight.numpy(), np.float32)
        bits[name], scales[name] = _quantizer_scale(quantizer, variables, values[name], name)
    for stage in STAGES:
        quantizer, variables = layer.stage_quantizers[stage]
        bits[stage], scales[stage] = _ema_scale(quantizer, variables, stage)
    output_quantizers = wrapper._output_quantizers  # pylint: disable=protected-access
    if not output_quantizers:
        raise ValueError(f"layer {layer.name!r} has no output quantizer")
    bits["output"], scales["output"] = _ema_scale(
        output_quantizers[0], wrapper._output_quantizer_vars,  # pylint: disable=protected-access
        "output")
    bias = float_weight(wrapper, "bias").numpy() if layer.use_bias else None
    return _base_arrays(layer.name, layer.tile_size, layer.kernel_size[0], layer.padding,
                     layer.flex, bool(layer.quantization.get("per_tap", False)), bits, scales,
                     values["kernel"], values["G"], values["B_t"], values["A_t"], bias)


def export_layer_npz(layer_or_wrapper, path: str) -> str:
    """Writes one quantized WinogradConv2D's deployment file.

    Args:
      layer_or_wrapper: See :func:`layer_arrays`.
      path: Output file (``.npz`` is appended by numpy when missing).

    Returns:
      The path written.
    """
    return _save(layer_arrays(layer_or_wrapper), path)


def export_model_npz(model, directory: str) -> Dict[str, str]:
    """Writes ``<directory>/<layer>.npz`` for every quantized WinogradConv2D of a model.

    Returns:
      Layer name -> path written.

    Raises:
      ValueError: if the model has no quantized WinogradConv2D.
    """
    wrappers = [layer for layer in model.layers
                if _is_wrapper(layer) and isinstance(layer.layer, WinogradConv2D)
                and layer.layer.quantization]
    if not wrappers:
        raise ValueError("model has no quantized WinogradConv2D layer to export "
                         "(quantize it with wa_tf.quantization.quantize_model)")
    layers = [_arrays(wrapper) for wrapper in wrappers]
    paths = {}
    for wrapper, arrays, u in zip(wrappers, layers, _winograd_weights(wrappers)):
        arrays.update(_u_codes(arrays, u))
        name = wrapper.layer.name
        paths[name] = _save(arrays, os.path.join(directory, name + ".npz"))
    return paths
