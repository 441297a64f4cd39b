"""LiteRT files with native Winograd operators: exact layers through LiteRT, whole models."""

import numpy as np
import pytest
import tf_keras
from int8_layers import reference_codes

from wa_tf import models, quantization
from wa_tf.deploy import integer, litert, litert_native, native
from wa_tf.deploy.litert_fusion import epilogue
from wa_tf.deploy.litert_winograd import NATIVE_OP, lower_native
from wa_tf.deploy.tflite_graph import Graph
from wa_tf.layers import WinogradConv2D
from wa_tf.quantization import quantize_model

pytest.importorskip("ai_edge_litert")
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _one_layer_file(layer, batch):
    g = Graph()
    x = g.tensor("x", [batch, 12, 10, layer["in_channels"]], "int8",
                 float(layer["input_scale"]), 0)
    return g.finish([x], [lower_native(g, x, layer, "wa")])


@pytest.mark.parametrize("threads,fused", [(1, False), (2, False), (2, True)])
def test_a_layer_through_litert_is_bit_exact(threads, fused):
    layer = integer.as_layer(native.synthetic_layer(4, c=16, k=24, flex=True, per_tap=True,
                                                    bias=True))
    if fused:  # a batch norm and ReLU as the operator's epilogue
        rng = np.random.default_rng(7)
        layer.update(epilogue(rng.uniform(0.5, 2, 24), rng.uniform(-0.5, 0.5, 24),
                              float(layer["output_scale"]), 0.02, relu=True))
    blob = _one_layer_file(layer, batch=2)
    assert litert_native.is_native(blob)
    runner = litert.interpreter(blob, threads)
    assert isinstance(runner, litert_native.NativeModel) and len(runner.layers) == 1
    codes = np.random.default_rng(threads).integers(-128, 128, (5, 12, 10, 16)).astype(np.int8)
    runner.set_tensor(0, codes)  # 5 images through a batch-2 file: three invocations
    runner.invoke()
    np.testing.assert_array_equal(runner.get_tensor(1), reference_codes(layer, codes))
    assert runner.layers[0].output_scale == np.float32(0.02 if fused else layer["output_scale"])


@pytest.mark.parametrize("tail", ["", "bn", "bn_relu"])
def test_a_small_model_runs_with_native_operators(tmp_path, tail):
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 4))
    y = WinogradConv2D(8, tile_size=4, flex=True, name="wa")(inputs)
    if tail:  # fused into the native operator: no depthwise convolution after it
        y = tf_keras.layers.BatchNormalization(name="bn")(y)
    if tail == "bn_relu":
        y = tf_keras.layers.ReLU(name="relu")(y)
    y = tf_keras.layers.GlobalAveragePooling2D()(y)
    model = quantize_model(tf_keras.Model(inputs, tf_keras.layers.Dense(3)(y)), bits=8,
                           per_tap=True, quantize_first=True)
    rng = np.random.default_rng(0)
    for _ in range(3):
        model(rng.normal(size=(8, 8, 8, 4)).astype(np.float32), training=True)
    path = str(tmp_path / "small.tflite")
    info = litert.export_litert(model, path, transforms="native")
    assert info["operators"][:2] == ["QUANTIZE", NATIVE_OP]
    assert "DEPTHWISE_CONV_2D" not in info["operators"]
    assert info["winograd"]["wa"] == {"native": True, "fused": tail.replace("_", " ").split()}
    x = rng.normal(size=(5, 8, 8, 4)).astype(np.float32)
    logits = litert.predict(litert.interpreter(path), x, batch_size=2)
    expected = model(x, training=False).numpy()
    # The layer is the integer pipeline; the pooled classifier rounds differently, and so
    # does a batch norm's int8 output (which no trained quantizer reads) without a ReLU.
    tolerance = 0.03 if tail == "bn" else 0.02
    assert np.abs(logits - expected).max() <= tolerance * np.abs(expected).max()


@pytest.mark.slow  # two exports of a ResNet: half a minute
def test_whole_model_runs_with_native_operators(tmp_path):
    tf_keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = quantization.quantize_model(models.resnet18_like("flex", 4, width_multiplier=0.125),
                                        per_tap=True)
    for _ in range(3):
        model(rng.normal(size=(8, 32, 32, 3)).astype(np.float32), training=True)
    path = str(tmp_path / "native.tflite")
    info = litert.export_litert(model, path, normalization=(MEAN, STD), transforms="native")
    # Each layer's BatchNormalization (and ReLU, where one follows) is its epilogue.
    assert NATIVE_OP in info["operators"] and all(
        v["native"] and v["fused"][0].startswith(name.replace("conv", "bn"))
        for name, v in info["winograd"].items())
    assert not {"PAD", "DEPTH_TO_SPACE", "STRIDED_SLICE"} & set(info["operators"])
    raw = rng.integers(0, 256, (12, 32, 32, 3)).astype(np.uint8)
    normalized = ((raw / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)
    expected = model.predict(normalized, verbose=0)
    logits = litert.predict(litert.interpreter(path), raw, batch_size=5)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    # Integer against fake-quantized: the logits follow the model's (an untrained model's
    # logits are small, so they differ by several output steps; garbage would not correlate).
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.8
    assert np.abs(logits - expected).mean() <= 0.5 * np.abs(expected).mean()


def test_native_export_refusals(tmp_path):
    float_model = models.resnet18_like("flex", 4, width_multiplier=0.125)
    with pytest.raises(ValueError, match="export a quantized model"):
        litert.export_litert(float_model, str(tmp_path / "f.tflite"), transforms="native")
    layer = integer.as_layer(native.synthetic_layer(4, c=4, k=4))
    layer["hadamard_bits"] = 16
    g = Graph()
    x = g.tensor("x", [1, 8, 8, 4], "int8", float(layer["input_scale"]), 0)
    with pytest.raises(ValueError, match="8-bit layers .*wider tensors: hadamard"):
        lower_native(g, x, layer, "wa")


def test_an_operator_given_float_input_fails_with_one_clear_error():
    layer = integer.as_layer(native.synthetic_layer(2, c=4, k=4))
    g = Graph()
    x = g.tensor("x", [1, 8, 8, 4], "float32")  # not the int8 codes the operator takes
    runner = litert.interpreter(g.finish([x], [lower_native(g, x, layer, "wa")]))
    runner.set_tensor(0, np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="a native Winograd operator failed"):
        runner.invoke()
