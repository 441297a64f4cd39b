"""A Winograd-aware layer lowered to LiteRT builtin operators.

One F(m x m, r x r) layer becomes, on NHWC tensors (``t = m + r - 1``,
``P`` tiles)::

    PAD                 zero rows/columns so that whole t x t tiles, stride m, cover the input
    DEPTHWISE_CONV_2D   t x t, stride m, t^2 outputs per channel: V = B_t d B_t^T
    RESHAPE, TRANSPOSE  channel c*t^2 + tap  ->  tap*C + c
    CONV_2D, t^2 groups 1x1: per tap, the C -> K product with U (the element-wise stage)
    RESHAPE, TRANSPOSE  (P, t^2, K) -> (P*K, t^2)
    FULLY_CONNECTED     t^2 -> m^2: Y = A_t M A_t^T, one row per output position
    RESHAPE, TRANSPOSE  (P, K, m^2) -> (P, m^2, K)
    DEPTH_TO_SPACE      m x m output tiles back to pixels
    STRIDED_SLICE       crop the tiles that reach past the output (when needed)

In the integer model every tensor is int8 and every operator requantises its
int32 accumulator once, as the integer reference (:mod:`wa_tf.integer`) does
at the same three points.  Per-tap scales, which LiteRT cannot give an
activation tensor, live in the per-channel scales of the weights: V and M are
then stored as their codes (tensor scale 1).  The element-wise stage holds the
trained codes of U exactly.  The transforms' weights are products of two
transform codes (B_q[a, i] B_q[b, j], and A_q[i, a] A_q[j, b] times the
reference's fixed-point tap weights), which int8 holds exactly only when each
row's products share a factor (static F2 does); otherwise each row is rounded
to int8 with its own scale, and V and Y can then differ from the reference by
a few codes (:func:`transform_rows` reports which).
"""

import io
from typing import Dict, List, Optional, Tuple

import numpy as np

from wa_tf.deploy import integer
from wa_tf.deploy.tflite_graph import Graph, options
from wa_tf.transforms import tile_geometry


def int8_rows(rows: np.ndarray, max_parts: int = 3) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Matrix rows as a sum of int8 parts: ``rows ~ sum(codes * step[:, None])``.

    Each part holds 127 steps of what the previous ones left, so every part
    after the first is small (at most 1/254 of the previous remainder) and its
    int8 result cannot saturate where the sum does not.  A row of integers
    (after dividing out their common factor) uses an integer first step, which
    leaves an integer remainder: products of two 8-bit codes are then exact in
    two parts (the remainder is at most half of ``ceil(16384 / 127)``).

    Args:
      rows: Array (R, n).
      max_parts: At most this many parts; real rows are greedy up to it.

    Returns:
      ``[(codes int8 (R, n), step float64 (R,)), ...]``, most significant first.
    """
    rows = np.asarray(rows, np.float64)
    integral = np.all(rows == np.rint(rows)) and np.abs(rows).max(initial=0) < 2 ** 52
    scale = np.ones(rows.shape[0])
    if integral:  # divide out each row's common factor
        ints = rows.astype(np.int64)
        scale = np.array([max(int(np.gcd.reduce(np.abs(r))), 1) for r in ints], np.float64)
        rows = rows / scale[:, None]
    parts, rest = [], rows
    while np.any(rest) and len(parts) < max_parts:
        step = np.abs(rest).max(axis=1) / 127.0
        if integral:
            step = np.ceil(step)
        step = np.where(step > 0, step, 1.0)
        codes = np.rint(rest / step[:, None])
        parts.append((codes.astype(np.int8), step * scale))
        rest = rest - codes * step[:, None]
    return parts or [(np.zeros(rows.shape, np.int8), np.ones(rows.shape[0]))]


# The int16 sums of the wide lowering hold 1/_FINE of an int8 code.
_FINE = 256.0


def _reshape(g: Graph, x: int, shape, dtype, quant, name) -> int:
    scale, zero = quant if quant is not None else (None, None)
    static = list(shape)
    total = int(np.prod(g.shape_of(x)))
    known = int(np.prod([d for d in static if d != -1]))
    static = [total // known if d == -1 else d for d in static]
    y = g.tensor(name, static, dtype, scale, zero)
    g.op("RESHAPE", [x, g.constant(name + "/shape", np.asarray(shape, np.int32), "int32")], [y])
    return y


def _transpose(g: Graph, x: int, perm, dtype, quant, name) -> int:
    scale, zero = quant if quant is not None else (None, None)
    shape = g.shape_of(x)
    y = g.tensor(name, [shape[p] for p in perm], dtype, scale, zero)
    g.op("TRANSPOSE", [x, g.constant(name + "/perm", np.asarray(perm, np.int32), "int32")], [y])
    return y


def _geometry(g: Graph, x: int, m: int, r: int, padding: str):
    n, height, width, c = g.shape_of(x)
    geo = tile_geometry(height, width, m, r, padding)
    if geo.out_h < 1 or geo.out_w < 1:
        raise ValueError(f"input of {height}x{width} is smaller than the {r}x{r} kernel")
    t = m + r - 1
    pads = ((0, 0), (geo.pad_top, (geo.n_h - 1) * m + t - height - geo.pad_top),
            (geo.pad_left, (geo.n_w - 1) * m + t - width - geo.pad_left), (0, 0))
    return n, c, geo, pads


def _tiles(g, x, m, r, padding, dtype, quant, name):
    """PAD to whole tiles; returns (padded tensor, batch, channels, geometry)."""
    n, c, geo, pads = _geometry(g, x, m, r, padding)
    if any(p for pair in pads for p in pair):
        if min(p for pair in pads for p in pair) < 0:
            raise ValueError("negative padding")  # cannot happen for stride-1 geometry
        shape = [d + a + b for d, (a, b) in zip(g.shape_of(x), pads)]
        scale, zero = quant if quant is not None else (None, None)
        y = g.tensor(name + "/pad", shape, dtype, scale, zero)
        g.op("PAD", [x, g.constant(name + "/paddings", np.asarray(pads, np.int32), "int32")],
             [y])
        x = y
    return x, n, c, geo


def _tail(g, y_rows, n, geo, m, k, dtype, quant, name):
    """(P*K, m^2) rows -> NHWC output: transpose, depth-to-space, crop."""
    y = _reshape(g, y_rows, [-1, k, m * m], dtype, quant, name + "/rows")
    y = _transpose(g, y, [0, 2, 1], dtype, quant, name + "/by_position")
    y = _reshape(g, y, [-1, geo.n_h, geo.n_w, m * m * k], dtype, quant, name + "/tiles")
    scale, zero = quant if quant is not None else (None, None)
    full = g.tensor(name + "/full", [n, geo.n_h * m, geo.n_w * m, k], dtype, scale, zero)
    g.op("DEPTH_TO_SPACE", [y], [full], options("DepthToSpace", blockSize=m))
    if (geo.out_h, geo.out_w) == (geo.n_h * m, geo.n_w * m):
        return full
    out = g.tensor(name, [n, geo.out_h, geo.out_w, k], dtype, scale, zero)
    # STRIDED_SLICE with the batch masked keeps the batch free (SLICE fixes it).
    g.op("STRIDED_SLICE", [full, g.constant(name + "/begin", np.zeros(4, np.int32), "int32"),
                           g.constant(name + "/end", np.array([0, geo.out_h, geo.out_w, k],
                                                              np.int32), "int32"),
                           g.constant(name + "/strides", np.ones(4, np.int32), "int32")],
         [out], options("StridedSlice", beginMask=1, endMask=1))
    return out


def _zero_bias(g, name, scale, wide) -> int:
    """A zero bias (int32; int64 for LiteRT's 16x8 operators)."""
    dtype = "int64" if wide else "int32"
    return g.constant(name, np.zeros(np.size(scale), dtype), dtype, scale)


def _sum(g, parts, shape, quant, name, act="int8", act_scale=1.0) -> int:
    """The sum of ``parts`` (ADDs) as an int8 tensor with quantization ``quant``.

    int16 parts (scale ``act_scale`` of ``quant``'s) are added in int16 and
    requantised to int8 once.
    """
    scale, zero = quant
    total = parts[0]
    for i, part in enumerate(parts[1:]):
        last = i == len(parts) - 2 and act == "int8"
        out = g.tensor(name if last else f"{name}/sum{i}", shape, act, scale * act_scale, zero)
        g.op("ADD", [total, part], [out], options("Add"))
        total = out
    if act == "int8":
        return total
    out = g.tensor(name, shape, "int8", scale, zero)
    g.op("QUANTIZE", [total], [out])
    return out


def _to_tap_major(g, v, t, c, geo, dtype, quant, name):
    v = _reshape(g, v, [-1, geo.n_h, geo.n_w, c, t * t], dtype, quant, name + "/v5")
    v = _transpose(g, v, [0, 1, 2, 4, 3], dtype, quant, name + "/v_taps")
    return _reshape(g, v, [-1, geo.n_h, geo.n_w, t * t * c], dtype, quant, name + "/v")


def lower_int8(g: Graph, x: int, layer: Dict, name: str,
               output_scale: Optional[float] = None, wide: bool = False) -> Tuple[int, Dict]:
    """Appends one quantized layer (a :mod:`wa_tf.integer` layer dict) to ``g``.

    Args:
      g: The graph.
      x: Its int8 NHWC input, quantized with ``layer['input_scale']``.
      layer: The layer's arrays (:func:`wa_tf.integer.as_layer` form).
      name: Prefix of the tensor names.
      output_scale: Scale of the output tensor (default the layer's own output
        scale; another one requantises there, saving an operator).
      wide: Sum the transforms' int8 parts in int16 at 1/256 of a code (LiteRT's
        16x8 operators) and requantise that sum to int8 once: V and the output
        then match the reference but where the sum lies within 1/256 of a code
        of a rounding tie.  The 16x8 operators run on LiteRT's builtin kernels
        (XNNPACK has none).

    Returns:
      ``(output tensor, info)``; ``info['exact']`` tells whether both
      transforms were stored exactly.
    """
    m, r, t = layer["tile_size"], layer["kernel_size"], layer["tile_input_size"]
    c, k = layer["in_channels"], layer["filters"]
    if "bias" in layer:
        raise ValueError(f"layer {layer['layer']}: a Winograd layer with a bias is not lowered")
    if max(layer[f"{s}_bits"] for s in ("input", "input_winograd", "weights_winograd",
                                        "hadamard", "output")) > 8:
        raise ValueError(f"layer {layer['layer']}: LiteRT integer tensors hold at most 8 bits")
    s_in = float(layer["input_scale"])
    s_bt, s_at = float(layer["B_t_scale"]), float(layer["A_t_scale"])
    s_v, s_w, s_m = (integer.per_tap(layer[f"{s}_scale"], t).reshape(-1)
                     for s in ("input_winograd", "weights_winograd", "hadamard"))
    tensor_v = float(s_v[0]) if np.size(layer["input_winograd_scale"]) == 1 else 1.0
    tensor_m = float(s_m[0]) if np.size(layer["hadamard_scale"]) == 1 else 1.0
    s_out = float(layer["output_scale"] if output_scale is None else output_scale)
    zero = np.zeros(1, np.int64)

    # Input transform: one depthwise output channel per (input channel, tap).
    b_t = layer["B_t_codes"].astype(np.int64)
    taps = int8_rows(np.einsum("ai,bj->abij", b_t, b_t).reshape(t * t, t * t))
    # A transform stored in one part is requantised once already: int16 sums only for more.
    act, act_scale = ("int16", 1.0 / _FINE) if wide and len(taps) > 1 else ("int8", 1.0)
    if act == "int16":
        x16 = g.tensor(name + "/x16", g.shape_of(x), "int16", s_in, zero)
        g.op("QUANTIZE", [x], [x16])
        x = x16
    xp, n, _, geo = _tiles(g, x, m, r, layer["padding"], act, (s_in, zero), name)
    parts = []
    for part, (codes, steps) in enumerate(taps):
        ch_scale = np.tile(steps * s_bt ** 2 * tensor_v / s_v, c)  # per (channel, tap)
        weights = np.tile(codes.reshape(t * t, t, t).transpose(1, 2, 0), (1, 1, c))[None]
        out = g.tensor(f"{name}/input_transform{part}", [n, geo.n_h, geo.n_w, c * t * t],
                       act, tensor_v * act_scale, zero)
        g.op("DEPTHWISE_CONV_2D",
             [xp, g.constant(f"{name}/B{part}", weights, "int8", ch_scale, axis=3),
              _zero_bias(g, f"{name}/B_bias{part}", s_in * ch_scale, act == "int16")],
             [out], options("DepthwiseConv2D", padding="valid", stride=m,
                            depthMultiplier=t * t))
        parts.append(out)
    parts_b = parts
    v = _sum(g, parts, [n, geo.n_h, geo.n_w, c * t * t], (tensor_v, zero),
             name + "/input_transform", act, act_scale)
    v = _to_tap_major(g, v, t, c, geo, "int8", (tensor_v, zero), name)
    # Element-wise stage: t^2 groups of C -> K with the trained codes of U.
    u = layer["U_codes"].astype(np.int8).reshape(t * t, c, k).transpose(0, 2, 1)
    u_scale = np.repeat(s_v * s_w * tensor_m / (s_m * tensor_v), k)
    mm = g.tensor(name + "/hadamard", [n, geo.n_h, geo.n_w, t * t * k], "int8", tensor_m, zero)
    g.op("CONV_2D", [v, g.constant(name + "/U", u.reshape(t * t * k, 1, 1, c), "int8", u_scale),
                     g.constant(name + "/U_bias", np.zeros(t * t * k, np.int32), "int32",
                                tensor_v * u_scale)],
         [mm], options("Conv2D", padding="valid", stride=1))
    # Output transform with the reference's fixed-point tap weights.
    frac = integer.fraction_bits(layer)
    s_ref = float(s_m.max())
    tap_w = np.rint(s_m / s_ref * 2.0 ** frac).astype(np.int64)
    a_t = layer["A_t_codes"].astype(np.int64)
    rows = np.einsum("ia,jb->ijab", a_t, a_t).reshape(m * m, t * t) * tap_w[None]
    s_y = s_at ** 2 * s_ref * 2.0 ** -frac
    mm = _reshape(g, mm, [-1, t * t, k], "int8", (tensor_m, zero), name + "/m3")
    mm = _transpose(g, mm, [0, 2, 1], "int8", (tensor_m, zero), name + "/m_rows")
    mm = _reshape(g, mm, [-1, t * t], "int8", (tensor_m, zero), name + "/m")
    rows = int8_rows(rows)
    act, act_scale = ("int16", 1.0 / _FINE) if wide and len(rows) > 1 else ("int8", 1.0)
    if act == "int16":
        m16 = g.tensor(name + "/m16", g.shape_of(mm), "int16", tensor_m, zero)
        g.op("QUANTIZE", [mm], [m16])
        mm = m16
    parts = []
    for part, (codes, steps) in enumerate(rows):
        a_scale = steps * s_y / tensor_m
        out = g.tensor(f"{name}/output_transform{part}", [g.shape_of(mm)[0], m * m], act,
                       s_out * act_scale, zero)
        g.op("FULLY_CONNECTED",
             [mm, g.constant(f"{name}/A{part}", codes, "int8", a_scale),
              _zero_bias(g, f"{name}/A_bias{part}", tensor_m * a_scale, act == "int16")],
             [out], options("FullyConnected"))
        parts.append(out)
    rows_out = _sum(g, parts, [g.shape_of(mm)[0], m * m], (s_out, zero),
                    name + "/output_transform", act, act_scale)
    y = _tail(g, rows_out, n, geo, m, k, "int8", (s_out, zero), name)
    return y, {"input_transform_parts": len(parts_b), "output_transform_parts": len(parts)}


# Custom operators of the native int8 kernel: one code per layer (LiteRT tells the nodes of
# one registration apart by nothing), "WA_WINOGRAD_INT8:<layer>".
NATIVE_OP = "WA_WINOGRAD_INT8"


def lower_native(g: Graph, x: int, layer: Dict, name: str) -> int:
    """Appends one quantized layer as a CUSTOM operator that runs the native int8 kernel.

    The operator's custom options are the layer file itself (``.npz`` bytes of
    :mod:`wa_tf.deploy.integer`, less ``kernel_codes``, which ``U_codes`` was
    computed from); :mod:`wa_tf.deploy.litert_native` registers
    :mod:`wa_tf.kernels.winograd_int8` for it.  Its input and output are the
    layer's int8 codes with the layer's input and output scales; with the
    arrays of a fused epilogue (:data:`wa_tf.deploy.native.EPILOGUE`), the
    output is the epilogue's codes and scale.

    Raises:
      ValueError: if the kernel cannot run the layer (wider than 8 bits, a
        tile of more than 8 inputs, an even kernel).
    """
    m, r, t = layer["tile_size"], layer["kernel_size"], layer["tile_input_size"]
    wide = [tensor for tensor in integer.TENSORS if layer[f"{tensor}_bits"] > 8]
    if wide or t > 8 or r % 2 == 0:
        raise ValueError(f"layer {name!r}: the native kernel runs 8-bit layers of odd kernel "
                         f"size with tiles of at most 8 inputs (F({m}, {r}), "
                         f"{'wider tensors: ' + ', '.join(wide) if wide else 'bits ok'})")
    n, height, width, _ = g.shape_of(x)
    geo = tile_geometry(height, width, m, r, layer["padding"])
    scale = layer.get("epilogue_output_scale", layer["output_scale"])  # a fused BN / ReLU
    y = g.tensor(name + "/native", [n, geo.out_h, geo.out_w, layer["filters"]], "int8",
                 float(scale), 0)
    blob = io.BytesIO()
    # Without kernel_codes: the kernel runs from U_codes (a quarter less weight bytes at F4).
    np.savez(blob, **{key: value for key, value in layer.items() if key != "kernel_codes"})
    g.custom_op(f"{NATIVE_OP}:{name}", [x], [y], blob.getvalue())
    return y


def lower_float(g: Graph, x: int, b_t, a_t, u, tile_size: int, kernel_size: int,
                padding: str, name: str, bias=None) -> int:
    """Appends one float32 layer: transforms ``b_t`` (t, t), ``a_t`` (m, t), U (t, t, C, K)."""
    m, r = int(tile_size), int(kernel_size)
    t = m + r - 1
    b_t, a_t = np.asarray(b_t, np.float64), np.asarray(a_t, np.float64)
    u = np.asarray(u, np.float32)
    c, k = u.shape[2], u.shape[3]
    xp, n, _, geo = _tiles(g, x, m, r, padding, "float32", None, name)
    taps = np.einsum("ai,bj->ijab", b_t, b_t).reshape(t, t, t * t)
    v = g.tensor(name + "/input_transform", [n, geo.n_h, geo.n_w, c * t * t], "float32")
    g.op("DEPTHWISE_CONV_2D",
         [xp, g.constant(name + "/B", np.tile(taps, (1, 1, c))[None], "float32"),
          g.constant(name + "/B_bias", np.zeros(c * t * t, np.float32), "float32")],
         [v], options("DepthwiseConv2D", padding="valid", stride=m, depthMultiplier=t * t))
    v = _to_tap_major(g, v, t, c, geo, "float32", None, name)
    mm = g.tensor(name + "/hadamard", [n, geo.n_h, geo.n_w, t * t * k], "float32")
    weights = u.reshape(t * t, c, k).transpose(0, 2, 1).reshape(t * t * k, 1, 1, c)
    g.op("CONV_2D", [v, g.constant(name + "/U", weights, "float32"),
                     g.constant(name + "/U_bias", np.zeros(t * t * k, np.float32), "float32")],
         [mm], options("Conv2D", padding="valid", stride=1))
    mm = _reshape(g, mm, [-1, t * t, k], "float32", None, name + "/m3")
    mm = _transpose(g, mm, [0, 2, 1], "float32", None, name + "/m_rows")
    mm = _reshape(g, mm, [-1, t * t], "float32", None, name + "/m")
    rows = np.einsum("ia,jb->ijab", a_t, a_t).reshape(m * m, t * t)
    rows_out = g.tensor(name + "/output_transform", [g.shape_of(mm)[0], m * m], "float32")
    g.op("FULLY_CONNECTED", [mm, g.constant(name + "/A", rows, "float32"), -1], [rows_out],
         options("FullyConnected"))
    y = _tail(g, rows_out, n, geo, m, k, "float32", None, name)
    if bias is None:
        return y
    out = g.tensor(name + "/biased", g.shape_of(y), "float32")
    g.op("ADD", [y, g.constant(name + "/bias", np.asarray(bias, np.float32), "float32")], [out],
         options("Add"))
    return out
