"""Tests of wa_tf.deploy.integer and wa_tf.deploy.integer_export: the per-layer .npz and its
integer pipeline."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import WinogradConv2D, quantization
from wa_tf.deploy import integer, integer_export
from wa_tf.quantization import float_weight, input_quant_layer


def _quantized_model(tile_size, flex, per_tap, padding="same", use_bias=False, seed=0):
    """Stem conv (float) -> quantized WinogradConv2D -> GAP -> Dense, calibrated."""
    tf_keras.utils.set_random_seed(seed)
    inputs = tf_keras.Input((9, 9, 3))
    x = tf_keras.layers.Conv2D(5, 3, padding="same", name="stem")(inputs)
    x = WinogradConv2D(6, tile_size=tile_size, flex=flex, padding=padding, use_bias=use_bias,
                       bias_initializer="random_normal", name="wa")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_keras.layers.Dense(3, name="fc")(x)
    model = quantization.quantize_model(tf_keras.Model(inputs, outputs), bits=8,
                                        per_tap=per_tap)
    wrapper = model.get_layer("quant_wa")
    rng = np.random.default_rng(seed)
    if flex:  # learned transforms: move them away from Cook-Toom's
        for name in ("A_t", "B_t", "G"):
            weight = float_weight(wrapper, name)
            weight.assign(weight + 0.05 * rng.normal(size=weight.shape))
    for _ in range(3):  # calibration batches, not the test batch
        model(rng.normal(size=(4, 9, 9, 3)).astype(np.float32), training=True)
    return model, wrapper


def _layer_io(model, wrapper, x):
    """The float input of the layer's input quantizer and the wrapped layer's output.

    Run in a graph, as model.predict and SavedModels run: an eager call can
    round a value lying exactly on a quantizer's range differently.
    """
    probe = tf_keras.Model(model.inputs, [input_quant_layer(wrapper).input, wrapper.output])
    return [t.numpy() for t in tf.function(lambda x: probe(x, training=False))(x)]


def _fake_quant(x, scale, bits=8):
    return np.clip(np.rint(x / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale


def _float_pipeline(layer, x):
    """Independent float64 simulation of the fake-quantized layer from the file's values."""
    m, r, t = layer["tile_size"], layer["kernel_size"], layer["tile_input_size"]

    def value(name):
        return layer[f"{name}_codes"].astype(np.float64) * np.float64(layer[f"{name}_scale"])

    def tap_scale(name):
        return np.broadcast_to(layer[f"{name}_scale"].astype(np.float64), (t, t))

    a_t, b_t = value("A_t"), value("B_t")
    u = layer["U_codes"] * tap_scale("weights_winograd")[:, :, None, None]
    xq = _fake_quant(x.astype(np.float64), np.float64(layer["input_scale"]))
    pad = (r - 1) // 2 if layer["padding"] == "same" else 0
    n, h, w, _ = x.shape
    out_h, out_w = h + 2 * pad - r + 1, w + 2 * pad - r + 1
    n_h, n_w = -(-out_h // m), -(-out_w // m)
    padded = np.zeros((n, n_h * m + r - 1, n_w * m + r - 1, x.shape[3]))
    padded[:, pad:pad + h, pad:pad + w] = xq
    y = np.zeros((n, n_h * m, n_w * m, layer["filters"]))
    for i in range(n_h):
        for j in range(n_w):
            d = padded[:, i * m:i * m + t, j * m:j * m + t]  # (N, t, t, C)
            v = _fake_quant(np.einsum("ak,bl,nklc->abnc", b_t, b_t, d),
                            tap_scale("input_winograd")[:, :, None, None])
            mm = _fake_quant(np.einsum("abnc,abck->abnk", v, u),
                             tap_scale("hadamard")[:, :, None, None])
            y[:, i * m:(i + 1) * m, j * m:(j + 1) * m] = np.einsum("ia,jb,abnk->nijk",
                                                                     a_t, a_t, mm)
    y = y[:, :out_h, :out_w] + layer.get("bias", 0.0)
    return _fake_quant(y, np.float64(layer["output_scale"]))


@pytest.mark.parametrize("tile_size,padding,use_bias", [(2, "same", False),
                                                        (4, "valid", False),
                                                        (6, "same", True)])
@pytest.mark.parametrize("flex", [False, True], ids=["static", "flex"])
@pytest.mark.parametrize("per_tap", [False, True], ids=["per_tensor", "per_tap"])
def test_integer_layer_reproduces_fake_quantized_layer(tmp_path, tile_size, padding, use_bias,
                                                       flex, per_tap):
    model, wrapper = _quantized_model(tile_size, flex, per_tap, padding, use_bias)
    x = np.random.default_rng(1).normal(size=(3, 9, 9, 3)).astype(np.float32)
    layer_in, expected = _layer_io(model, wrapper, x)

    path = integer_export.export_layer_npz(wrapper, str(tmp_path / "wa.npz"))
    layer = integer.load_layer_npz(path)
    codes, scale = integer.run_layer_codes(layer, layer_in)
    got = integer.run_layer(path, layer_in)

    # The codes are the model's own fake-quantized output divided by the output
    # quantizer's scale, derived here from its EMA state by the reference's
    # formula: range = max(-min(min, 0), max(max, 0)), scale = range / 127.5.
    state = {v.name.split("/")[-1]: float(v.numpy()) for v in wrapper.non_trainable_weights
             if v.name.split("/")[-1].startswith("output_")}
    out_range = max(-min(state["output_min:0"], 0.0), max(state["output_max:0"], 0.0))
    out_scale = out_range / ((127 - -128) / 2)
    np.testing.assert_allclose(float(scale), out_scale, rtol=1e-6)
    np.testing.assert_array_equal(codes, np.round(expected.astype(np.float64) / out_scale))
    assert np.abs(codes).mean() > 2  # a non-trivial output, not all zeros
    # Within one step of the output quantizer (in practice bit-exact).
    assert np.abs(got - expected).max() <= float(scale) * (1 + 1e-5)
    # An independent float64 simulation of the same quantized pipeline agrees.
    np.testing.assert_allclose(got, _float_pipeline(layer, layer_in),
                               atol=float(scale) * (1 + 1e-5))


def test_npz_format(tmp_path):
    model, wrapper = _quantized_model(4, flex=True, per_tap=True)
    del model
    layer = integer.load_layer_npz(integer_export.export_layer_npz(wrapper, str(tmp_path / "wa")))
    t = 6
    assert layer["format"] == integer.FORMAT and layer["layer"] == "wa"
    assert (layer["tile_size"], layer["kernel_size"], layer["tile_input_size"]) == (4, 3, t)
    assert (layer["in_channels"], layer["filters"], layer["padding"]) == (5, 6, "same")
    assert layer["flex"] is True and layer["per_tap"] is True
    for tensor in integer.TENSORS:
        assert layer[f"{tensor}_bits"] == 8
        expected_shape = (t, t) if tensor in integer.STAGES else ()
        assert layer[f"{tensor}_scale"].shape == expected_shape
        assert layer[f"{tensor}_scale"].dtype == np.float32
    shapes = {"kernel": (3, 3, 5, 6), "G": (t, 3), "B_t": (t, t), "A_t": (4, t),
              "U": (t, t, 5, 6)}
    for name, shape in shapes.items():
        assert layer[f"{name}_codes"].shape == shape and layer[f"{name}_codes"].dtype == np.int8
    # The kernel's codes are those of its quantizer's scale.
    kernel = float_weight(wrapper, "kernel").numpy()
    np.testing.assert_array_equal(layer["kernel_codes"],
                                  np.clip(np.rint(kernel / layer["kernel_scale"]), -128, 127))
    # U is G g G^T of the quantized kernel and G, quantized per tap (+-1 code:
    # the model computes it in float32).
    g = layer["G_codes"] * np.float64(layer["G_scale"])
    u = np.einsum("ai,bj,ijck->abck", g, g,
                  layer["kernel_codes"] * np.float64(layer["kernel_scale"]))
    u_codes = np.clip(np.rint(u / layer["weights_winograd_scale"][:, :, None, None]), -128, 127)
    assert np.abs(layer["U_codes"] - u_codes).max() <= 1


def test_export_errors(tmp_path):
    inputs = tf_keras.Input((6, 6, 2))
    float_model = tf_keras.Model(inputs, WinogradConv2D(2, tile_size=2, name="wa")(inputs))
    with pytest.raises(ValueError, match="QuantizeWrapper"):
        integer_export.layer_arrays(float_model.get_layer("wa"))
    model, wrapper = _quantized_model(2, flex=False, per_tap=False)
    for weight in wrapper.weights:  # forget the calibration
        if weight.name.endswith("_initialized:0"):
            weight.assign(0.0)
    with pytest.raises(ValueError, match="no range"):
        integer_export.layer_arrays(wrapper)
    with pytest.raises(ValueError, match="no quantized WinogradConv2D"):
        integer_export.export_model_npz(float_model, str(tmp_path))
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="is not a wa_tf.winograd_layer/1"):
        integer.load_layer_npz(str(tmp_path / "other.npz"))
    del model


def test_requantize_rounds_as_documented():
    """Hand-worked: 3 x float32(1/6) is 0.5000000149 in float64 (rounds to 1) but 0.5 in
    float32 (a tie, rounds to even 0); the V and M stages use float32."""
    m = float(np.float32(1 / 6))  # 0.16666667163372040...
    assert integer.requantize(np.array([3]), m, 8).tolist() == [1]
    assert integer.requantize_f32(np.array([3]), m, 8).tolist() == [0]
    # Half to even, and clipping to the bit-width's range.
    assert integer.requantize_f32(np.array([5, 7, -5, 1000, -1000]), 0.5, 8).tolist() == [
        2, 4, -2, 127, -128]
    # float32(2^24 + 1) is 2^24: the accumulator itself is rounded to float32.
    assert integer.requantize_f32(np.array([2 ** 24 + 1]), 2.0 ** -23, 8).tolist() == [2]
    assert integer.requantize(np.array([2 ** 24 + 3]), 2.0 ** -23, 8).tolist() == [2]


def test_affine_requantize_by_hand():
    """Per channel (last axis): y * scale + offset, half to even, clipped to (lo, hi)."""
    codes = np.array([[3, 5, -7], [100, -3, 2]])
    scale, offset = np.array([0.5, 0.5, 2.0]), np.array([0.0, 0.25, 1.0])
    # 1.5 -> 2, 2.75 -> 3, -13; 50, -1.25 -> -1, 5
    assert integer.affine_requantize(codes, scale, offset, -128, 127).tolist() == [
        [2, 3, -13], [50, -1, 5]]
    # A ReLU's floor and a narrow range.
    assert integer.affine_requantize(codes, scale, offset, 0, 40).tolist() == [
        [2, 3, 0], [40, 0, 5]]
