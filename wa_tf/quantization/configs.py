"""TF-MOT QuantizeConfigs and scheme of Winograd-aware quantization.

The QuantizeConfigs that annotate Conv2D/Dense, WinogradConv2D and the inserted
input quantizers, the scheme that quantizes exactly the annotated layers, and
the custom objects (by their registered Keras names) that load quantized models.
"""

import tensorflow_model_optimization as tfmot
import tf_keras

from wa_tf.choices import check_bits
from wa_tf.layers import WinogradConv2D
from wa_tf.quantization.quantizers import EMAQuantizer, MaxAbsQuantizer

_tfmot_q = tfmot.quantization.keras


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class KernelOutputQuantizeConfig(_tfmot_q.QuantizeConfig):
    """Quantizes named weight attributes and the output of a layer.

    Weights and output get :class:`~wa_tf.quantization.quantizers.EMAQuantizer` ranges, as
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

