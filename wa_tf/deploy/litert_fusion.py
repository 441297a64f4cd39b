"""The layers a LiteRT lowering fuses into the operator before them.

A BatchNormalization after a convolution is, at inference, a per-channel affine
``a x + b`` (:func:`bn_affine`); a plain ReLU clamps at zero
(:func:`is_plain_relu`).  :mod:`wa_tf.deploy.litert_model` folds them into a
float convolution's weights, runs them as one 1x1 depthwise convolution after a
quantized one, or hands them to a native Winograd operator as its epilogue
(:func:`epilogue`), which saves that operator and a pass over the tensor.
"""

from typing import Dict, Tuple

import numpy as np
import tf_keras

from wa_tf.quantization import unwrap

# Standard deviations of a BatchNormalization output its int8 range spans (see
# statistical_bound).
BN_SIGMAS = 6.0


def bn_affine(bn) -> Tuple[np.ndarray, np.ndarray]:
    """(a, b) with bn(x) = a x + b per channel (inference), in float64."""
    var = bn.moving_variance.numpy().astype(np.float64)
    a = 1.0 / np.sqrt(var + bn.epsilon)
    if bn.scale:
        a = a * bn.gamma.numpy()
    b = -bn.moving_mean.numpy() * a
    if bn.center:
        b = b + bn.beta.numpy()
    return a, b


def statistical_bound(bn) -> float:
    """A range of a BatchNormalization's output from its own statistics (data-free).

    Its output has mean beta and standard deviation |gamma| per channel (the
    moving statistics normalise it); ``BN_SIGMAS`` deviations from the mean
    hold all but a vanishing fraction of it, as in data-free quantization
    (Nagel et al., 2019).  A much tighter range than the interval bound, so
    the int8 tensor loses less to rounding before the residual addition.
    """
    gamma = np.abs(bn.gamma.numpy()) if bn.scale else np.ones(bn.moving_mean.shape)
    beta = np.abs(bn.beta.numpy()) if bn.center else np.zeros(bn.moving_mean.shape)
    return float(np.max(beta + BN_SIGMAS * gamma))


def is_batch_norm(layer) -> bool:
    """A (unwrapped) BatchNormalization layer."""
    return isinstance(layer, tf_keras.layers.BatchNormalization)


def is_plain_relu(layer) -> bool:
    """A ReLU with no threshold, slope or cap (a clamp at zero), as a layer or activation."""
    inner = unwrap(layer)
    if isinstance(inner, tf_keras.layers.ReLU):
        return (inner.max_value is None and float(inner.negative_slope) == 0
                and float(inner.threshold) == 0)
    return isinstance(inner, tf_keras.layers.Activation) and \
        inner.activation is tf_keras.activations.relu


def epilogue(a, b, y_scale: float, z_scale: float, relu: bool) -> Dict[str, np.ndarray]:
    """A native layer's epilogue arrays for ``z = relu?(a y + b)`` on its output codes.

    Args:
      a, b: The per-channel affine (:func:`bn_affine`).
      y_scale: The layer's output scale; ``z_scale``: the scale of z's int8 codes.
      relu: Whether a ReLU follows (codes clamped at 0).

    Returns:
      The :data:`wa_tf.deploy.native.EPILOGUE` arrays: codes ``y`` become
      ``clip(rint(y * a y_scale / z_scale + b / z_scale))``
      (:func:`wa_tf.deploy.integer.affine_requantize`).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {"epilogue_scale": a * (float(y_scale) / float(z_scale)),
            "epilogue_offset": b / float(z_scale),
            "epilogue_range": np.array([0 if relu else -128, 127], np.int32),
            "epilogue_output_scale": np.float32(z_scale)}
