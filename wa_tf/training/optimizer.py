"""The reference's optimizer: PyTorch's ``torch.optim.Adam(lr, weight_decay=4e-5)``.

PyTorch's Adam with ``weight_decay`` is *coupled* L2 regularisation: before
the moment updates, ``grad += weight_decay * param`` for every parameter
(BatchNorm scales and offsets, biases and learned Winograd transforms
included).  That is neither Keras's ``weight_decay`` argument (decoupled,
AdamW-style: ``param -= lr * wd * param`` after the Adam step) nor a
``kernel_regularizer`` (kernels only, and part of the reported loss).

:class:`AdamL2` adds the term in ``update_step``, which runs once per
variable on the *aggregated* gradient, so the decay is the same under any
``tf.distribute`` strategy (adding it to per-replica gradients would count it
once per replica).  It also uses PyTorch's epsilon placement
(``adaptive_epsilon=True``, ``epsilon=1e-8``): ``lr * m_hat / (sqrt(v_hat) + eps)``.
"""

import tensorflow as tf
import tf_keras

WEIGHT_DECAY = 4e-5


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class AdamL2(tf_keras.optimizers.Adam):
    """Adam with PyTorch's coupled L2 weight decay.

    Args:
      learning_rate: Learning rate (a float, a variable or a schedule).
      l2: Coefficient of the L2 term added to every gradient: ``g + l2 * w``.
      epsilon: PyTorch's epsilon (added to ``sqrt(v_hat)``).
      **kwargs: Other ``tf_keras.optimizers.Adam`` arguments.
    """

    def __init__(self, learning_rate=0.001, l2: float = WEIGHT_DECAY, epsilon: float = 1e-8,
                 name: str = "AdamL2", **kwargs):
        kwargs.setdefault("adaptive_epsilon", True)
        super().__init__(learning_rate=learning_rate, epsilon=epsilon, name=name, **kwargs)
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0; got {l2}")
        self.l2 = float(l2)

    def update_step(self, gradient, variable):
        if self.l2:
            if isinstance(gradient, tf.IndexedSlices):
                gradient = tf.convert_to_tensor(gradient)
            gradient = gradient + tf.cast(self.l2, variable.dtype) * variable
        return super().update_step(gradient, variable)

    def get_config(self):
        config = super().get_config()
        config["l2"] = self.l2
        return config
