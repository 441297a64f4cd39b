"""wa_tf.kernels: the fused fake-quant, code and min/max kernels against numpy, and the
quantizers that use them."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import kernels

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"fused kernels unavailable: {kernels.unavailable_reason()}")



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_axis", [False, True])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fake_quant_matches_numpy_bit_for_bit(dtype, per_axis, bits):
    rng = np.random.default_rng(bits)
    qmin, qmax = -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
    scale = (rng.uniform(0.01, 0.2, size=(5, 1, 1)) if per_axis else np.array(0.05)).astype(dtype)
    codes = rng.integers(int(qmin) - 20, int(qmax) + 20, size=(5, 7, 33))
    # Ties (k + 1/2) round to even; values past the limits clip; the rest is noise.
    x = ((codes + rng.choice([0.0, 0.5, -0.5, 0.3], size=codes.shape)) * scale).astype(dtype)
    expected_codes = np.clip(np.round(x / scale), qmin, qmax)  # numpy rounds half to even
    expected = (expected_codes * scale).astype(dtype)
    y = kernels.fake_quant(tf.constant(x), tf.constant(scale), qmin, qmax)
    np.testing.assert_array_equal(y.numpy(), expected)
    code_dtype = tf.int8 if bits <= 8 else tf.int16
    y2, c = kernels.fake_quant(tf.constant(x), tf.constant(scale), qmin, qmax, code_dtype)
    np.testing.assert_array_equal(y2.numpy(), expected)
    assert c.dtype == code_dtype
    np.testing.assert_array_equal(c.numpy(), expected_codes.astype(code_dtype.as_numpy_dtype))
    c2 = kernels.quantize(tf.constant(x), tf.constant(scale), qmin, qmax, code_dtype)
    assert c2.dtype == code_dtype
    np.testing.assert_array_equal(c2.numpy(), expected_codes.astype(code_dtype.as_numpy_dtype))


def test_fake_quant_keeps_nan_and_checks_the_scale():
    x = tf.constant([[1.0, np.nan], [3.0, -2.0]])
    y = kernels.fake_quant(x, tf.constant(0.5), -128, 127).numpy()
    assert np.isnan(y[0, 1]) and y[0, 0] == 1.0
    assert np.isnan(kernels.fake_quant(x, tf.constant(np.nan, tf.float32), -128, 127)).all()
    with pytest.raises(tf.errors.InvalidArgumentError, match="one per index"):
        kernels.fake_quant(x, tf.constant([0.5, 0.5, 0.5]), -128, 127)


@pytest.mark.parametrize("code_dtype", [tf.int8, tf.int16])
def test_fake_quant_codes_nan_as_zero(code_dtype):
    # 37 values: the vectorized conversion (16 at a time) and its remainder.
    x = np.linspace(-3.0, 3.0, 37).astype(np.float32)
    x[[2, 20, 36]] = np.nan
    y, c = kernels.fake_quant(tf.constant(x), tf.constant(0.5), -128, 127, code_dtype)
    expected = np.where(np.isnan(x), 0, np.round(x / 0.5)).astype(code_dtype.as_numpy_dtype)
    np.testing.assert_array_equal(c.numpy(), expected)
    assert np.isnan(y.numpy()[[2, 20, 36]]).all()
    _, c = kernels.fake_quant(tf.constant(x), tf.constant(np.nan, tf.float32), -128, 127,
                              code_dtype)
    np.testing.assert_array_equal(c.numpy(), np.zeros(37))
    c = kernels.quantize(tf.constant(x), tf.constant(0.5), -128, 127, code_dtype)
    np.testing.assert_array_equal(c.numpy(), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("code_dtype", [np.int8, np.int16])
def test_from_codes_matches_numpy(dtype, code_dtype):
    rng = np.random.default_rng(7)
    info = np.iinfo(code_dtype)
    codes = rng.integers(info.min, info.max, size=(6, 5, 7), endpoint=True).astype(code_dtype)
    for scale in (np.array(0.037, dtype), rng.uniform(0.01, 0.2, size=(6, 1, 1)).astype(dtype)):
        y = kernels.from_codes(tf.constant(codes), tf.constant(scale))
        assert y.dtype == dtype
        # 35 codes per scale: 16 at a time and a remainder.
        np.testing.assert_array_equal(y.numpy(), codes.astype(dtype) * scale)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one per index"):
        kernels.from_codes(tf.constant(codes), tf.constant([0.5, 0.5], dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(36, 700, 3), (5, 20000), (3, 0)])
def test_min_max_matches_numpy(dtype, shape):
    # (5, 20000): runs of 16384 values and a remainder per index; (3, 0): empty.
    x = np.random.default_rng(len(shape)).normal(size=shape).astype(dtype) * 3
    for per_axis in (False, True):
        lo, hi = kernels.min_max(tf.constant(x), per_axis=per_axis)
        axes = tuple(range(1, x.ndim)) if per_axis else None
        expected_lo = np.min(x, axis=axes, initial=np.inf)
        expected_hi = np.max(x, axis=axes, initial=-np.inf)
        np.testing.assert_array_equal(lo.numpy(), expected_lo)
        np.testing.assert_array_equal(hi.numpy(), expected_hi)
        assert lo.dtype == dtype and lo.shape == np.shape(expected_lo)


def test_min_max_nan_as_tensorflow():
    x = np.arange(60.0, dtype=np.float32).reshape(3, 20)
    x[1, 17] = np.nan  # in the remainder after 16 lanes
    x[2, 3] = np.nan   # in the vector part
    lo, hi = kernels.min_max(tf.constant(x), per_axis=True)
    np.testing.assert_array_equal(lo.numpy(), tf.reduce_min(x, axis=1).numpy())
    np.testing.assert_array_equal(hi.numpy(), tf.reduce_max(x, axis=1).numpy())
    assert np.isnan(lo.numpy()[1:]).all() and lo.numpy()[0] == 0.0 and hi.numpy()[0] == 19.0
    lo, hi = kernels.min_max(tf.constant(x))
    assert np.isnan(lo.numpy()) and np.isnan(hi.numpy())


@pytest.mark.parametrize("axis", [None, 0])
def test_ema_quantizer_uses_the_fused_min_max_with_the_same_state(axis):
    from wa_tf.quantization import quantizers  # pylint: disable=import-outside-toplevel
    x = tf.random.stateless_normal((9, 300, 16), seed=(4, 2)) * 3

    def run():
        layer = tf_keras.layers.Layer()
        quantizer = quantizers.EMAQuantizer(8, axis=axis)
        weights = quantizer.build(x.shape, "v", layer)
        step = tf.function(lambda v: quantizer.update_range(v, True, weights))
        ops = {op.type for op in step.get_concrete_function(x).graph.get_operations()}
        ranges = [step(x * (i + 1)).numpy() for i in range(2)]
        return ops, ranges, weights["min_var"].numpy(), weights["max_var"].numpy()

    ops, ranges, lo, hi = run()
    assert "WaMinMax" in ops and "Min" not in ops
    with kernels.disabled():
        plain_ops, plain_ranges, plain_lo, plain_hi = run()
    assert "WaMinMax" not in plain_ops
    np.testing.assert_array_equal(np.array(ranges), np.array(plain_ranges))
    np.testing.assert_array_equal(lo, plain_lo)
    np.testing.assert_array_equal(hi, plain_hi)


def test_quantizers_use_the_fused_fake_quant_with_the_same_values():
    from wa_tf.quantization import quantizers  # pylint: disable=import-outside-toplevel
    x = tf.random.stateless_normal((9, 40, 16), seed=(2, 9)) * 3
    ranges = tf.random.stateless_uniform((9, 1, 1), seed=(2, 8), minval=0.5, maxval=4.0)

    def ops(fn):
        return {op.type for op in tf.function(fn).get_concrete_function().graph.get_operations()}
    for range_ in (ranges, tf.constant(2.5)):
        fused = quantizers.fake_quant_codes(x, range_, 8)
        assert "WaFakeQuantCodes" in ops(lambda r=range_: quantizers.fake_quant_codes(x, r, 8))
        with kernels.disabled():
            plain = quantizers.fake_quant_codes(x, range_, 8)
            assert "WaFakeQuantCodes" not in ops(
                lambda r=range_: quantizers.fake_quant_codes(x, r, 8))
        for a, b in zip(fused, plain):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Straight-through gradient either way.
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quantizers.fake_quant(x, ranges, 4)
    np.testing.assert_array_equal(tape.gradient(y, x, output_gradients=x * 2).numpy(),
                                  (x * 2).numpy())
