"""Tests of the public seams: winograd_conv, winograd_weights, tile_geometry, the typed
quantization argument and side-effect-free reads of quantizers."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import WinogradConv2D, quantization
from wa_tf.layers import WinogradQuantization, winograd_conv
from wa_tf.quantization.quantizers import EMAQuantizer, MaxAbsQuantizer
from wa_tf.transforms import STAGES, TileGeometry, tile_geometry, winograd_matrices


def test_tile_geometry_hand_worked():
    # 9x7 input, F(4x4, 3x3), 'same': output 9x7, ceil(9/4) = 3 by ceil(7/4) = 2
    # tiles, one zero row/column before the input, a 6-wide tile reaches one
    # 4-block past its own.
    geo = tile_geometry(9, 7, 4, 3, "same")
    assert isinstance(geo, TileGeometry)
    assert geo == (9, 7, 3, 2, 1, 1, 1)
    assert (geo.n_h, geo.n_w, geo.pad_top) == (3, 2, 1)
    # 'valid': output 7x5, 2x2 tiles, no padding; F(2x2, 5x5) reaches two blocks.
    assert tile_geometry(9, 7, 4, 3, "valid") == (7, 5, 2, 2, 0, 0, 1)
    assert tile_geometry(8, 8, 2, 5, "same").extra == 2


@pytest.mark.parametrize("tile_size,padding", [(2, "same"), (4, "valid"), (6, "same")])
def test_winograd_conv_matches_conv2d_and_calls_the_hook_per_stage(tile_size, padding,
                                                                  pipeline):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 11, 9, 3)), tf.float64)
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 5)), tf.float64)
    a_t, b_t, g = (tf.constant(m) for m in winograd_matrices(tile_size, 3))
    seen = []

    def hook(stage, tensor):
        seen.append((stage, tuple(tensor.shape)))
        return tensor

    y = winograd_conv(x, kernel, a_t, b_t, g, tile_size, padding, quantize=hook)
    expected = tf.nn.conv2d(x, kernel, 1, padding.upper())
    np.testing.assert_allclose(y.numpy(), expected.numpy(), atol=1e-9)
    t2 = (tile_size + 2) ** 2
    assert [stage for stage, _ in seen] == list(STAGES)
    assert seen[0][1] == (t2, 3, 5) and seen[1][1][::2] == (t2, 3) and seen[2][1][::2] == (t2, 5)
    # The hook's result is what the pipeline uses.
    zero_m = winograd_conv(x, kernel, a_t, b_t, g, tile_size, padding,
                           quantize=lambda s, v: v * 0 if s == "hadamard" else v)
    assert not np.any(zero_m.numpy())


def _numpy_u(kernel, g):
    t = g.shape[0]
    u = np.einsum("ai,bj,ijck->abck", g, g, kernel.astype(np.float64))
    return u.reshape(t * t, *kernel.shape[2:])


def test_layer_winograd_weights():
    layer = WinogradConv2D(4, tile_size=4, flex=False)
    layer.build((None, 8, 8, 2))
    _, _, g = winograd_matrices(4, 3)
    u = layer.winograd_weights()
    assert u.shape == (36, 2, 4)
    np.testing.assert_allclose(u.numpy(), _numpy_u(layer.kernel.numpy(), g), atol=1e-5)
    kernel = np.ones((3, 3, 2, 4), np.float32)
    np.testing.assert_allclose(layer.winograd_weights(kernel=kernel).numpy(),
                               _numpy_u(kernel, g), atol=1e-5)


def test_quantized_static_layer_winograd_weights_use_its_quantized_g():
    inputs = tf_keras.Input((8, 8, 2))
    model = quantization.quantize_model(
        tf_keras.Model(inputs, WinogradConv2D(3, tile_size=4, flex=False, name="wa")(inputs)),
        bits=4, quantize_first=True)
    wrapper = model.get_layer("quant_wa")
    kernel = quantization.float_weight(wrapper, "kernel").numpy()
    _, _, g = winograd_matrices(4, 3)
    step = np.abs(g).max() / 7.5  # 4 bits: MaxAbsQuantizer's scale range / 7.5
    g_q = np.clip(np.rint(g / step), -8, 7) * step
    assert not np.allclose(g_q, g)  # 4 bits change G
    u = wrapper.layer.winograd_weights(kernel=kernel)
    np.testing.assert_allclose(u.numpy(), _numpy_u(kernel, g_q), atol=1e-5)


def test_winograd_quantization_argument():
    spec = WinogradQuantization(8, per_tap=True)
    layer = WinogradConv2D(4, quantization=spec)
    assert layer.quantization is spec and spec.warmup is False
    # The dict form (configs and SavedModels written before) is the same argument.
    old = WinogradConv2D(4, quantization={"bits": 8, "per_tap": True, "warmup": False})
    assert old.quantization == spec
    assert old.get_config()["quantization"] == {"bits": 8, "per_tap": True, "warmup": False}
    assert WinogradConv2D.from_config(layer.get_config()).quantization == spec
    assert WinogradConv2D(4).get_config()["quantization"] is None
    for bad in ({"bitz": 8}, {"bits": 8, "per_channel": True}, 8, {}):
        with pytest.raises(ValueError, match="quantization"):
            WinogradConv2D(4, quantization=bad)
    for bits in (1, 17, 8.0, True):
        with pytest.raises(ValueError, match="quantization bits"):
            WinogradQuantization(bits)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4


def test_inference_range_reads_without_updating():
    layer = tf_keras.layers.Layer()
    quantizer = EMAQuantizer(4, warmup=True)
    state = quantizer.build(tf.TensorShape([3]), "q", layer)
    x = tf.constant([-3.0, 1.0, 2.0])
    assert float(quantizer.inference_range(state)) == 0.0  # no statistics yet
    assert float(state["initialized_var"]) == 0.0
    quantizer(x, False, state)  # warm-up at inference: takes the batch's range
    state["min_var"].assign(-2.0)
    state["max_var"].assign(1.5)
    np.testing.assert_array_equal(quantizer.inference_range(state, x).numpy(), 2.0)
    assert (float(state["min_var"]), float(state["max_var"])) == (-2.0, 1.5)
    assert float(MaxAbsQuantizer(4).inference_range({}, x)) == 3.0


def test_inference_weight_is_the_wrappers_quantized_weight():
    inputs = tf_keras.Input((6, 6, 2))
    model = quantization.quantize_model(
        tf_keras.Model(inputs, WinogradConv2D(3, tile_size=2, flex=False, name="wa")(inputs)),
        bits=4, quantize_first=True)
    model(np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype(np.float32), training=True)
    wrapper = model.get_layer("quant_wa")
    kernel = quantization.float_weight(wrapper, "kernel").numpy()
    # The kernel quantizer's range is the kernel's own after one training batch.
    step = np.abs(kernel).max() / 7.5
    expected = np.clip(np.rint(kernel / step), -8, 7) * step
    actual = quantization.inference_weight(wrapper, "kernel").numpy()
    # The element at -range lies on a rounding tie (-7.5 steps): float32 may round
    # it to either neighbour; every other element must match exactly.
    tie = np.isclose(kernel / step, -7.5)
    np.testing.assert_allclose(actual[~tie], expected[~tie], rtol=1e-6)
    for value in actual[tie]:
        assert np.isclose(value, -8 * step, rtol=1e-6) or np.isclose(value, -7 * step, rtol=1e-6)
    # Static transforms are not the wrapper's: their float variable.
    assert quantization.inference_weight(wrapper, "G") is quantization.float_weight(wrapper, "G")
