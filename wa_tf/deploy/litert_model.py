"""A trained wa_tf model lowered, layer by layer, to a LiteRT graph.

:func:`build` walks a functional tf_keras model (float, or quantized by
:func:`wa_tf.quantization.quantize_model`) in topological order and appends
builtin LiteRT operators to a :class:`~wa_tf.deploy.tflite_graph.Graph`.

Integer models keep the run's own quantization, with no calibration set:

* every ``<layer>_input_quant`` range, the quantized layers' weight codes and
  output ranges are the trained ones, and Winograd-aware layers are lowered by
  :mod:`wa_tf.deploy.litert_winograd`;
* BatchNormalization, float in training, becomes a 1x1 depthwise convolution
  (its per-channel affine, ReLU fused) that writes the next layer's input
  codes directly, or the epilogue of the native Winograd operator before it;
* a tensor that training left float gets the range of the quantizer that reads
  it (looking through max-pooling), else a range bounded from its inputs'
  (never clipped): BatchNormalization before an addition, the last block's
  output;
* a float stem convolution (the default) is folded with its BatchNormalization
  and ReLU, its weights quantized per output channel;
* a float classifier (the default) sums the last feature map against int8
  weights in an int32 BATCH_MATMUL, average pooling folded into its float
  scale; a quantized one runs as the trained FULLY_CONNECTED.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tf_keras

from wa_tf.deploy import integer, litert_ends, litert_winograd
from wa_tf.deploy.integer_export import model_layer_arrays, output_scale, quantizer_scale
from wa_tf.deploy.litert_ends import ZERO, is_input_quant
from wa_tf.deploy.litert_fusion import (
    bn_affine,
    epilogue,
    is_batch_norm,
    is_plain_relu,
    statistical_bound,
)
from wa_tf.deploy.tflite_graph import Graph, options
from wa_tf.layers import WinogradConv2D
from wa_tf.quantization import unwrap, weight_name
from wa_tf.quantization.tfmot_adapter import call_node, is_quantize_wrapper, weight_quantizers


class _Lowering:
    """State of one :func:`build` call."""

    def __init__(self, model, quantized: bool, batch_size: int, wide: bool = False,
                 native: bool = False):
        self.model, self.quantized, self.batch, self.wide = model, quantized, batch_size, wide
        self.native = native
        self.g = Graph()
        self.tensors: Dict[int, int] = {}       # id(KerasTensor) -> graph tensor
        self.scales: Dict[int, float] = {}      # graph tensor -> scale
        self.bounds: Dict[int, float] = {}      # graph tensor -> max |value|
        self.nodes = {layer.name: call_node(model, layer) for layer in self.layers()}
        self.consumers: Dict[str, List] = {layer.name: [] for layer in self.layers()}
        for layer in self.layers():
            for source in self.inbound(layer):
                self.consumers[source.name].append(layer)
        self.done = set()
        self.info: Dict[str, Dict] = {}
        self.layer_tensors: Dict[str, int] = {}  # Keras layer -> graph tensor of its output
        self.winograd_arrays: Optional[Dict[str, Dict]] = None  # layer files, by layer

    def layers(self):
        return [layer for layer in self.model.layers
                if not isinstance(layer, tf_keras.layers.InputLayer)]

    def inbound(self, layer) -> list:
        sources = self.nodes[layer.name].inbound_layers
        sources = sources if isinstance(sources, (list, tuple)) else [sources]
        return [s for s in sources if not isinstance(s, tf_keras.layers.InputLayer)]

    def input_of(self, layer) -> int:
        tensors = self.nodes[layer.name].input_tensors
        tensors = tensors if isinstance(tensors, (list, tuple)) else [tensors]
        return self.tensors[id(tensors[0])]

    def inputs_of(self, layer) -> List[int]:
        return [self.tensors[id(t)] for t in self.nodes[layer.name].input_tensors]

    def set_output(self, layer, tensor: int) -> None:
        outputs = self.nodes[layer.name].output_tensors
        outputs = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        self.tensors[id(outputs)] = tensor
        self.layer_tensors[layer.name] = tensor

    def only_consumer(self, layer, predicate):
        """The layer's single consumer if it satisfies ``predicate`` (a fusion), else None."""
        consumers = self.consumers[layer.name]
        if len(consumers) == 1 and predicate(consumers[0]):
            return consumers[0]
        return None

    def target_scale(self, layer) -> Optional[float]:
        """The range of the first quantizer reading ``layer``'s output (through max-pools)."""
        for consumer in self.consumers[layer.name]:
            if is_input_quant(consumer):
                return float(output_scale(consumer, f"{consumer.name} input")[1])
            if isinstance(unwrap(consumer), tf_keras.layers.MaxPooling2D):
                scale = self.target_scale(consumer)
                if scale is not None:
                    return scale
        return None

    # -- tensors -----------------------------------------------------------------------------

    def new(self, name, shape, scale=None, bound=None) -> int:
        if not self.quantized:
            return self.g.tensor(name, shape, "float32")
        index = self.g.tensor(name, shape, "int8", scale, ZERO)
        self.scales[index] = float(scale)
        self.bounds[index] = float(bound if bound is not None else 128 * scale)
        return index

    def out_scale(self, layer, bound: float) -> Tuple[float, float]:
        """(scale, bound) of a tensor training left float: its reader's range, else ``bound``."""
        scale = self.target_scale(layer)
        if scale is None:
            scale = max(bound, 1e-8) / 127.0
        return scale, min(bound, 128 * scale)

    def shape(self, layer) -> list:
        outputs = self.nodes[layer.name].output_tensors
        outputs = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        return [self.batch] + [int(d) for d in outputs.shape[1:]]

    # -- layers ------------------------------------------------------------------------------

    def affine(self, x, a, b, shape, name, activation, scale=None, bound=None) -> int:
        """y = a x + b per channel as a 1x1 depthwise convolution (``activation`` fused)."""
        channels = shape[-1]
        a = np.broadcast_to(np.asarray(a, np.float64), (channels,))
        b = np.broadcast_to(np.asarray(b, np.float64), (channels,))
        y = self.new(name, shape, scale, bound)
        opts = options("DepthwiseConv2D", padding="valid", stride=1, depthMultiplier=1,
                       activation=activation)
        if not self.quantized:
            weights = self.g.constant(name + "/a", a.reshape(1, 1, 1, channels), "float32")
            bias = self.g.constant(name + "/b", b, "float32")
            self.g.op("DEPTHWISE_CONV_2D", [x, weights, bias], [y], opts)
            return y
        w_scale = np.where(a != 0, np.abs(a) / 127.0, 1.0)
        codes = np.where(a > 0, 127, np.where(a < 0, -127, 0)).astype(np.int8)
        acc_scale = self.scales[x] * w_scale
        # The kernel subtracts the input's zero point itself.
        bias = np.clip(np.rint(b / acc_scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        self.g.op("DEPTHWISE_CONV_2D",
                  [x, self.g.constant(name + "/a", codes.reshape(1, 1, 1, channels), "int8",
                                      w_scale, axis=3),
                   self.g.constant(name + "/b", bias, "int32", acc_scale)], [y], opts)
        return y

    def fused_tail(self, layer):
        """The layers fused after ``layer`` (BatchNorm, ReLU) and the fused activation."""
        tail, activation = [], None
        bn = self.only_consumer(layer, is_batch_norm)
        if bn is not None and isinstance(unwrap(layer), tf_keras.layers.Conv2D):
            tail.append(bn)
        last = tail[-1] if tail else layer
        relu = self.only_consumer(last, is_plain_relu)
        if relu is not None:
            tail.append(relu)
            activation = "relu"
        return tail, activation

    def conv(self, layer) -> None:
        """A Conv2D: quantized as trained, or float (folded with its BN and ReLU)."""
        inner = unwrap(layer)
        x = self.input_of(layer)
        if inner.strides != (1, 1) and inner.padding == "same":
            raise ValueError(f"layer {inner.name!r}: strided 'same' convolutions are not lowered")
        kernel = np.asarray(inner.kernel.numpy() if not is_quantize_wrapper(layer)
                            else self.float_weight(layer, "kernel"), np.float64)
        bias = self.float_weight(layer, "bias") if inner.use_bias else None
        opts_ = dict(padding=inner.padding, strideH=inner.strides[0], strideW=inner.strides[1])
        if not self.quantized:
            y = self.new(inner.name, self.shape(layer))
            self.g.op("CONV_2D", [x, self.g.constant(inner.name + "/kernel",
                                                     kernel.transpose(3, 0, 1, 2), "float32"),
                                  self.g.constant(inner.name + "/bias", np.zeros(kernel.shape[3])
                                                  if bias is None else bias, "float32")],
                      [y], options("Conv2D", **opts_))
            self.set_output(layer, y)
            return
        k = kernel.shape[3]
        if is_quantize_wrapper(layer):  # the trained codes, output range and bias
            tail, activation, a, b = [], None, np.ones(k), np.zeros(k)
            (_, quantizer, state), = [q for q in weight_quantizers(layer)
                                      if weight_name(q[0]) == "kernel"]
            bits, scale = quantizer_scale(quantizer, state, kernel.astype(np.float32),
                                          f"{inner.name} kernel")
            codes = integer.quantize(kernel, scale, bits)
            w_scale = np.full(k, float(scale))
            out, bound = float(output_scale(layer, f"{inner.name} output")[1]), None
            self.check_bits(inner.name, bits)
        else:  # float in training: BN and ReLU folded, weights per output channel
            tail, activation = self.fused_tail(layer)
            a, b = np.ones(k), np.zeros(k)
            if tail and is_batch_norm(tail[0]):
                a, b = bn_affine(tail[0])
            kernel = kernel * a
            w_scale = np.maximum(np.abs(kernel).reshape(-1, k).max(0), 1e-12) / 127.0
            codes = np.rint(kernel / w_scale)
            peak = np.abs(kernel).reshape(-1, k).sum(0) * self.bounds[x] + np.abs(b)
            out, bound = self.out_scale(tail[-1] if tail else layer, float(peak.max()))
        if bias is not None:
            b = b + a * bias
        acc_scale = self.scales[x] * w_scale
        y = self.new(inner.name, self.shape(layer), out, bound)
        self.g.op("CONV_2D",
                  [x, self.g.constant(inner.name + "/kernel", codes.transpose(3, 0, 1, 2),
                                      "int8", w_scale),
                   self.g.constant(inner.name + "/bias", np.rint(b / acc_scale), "int32",
                                   acc_scale)],
                  [y], options("Conv2D", activation=activation, **opts_))
        for fused in tail:
            self.done.add(fused.name)
        self.set_output(tail[-1] if tail else layer, y)

    def float_weight(self, layer, name):
        for variable in layer.weights:
            if weight_name(variable) == name:
                return variable.numpy()
        raise ValueError(f"layer {layer.name!r} has no weight {name!r}")

    def check_bits(self, name, bits) -> None:
        if bits > 8:
            raise ValueError(f"layer {name!r} is quantized to {bits} bits; LiteRT integer "
                             "tensors hold at most 8: export it as a float32 LiteRT model "
                             "(a run without --Q) or serve the SavedModel")

    def winograd(self, layer) -> None:
        inner = unwrap(layer)
        x = self.input_of(layer)
        if not self.quantized:
            u = inner.winograd_weights().numpy()
            t = inner.tile_size + inner.kernel_size[0] - 1
            y = litert_winograd.lower_float(
                self.g, x, inner.B_t.numpy(), inner.A_t.numpy(),
                u.reshape(t, t, *u.shape[1:]), inner.tile_size, inner.kernel_size[0],
                inner.padding, inner.name, inner.bias.numpy() if inner.use_bias else None)
            self.set_output(layer, y)
            return
        if not (is_quantize_wrapper(layer) and inner.quantization):
            raise ValueError(f"layer {inner.name!r} is float in a quantized model; an integer "
                             "LiteRT model needs every convolution quantized")
        if self.winograd_arrays is None:  # every layer's U from one graph
            self.winograd_arrays = model_layer_arrays(self.model)
        arrays = integer.as_layer(self.winograd_arrays[inner.name])
        for tensor in integer.TENSORS:
            self.check_bits(inner.name, arrays[f"{tensor}_bits"])
        if abs(self.scales[x] / float(arrays["input_scale"]) - 1) > 1e-6:
            raise ValueError(f"layer {inner.name!r}: its input is not quantized with its range")
        scale = float(arrays["output_scale"])
        bound, fused = 128 * scale, []
        bn = self.only_consumer(layer, is_batch_norm) if self.native else None
        if bn is not None:  # BN (and ReLU) run as the native operator's epilogue
            a, b, relu, z_scale, bound = self.bn_output(bn, bound)
            arrays = dict(arrays, **epilogue(a, b, scale, z_scale, relu is not None))
            scale, fused = z_scale, [bn] + ([relu] if relu is not None else [])
        if self.native:
            y = litert_winograd.lower_native(self.g, x, arrays, inner.name)
            info = {"native": True, "fused": [f.name for f in fused]}
        else:
            y, info = litert_winograd.lower_int8(self.g, x, arrays, inner.name, wide=self.wide)
        self.scales[y], self.bounds[y] = scale, bound
        self.info[inner.name] = info
        self.done.update(f.name for f in fused)
        self.set_output(fused[-1] if fused else layer, y)

    def input_quant(self, layer) -> None:
        """A ``<layer>_input_quant``: the reader's codes (requantised unless already so)."""
        x = self.input_of(layer)
        if not self.quantized:
            self.set_output(layer, x)
            return
        bits, scale = output_scale(layer, f"{layer.name} range")
        self.check_bits(layer.name, bits)
        if abs(self.scales[x] / float(scale) - 1) <= 1e-6:
            self.set_output(layer, x)
            return
        y = self.new(layer.name, self.g.shape_of(x), float(scale))
        self.g.op("QUANTIZE", [x], [y])
        self.set_output(layer, y)

    def bn_output(self, bn, x_bound: float):
        """(a, b, relu, scale, bound): a quantized BatchNormalization's affine, the ReLU
        fused after it (or None) and its int8 output's scale and bound."""
        a, b = bn_affine(bn)
        relu = self.only_consumer(bn, is_plain_relu)
        bound = float(np.max(np.abs(a) * x_bound + np.abs(b)))
        if relu is None:  # e.g. before an addition: no quantizer reads it
            bound = min(bound, statistical_bound(bn))
        scale, bound = self.out_scale(relu or bn, bound)
        return a, b, relu, scale, bound

    def batch_norm(self, layer) -> None:
        x = self.input_of(layer)
        shape = self.g.shape_of(x)
        if not self.quantized:
            a, b = bn_affine(layer)
            relu = self.only_consumer(layer, is_plain_relu)
            y = self.affine(x, a, b, shape, layer.name, "relu" if relu else None)
        else:
            a, b, relu, scale, bound = self.bn_output(layer, self.bounds[x])
            y = self.affine(x, a, b, shape, layer.name, "relu" if relu else None, scale, bound)
        if relu is not None:
            self.done.add(relu.name)
        self.set_output(relu or layer, y)

    def add(self, layer) -> None:
        inputs = self.inputs_of(layer)
        if len(inputs) != 2:
            raise ValueError(f"layer {layer.name!r}: only two-input additions are lowered")
        relu = self.only_consumer(layer, is_plain_relu)
        last = relu or layer
        scale, bound = (None, None) if not self.quantized else \
            self.out_scale(last, sum(self.bounds[i] for i in inputs))
        y = self.new(last.name, self.g.shape_of(inputs[0]), scale, bound)
        self.g.op("ADD", inputs, [y], options("Add", activation="relu" if relu else None))
        if relu is not None:
            self.done.add(relu.name)
        self.set_output(last, y)

    def relu(self, layer) -> None:
        x = self.input_of(layer)
        y = self.new(layer.name, self.g.shape_of(x), self.scales.get(x), self.bounds.get(x))
        self.g.op("RELU", [x], [y])
        self.set_output(layer, y)

    def max_pool(self, layer) -> None:
        x = self.input_of(layer)
        y = self.new(layer.name, self.shape(layer), self.scales.get(x), self.bounds.get(x))
        pool = layer.pool_size
        self.g.op("MAX_POOL_2D", [x], [y], options(
            "Pool2D", padding=layer.padding, strideH=layer.strides[0], strideW=layer.strides[1],
            filterHeight=pool[0], filterWidth=pool[1]))
        self.set_output(layer, y)


_DISPATCH = ((WinogradConv2D, "winograd"), (tf_keras.layers.Conv2D, "conv"),
             (tf_keras.layers.BatchNormalization, "batch_norm"), (tf_keras.layers.Add, "add"),
             (tf_keras.layers.ReLU, "relu"), (tf_keras.layers.MaxPooling2D, "max_pool"),
             (tf_keras.layers.GlobalAveragePooling2D, litert_ends.global_pool),
             (tf_keras.layers.Dense, litert_ends.dense))


# How the integer Winograd transforms sum their int8 parts (see build).
TRANSFORM_PRECISIONS = ("int8", "int16", "native")


def is_quantized(model) -> bool:
    """True when any layer of ``model`` is wrapped by TF-MOT's quantizer."""
    return any(is_quantize_wrapper(layer) for layer in model.layers)


def build(model, normalization: Optional[Sequence] = None, batch_size: int = 1,
          transforms: str = "int8") -> Tuple[bytes, Dict]:
    """Lowers ``model`` to a LiteRT flatbuffer.

    Args:
      model: A functional tf_keras model of wa_tf's layers (float or quantized).
      normalization: ``(mean, std)`` per channel on [0, 1] images: the file then
        takes uint8 0-255 images; else float32 images as the model takes them.
      batch_size: Batch size of the file's static shapes (the interpreter can
        resize it: every reshape keeps the batch free).
      transforms: 'int8' (every tensor int8, XNNPACK runs it all) or 'int16':
        the Winograd transforms sum their int8 parts in int16 before one
        requantisation, closer to the integer reference but on LiteRT's
        builtin kernels (see :func:`wa_tf.deploy.litert_winograd.lower_int8`);
        'native': each Winograd layer one custom operator running wa_tf's int8
        kernel, bit-exact with the integer reference
        (:mod:`wa_tf.deploy.litert_native` runs such a file).

    Returns:
      ``(flatbuffer bytes, info)``; ``info`` has ``operators`` (the builtin
      operators used), ``integer``, per Winograd layer whether its transforms
      are stored exactly (``winograd``), the graph tensor of each Keras
      layer's output (``tensors``; fused layers share one) and the operators
      XNNPACK refuses (``xnnpack_refused``: LiteRT's builtin kernels run the file).

    Raises:
      ValueError: For a model or layer this lowering does not express.
    """
    if transforms not in TRANSFORM_PRECISIONS:
        raise ValueError(f"transforms must be one of {', '.join(TRANSFORM_PRECISIONS)}; "
                         f"got {transforms!r}")
    quantized = is_quantized(model)
    if transforms == "native" and not quantized:
        raise ValueError("transforms='native' runs integer Winograd layers: export a quantized "
                         "model (a run with --Q)")
    lowering = _Lowering(model, quantized, int(batch_size), wide=transforms == "int16",
                         native=transforms == "native")
    graph_input, x = litert_ends.image_input(lowering, normalization)
    lowering.tensors[id(model.inputs[0])] = x
    for layer in lowering.layers():
        if layer.name in lowering.done:
            continue
        inner = unwrap(layer)
        if is_input_quant(layer):
            lowering.input_quant(layer)
            continue
        if is_plain_relu(layer) and not isinstance(inner, tf_keras.layers.ReLU):
            lowering.relu(layer)
            continue
        method = next((name for kind, name in _DISPATCH if isinstance(inner, kind)), None)
        if method is None:
            raise ValueError(f"layer {layer.name!r} ({type(inner).__name__}) has no LiteRT "
                             "lowering")
        if callable(method):
            method(lowering, layer)
        else:
            getattr(lowering, method)(layer)
    outputs = model.outputs[0]
    logits = lowering.tensors[id(outputs)]
    if lowering.g.quantization_of(logits) is not None:  # a quantized tensor: dequantize
        out = lowering.g.tensor("logits", lowering.g.shape_of(logits), "float32")
        lowering.g.op("DEQUANTIZE", [logits], [out])
        logits = out
    flatbuffer = lowering.g.finish([graph_input], [logits])
    return flatbuffer, {"integer": quantized, "operators": lowering.g.operator_kinds(),
                        "winograd": lowering.info, "tensors": lowering.layer_tensors,
                        "xnnpack_refused": lowering.g.xnnpack_refused}
