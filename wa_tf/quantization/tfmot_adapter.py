"""The private attributes of TF-MOT and Keras that wa_tf reads, in one place.

TF-MOT's ``QuantizeWrapper`` keeps its quantizers in private attributes, and a
Keras functional model keeps the calls of a shared layer in private node
lists; neither has a public accessor.  Every read of them in wa_tf goes through
these functions, so a TF-MOT or tf_keras release that renames one breaks here
only.
"""

from typing import List, Optional, Tuple

import tensorflow_model_optimization as tfmot


def is_quantize_wrapper(layer) -> bool:
    """True for a TF-MOT ``QuantizeWrapper`` (``QuantizeWrapperV2`` included)."""
    return isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)


def weight_quantizers(wrapper) -> List[Tuple[object, object, dict]]:
    """``(float variable, quantizer, quantizer state)`` of each weight a wrapper quantizes."""
    return list(wrapper._weight_vars)  # pylint: disable=protected-access


def output_quantizer(wrapper) -> Optional[Tuple[object, dict]]:
    """``(quantizer, quantizer state)`` of a wrapper's output, or None.

    TF-MOT applies only the first output quantizer its QuantizeConfig returns.
    """
    quantizers = wrapper._output_quantizers  # pylint: disable=protected-access
    if not quantizers:
        return None
    return quantizers[0], wrapper._output_quantizer_vars  # pylint: disable=protected-access


def is_graph_network(model) -> bool:
    """True for a functional or Sequential model (a graph of layers), not a subclassed one."""
    return bool(getattr(model, "_is_graph_network", False))


def inbound_nodes(layer) -> list:
    """The Keras nodes of a layer's calls (``node.inbound_layers``, ``node.input_tensors``)."""
    return list(layer._inbound_nodes)  # pylint: disable=protected-access


def call_inputs(model, layer):
    """The input tensor(s) of ``layer``'s call inside the functional ``model``.

    ``layer.input`` is ambiguous for layers shared between graphs (TF-MOT's
    ``quantize_apply`` reuses the unquantized layers of the model it clones).

    Raises:
      ValueError: if ``layer`` is not called in ``model``.
    """
    return call_node(model, layer).input_tensors


def call_node(model, layer):
    """The Keras node of ``layer``'s call inside the functional ``model``.

    Its ``input_tensors`` and ``output_tensors`` are the call's own, unlike
    ``layer.input`` / ``layer.output`` for a layer shared between models.

    Raises:
      ValueError: if ``layer`` is not called in ``model``.
    """
    network = model._network_nodes  # pylint: disable=protected-access
    for index, node in enumerate(inbound_nodes(layer)):
        if f"{layer.name}_ib-{index}" in network:
            return node
    raise ValueError(f"layer {layer.name!r} is not called in model {model.name!r}")
