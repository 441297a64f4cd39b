"""Quantization-aware training of Winograd-aware models through TF-MOT.

What is quantized (as the reference, Fernandez-Marques et al., MLSys 2020),
every tensor with its own :class:`~wa_tf.quantizers.EMAQuantizer`:

* every quantized layer's input, by an identity layer named
  ``<layer>_input_quant`` inserted in front of it and annotated with
  :class:`OutputQuantizeConfig` (each consumer of a tensor quantizes it
  separately, as the reference);
* ``Conv2D`` and ``Dense``: the kernel and the output
  (:class:`KernelOutputQuantizeConfig`);
* ``WinogradConv2D``: the kernel, flex transforms ``A_t``, ``B_t``, ``G`` and
  the output (:class:`WinogradQuantizeConfig`); the layer itself quantizes
  the Winograd-domain weights and input, the element-wise stage (its
  ``quantization``, a :class:`~wa_tf.layers.WinogradQuantization`, optionally
  per tap) and static transforms (from their own range, i.e. quantized once
  and frozen).

BatchNormalization, activations, pooling and other layers stay float, and so
do, by default, the first convolution (stem) and the last ``Dense``.  Each
quantized layer has one bit-width for all its quantizers (its input quantizer
included); ``quantize_model(layer_bits=...)`` gives layers their own, or keeps
them float (mixed precision, as mixed architectures use).

Example::

    qmodel = quantize_model(model, bits=8)
    qmodel.compile(...); qmodel.fit(...)
    qmodel.save(path)                 # a SavedModel directory
    with quantize_scope():
        restored = tf_keras.models.load_model(path)
"""

from typing import Dict, List, Mapping, Optional

import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from wa_tf.choices import check_bits
from wa_tf.layers import WinogradConv2D, WinogradQuantization
from wa_tf.quantizers import EMAQuantizer, MaxAbsQuantizer, fake_quant
from wa_tf.tfmot_adapter import (
    inbound_nodes,
    is_graph_network,
    is_quantize_wrapper,
    weight_quantizers,
)

_tfmot_q = tfmot.quantization.keras

# Name suffix of the identity layer quantize_model inserts in front of each quantized layer.
INPUT_QUANT_SUFFIX = "_input_quant"


def unwrap(layer):
    """The layer inside a TF-MOT QuantizeWrapper, or the layer itself."""
    return getattr(layer, "layer", layer) if hasattr(layer, "quantize_config") else layer


def weight_name(variable) -> str:
    """A variable's short name: ``'quant_conv/kernel:0'`` -> ``'kernel'``."""
    return variable.name.split(":")[0].split("/")[-1]


def weight_key(layer, variable) -> str:
    """``'<layer>/<weight>'``, naming a wrapped layer by the layer it wraps."""
    return f"{unwrap(layer).name}/{weight_name(variable)}"


def named_weights(model: tf_keras.Model) -> Dict[str, tf.Variable]:
    """The model's variables by :func:`weight_key`, in layer order.

    The same key in a float model and its quantized copy names the same
    weight, so weights copy between them (and between Conv2D and
    WinogradConv2D models, whose kernels have the same name and shape).
    """
    weights = {}
    for layer in model.layers:
        for variable in layer.weights:
            weights.setdefault(weight_key(layer, variable), variable)
    return weights


def copy_weights(source: tf_keras.Model, target: tf_keras.Model) -> Dict[str, List[str]]:
    """Copies every weight of ``source`` into ``target``'s weight of the same key.

    Returns:
      ``{'copied': keys, 'not_found': target keys with no source weight (kept
      as initialised), 'unused': source keys with no target weight}``.

    Raises:
      ValueError: if weights of the same key differ in shape, or none matches.
    """
    src, dst = named_weights(source), named_weights(target)
    copied = []
    for key, variable in dst.items():
        if key not in src:
            continue
        if tuple(src[key].shape) != tuple(variable.shape):
            raise ValueError(f"incompatible models: {key} has shape {tuple(src[key].shape)} "
                             f"in {source.name} and {tuple(variable.shape)} in {target.name}")
        variable.assign(src[key])
        copied.append(key)
    if not copied:
        raise ValueError(f"incompatible models: no weight of {source.name} matches "
                         f"{target.name} by name")
    return {"copied": copied, "not_found": [k for k in dst if k not in src],
            "unused": [k for k in src if k not in dst]}


def float_weight(layer, name: str):
    """The float (unquantized) variable ``name`` of a possibly wrapped layer.

    A QuantizeWrapper replaces the wrapped layer's quantized weight attributes
    by their fake-quantized tensors (and the wrapped layer stops listing
    them); the float variables stay in the wrapper's own weight list.
    """
    for variable in layer.weights:
        if weight_name(variable) == name:
            return variable
    raise ValueError(f"layer {layer.name!r} has no weight named {name!r}")


def inference_weight(layer, name: str):
    """Weight ``name`` of a possibly wrapped layer as it is used at inference.

    The wrapper's fake-quantized weight with the quantizer's current range
    (read without updating the quantizer), or the float variable when the
    wrapper does not quantize it.
    """
    if is_quantize_wrapper(layer):
        for variable, quantizer, state in weight_quantizers(layer):
            if weight_name(variable) == name:
                return fake_quant(variable, quantizer.inference_range(state, variable),
                                  quantizer.num_bits)
    return float_weight(layer, name)


def input_quant_layer(layer) -> Optional[tf_keras.layers.Layer]:
    """The ``<layer>_input_quant`` layer feeding ``layer`` (called once), or None.

    :func:`quantize_model` inserts it in front of every quantized layer; after
    ``quantize_apply`` both are QuantizeWrappers.
    """
    nodes = inbound_nodes(layer)
    if len(nodes) != 1:
        return None
    inbound = nodes[0].inbound_layers
    if unwrap(inbound).name == unwrap(layer).name + INPUT_QUANT_SUFFIX:
        return inbound
    return None


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class KernelOutputQuantizeConfig(_tfmot_q.QuantizeConfig):
    """Quantizes named weight attributes and the output of a layer.

    Weights and output get :class:`~wa_tf.quantizers.EMAQuantizer` ranges, as
    the reference's Conv2d/Linear; a fused activation is applied before the
    output quantizer; the bias stays float.  In the style of TF-MOT's
    ``Default8BitQuantizeConfig``, driven by attribute names.

    Args:
      num_bits: Bit-width, 2 to 16.
      weight_attrs: Names of the layer attributes holding quantized weights.
      warmup: Give the weight quantizers ``warmup=True``.
    """

    def __init__(self, num_bits=8, weight_attrs=("kernel",), warmup=False):
        self.num_bits = check_bits(num_bits)
        self.weight_attrs = tuple(weight_attrs)
        self.warmup = bool(warmup)

    def _weight_attrs(self, layer):
        del layer
        return self.weight_attrs

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, attr), EMAQuantizer(self.num_bits, warmup=self.warmup))
                for attr in self._weight_attrs(layer)]

    def set_quantize_weights(self, layer, quantize_weights):
        for attr, weight in zip(self._weight_attrs(layer), quantize_weights):
            setattr(layer, attr, weight)

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [EMAQuantizer(self.num_bits)]

    def get_config(self):
        return {"num_bits": self.num_bits, "weight_attrs": list(self.weight_attrs),
                "warmup": self.warmup}

    def __eq__(self, other):
        return type(other) is type(self) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class WinogradQuantizeConfig(KernelOutputQuantizeConfig):
    """QuantizeConfig of :class:`~wa_tf.layers.WinogradConv2D`.

    Quantizes the kernel, in flex mode the transforms ``A_t``, ``B_t``, ``G``
    (float master copies are learned, a quantized copy is used at each step),
    and the output.  Static transforms are not listed: TF-MOT's wrapper makes
    every weight it quantizes trainable, so the layer quantizes those
    constants itself.

    Args:
      num_bits: Bit-width, 2 to 16.
      warmup: Give the kernel and transform quantizers ``warmup=True``.
    """

    def __init__(self, num_bits=8, warmup=False):
        super().__init__(num_bits, ("kernel",), warmup)

    def _weight_attrs(self, layer):
        return ("kernel", "A_t", "B_t", "G") if layer.flex else ("kernel",)

    def get_config(self):
        return {"num_bits": self.num_bits, "warmup": self.warmup}


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class OutputQuantizeConfig(KernelOutputQuantizeConfig):
    """Quantizes only a layer's output (EMA range); on the inserted input quantizers.

    Args:
      num_bits: Bit-width, 2 to 16.
    """

    def __init__(self, num_bits=8):
        super().__init__(num_bits, weight_attrs=())

    def get_config(self):
        return {"num_bits": self.num_bits}


class _IdentityLayoutTransform(_tfmot_q.QuantizeLayoutTransform):
    def apply(self, model, layer_quantize_map):
        return model, layer_quantize_map


class _AnnotatedOnlyRegistry(_tfmot_q.QuantizeRegistry):
    def get_quantize_config(self, layer):
        return None

    def supports(self, layer):
        return False


class AnnotatedOnlyScheme(_tfmot_q.QuantizeScheme):
    """A TF-MOT scheme that quantizes exactly the annotated layers.

    TF-MOT's default 8-bit scheme would add what the reference does not have:
    a ``QuantizeLayer`` at the model input with its own +-6-initialised 8-bit
    quantizer (every quantized layer here already quantizes its input), Conv+BN
    folding (BN stays float and separate), and 8-bit output quantizers on
    unannotated layers feeding annotated ones.
    """

    def get_layout_transformer(self):
        return _IdentityLayoutTransform()

    def get_quantize_registry(self):
        return _AnnotatedOnlyRegistry()


def custom_objects():
    """The classes quantized models reference, by class name (for ``load_model``)."""
    return {"QuantizeWrapper": _tfmot_q.QuantizeWrapper,
            "QuantizeWrapperV2": _tfmot_q.QuantizeWrapperV2,
            "WinogradConv2D": WinogradConv2D, "EMAQuantizer": EMAQuantizer,
            "MaxAbsQuantizer": MaxAbsQuantizer, "OutputQuantizeConfig": OutputQuantizeConfig,
            "KernelOutputQuantizeConfig": KernelOutputQuantizeConfig,
            "WinogradQuantizeConfig": WinogradQuantizeConfig}


def quantize_scope():
    """Context manager to deserialize quantized models (TF-MOT's scope plus wa_tf's)."""
    return _tfmot_q.quantize_scope(custom_objects())


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
