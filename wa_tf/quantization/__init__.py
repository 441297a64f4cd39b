"""Quantization-aware training of Winograd-aware models through TF-MOT.

The package holds the fake quantizers (:mod:`.quantizers`), every private TF-MOT
attribute read (:mod:`.tfmot_adapter`), the QuantizeConfigs (:mod:`.configs`), the
weight helpers (:mod:`.weights`) and :func:`quantize_model` (:mod:`.model`); this
module re-exports their public names.

What is quantized (as the reference, Fernandez-Marques et al., MLSys 2020),
every tensor with its own :class:`~wa_tf.quantization.quantizers.EMAQuantizer`:

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

from wa_tf.quantization.configs import (
    AnnotatedOnlyScheme,
    KernelOutputQuantizeConfig,
    OutputQuantizeConfig,
    WinogradQuantizeConfig,
    custom_objects,
    quantize_scope,
)
from wa_tf.quantization.model import quantize_model
from wa_tf.quantization.weights import (
    INPUT_QUANT_SUFFIX,
    copy_weights,
    float_weight,
    inference_weight,
    input_quant_layer,
    named_weights,
    unwrap,
    weight_key,
    weight_name,
)

__all__ = [
    "AnnotatedOnlyScheme",
    "INPUT_QUANT_SUFFIX",
    "KernelOutputQuantizeConfig",
    "OutputQuantizeConfig",
    "WinogradQuantizeConfig",
    "copy_weights",
    "custom_objects",
    "float_weight",
    "inference_weight",
    "input_quant_layer",
    "named_weights",
    "quantize_model",
    "quantize_scope",
    "unwrap",
    "weight_key",
    "weight_name",
]
