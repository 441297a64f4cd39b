"""Weights of quantized models: unwrapping, naming, copying, reading as used.

The helpers that find a weight of a possibly TF-MOT-wrapped layer by name, copy
weights between a float model and its quantized copy, and read a weight as it
is used at inference (fake-quantized with the quantizer's current range).
"""

from typing import Dict, List, Optional

import tensorflow as tf
import tf_keras

from wa_tf.quantization.quantizers import fake_quant
from wa_tf.quantization.tfmot_adapter import (
    inbound_nodes,
    is_quantize_wrapper,
    weight_quantizers,
)

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

