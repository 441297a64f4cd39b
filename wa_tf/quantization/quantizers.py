"""Fake quantizers for Winograd-aware quantization-aware training.

The quantizer follows Winograd-aware networks (Fernandez-Marques et al.,
MLSys 2020): symmetric, signed, range ``max(|min|, |max|)`` where ``min`` and
``max`` are tracked by an exponential moving average with momentum 0.01 and
initialised from the first training batch, round half to even, and a
straight-through gradient.  TF-MOT's ``MovingAverageQuantizer`` differs (decay
0.999, ranges start at +-6), hence :class:`EMAQuantizer`.

Both quantizers implement ``tfmot.quantization.keras.quantizers.Quantizer``:
``build(shape, name, layer)`` creates the state on ``layer`` and returns it,
``__call__(x, training, weights)`` quantizes.
"""

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from wa_tf import kernels
from wa_tf.choices import check_bits
from wa_tf.transforms import is_int

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer


def fake_quant(x, range_, num_bits):
    """Symmetric fake quantization with a straight-through gradient.

    ``y = clip(round(x / s), qmin, qmax) * s`` with ``qmin = -2^(b-1)``,
    ``qmax = 2^(b-1) - 1`` and ``s = range_ / ((qmax - qmin) / 2)``; ``s = 1``
    where ``range_`` is 0 (no statistics yet), and ``s >= 1e-8``.  A NaN or
    infinite range gives NaN: a corrupted state must surface (as a NaN loss)
    rather than quantize at an arbitrary scale.  The gradient
    with respect to ``x`` is the identity (not masked outside the range); no
    gradient flows into ``range_``.

    Args:
      x: Tensor to quantize.
      range_: Non-negative range, a scalar or a tensor broadcastable to ``x``
        (per-axis ranges).
      num_bits: Bit-width, 2 to 16.

    Returns:
      The fake-quantized tensor, same shape and dtype as ``x``.
    """
    return _fake_quant(x, range_, num_bits, with_codes=False)


def fake_quant_codes(x, range_, num_bits):
    """:func:`fake_quant` that also returns the integer codes and the scale.

    ``y == from_codes(codes, scale)`` exactly (value for value); the codes
    (int8 up to 8 bits, else int16: a quarter, a half of float32's memory; no
    gradient) cost one cast on top of the quantization.

    Returns:
      (y, codes, scale).
    """
    return _fake_quant(x, range_, num_bits, with_codes=True)


def quantize_codes(x, range_, num_bits):
    """The codes and scale of :func:`fake_quant_codes`, without the fake-quantized values.

    For a consumer that decodes the codes itself (the Winograd layer's output
    transform, :func:`wa_tf.kernels.tile_transform_adjoint_codes`): the float
    values are never written.  ``from_codes(codes, scale)`` equals
    ``fake_quant(x, range_, num_bits)`` value for value.  No gradient.

    Returns:
      (codes, scale): int8 up to 8 bits, else int16; the step as :func:`quant_scale`.
    """
    num_bits = check_bits(num_bits)
    qmin, qmax = code_limits(num_bits)
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    scale = quant_scale(range_, num_bits, x.dtype)
    if _leading_axis_scale(scale, x) and kernels.usable(x.dtype):
        return kernels.quantize(x, scale, qmin, qmax, _code_dtype(num_bits)), scale
    q = tf.clip_by_value(tf.round(x / scale), qmin, qmax)
    return tf.cast(q, _code_dtype(num_bits)), scale


def _fake_quant(x, range_, num_bits, with_codes):
    num_bits = check_bits(num_bits)
    qmin, qmax = code_limits(num_bits)
    x = tf.convert_to_tensor(x)
    scale = quant_scale(range_, num_bits, x.dtype)
    # The same arithmetic in one pass where wa_tf.kernels runs (bit-identical).
    fused = _leading_axis_scale(scale, x) and kernels.usable(x.dtype)
    if not with_codes:
        @tf.custom_gradient
        def _quantize(v):
            if fused:
                y = kernels.fake_quant(v, scale, qmin, qmax)
            else:
                y = tf.clip_by_value(tf.round(v / scale), qmin, qmax) * scale
            return y, lambda dy: dy
        return _quantize(x)

    @tf.custom_gradient
    def _quantize_codes(v):
        def grad(dy, dcodes):
            del dcodes  # integer output: no gradient
            return dy
        if fused:
            return kernels.fake_quant(v, scale, qmin, qmax, _code_dtype(num_bits)), grad
        q = tf.clip_by_value(tf.round(v / scale), qmin, qmax)
        return (q * scale, tf.cast(q, _code_dtype(num_bits))), grad

    y, codes = _quantize_codes(x)
    return y, codes, scale


@tf.autograph.experimental.do_not_convert
def _leading_axis_scale(scale, x):
    """Whether `scale` is one value, or one per index of `x`'s first axis (the fused kernel's)."""
    shape = scale.shape
    if not shape.is_fully_defined():
        return False
    if shape.num_elements() == 1:
        return True
    return (x.shape.rank == shape.rank and x.shape[0] == shape[0]
            and all(d == 1 for d in shape[1:]))


def _code_dtype(num_bits):
    return tf.int8 if num_bits <= 8 else tf.int16


def code_limits(num_bits):
    """The codes of :func:`fake_quant` at `num_bits`: ``(qmin, qmax)`` as floats."""
    return -(2.0 ** (num_bits - 1)), 2.0 ** (num_bits - 1) - 1.0


def quant_scale(range_, num_bits, dtype=tf.float32):
    """The step :func:`fake_quant` quantizes with: ``range_ / ((qmax - qmin) / 2)``.

    1 where ``range_`` is 0 (no statistics yet), at least 1e-8 elsewhere, NaN
    for a NaN range.  No gradient flows into ``range_``.
    """
    qmin, qmax = code_limits(check_bits(num_bits))
    range_ = tf.stop_gradient(tf.cast(range_, dtype))
    # Multiply by the reciprocal rather than divide by the constant: graphs
    # (Grappler) rewrite the division so, and eager and graph runs (and
    # wa_tf.deploy.integer) must agree on the scale to the last bit.
    scale = tf.maximum(range_ * (1.0 / ((qmax - qmin) / 2.0)), 1e-8)
    # Only "no statistics yet" (0) falls back to 1; `range_ > 0` would also send
    # NaN there (NaN compares False) and hide it.
    return tf.where(range_ <= 0, tf.ones_like(scale), scale)


def from_codes(codes, scale):
    """``codes * scale`` in `scale`'s dtype: the values :func:`fake_quant_codes` coded."""
    if _leading_axis_scale(scale, codes) and kernels.usable(scale.dtype):
        return kernels.from_codes(codes, scale)  # one pass, the same values
    return tf.cast(codes, scale.dtype) * scale


def symmetric_range(min_value, max_value):
    """The symmetric range ``max(-min(0, min), max(0, max))``."""
    return tf.maximum(-tf.minimum(min_value, 0.0), tf.maximum(max_value, 0.0))


def _static_bool(value):
    """A Python bool for a Python/NumPy/constant value, None for a symbolic tensor."""
    if isinstance(value, (bool, int, np.bool_, np.integer)):
        return bool(value)
    static = tf.get_static_value(value)
    return None if static is None else bool(static)


def _select(pred, if_true, if_false):
    """``if_true if pred else if_false``, branch-free when ``pred`` is a tensor.

    No ``tf.cond``: variable updates and cross-replica reductions then stay out
    of control flow, which ``MirroredStrategy`` does not allow around
    synchronisation points.
    """
    static = _static_bool(pred)
    if static is not None:
        return if_true if static else if_false
    return tf.where(tf.cast(pred, tf.bool), if_true, if_false)


def _cross_replica_min_max(batch_min, batch_max):
    """Global min/max over all replicas, so ranges do not depend on the device count."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return batch_min, batch_max
    # ReduceOp has no MAX: gather one row per replica and reduce locally.
    stacked = tf.stack([-batch_min, batch_max])[None]
    gathered = tf.reduce_max(ctx.all_gather(stacked, axis=0), axis=0)
    return -gathered[0], gathered[1]


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class EMAQuantizer(_Quantizer):
    """Symmetric quantizer whose range is an EMA of batch min/max.

    In training, the batch min and max (over all replicas under
    ``tf.distribute``) initialise the state on the first batch and then update
    it as ``v += momentum * (batch - v)``; the tensor is quantized with the
    updated range.  At inference the state is frozen.  With ``warmup``, an
    uninitialised quantizer also initialises from the incoming batch at
    inference (for models adapted from float checkpoints that hold no
    statistics for it).

    State created by ``build(shape, name, layer)`` on ``layer``, all
    non-trainable float32 (``synchronization=ON_READ`` as BatchNormalization's
    moving statistics, so each replica updates its own copy in replica context;
    the copies stay identical because the statistics are reduced across
    replicas): ``{name}_min``, ``{name}_max`` (scalars, or ``(n,)`` per
    position of ``axis``) and ``{name}_initialized`` (0 or 1).

    Args:
      num_bits: Bit-width, 2 to 16.
      momentum: EMA momentum in (0, 1]; 0.01 as the reference.
      axis: None for one range per tensor, or the axis that gets one range per
        position (min/max reduced over all other axes).
      warmup: Initialise from the incoming batch at inference too.
    """

    def __init__(self, num_bits=8, momentum=0.01, axis=None, warmup=False):
        self.num_bits = check_bits(num_bits)
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if axis is not None and not is_int(axis):
            raise ValueError(f"axis must be None or an int, got {axis!r}")
        self.momentum = float(momentum)
        self.axis = None if axis is None else int(axis)
        self.warmup = bool(warmup)

    def build(self, tensor_shape, name, layer):
        shape = ()
        if self.axis is not None:
            tensor_shape = tf.TensorShape(tensor_shape)
            if tensor_shape.rank is None or not -tensor_shape.rank <= self.axis < tensor_shape.rank:
                raise ValueError(f"axis {self.axis} is out of range for the shape "
                                 f"{tensor_shape} of {name!r}")
            size = tensor_shape[self.axis]
            if size is None:
                raise ValueError(f"axis {self.axis} of {name!r} needs a known size, "
                                 f"got shape {tensor_shape}")
            shape = (int(size),)

        def state(suffix, var_shape):
            return layer.add_weight(
                f"{name}_{suffix}", shape=var_shape, dtype=tf.float32, initializer="zeros",
                trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN)

        return {"min_var": state("min", shape), "max_var": state("max", shape),
                "initialized_var": state("initialized", ())}

    def _batch_min_max(self, x):
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        leading = self.axis is None or (x.shape.rank and self.axis % x.shape.rank == 0)
        if leading and kernels.usable(x.dtype):  # both in one pass, the same values
            batch_min, batch_max = kernels.min_max(x, per_axis=self.axis is not None)
        elif self.axis is None:
            batch_min, batch_max = tf.reduce_min(x), tf.reduce_max(x)
        else:
            axis = self.axis % x.shape.rank
            others = [i for i in range(x.shape.rank) if i != axis]
            batch_min = tf.reduce_min(x, axis=others)
            batch_max = tf.reduce_max(x, axis=others)
        return _cross_replica_min_max(batch_min, batch_max)

    def _broadcast(self, range_, x):
        if self.axis is None:
            return range_
        rank = x.shape.rank
        shape = [1] * rank
        shape[self.axis % rank] = -1
        return tf.reshape(range_, shape)

    def __call__(self, inputs, training, weights, **kwargs):
        return fake_quant(inputs, self.update_range(inputs, training, weights), self.num_bits)

    def update_range(self, inputs, training, weights):
        """Updates the state from ``inputs`` as ``__call__`` does; returns the range to use.

        The range is broadcastable to ``inputs``.  Layers that recompute their
        forward pass in the backward pass (``WinogradConv2D(recompute=True)``)
        quantize with this range again rather than updating the state twice.
        """
        if training is None:
            training = tf_keras.backend.learning_phase()
        min_var, max_var = weights["min_var"], weights["max_var"]
        initialized_var = weights["initialized_var"]
        static_training = _static_bool(training)
        if static_training is False and not self.warmup:
            return self.inference_range(weights, inputs)

        batch_min, batch_max = self._batch_min_max(inputs)
        old_min, old_max = tf.identity(min_var), tf.identity(max_var)
        initialized = tf.identity(initialized_var) > 0
        # Training: initialise from the first batch, EMA afterwards.
        train_min = tf.where(initialized, old_min + self.momentum * (batch_min - old_min),
                             batch_min)
        train_max = tf.where(initialized, old_max + self.momentum * (batch_max - old_max),
                             batch_max)
        # Inference: frozen, except that warm-up fills an empty state.
        if self.warmup:
            infer_min = tf.where(initialized, old_min, batch_min)
            infer_max = tf.where(initialized, old_max, batch_max)
            infer_initialized = tf.ones_like(initialized_var)
        else:
            infer_min, infer_max, infer_initialized = old_min, old_max, initialized_var
        new_min = _select(training, train_min, infer_min)
        new_max = _select(training, train_max, infer_max)
        new_initialized = _select(training, tf.ones_like(initialized_var), infer_initialized)
        with tf.control_dependencies([min_var.assign(new_min), max_var.assign(new_max),
                                      initialized_var.assign(new_initialized)]):
            range_ = tf.identity(symmetric_range(new_min, new_max))
        return self._broadcast(range_, inputs)

    def inference_range(self, weights, inputs=None):
        """The range the quantizer holds now, read without updating its state.

        This is the range it applies at inference once it has statistics; 0
        before (``fake_quant`` then uses scale 1, where a warm-up quantizer's
        ``__call__`` would take the range of the incoming batch instead).

        Args:
          weights: The state returned by ``build``.
          inputs: When given, the range is shaped to broadcast to ``inputs``
            (per-axis ranges); otherwise a scalar or ``(n,)`` tensor.
        """
        range_ = symmetric_range(weights["min_var"], weights["max_var"])
        return range_ if inputs is None else self._broadcast(range_, inputs)

    def get_config(self):
        return {"num_bits": self.num_bits, "momentum": self.momentum, "axis": self.axis,
                "warmup": self.warmup}

    def __eq__(self, other):
        return isinstance(other, EMAQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class MaxAbsQuantizer(_Quantizer):
    """Stateless symmetric quantizer with the range ``max|x|`` of the tensor itself.

    For constant tensors such as static Winograd transforms: the reference
    quantizes them once from their own min/max and then freezes them, which for
    a constant is the same as quantizing with ``max|x|`` at every step.

    Args:
      num_bits: Bit-width, 2 to 16.
    """

    def __init__(self, num_bits=8):
        self.num_bits = check_bits(num_bits)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        inputs = tf.convert_to_tensor(inputs)
        return fake_quant(inputs, self.inference_range(weights, inputs), self.num_bits)

    def inference_range(self, weights, inputs):
        """``max|inputs|``, the range the quantizer applies (it has no state)."""
        del weights
        return tf.reduce_max(tf.abs(tf.convert_to_tensor(inputs)))

    def get_config(self):
        return {"num_bits": self.num_bits}

    def __eq__(self, other):
        return isinstance(other, MaxAbsQuantizer) and self.num_bits == other.num_bits

    def __ne__(self, other):
        return not self.__eq__(other)
