"""The two ends of a lowered model: the image input and the classifier.

Helpers of :mod:`wa_tf.deploy.litert_model`: each function takes its lowering
state ``lw`` (tensors, scales, the graph) and appends the operators of the
model's input normalisation, global pooling and final ``Dense``.
"""

import numpy as np
import tf_keras

from wa_tf.deploy import integer
from wa_tf.deploy.integer_export import output_scale, quantizer_scale
from wa_tf.deploy.tflite_graph import options
from wa_tf.quantization import INPUT_QUANT_SUFFIX, unwrap, weight_name
from wa_tf.quantization.tfmot_adapter import is_quantize_wrapper, weight_quantizers

# The zero point of every int8 tensor the lowering makes (symmetric, as training).
ZERO = np.zeros(1, np.int64)


def is_input_quant(layer) -> bool:
    """True for the ``<layer>_input_quant`` wrapper quantize_model puts before a layer."""
    return is_quantize_wrapper(layer) and layer.name.endswith(INPUT_QUANT_SUFFIX)


def image_input(lw, normalization) -> int:
    """The graph input: uint8 images normalised inside (``normalization``), else float."""
    shape = [lw.batch] + [int(d) for d in lw.model.input_shape[1:]]
    if normalization is None:
        x = lw.g.tensor("images", shape, "float32")
        if not lw.quantized:
            return x, x
        scale = input_range(lw)
        if scale is None:
            raise ValueError("an integer model without a normalization needs a quantized "
                             "first layer (its input range); give the normalization")
        y = lw.new("images_int8", shape, scale)
        lw.g.op("QUANTIZE", [x], [y])
        return x, y
    mean, std = (np.asarray(v, np.float64) for v in normalization)
    if mean.shape != (shape[-1],) or std.shape != (shape[-1],) or np.any(std <= 0):
        raise ValueError(f"normalization must be (mean, std) with {shape[-1]} values "
                         f"each and std > 0, got {normalization!r}")
    raw = lw.g.tensor("images", shape, "uint8", 1.0, 0)
    a, b = 1.0 / (255.0 * std), -mean / std
    if not lw.quantized:
        as_float = lw.g.tensor("images_float", shape, "float32")
        lw.g.op("CAST", [raw], [as_float])
        return raw, lw.affine(as_float, a, b, shape, "normalized", None)
    shifted = lw.g.tensor("images_int8", shape, "int8", 1.0, np.array([-128]))
    lw.g.op("QUANTIZE", [raw], [shifted])
    lw.scales[shifted], lw.bounds[shifted] = 1.0, 255.0
    bound = float(np.max(np.maximum(np.abs(b), np.abs(255 * a + b))))
    scale = input_range(lw) or bound / 127.0
    return raw, lw.affine(shifted, a, b, shape, "normalized", None, scale,
                            min(bound, 128 * scale))


def input_range(lw):
    first = [layer for layer in lw.layers()
             if any(isinstance(s, tf_keras.layers.InputLayer)
                    for s in np.atleast_1d(lw.nodes[layer.name].inbound_layers))]
    scales = [float(output_scale(c, "input")[1]) for c in first if is_input_quant(c)]
    return scales[0] if scales else None


def global_pool(lw, layer) -> None:
    x = lw.input_of(layer)
    dense = lw.only_consumer(layer, lambda c: isinstance(c, tf_keras.layers.Dense))
    if lw.quantized and dense is not None:
        classifier(lw, x, dense)
        lw.done.add(dense.name)
        return
    scale, bound = (lw.scales.get(x), lw.bounds.get(x))
    if lw.quantized:
        scale, bound = lw.out_scale(layer, bound)
    y = lw.new(layer.name, lw.shape(layer), scale, bound)
    axes = lw.g.constant(layer.name + "/axes", np.array([1, 2], np.int32), "int32")
    lw.g.op("MEAN", [x, axes], [y], options("Reducer", keepDims=False))
    lw.set_output(layer, y)


def classifier(lw, x, dense) -> None:
    """Global average pooling + a float Dense: int8 x int8 -> int32, then float scales."""
    n, h, w, c = lw.g.shape_of(x)
    kernel = dense.kernel.numpy().astype(np.float64)  # (C, K)
    k = kernel.shape[1]
    w_scale = np.maximum(np.abs(kernel).max(0), 1e-12) / 127.0
    codes = np.tile(np.rint(kernel / w_scale), (h * w, 1))  # rows: (y, x, c) order
    flat = lw.g.tensor(dense.name + "/features", [n, 1, h * w * c], "int8",
                         lw.scales[x], ZERO)
    lw.g.op("RESHAPE", [x, lw.g.constant(dense.name + "/shape",
                                             np.array([-1, 1, h * w * c], np.int32),
                                             "int32")], [flat])
    acc = lw.g.tensor(dense.name + "/acc", [n, 1, k], "int32", 1.0, ZERO)
    lw.g.op("BATCH_MATMUL", [flat, lw.g.constant(dense.name + "/kernel", codes, "int8",
                                                     1.0, ZERO)],
              [acc], options("BatchMatMul"))
    acc2 = lw.g.tensor(dense.name + "/acc2", [n, k], "int32")
    lw.g.op("RESHAPE", [acc, lw.g.constant(dense.name + "/shape2",
                                               np.array([-1, k], np.int32), "int32")],
              [acc2])
    as_float = lw.g.tensor(dense.name + "/acc_float", [n, k], "float32")
    lw.g.op("CAST", [acc2], [as_float])
    scaled = lw.g.tensor(dense.name + "/scaled", [n, k], "float32")
    lw.g.op("MUL", [as_float, lw.g.constant(
        dense.name + "/scale", (lw.scales[x] * w_scale / (h * w)).astype(np.float32),
        "float32")], [scaled], options("Mul"))
    logits = lw.g.tensor("logits", [n, k], "float32")
    bias = dense.bias.numpy() if dense.use_bias else np.zeros(k, np.float32)
    lw.g.op("ADD", [scaled, lw.g.constant(dense.name + "/bias", bias, "float32")],
              [logits], options("Add"))
    lw.set_output(dense, logits)


def dense(lw, layer) -> None:
    inner = unwrap(layer)
    x = lw.input_of(layer)
    kernel = np.asarray(lw.float_weight(layer, "kernel"), np.float64)
    bias = lw.float_weight(layer, "bias") if inner.use_bias else np.zeros(kernel.shape[1])
    n, k = lw.g.shape_of(x)[0], kernel.shape[1]
    if not lw.quantized:
        y = lw.new(inner.name, [n, k])
        lw.g.op("FULLY_CONNECTED", [x, lw.g.constant(inner.name + "/kernel", kernel.T,
                                                         "float32"),
                                      lw.g.constant(inner.name + "/bias", bias,
                                                      "float32")],
                  [y], options("FullyConnected"))
        lw.set_output(layer, y)
        return
    if not is_quantize_wrapper(layer):
        raise ValueError(f"layer {inner.name!r}: a float Dense is lowered only after "
                         "global average pooling")
    (_, quantizer, state), = [q for q in weight_quantizers(layer)
                              if weight_name(q[0]) == "kernel"]
    bits, scale = quantizer_scale(quantizer, state, kernel.astype(np.float32), "kernel")
    lw.check_bits(inner.name, bits)
    out = float(output_scale(layer, f"{inner.name} output")[1])
    acc_scale = lw.scales[x] * float(scale)
    y = lw.new(inner.name, [n, k], out)
    lw.g.op("FULLY_CONNECTED",
              [x, lw.g.constant(inner.name + "/kernel",
                                  integer.quantize(kernel, scale, bits).T, "int8", scale),
               lw.g.constant(inner.name + "/bias", np.rint(bias / acc_scale), "int32",
                               acc_scale)], [y], options("FullyConnected"))
    logits = lw.g.tensor("logits", [n, k], "float32")
    lw.g.op("DEQUANTIZE", [y], [logits])
    lw.set_output(layer, logits)
