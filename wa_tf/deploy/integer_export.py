"""Export of a TF-MOT-quantized Winograd-aware layer to its integer deployment file.

Reads the quantizer ranges, weights and transforms of a
:class:`~wa_tf.layers.WinogradConv2D` quantized by
:func:`wa_tf.quantization.quantize_model` and writes them in the file format
of :mod:`wa_tf.deploy.integer` (which documents it and runs the integer pipeline)::

    paths = export_model_npz(qmodel, "layers/")      # {layer name: path}
    y = wa_tf.deploy.integer.run_layer(paths["layer2.0.conv1"], x)
"""

import os
from typing import Dict

import numpy as np
import tensorflow as tf

from wa_tf.deploy import integer
from wa_tf.layers import WinogradConv2D
from wa_tf.quantization import (
    INPUT_QUANT_SUFFIX,
    float_weight,
    inference_weight,
    input_quant_layer,
    weight_name,
)
from wa_tf.quantization.quantizers import EMAQuantizer, MaxAbsQuantizer
from wa_tf.quantization.tfmot_adapter import (
    is_quantize_wrapper,
    output_quantizer,
    weight_quantizers,
)
from wa_tf.transforms import STAGES


def _ema_scale(quantizer, variables, what):
    """Bits and float32 scale of a frozen EMAQuantizer."""
    if float(variables["initialized_var"].numpy()) <= 0:
        raise ValueError(f"the {what} quantizer has no range yet: train or calibrate the model "
                         "(one training-mode batch) before exporting")
    range_ = quantizer.inference_range(variables).numpy()
    return quantizer.num_bits, integer.scale_from_range(range_, quantizer.num_bits)


def quantizer_scale(quantizer, variables, value, what):
    """Bits and float32 scale a wa_tf quantizer applies at inference.

    Args:
      quantizer, variables: A weight quantizer and its state (from
        :func:`wa_tf.tfmot_adapter.weight_quantizers`).
      value: The weight it quantizes (MaxAbsQuantizer scales by its extreme).
      what: The weight's name, for errors.
    """
    if isinstance(quantizer, EMAQuantizer):
        return _ema_scale(quantizer, variables, what)
    if isinstance(quantizer, MaxAbsQuantizer):
        range_ = np.max(np.abs(np.asarray(value, np.float32)))
        return quantizer.num_bits, integer.scale_from_range(range_, quantizer.num_bits)
    raise ValueError(f"the {what} quantizer is a {type(quantizer).__name__}; "
                     "only EMAQuantizer and MaxAbsQuantizer can be exported")


def output_scale(wrapper, what):
    """Bits and float32 scale of a wrapper's output quantizer (``what`` names it in errors)."""
    quantizer = output_quantizer(wrapper)
    if quantizer is None:
        raise ValueError(f"layer {wrapper.layer.name!r} has no output quantizer")
    return _ema_scale(*quantizer, what)


def _input_quantizer(wrapper):
    """The wrapped ``<layer>_input_quant`` layer feeding ``wrapper``."""
    inbound = input_quant_layer(wrapper)
    if inbound is None or not is_quantize_wrapper(inbound):
        raise ValueError(f"layer {wrapper.layer.name!r} has no input quantizer "
                         f"'{wrapper.layer.name}{INPUT_QUANT_SUFFIX}' in front of it; "
                         "quantize the model with wa_tf.quantization.quantize_model")
    return inbound


def _winograd_weights(wrappers) -> list:
    """The float32 U = G_q g_q G_q^T each wrapped layer quantizes, (t*t, C, K).

    Computed by the layer itself from the wrapper's quantized kernel (and flex
    G), in one graph as the model is deployed, not recomputed in numpy: the
    range of U is its own extreme element, which then lies exactly on a
    rounding tie, so a different summation order could round it the other way.
    """
    @tf.function
    def winograd_weights():
        return [wrapper.layer.winograd_weights(
            kernel=inference_weight(wrapper, "kernel"),
            g=inference_weight(wrapper, "G") if wrapper.layer.flex else None)
                for wrapper in wrappers]

    return [u.numpy() for u in winograd_weights()]


def _check_wrapper(wrapper):
    if not (is_quantize_wrapper(wrapper) and isinstance(wrapper.layer, WinogradConv2D)):
        name = getattr(wrapper, "name", repr(wrapper))
        raise ValueError(f"layer_or_wrapper must be the TF-MOT QuantizeWrapper of a "
                         f"WinogradConv2D (from wa_tf.quantization.quantize_model), got "
                         f"{type(wrapper).__name__} {name!r}")
    if not wrapper.layer.quantization:
        raise ValueError(f"layer {wrapper.layer.name!r} has no Winograd-stage quantization")


def layer_arrays(layer_or_wrapper) -> Dict[str, np.ndarray]:
    """The file's arrays for a quantized WinogradConv2D (see :mod:`wa_tf.deploy.integer`).

    Args:
      layer_or_wrapper: The TF-MOT ``QuantizeWrapper`` of a WinogradConv2D in a
        model from :func:`wa_tf.quantization.quantize_model`; a bare layer gets a
        clear error (it lacks the input, kernel and output quantizers).

    Raises:
      ValueError: for a float or unwrapped layer, a missing input quantizer or
        quantizers without ranges.
    """
    _check_wrapper(layer_or_wrapper)
    fields = _layer_fields(layer_or_wrapper)  # checks every range before running the layer
    return integer.encode_layer(**fields, u=_winograd_weights([layer_or_wrapper])[0])


def _layer_fields(wrapper) -> dict:
    """:func:`wa_tf.deploy.integer.encode_layer`'s arguments for a wrapped layer, but ``u``."""
    layer = wrapper.layer
    bits, scales = {}, {}
    bits["input"], scales["input"] = output_scale(_input_quantizer(wrapper), "input")
    values = {}
    quantized = {weight_name(w): (w, q, v) for w, q, v in weight_quantizers(wrapper)}
    for name in ("kernel", "A_t", "B_t", "G"):
        if name in quantized:
            weight, quantizer, variables = quantized[name]
        elif name != "kernel" and layer.transform_quantizer is not None:
            weight, quantizer, variables = float_weight(wrapper, name), \
                layer.transform_quantizer, {}
        else:
            raise ValueError(f"the {name} of layer {layer.name!r} is not quantized")
        values[name] = np.asarray(weight.numpy(), np.float32)
        bits[name], scales[name] = quantizer_scale(quantizer, variables, values[name], name)
    for stage in STAGES:
        quantizer, variables = layer.stage_quantizers[stage]
        bits[stage], scales[stage] = _ema_scale(quantizer, variables, stage)
    bits["output"], scales["output"] = output_scale(wrapper, "output")
    bias = float_weight(wrapper, "bias").numpy() if layer.use_bias else None
    return dict(name=layer.name, tile_size=layer.tile_size, kernel_size=layer.kernel_size[0],
                padding=layer.padding, flex=layer.flex,
                per_tap=layer.quantization.per_tap, bits=bits,
                scales=scales, kernel=values["kernel"], G=values["G"], B_t=values["B_t"],
                A_t=values["A_t"], bias=bias)


def export_layer_npz(layer_or_wrapper, path: str) -> str:
    """Writes one quantized WinogradConv2D's deployment file.

    Args:
      layer_or_wrapper: See :func:`layer_arrays`.
      path: Output file (``.npz`` is appended by numpy when missing).

    Returns:
      The path written.
    """
    return integer.save(layer_arrays(layer_or_wrapper), path)


def model_layer_arrays(model) -> Dict[str, Dict[str, np.ndarray]]:
    """:func:`layer_arrays` of every quantized WinogradConv2D of a model, by layer name.

    Every layer's U comes from one graph (one trace for the model, not one per layer).
    """
    wrappers = [layer for layer in model.layers
                if is_quantize_wrapper(layer) and isinstance(layer.layer, WinogradConv2D)
                and layer.layer.quantization]
    fields = [_layer_fields(wrapper) for wrapper in wrappers]  # every range checked first
    return {wrapper.layer.name: integer.encode_layer(**layer_fields, u=u)
            for wrapper, layer_fields, u in zip(wrappers, fields, _winograd_weights(wrappers))}


def export_model_npz(model, directory: str) -> Dict[str, str]:
    """Writes ``<directory>/<layer>.npz`` for every quantized WinogradConv2D of a model.

    Returns:
      Layer name -> path written.

    Raises:
      ValueError: if the model has no quantized WinogradConv2D.
    """
    arrays = model_layer_arrays(model)
    if not arrays:
        raise ValueError("model has no quantized WinogradConv2D layer to export "
                         "(quantize it with wa_tf.quantization.quantize_model)")
    return {name: integer.save(layer, os.path.join(directory, name + ".npz"))
            for name, layer in arrays.items()}
