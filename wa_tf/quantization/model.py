"""quantize_model: a float functional model made quantization-aware.

Chooses the layers to quantize and their bit-widths, inserts the input
quantizers, annotates the layers with their QuantizeConfigs, applies TF-MOT and
copies the float weights into the quantized model.
"""

from typing import Mapping, Optional

import tensorflow_model_optimization as tfmot
import tf_keras

from wa_tf.choices import check_bits
from wa_tf.layers import WinogradConv2D, WinogradQuantization
from wa_tf.quantization.configs import (
    AnnotatedOnlyScheme,
    KernelOutputQuantizeConfig,
    OutputQuantizeConfig,
    WinogradQuantizeConfig,
    quantize_scope,
)
from wa_tf.quantization.tfmot_adapter import is_graph_network
from wa_tf.quantization.weights import INPUT_QUANT_SUFFIX, copy_weights

_tfmot_q = tfmot.quantization.keras


def _is_conv(layer):
    return isinstance(layer, WinogradConv2D) or type(layer) is tf_keras.layers.Conv2D


def _layers_to_quantize(model, quantize_first, quantize_last):
    convs = [layer for layer in model.layers if _is_conv(layer)]
    denses = [layer for layer in model.layers if type(layer) is tf_keras.layers.Dense]
    skip = set()
    if convs and not quantize_first:
        skip.add(convs[0].name)
    if denses and not quantize_last:
        skip.add(denses[-1].name)
    return [layer for layer in model.layers
            if (_is_conv(layer) or type(layer) is tf_keras.layers.Dense)
            and layer.name not in skip]


def _bits_per_layer(model, bits, quantize_first, quantize_last, layer_bits):
    """{name: bits} of the layers to quantize (see quantize_model's `layer_bits`)."""
    chosen = {} if bits is None else {
        layer.name: bits for layer in _layers_to_quantize(model, quantize_first, quantize_last)}
    if layer_bits is None:
        return chosen
    if not isinstance(layer_bits, Mapping):
        raise ValueError(f"layer_bits must map layer names to bits (or None); got {layer_bits!r}")
    quantizable = {layer.name for layer in model.layers
                   if _is_conv(layer) or type(layer) is tf_keras.layers.Dense}
    for name, value in layer_bits.items():
        if name not in quantizable:
            raise ValueError(f"layer_bits names {name!r}, which is not a Conv2D, WinogradConv2D "
                             f"or Dense layer of {model.name}")
        if value is None:
            chosen.pop(name, None)
        else:
            chosen[name] = check_bits(value, f"layer_bits[{name!r}]")
    return chosen


def _input_quant_entry(name, source):
    # An identity layer; quantize_apply wraps it with an OutputQuantizeConfig.
    entry = tf_keras.layers.serialize(tf_keras.layers.Activation("linear", name=name))
    entry.update(name=name, inbound_nodes=[[[source[0], source[1], source[2], {}]]])
    return entry


def _rewrite_config(config, targets, quantization):
    """Inserts an input quantizer before each of `targets` (layer names) and
    sets the WinogradQuantization ``quantization[name]`` in the config of each
    Winograd layer it names."""
    names = {entry["name"] for entry in config["layers"]}
    layers = []
    for entry in config["layers"]:
        name = entry["name"]
        if name in targets:
            nodes = entry["inbound_nodes"]
            if len(nodes) != 1 or len(nodes[0]) != 1 or not isinstance(nodes[0][0], list):
                raise ValueError(f"quantize_model needs layer {name!r} to be called once on "
                                 f"one tensor; it has inbound nodes {nodes!r}")
            quant_name = name + INPUT_QUANT_SUFFIX
            if quant_name in names:
                raise ValueError(f"quantize_model inserts a layer named {quant_name!r}, "
                                 "but the model already has one")
            source = nodes[0][0]
            layers.append(_input_quant_entry(quant_name, source))
            call_kwargs = source[3] if len(source) > 3 else {}
            entry = dict(entry, inbound_nodes=[[[quant_name, 0, 0, call_kwargs]]])
            if name in quantization:
                entry["config"] = dict(entry["config"],
                                       quantization=quantization[name].get_config())
        layers.append(entry)
    return dict(config, layers=layers)


def _copy_all_weights(source_model, target_model):
    """Copies every weight of ``source_model`` into its quantized rewrite."""
    report = copy_weights(source_model, target_model)
    if report["unused"]:
        raise ValueError(f"cannot copy weights {report['unused']} into the quantized model")


def _to_functional(model):
    inputs = tf_keras.Input(batch_shape=model.input_shape, dtype=model.inputs[0].dtype)
    outputs = inputs
    for layer in model.layers:
        outputs = layer(outputs)
    return tf_keras.Model(inputs, outputs, name=model.name)


def quantize_model(model, bits=8, per_tap=False, warmup=False, quantize_first=False,
                   quantize_last=False, layer_bits: Optional[Mapping[str, Optional[int]]] = None):
    """Returns a TF-MOT quantization-aware copy of a built tf_keras model.

    ``Conv2D``, ``Dense`` and ``WinogradConv2D`` layers are quantized (see the
    module docstring); weights are copied from ``model``, quantizer ranges start
    empty and are set by the first training batch (or, with ``warmup``, by the
    first batch seen at all for the Winograd-specific quantizers).  Save and
    load the result as a SavedModel directory or checkpoint; load inside
    :func:`quantize_scope`.

    Each quantized layer has one bit-width, used by all its quantizers and by
    its ``<layer>_input_quant``; ``layer_bits`` gives layers their own (mixed
    precision).  A layer left float has no input quantizer: it reads its input
    tensor as it is (float), and its output is float; quantized layers after
    it quantize their own inputs.

    Args:
      model: A built functional or Sequential ``tf_keras`` model.
      bits: Bit-width of every quantized layer's quantizers, 2 to 16; or None
        to quantize only the layers ``layer_bits`` gives a bit-width.
      per_tap: One range per Winograd position (t*t of them) for the
        Winograd-domain weights and input and the element-wise stage.
      warmup: Winograd-layer quantizers (kernel, transforms, Winograd stages)
        take their range from the incoming batch until they have statistics;
        for models adapted from a float checkpoint.
      quantize_first: Quantize the first convolution too (float by default).
      quantize_last: Quantize the last ``Dense`` too (float by default).
      layer_bits: Optional ``{layer name: bits}`` for Conv2D, WinogradConv2D
        or Dense layers, overriding ``bits`` (and ``quantize_first`` /
        ``quantize_last``) for them: 2..16 quantizes the layer at that
        bit-width, None keeps it float.

    Returns:
      A functional ``tf_keras.Model`` with the name of ``model``.

    Raises:
      ValueError: For bad arguments or a model that cannot be quantized.
    """
    if bits is not None:
        bits = check_bits(bits, "bits")
    per_tap, warmup = bool(per_tap), bool(warmup)
    if not isinstance(model, tf_keras.Model) or not is_graph_network(model):
        raise ValueError("model must be a built functional or Sequential tf_keras.Model, "
                         f"got {type(model).__name__}")
    if isinstance(model, tf_keras.Sequential):
        model = _to_functional(model)
    for layer in model.layers:
        if isinstance(layer, tf_keras.Model):
            raise ValueError(f"nested model {layer.name!r} is not supported by quantize_model")
    chosen = _bits_per_layer(model, bits, quantize_first, quantize_last, layer_bits)
    if not chosen:
        if bits is None:
            raise ValueError("nothing to quantize: bits is None and layer_bits gives no layer "
                             "a bit-width")
        raise ValueError("model has no Conv2D, Dense or WinogradConv2D layer to quantize "
                         "(the first convolution and the last Dense stay float unless "
                         "quantize_first / quantize_last)")
    configs, specs = {}, {}
    for layer in model.layers:
        if layer.name not in chosen:
            continue
        layer_bit = chosen[layer.name]
        if isinstance(layer, WinogradConv2D):
            configs[layer.name] = WinogradQuantizeConfig(layer_bit, warmup=warmup)
            specs[layer.name] = WinogradQuantization(layer_bit, per_tap, warmup)
        else:
            configs[layer.name] = KernelOutputQuantizeConfig(layer_bit)
    config = _rewrite_config(model.get_config(), set(configs), specs)
    # Each input quantizer has its layer's bit-width.
    configs.update({name + INPUT_QUANT_SUFFIX: OutputQuantizeConfig(chosen[name])
                    for name in list(configs)})
    with quantize_scope():
        rewritten = tf_keras.Model.from_config(config)
        _copy_all_weights(model, rewritten)

        def annotate(layer):
            if layer.name not in configs:
                return layer
            return _tfmot_q.quantize_annotate_layer(layer, configs[layer.name])

        annotated = tf_keras.models.clone_model(rewritten, clone_function=annotate)
        quantized = _tfmot_q.quantize_apply(annotated, scheme=AnnotatedOnlyScheme())
    _restore_synchronized_batchnorm(model, quantized)
    return quantized


def _restore_synchronized_batchnorm(original, quantized):
    """Re-enables ``synchronized`` BatchNormalization lost by cloning.

    tf_keras' ``BatchNormalization.get_config`` omits ``synchronized``, so every
    rebuild from config (ours and TF-MOT's) falls back to per-replica batch
    statistics, and distributed training would then depend on the number of
    replicas.  A synchronized layer is never fused, hence ``fused = False``.
    """
    synced = {layer.name for layer in original.layers
              if isinstance(layer, tf_keras.layers.BatchNormalization)
              and getattr(layer, "synchronized", False)}
    for layer in quantized.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization) and layer.name in synced:
            layer.synchronized = True
            layer.fused = False
