"""WinogradConv2D against tf.nn.conv2d, and its Keras integration."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import transforms
from wa_tf.layers import WinogradConv2D, winograd_weights

import float_bounds

TOL = {2: 1e-5, 4: 1e-4, 6: 1e-3}


def rel_err(y, ref):
    return float(tf.reduce_max(tf.abs(y - ref)) / tf.reduce_max(tf.abs(ref)))


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (16, 15), (3, 5)])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_static_matches_conv2d(m, size, padding, pipeline):
    if padding == "valid" and min(size) < 3:
        pytest.skip("no valid output")
    x = tf.random.stateless_normal((2, *size, 5), seed=(1, m))
    layer = WinogradConv2D(7, tile_size=m, flex=False, padding=padding)
    y = layer(x)
    ref = tf.nn.conv2d(x, layer.kernel, 1, padding.upper())
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= TOL[m]


@pytest.mark.parametrize("m,r", [(2, 5), (4, 5), (3, 3), (2, 1)])
def test_other_filter_and_tile_sizes(m, r, pipeline):
    x = tf.random.stateless_normal((2, 11, 10, 3), seed=(2, m))
    layer = WinogradConv2D(4, kernel_size=r, tile_size=m, use_bias=True,
                           bias_initializer="ones")
    y = layer(x)
    ref = tf.nn.conv2d(x, layer.kernel, 1, "SAME") + 1.0
    assert rel_err(y, ref) <= 1e-4


def test_custom_points_match_conv2d():
    x = tf.random.stateless_normal((1, 12, 12, 4), seed=(3, 3))
    layer = WinogradConv2D(4, tile_size=4, points=[0, 1, -1, 0.5, -0.5])
    assert rel_err(layer(x), tf.nn.conv2d(x, layer.kernel, 1, "SAME")) <= 1e-4


def test_weights_layout_and_trainability():
    x = tf.zeros((1, 8, 8, 3))
    flex, static = WinogradConv2D(5, tile_size=4), WinogradConv2D(5, tile_size=4, flex=False)
    flex(x)
    static(x)
    conv = tf_keras.layers.Conv2D(5, 3, use_bias=False)
    conv(x)
    assert flex.kernel.shape == conv.kernel.shape == (3, 3, 3, 5)
    assert [w.name.split("/")[-1] for w in flex.weights] == ["kernel:0", "A_t:0", "B_t:0", "G:0"]
    assert {w.name.split("/")[-1] for w in flex.trainable_weights} == {
        "kernel:0", "A_t:0", "B_t:0", "G:0"}
    assert [w.name.split("/")[-1] for w in static.trainable_weights] == ["kernel:0"]
    # The transforms start as Lavin & Gray's published F(4x4, 3x3) matrices.
    lavin_a_t = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                 [0, 1, -1, 8, -8, 1]]
    lavin_b_t = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    lavin_g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
    for layer in (flex, static):
        np.testing.assert_allclose(layer.A_t.numpy(), lavin_a_t, rtol=1e-7, atol=0)
        np.testing.assert_allclose(layer.B_t.numpy(), lavin_b_t, rtol=1e-7, atol=0)
        np.testing.assert_allclose(layer.G.numpy(), lavin_g, rtol=1e-7, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"strides": 2}, "strides"),
    ({"strides": (1, 2)}, "strides"),
    ({"dilation_rate": 2}, "dilation_rate"),
    ({"kernel_size": 4}, "kernel_size"),
    ({"kernel_size": (3, 5)}, "kernel_size"),
    ({"padding": "causal"}, "padding"),
    ({"tile_size": 0}, "tile_size"),
    ({"filters": 0}, "filters"),
    ({"points": [0, 1]}, "points"),
    ({"quantization": {"bitz": 8}}, "quantization"),
])
def test_bad_arguments(kwargs, match):
    args = {"filters": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        WinogradConv2D(**args)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_winograd_weights_and_gradients_match_einsum(m):
    # U[a, b] = sum_ij G[a, i] G[b, j] g[i, j], and its gradients for the kernel g
    # and G, against the same product written as one einsum (TensorFlow's gradient).
    _, _, g_mat = transforms.winograd_matrices(m, 3)
    g = tf.constant(np.asarray(g_mat, np.float64) + 0.1)  # no zeros: every entry counts
    kernel = tf.random.stateless_normal((3, 3, 5, 7), seed=(1, 2), dtype=tf.float64)
    du = tf.random.stateless_normal(((m + 2) ** 2, 5, 7), seed=(3, 4), dtype=tf.float64)
    results = []
    for fn in (winograd_weights,
               lambda k, g: tf.reshape(tf.einsum("ai,bj,ijck->abck", g, g, k), du.shape)):
        with tf.GradientTape() as tape:
            tape.watch([kernel, g])
            u = fn(kernel, g)
        results.append([u, *tape.gradient(u, [kernel, g], output_gradients=du)])
    for name, got, want in zip(["U", "kernel", "G"], *results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("flex", [False, True])
def test_gradients(flex, pipeline):
    x = tf.random.stateless_normal((2, 8, 8, 3), seed=(4, 4))
    layer = WinogradConv2D(4, tile_size=4, flex=flex)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) ** 2)
    names = [w.name.split("/")[-1] for w in layer.trainable_weights]
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    # Every gradient (input, kernel, and flex transforms) is the derivative:
    # in float64, <gradient, D> equals the central difference of the loss
    # along a random direction D (the loss is a polynomial of degree <= 4 in
    # each tensor, so the difference's error is O(h^2), ~1e-6 relative here).
    layer64 = WinogradConv2D(4, tile_size=4, flex=flex, dtype="float64")
    x64 = tf.cast(x, tf.float64)
    layer64(x64)
    layer64.set_weights(layer.get_weights())
    rng = np.random.default_rng(0)
    h = 1e-5
    for i, (name, grad) in enumerate(zip(["input"] + names, grads)):
        variables = [tf.Variable(x64)] + layer64.trainable_weights
        variable = variables[i]
        with tf.GradientTape() as tape:
            loss64 = tf.reduce_sum(layer64(variables[0]) ** 2)
        grad64 = tape.gradient(loss64, variable).numpy()
        direction = rng.standard_normal(variable.shape)
        start = variable.numpy()
        losses = []
        for sign in (1, -1):
            variable.assign(start + sign * h * direction)
            losses.append(float(tf.reduce_sum(layer64(variables[0]) ** 2)))
        variable.assign(start)
        np.testing.assert_allclose(np.sum(grad64 * direction), (losses[0] - losses[1]) / (2 * h),
                                   rtol=1e-5, err_msg=name)
        # ... and the float32 layer's gradient is that gradient.
        np.testing.assert_allclose(grad, grad64, rtol=1e-3, atol=1e-3 * np.abs(grad64).max(),
                                   err_msg=name)
    # The kernel's gradient equals the direct convolution's.
    kernel = tf.Variable(layer.kernel)
    with tf.GradientTape() as tape:
        ref = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME") ** 2)
    np.testing.assert_allclose(grads[1], tape.gradient(ref, kernel), rtol=1e-3, atol=1e-3)


def test_recompute_matches(pipeline):
    # The recomputed V enters other sums (the weight gradient's) than the stored one:
    # each output and gradient within the float32 bound of tests/float_bounds.py.
    x = tf.random.stateless_normal((2, 9, 9, 3), seed=(5, 5))
    cotangent = tf.random.stateless_normal((2, 9, 9, 4), seed=(5, 6))
    a = WinogradConv2D(4, tile_size=4)
    b = WinogradConv2D(4, tile_size=4, recompute=True)
    a(x)
    b(x)
    b.set_weights(a.get_weights())
    results = []
    for layer in (a, b):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * cotangent)
        results.append([y] + tape.gradient(loss, [x] + layer.trainable_weights))
    n = float_bounds.chain_length(a, x.shape)
    terms = float_bounds.abs_terms(a, x, cotangent)
    bounds = [terms["y"], terms["x"]] + [terms[float_bounds.short_name(v)]
                                         for v in a.trainable_weights]
    for u, v, bound in zip(*results, bounds):
        assert float_bounds.error_ratio(u, v, bound, n, tf.float32) <= 1
        assert np.abs(np.asarray(v)).max() > 0


def _model(m=4, flex=True, functional=True, size=(12, 12)):
    if functional:
        inputs = tf_keras.Input((*size, 3))
        y = WinogradConv2D(8, tile_size=m, flex=flex, name="wa")(inputs)
        y = tf_keras.layers.ReLU()(y)
        y = tf_keras.layers.GlobalAveragePooling2D()(y)
        return tf_keras.Model(inputs, tf_keras.layers.Dense(3)(y))
    return tf_keras.Sequential([
        tf_keras.Input((*size, 3)), WinogradConv2D(8, tile_size=m, flex=flex, name="wa"),
        tf_keras.layers.ReLU(), tf_keras.layers.GlobalAveragePooling2D(),
        tf_keras.layers.Dense(3)])


def _data(n=32, size=(12, 12)):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *size, 3)).astype("float32"), rng.integers(0, 3, n)


@pytest.mark.parametrize("functional", [True, False])
def test_fit_lowers_loss(functional, distribute_scope):
    model = _model(functional=functional)
    model.compile(tf_keras.optimizers.Adam(1e-2),
                  tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    hist = model.fit(x, y, batch_size=8, epochs=4, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    transforms = [w for w in model.trainable_weights if "B_t" in w.name]
    assert transforms and not np.allclose(transforms[0].numpy(),
                                          model.get_layer("wa")._matrices[1])


def test_jit_compile_and_dynamic_shapes():
    inputs = tf_keras.Input((None, None, 3))
    layer = WinogradConv2D(4, tile_size=4)
    model = tf_keras.Model(inputs, layer(inputs))
    for size in ((8, 8), (13, 7)):
        x = tf.random.stateless_normal((2, *size, 3), seed=(6, size[0]))
        ref = tf.nn.conv2d(x, layer.kernel, 1, "SAME")
        assert rel_err(model(x), ref) <= 1e-4
        assert rel_err(tf.function(model, jit_compile=True)(x), ref) <= 1e-4


def test_config_roundtrip():
    layer = WinogradConv2D(6, kernel_size=(5, 5), tile_size=2, flex=False, padding="valid",
                           use_bias=True, kernel_regularizer="l2", points=[0, 1, -1, 2, -2])
    clone = WinogradConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    restored = tf_keras.layers.deserialize(tf_keras.layers.serialize(layer))
    assert isinstance(restored, WinogradConv2D) and restored.get_config() == layer.get_config()
    assert restored.kernel_size == (5, 5) and restored.padding == "valid"


@pytest.mark.parametrize("fmt", ["h5", "checkpoint", "savedmodel"])
def test_save_load_roundtrip(tmp_path, fmt, pipeline):
    model = _model(m=6)
    x, _ = _data(4)
    for w in model.trainable_weights:  # make the transforms differ from their defaults
        w.assign(w + 0.01)
    expected = model(x)
    if fmt == "h5":
        model.save_weights(str(tmp_path / "w.h5"))
        clone = _model(m=6)
        clone.load_weights(str(tmp_path / "w.h5"))
    elif fmt == "checkpoint":
        model.save_weights(str(tmp_path / "ckpt"))
        clone = _model(m=6)
        clone.load_weights(str(tmp_path / "ckpt")).assert_existing_objects_matched()
    else:
        model.save(str(tmp_path / "sm"), save_format="tf")
        clone = tf_keras.models.load_model(str(tmp_path / "sm"))
        assert isinstance(clone.get_layer("wa"), WinogradConv2D)
        raw = tf.saved_model.load(str(tmp_path / "sm"))
        np.testing.assert_allclose(raw(x, training=False), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clone(x), expected, rtol=1e-5, atol=1e-6)


def test_weights_copy_from_conv2d():
    x = tf.random.stateless_normal((2, 10, 10, 3), seed=(7, 7))
    conv = tf_keras.layers.Conv2D(5, 3, padding="same", use_bias=False)
    ref = conv(x)
    layer = WinogradConv2D(5, tile_size=4)
    layer(x)
    layer.kernel.assign(conv.kernel)
    assert rel_err(layer(x), ref) <= 1e-4


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("size,padding",
                         [((7, 9), "same"), ((16, 15), "same"), ((11, 10), "valid")])
def test_input_gradient_matches_conv2d(m, size, padding, pipeline):
    # The tile gather has a hand-written gradient: every input pixel's share
    # of each overlapping tile, edges and padding included.
    x = tf.random.stateless_normal((2, *size, 3), seed=(7, m))
    layer = WinogradConv2D(4, tile_size=m, flex=False, padding=padding)
    layer.build(x.shape)
    dy = tf.random.stateless_normal(layer.compute_output_shape(x.shape), seed=(8, m))
    grads = []
    for fn in (layer, lambda z: tf.nn.conv2d(z, layer.kernel, 1, padding.upper())):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        grads.append(tape.gradient(y, x, output_gradients=dy))
    assert rel_err(grads[0], grads[1]) <= TOL[m]


@pytest.mark.parametrize("m,padding", [(4, "same"), (2, "valid")])
def test_frozen_winograd_weights(m, padding, pipeline):
    x = tf.random.stateless_normal((2, 9, 7, 5), seed=(3, m))
    layer = WinogradConv2D(6, tile_size=m, flex=True, padding=padding, use_bias=True,
                           bias_initializer="ones")
    y = layer(x)
    ref = tf.nn.conv2d(x, layer.kernel, 1, padding.upper()) + 1.0
    u = tf.Variable(layer.inference_winograd_weights())
    with layer.frozen_winograd_weights(u):
        # With U frozen, the output depends on U, not on the kernel.
        layer.kernel.assign(tf.zeros_like(layer.kernel))
        frozen = layer(x, training=False)
        assert rel_err(frozen, ref) <= TOL[m]
        u.assign(tf.zeros_like(u))
        np.testing.assert_array_equal(layer(x), tf.ones_like(y))
        with pytest.raises(ValueError, match="inference only"):
            layer(x, training=True)
    # Unfrozen again: the (zeroed) kernel is used.
    np.testing.assert_array_equal(layer(x), tf.ones_like(y))
    layer.kernel.assign(tf.ones_like(layer.kernel))
    assert rel_err(layer(x), tf.nn.conv2d(x, layer.kernel, 1, padding.upper()) + 1.0) <= TOL[m]
    assert len(layer.weights) == 5  # U is not one of the layer's weights
    with pytest.raises(ValueError, match="must have shape"):
        with layer.frozen_winograd_weights(tf.zeros((3, 5, 6))):
            pass
