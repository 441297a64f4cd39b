"""Tests of wa_tf.quantization.quantizers against the reference quantizer's formula and
hand-worked values."""
import contextlib

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import kernels
from wa_tf.quantization.quantizers import (
    EMAQuantizer,
    MaxAbsQuantizer,
    fake_quant,
    fake_quant_codes,
    from_codes,
    quantize_codes,
)


def reference_quantize(x, range_, bits):
    """The reference's ``Quantize`` op (WinogradAwareNets, src/quantization.py), in float64.

    Written from the reference's formula, not from wa_tf's: ``qmin = -2^bits / 2``,
    ``qmax = -qmin - 1``, ``scale = range / ((qmax - qmin) / 2)`` (1 where the
    range is 0, at least 1e-8), codes ``round(x / scale)`` (half to even, as
    ``torch.round``) clamped to ``[qmin, qmax]``, output ``codes * scale``.

    Returns:
      (codes, scale, x / scale), float64 arrays broadcast to ``x``'s shape.
    """
    x = np.asarray(x, np.float64)
    range_ = np.broadcast_to(np.asarray(range_, np.float64), x.shape)
    qmin = -(2.0 ** bits) / 2
    qmax = -qmin - 1
    scale = np.where(range_ == 0, 1.0, np.maximum(range_ / ((qmax - qmin) / 2), 1e-8))
    quotient = x / scale
    return np.clip(np.round(quotient), qmin, qmax), scale, quotient


def assert_reference_quantized(y, x, range_, bits):
    """Asserts that `y` is the reference's quantization of `x` (see reference_quantize).

    `y` must be an integer multiple of the reference's scale (to float32
    precision), with the reference's code everywhere, except one step off
    where ``x / scale`` lies within float32 round-off of a rounding tie (x at
    +-range, for instance): there float32 arithmetic, which the reference uses
    as well, may round either way.
    """
    codes, scale, quotient = reference_quantize(x, range_, bits)
    y = np.asarray(y, np.float64)
    got = np.round(y / scale)
    np.testing.assert_allclose(y, got * scale, rtol=1e-6, atol=0,
                               err_msg="not a multiple of the reference's scale")
    near_tie = np.abs(quotient - np.floor(quotient) - 0.5) <= 4e-7 * np.abs(quotient)
    off = got != codes
    assert np.all(np.abs(got - codes) <= 1) and not np.any(off & ~near_tie), (
        f"codes {got[off & ~near_tie]} where the reference gives {codes[off & ~near_tie]} "
        f"(x = {np.asarray(x)[off & ~near_tie]})")


def np_range(v_min, v_max):
    return np.maximum(-np.minimum(v_min, 0), np.maximum(v_max, 0)).astype(np.float32)


def _build(quantizer, shape):
    holder = tf_keras.layers.Layer()
    return quantizer.build(tf.TensorShape(shape), "act", holder)


def _values(weights):
    return (weights["min_var"].numpy(), weights["max_var"].numpy(),
            weights["initialized_var"].numpy())


# Golden values worked by hand from the reference's formula: (bits, range, inputs,
# expected); scale = range / ((qmax - qmin) / 2), round half to even, clip.
GOLDEN = [
    # scale 1/1.5: -1.5 rounds to -2 (half to even), 1.5 to 2, clipped to qmax 1.
    (2, 1.0, [-1.0, -0.4, 0.3, 0.5, 1.0], [-4 / 3, -2 / 3, 0.0, 2 / 3, 2 / 3]),
    # scale 0.75 / 1.5 = 0.5: codes 0.5 -> 0, 1.5 -> 2 -> qmax 1, -1.5 -> -2, -0.5 -> 0, 0.6 -> 1.
    (2, 0.75, [0.25, 0.75, -0.75, -0.25, 0.3], [0.0, 0.5, -1.0, 0.0, 0.5]),
    # qmin -4, qmax 3, scale 3.5 / 3.5 = 1: -3.5 -> -4, 3.5 -> 4 -> 3, -4.5 -> -4.
    (3, 3.5, [0.5, 1.5, -3.5, 3.5, -4.5, 2.6], [0.0, 2.0, -4.0, 3.0, -4.0, 3.0]),
    # scale 1: half to even, clip to [-8, 7].
    (4, 7.5, [0.5, 1.5, 2.5, -8.0, 9.0], [0.0, 2.0, 2.0, -8.0, 7.0]),
    # qmin -32, qmax 31, scale 7.875 / 31.5 = 0.25: codes 1.5 -> 2, 2.5 -> 2,
    # -0.5 -> 0, -1.5 -> -2, 32 -> 31, -36 -> -32.
    (6, 7.875, [0.375, 0.625, -0.125, -0.375, 8.0, -9.0], [0.5, 0.5, 0.0, -0.5, 7.75, -8.0]),
    # scale 63.75 / 127.5 = 0.5: codes 0.5 -> 0, 1.5 -> 2, -1.5 -> -2, 127.2 -> 127,
    # -128.5 -> -128, 200 -> 127.
    (8, 63.75, [0.25, 0.75, -0.75, 63.6, -64.25, 100.0], [0.0, 1.0, -1.0, 63.5, -64.0, 63.5]),
    # scale 1 / 127.5: codes 63.75 -> 64, -127.37 -> -127, 0.255 -> 0, 0.51 -> 1, 255 -> 127.
    (8, 1.0, [0.5, -0.999, 0.002, 0.004, 2.0],
     [64 / 127.5, -127 / 127.5, 0.0, 1 / 127.5, 127 / 127.5]),
    # range 0 (no statistics): scale 1, clip to [-128, 127].
    (8, 0.0, [0.4, 0.6, 200.0, -300.0], [0.0, 1.0, 127.0, -128.0]),
    (16, 32767.5, [1.5, -40000.0, 40000.0], [2.0, -32768.0, 32767.0]),
]


def test_reference_formula_reproduces_golden_values():
    for bits, range_, inputs, expected in GOLDEN:
        codes, scale, _ = reference_quantize(inputs, range_, bits)
        np.testing.assert_allclose(codes * scale, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bits,range_,inputs,expected", GOLDEN)
def test_fake_quant_golden(bits, range_, inputs, expected):
    y = fake_quant(tf.constant(inputs, tf.float32), range_, bits)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("per_axis", [False, True])
def test_fake_quant_matches_reference_formula(bits, per_axis):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((6, 5, 4)) * 3).astype(np.float32)
    range_ = (np.abs(x).max(axis=(1, 2), keepdims=True) * 0.8 if per_axis
              else np.float32(2.5)).astype(np.float32)
    y = fake_quant(tf.constant(x), tf.constant(range_), bits).numpy()
    assert_reference_quantized(y, x, range_, bits)


def test_fake_quant_straight_through_gradient():
    x = tf.constant([-9.0, -0.3, 0.2, 0.7, 9.0])  # the ends are clipped
    w = tf.constant([1.0, 2.0, 3.0, 4.0, 5.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(w * fake_quant(x, 1.0, 4))
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), w.numpy())


@pytest.mark.parametrize("bad", [1, 17, 8.0, True, "8", None])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        fake_quant(tf.ones(3), 1.0, bad)
    with pytest.raises(ValueError, match="bits"):
        EMAQuantizer(bad)
    with pytest.raises(ValueError, match="bits"):
        MaxAbsQuantizer(bad)


@pytest.mark.parametrize("axis", [None, 1])
def test_ema_updates_match_numpy(axis):
    """First batch initialises, later batches move min/max by momentum * (batch - v)."""
    bits, momentum = 6, 0.01
    rng = np.random.default_rng(0)
    quantizer = EMAQuantizer(bits, momentum=momentum, axis=axis)
    weights = _build(quantizer, (None, 3, 4))
    reduce_axes = (0, 2) if axis == 1 else None
    v_min = v_max = None
    for step in range(4):
        x = (rng.standard_normal((5, 3, 4)) * (step + 1) + step).astype(np.float32)
        y = quantizer(tf.constant(x), True, weights).numpy()
        b_min = x.min(axis=reduce_axes).astype(np.float32)
        b_max = x.max(axis=reduce_axes).astype(np.float32)
        if step == 0:
            v_min, v_max = b_min, b_max
        else:
            v_min = (v_min + np.float32(momentum) * (b_min - v_min)).astype(np.float32)
            v_max = (v_max + np.float32(momentum) * (b_max - v_max)).astype(np.float32)
        got_min, got_max, initialized = _values(weights)
        np.testing.assert_allclose(got_min, v_min, rtol=1e-6)
        np.testing.assert_allclose(got_max, v_max, rtol=1e-6)
        assert initialized == 1.0
        range_ = np_range(got_min, got_max)
        assert_reference_quantized(y, x, range_.reshape(1, 3, 1) if axis == 1 else range_, bits)


def test_ema_frozen_at_inference_and_empty_state_means_unit_scale():
    quantizer = EMAQuantizer(8)
    weights = _build(quantizer, (None, 4))
    x = tf.constant([[0.4, 0.6, -3.2, 300.0]])
    # No statistics yet: scale 1, state untouched.
    np.testing.assert_array_equal(quantizer(x, False, weights).numpy(), [[0.0, 1.0, -3.0, 127.0]])
    assert _values(weights) == (0.0, 0.0, 0.0)
    quantizer(tf.constant([[-1.0, 2.0]]), True, weights)
    state = _values(weights)
    y = quantizer(x, False, weights)
    assert _values(weights) == state
    assert_reference_quantized(y.numpy(), x.numpy(), 2.0, 8)


def test_warmup_initialises_at_inference_then_freezes():
    quantizer = EMAQuantizer(8, warmup=True)
    weights = _build(quantizer, (None, 3))
    first = np.array([[-2.0, 0.5, 1.0]], np.float32)
    y = quantizer(tf.constant(first), False, weights)
    assert _values(weights) == (-2.0, 1.0, 1.0)
    assert_reference_quantized(y.numpy(), first, 2.0, 8)
    quantizer(tf.constant([[-8.0, 9.0]]), False, weights)
    assert _values(weights) == (-2.0, 1.0, 1.0)
    quantizer(tf.constant([[-8.0, 9.0]]), True, weights)  # training: EMA as usual
    np.testing.assert_allclose(_values(weights)[:2], (-2.06, 1.08), rtol=1e-6)


def test_training_flag_as_tensor():
    quantizer = EMAQuantizer(8, axis=0)
    weights = _build(quantizer, (2, None))
    x = tf.constant([[-1.0, 0.5], [3.0, 4.0]])

    @tf.function(input_signature=[tf.TensorSpec([], tf.bool)])
    def run(training):
        return quantizer(x, training, weights)

    run(tf.constant(False))
    assert _values(weights)[2] == 0.0
    y = run(tf.constant(True))
    np.testing.assert_array_equal(_values(weights)[0], [-1.0, 3.0])
    np.testing.assert_array_equal(_values(weights)[1], [0.5, 4.0])
    assert_reference_quantized(y.numpy(), x.numpy(), np.array([[1.0], [4.0]]), 8)


def test_ranges_do_not_depend_on_the_number_of_replicas(distribute_scope):
    """Under MirroredStrategy each replica sees half the batch, yet the state and
    the outputs equal a single device's on the global batch."""
    quantizer = EMAQuantizer(8, axis=-1)
    weights = _build(quantizer, (None, 3))
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((8, 3)).astype(np.float32) * s for s in (1.0, 4.0)]
    for x in batches:
        if distribute_scope is None:
            y = quantizer(tf.constant(x), True, weights).numpy()
        else:
            strategy = distribute_scope
            values = strategy.experimental_distribute_values_from_function(
                lambda ctx, x=x: tf.constant(x[4 * ctx.replica_id_in_sync_group:][:4]))
            run = tf.function(lambda v: strategy.run(lambda b: quantizer(b, True, weights),
                                                     args=(v,)))
            y = np.concatenate([t.numpy() for t in
                                strategy.experimental_local_results(run(values))])
    first, second = batches
    v_min = first.min(0) + np.float32(0.01) * (second.min(0) - first.min(0))
    v_max = first.max(0) + np.float32(0.01) * (second.max(0) - first.max(0))
    np.testing.assert_allclose(_values(weights)[0], v_min, rtol=1e-6)
    np.testing.assert_allclose(_values(weights)[1], v_max, rtol=1e-6)
    assert_reference_quantized(y, second, np_range(v_min, v_max), 8)


def test_max_abs_quantizer_is_stateless():
    a_t = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
    quantizer = MaxAbsQuantizer(4)
    assert quantizer.build((2, 4), "A_t", tf_keras.layers.Layer()) == {}
    y = quantizer(tf.constant(a_t * 0.3), True, {})
    assert_reference_quantized(y.numpy(), a_t * 0.3, np.float32(0.3), 4)


def test_config_round_trip():
    for quantizer in (EMAQuantizer(5, momentum=0.1, axis=0, warmup=True), MaxAbsQuantizer(3)):
        config = tf_keras.utils.legacy.serialize_keras_object(quantizer)
        assert tf_keras.utils.legacy.deserialize_keras_object(config) == quantizer
    assert EMAQuantizer(8) != EMAQuantizer(8, axis=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_eager_and_graph_quantize_identically(bits):
    """Values at the end of their own range are rounding ties: both modes must agree."""
    rng = np.random.default_rng(bits)
    graph_fq = tf.function(lambda x, r: fake_quant(x, r, bits))
    for _ in range(20):
        x = tf.constant(rng.standard_normal((7, 50)).astype("float32") * rng.uniform(0.01, 100))
        for range_ in (tf.reduce_max(tf.abs(x)), tf.reduce_max(tf.abs(x), axis=1, keepdims=True)):
            np.testing.assert_array_equal(fake_quant(x, range_, bits), graph_fq(x, range_))


def test_fake_quant_propagates_a_non_finite_range():
    """Only a range of 0 means "no statistics yet" (scale 1); NaN or infinity is a
    corrupted state and must not be hidden behind scale 1."""
    x = tf.constant([[0.3, -1.7], [2.2, 0.0]])
    # Range 0, 8 bits: scale 1, so round(x) clipped to [-128, 127] (worked by hand).
    np.testing.assert_array_equal(fake_quant(x, 0.0, 8), [[0.0, -2.0], [2.0, 0.0]])
    for bad in (np.nan, np.inf):
        assert np.isnan(fake_quant(x, bad, 8).numpy()).all(), bad
    # Per-axis ranges: only the corrupted row becomes NaN.
    y = fake_quant(x, tf.constant([[np.nan], [2.2]]), 8).numpy()
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    # A quantizer whose stored range is NaN yields NaN in training and at inference.
    layer = tf_keras.layers.Layer()
    quantizer = EMAQuantizer(8)
    weights = quantizer.build((2, 2), "t", layer)
    weights["max_var"].assign(np.nan)
    weights["initialized_var"].assign(1.0)
    for training in (True, False):
        assert np.isnan(quantizer(x, training, weights).numpy()).all(), training


@pytest.mark.parametrize("bits", [2, 4, 8, 9, 16])
def test_codes_round_trip_bit_exact(bits):
    """A fake-quantized tensor stored as integer codes decodes to exactly the same values."""
    from wa_tf.quantization.quantizers import fake_quant_codes, from_codes, quant_scale
    rng = np.random.default_rng(bits)
    x = tf.constant(rng.standard_normal((6, 50, 7)).astype("float32") * 3.7)
    # Per-position ranges (one per leading index), one of them 0 ("no statistics": scale 1).
    range_ = tf.constant(np.r_[0.0, rng.uniform(0.01, 5.0, 5)].astype("float32")[:, None, None])
    y = fake_quant(x, range_, bits)
    scale = quant_scale(range_, bits)
    # fake_quant_codes: fake_quant's output (bit for bit), its scale, identity gradient.
    with tf.GradientTape() as tape:
        tape.watch(x)
        y2, codes, scale2 = fake_quant_codes(x, range_, bits)
        loss = tf.reduce_sum(y2 * tf.range(x.shape[-1], dtype=tf.float32))
    np.testing.assert_array_equal(y2.numpy().view(np.uint32), y.numpy().view(np.uint32))
    np.testing.assert_array_equal(scale2.numpy(), scale.numpy())
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(),
                                  np.broadcast_to(np.arange(x.shape[-1]), x.shape))
    assert codes.dtype == (tf.int8 if bits <= 8 else tf.int16)
    # Exactly equal values (a -0.0 of round() comes back as +0.0, equal in value).
    np.testing.assert_array_equal(from_codes(codes, scale).numpy(), y.numpy())
    # The codes are the integers of the hand formula round(y / scale), within the code range.
    expected = np.round(y.numpy() / scale.numpy())
    np.testing.assert_array_equal(codes.numpy(), expected)
    assert codes.numpy().min() >= -2 ** (bits - 1) and codes.numpy().max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [4, 8, 12])
@pytest.mark.parametrize("range_shape", [(), (3, 1, 1)])
@pytest.mark.parametrize("fused", [True, False])
def test_quantize_codes_are_those_of_fake_quant_codes(bits, range_shape, fused):
    # The codes alone, with the fused kernel and with TensorFlow's ops: fake_quant_codes'
    # codes and step, and decoded, fake_quant's values.
    x = tf.random.stateless_normal((3, 40, 7), seed=(2, bits)) * 3.0
    range_ = tf.reshape(tf.constant([2.0, 4.0, 6.0][:max(1, int(np.prod(range_shape)))]),
                        range_shape)
    with kernels.disabled() if not fused else contextlib.nullcontext():
        codes, scale = quantize_codes(x, range_, bits)
    _, want_codes, want_scale = fake_quant_codes(x, range_, bits)
    assert codes.dtype == (tf.int8 if bits <= 8 else tf.int16)
    np.testing.assert_array_equal(codes.numpy(), want_codes.numpy())
    np.testing.assert_array_equal(scale.numpy(), want_scale.numpy())
    np.testing.assert_array_equal(from_codes(codes, scale).numpy(),
                                  fake_quant(x, range_, bits).numpy())
    assert len(np.unique(codes.numpy())) > 4
