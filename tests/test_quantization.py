"""Tests of wa_tf.quantization: Winograd-aware QAT through TF-MOT."""
import functools
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from wa_tf.layers import WinogradConv2D, WinogradQuantization
from wa_tf.quantization import custom_objects, quantize_model, quantize_scope, unwrap

import float_bounds

Wrapper = tfmot.quantization.keras.QuantizeWrapperV2


@functools.lru_cache(maxsize=None)
def static_layer_error(tile_size, bits, per_tap):
    """max|y_q - y| / max|y| of a fully quantized static layer vs tf.nn.conv2d,
    ranges calibrated on the same batch (see bench/quant_error.py)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((2, 12, 12, 16)), tf.float32)
    kernel = tf.constant(rng.uniform(-0.1, 0.1, (3, 3, 16, 16)), tf.float32)
    inputs = tf_keras.Input((12, 12, 16))
    layer = WinogradConv2D(16, tile_size=tile_size, flex=False)
    model = tf_keras.Model(inputs, layer(inputs))
    layer.kernel.assign(kernel)
    qmodel = quantize_model(model, bits=bits, per_tap=per_tap, quantize_first=True)
    qmodel(x, training=True)
    y_q = qmodel(x, training=False)
    y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    return float(tf.reduce_max(tf.abs(y_q - y)) / tf.reduce_max(tf.abs(y)))


def test_static_16_bits_close_to_float():
    assert static_layer_error(2, 16, False) < 1e-3


def test_static_8_bits_large_tiles_much_worse():
    """The reference's finding: static F4/F6 lose far more accuracy at INT8 than F2."""
    f2 = static_layer_error(2, 8, False)
    assert static_layer_error(4, 8, False) > 3 * f2
    assert static_layer_error(6, 8, False) > 3 * f2


@pytest.mark.parametrize("tile_size", [4, 6])
def test_per_tap_ranges_reduce_8_bit_error(tile_size):
    assert static_layer_error(tile_size, 8, True) < static_layer_error(tile_size, 8, False)


def _small_model(flex=True, tile_size=2):
    """Conv2D stem, WinogradConv2D, BN, ReLU, pooling, two Dense."""
    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = tf_keras.layers.BatchNormalization(name="bn0")(x)
    x = tf_keras.layers.ReLU(name="relu0")(x)
    x = WinogradConv2D(6, tile_size=tile_size, flex=flex, name="wino")(x)
    x = tf_keras.layers.BatchNormalization(name="bn1")(x)
    x = tf_keras.layers.ReLU(name="relu1")(x)
    x = tf_keras.layers.MaxPooling2D(name="pool")(x)
    x = tf_keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = tf_keras.layers.Dense(8, name="hidden")(x)
    outputs = tf_keras.layers.Dense(3, name="fc")(x)
    return tf_keras.Model(inputs, outputs, name="small")


def _data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8, 8, 3)).astype(np.float32), np.arange(n) % 3


def test_quantize_model_structure():
    model = _small_model()
    qmodel = quantize_model(model, bits=6, per_tap=True)
    assert qmodel.name == "small"
    wrapped = {layer.name: layer.quantize_config.get_config()
               for layer in qmodel.layers if isinstance(layer, Wrapper)}
    assert wrapped == {
        "quant_wino_input_quant": {"num_bits": 6},
        "quant_wino": {"num_bits": 6, "warmup": False},
        "quant_hidden_input_quant": {"num_bits": 6},
        "quant_hidden": {"num_bits": 6, "weight_attrs": ["kernel"], "warmup": False},
    }
    # Stem, BN, activations, pooling and the classifier stay float.
    for name in ("stem", "bn0", "relu0", "bn1", "relu1", "pool", "gap", "fc"):
        assert type(qmodel.get_layer(name)) is type(model.get_layer(name))
    assert len(qmodel.layers) == len(model.layers) + 2
    inner = qmodel.get_layer("quant_wino").layer
    assert inner.quantization == WinogradQuantization(bits=6, per_tap=True, warmup=False)
    assert qmodel.get_layer("quant_wino_input_quant").layer.name == "wino_input_quant"
    for name in ("stem", "wino", "hidden"):
        source = model.get_layer(name).kernel.numpy()
        layer = qmodel.get_layer(name if name == "stem" else "quant_" + name)
        np.testing.assert_array_equal(layer.trainable_weights[0].numpy(), source)

    everything = quantize_model(_small_model(flex=False), warmup=True, quantize_first=True,
                                quantize_last=True)
    # First and last layers quantized as any other Conv2D / Dense: kernel and
    # output at the default 8 bits (warm-up is for Winograd layers only), and
    # their float kernels carried over.
    for name in ("stem", "fc"):
        wrapper = everything.get_layer("quant_" + name)
        assert wrapper.quantize_config.get_config() == {
            "num_bits": 8, "weight_attrs": ["kernel"], "warmup": False}, name
        assert everything.get_layer(f"quant_{name}_input_quant").quantize_config.get_config() \
            == {"num_bits": 8}
    warm = everything.get_layer("quant_wino")
    assert warm.quantize_config.warmup and warm.layer.quantization.warmup
    assert not everything.get_layer("quant_hidden").quantize_config.warmup
    # Static transforms stay non-trainable (the layer quantizes them itself).
    names = [w.name.split("/")[-1] for w in warm.trainable_weights]
    assert names == ["kernel:0"]


def test_quantized_model_trains_and_round_trips(tmp_path):
    tf_keras.utils.set_random_seed(0)
    x, y = _data()
    qmodel = quantize_model(_small_model(flex=True), bits=8)
    qmodel.compile(tf_keras.optimizers.Adam(1e-2),
                   tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = qmodel.fit(x, y, batch_size=4, epochs=2, verbose=0)
    # Gradients flow through the quantizers: the second epoch's loss is lower
    # (by 17-23% for seeds 0-3).
    assert history.history["loss"][1] < 0.9 * history.history["loss"][0], history.history
    # Every quantizer saw training: wino's input, 3 stages, kernel + 3 flex
    # transforms, output; hidden's input, kernel, output.
    flags = {w.name: w.numpy() for w in qmodel.non_trainable_weights
             if w.name.endswith("_initialized:0")}
    assert len(flags) == 1 + 3 + 4 + 1 + 3 and all(v == 1.0 for v in flags.values()), flags
    expected = qmodel.predict(x, verbose=0)

    saved = os.path.join(tmp_path, "saved_model")
    qmodel.save(saved)
    with quantize_scope():
        restored = tf_keras.models.load_model(saved)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)
    restored = tf_keras.models.load_model(saved, custom_objects=custom_objects())
    assert isinstance(restored.get_layer("quant_wino"), Wrapper)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)

    prefix = os.path.join(tmp_path, "ckpt", "weights")
    qmodel.save_weights(prefix)
    fresh = quantize_model(_small_model(flex=True), bits=8)
    fresh.load_weights(prefix).assert_existing_objects_matched().expect_partial()
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), expected)


def test_flex_int8_training_lowers_loss():
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 4))
    x = WinogradConv2D(8, tile_size=4, flex=True, name="wino")(inputs)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(3)(x))
    qmodel = quantize_model(model, bits=8, quantize_first=True, quantize_last=True)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 8, 8, 4)).astype(np.float32)
    labels = np.arange(16) % 3
    # The wrapper holds the float variables; the wrapped layer's attributes are
    # replaced by their quantized tensors at each call.
    a_t_var, = [w for w in qmodel.get_layer("quant_wino").trainable_weights if "A_t" in w.name]
    a_t = a_t_var.numpy()
    qmodel.compile(tf_keras.optimizers.Adam(2e-2),
                   tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = qmodel.fit(images, labels, batch_size=16, epochs=15, verbose=0).history["loss"]
    assert loss[-1] < 0.7 * loss[0]
    assert np.abs(a_t_var.numpy() - a_t).max() > 1e-3  # the transforms are learned


def test_fit_ranges_match_single_device(distribute_scope):
    """model.fit over replicas sets the same ranges as a full-batch call."""
    x, y = _data()

    def build():
        tf_keras.utils.set_random_seed(1)
        inputs = tf_keras.Input((8, 8, 3))
        h = WinogradConv2D(4, tile_size=2, name="wino")(inputs)
        h = tf_keras.layers.GlobalAveragePooling2D()(h)
        model = tf_keras.Model(inputs, tf_keras.layers.Dense(3)(h))
        return quantize_model(model, bits=8, per_tap=True, quantize_first=True)

    fitted, reference = build(), build()
    fitted.compile(tf_keras.optimizers.SGD(0.0),
                   tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fitted.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # In a tf.function, as fit runs it.
    tf.function(lambda images: reference(images, training=True))(x)
    in_quant = fitted.get_layer("quant_wino_input_quant")
    state = {w.name.split("/")[-1]: w.numpy() for w in in_quant.non_trainable_weights}
    assert (state["output_min:0"], state["output_max:0"]) == (x.min(), x.max())
    for got, want in zip(fitted.non_trainable_weights, reference.non_trainable_weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, err_msg=got.name)


@pytest.mark.parametrize("bits", [1, 17, 8.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_model(_small_model(), bits=bits)


def test_rejects_unsupported_models():
    class Subclassed(tf_keras.Model):
        def call(self, inputs):
            return inputs

    with pytest.raises(ValueError, match="functional or Sequential"):
        quantize_model(Subclassed())
    float_only = tf_keras.Sequential([tf_keras.Input((4, 4, 2)),
                                      tf_keras.layers.Conv2D(2, 3), tf_keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no Conv2D"):
        quantize_model(float_only)
    model = tf_keras.Sequential([tf_keras.Input((4, 4, 2))] + float_only.layers
                                + [tf_keras.layers.Dense(3, bias_initializer="ones")])
    qmodel = quantize_model(model, quantize_last=True)
    # With quantize_last the Dense is quantized (input, kernel, output; the
    # first convolution stays float).  After one training-mode batch, whose
    # min/max initialise every range, it computes what numpy computes with the
    # reference's quantizer: scale = range / 127.5, round half to even, clip.
    x = np.random.default_rng(2).standard_normal((5, 4, 4, 2)).astype(np.float32)
    got = qmodel(x, training=True).numpy().astype(np.float64)

    def reference_quant(v, tie):
        """Quantizes `v` over its own range; `tie` is the code of a value at exactly
        -range: -127.5, which float64 rounds (half to even) to -128, and float32,
        whose scale is off by an ulp, may round to -127."""
        range_ = np.abs(v).max()
        codes = np.clip(np.round(v / (range_ / 127.5)), -128, 127)
        codes[v == -range_] = tie
        return codes * (range_ / 127.5)

    features = float_only(x).numpy().astype(np.float64)
    dense = model.layers[-1]
    kernel, bias = (w.numpy().astype(np.float64) for w in (dense.kernel, dense.bias))
    ties = [(a, b, c) for a in (-128, -127) for b in (-128, -127) for c in (-128, -127)]
    expected = [reference_quant(reference_quant(features, a) @ reference_quant(kernel, b) + bias,
                                c) for a, b, c in ties]
    assert any(np.allclose(got, e, rtol=1e-5, atol=0) for e in expected), (got, expected[0])
    assert np.abs(got - model(x).numpy()).max() > 1e-4  # not the float layer


@pytest.mark.parametrize("per_tap", [False, True])
def test_recompute_matches_stored_pipeline(per_tap, pipeline):
    """recompute=True: same outputs, gradients and quantizer state after two steps.

    Two different batches: a recomputation that updated the ranges again
    would move the EMA state twice in the second step.
    """
    batches = [tf.random.stateless_normal((4, 9, 9, 3), seed=(11, i)) * (i + 1)
               for i in range(2)]
    cotangent = tf.random.stateless_normal((4, 9, 9, 4), seed=(11, 9))
    initial, results = None, []
    for recompute in (False, True):
        inputs = tf_keras.Input((9, 9, 3))
        y = WinogradConv2D(4, tile_size=4, recompute=recompute, name="wa")(inputs)
        model = quantize_model(tf_keras.Model(inputs, y), bits=8, per_tap=per_tap,
                               quantize_first=True)
        if initial is None:
            initial = model.get_weights()
        model.set_weights(initial)
        for x in batches:
            with tf.GradientTape() as tape:
                y = model(x, training=True)
                loss = tf.reduce_sum(y * cotangent)
            grads = tape.gradient(loss, model.trainable_weights)
        results.append((model.get_weights(), [y] + grads))
    (w_a, g_a), (w_b, g_b) = results
    assert not all(np.array_equal(a, b) for a, b in zip(initial, w_a))  # ranges were updated
    for a, b in zip(w_a, w_b):  # ... once, identically
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # The forward passes are the same ops on the same values; the gradients sum the
    # recomputed V in other orders: within the float32 bound of tests/float_bounds.py,
    # normwise (the stages are quantized), from the float layer's terms.
    layer = unwrap(model.get_layer("quant_wa"))
    n = float_bounds.chain_length(layer, x.shape)
    terms = float_bounds.abs_terms(layer, x, cotangent)
    bounds = [terms["y"]] + [terms[float_bounds.short_name(v)] for v in model.trainable_weights]
    for a, b, bound in zip(g_a, g_b, bounds):
        assert float_bounds.error_ratio(a, b, bound, n, tf.float32, normwise=True) <= 1
