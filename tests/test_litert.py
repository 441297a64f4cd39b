"""LiteRT export of whole models: float32 equal to Keras, integer models from the run's own
ranges, the runtimes that load them, refusals, and the export / evaluate binaries."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import models, quantization
from wa_tf.deploy import litert
from wa_tf.deploy.integer import quantize
from wa_tf.deploy.integer_export import output_scale
from wa_tf.quantization.tfmot_adapter import call_node
from wa_tf.training import train_lib
from wa_tf.training.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
# Builtin operators only: no custom op, no TensorFlow (Flex) op.
BUILTINS = {"QUANTIZE", "DEQUANTIZE", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD", "MAX_POOL_2D",
            "RESHAPE", "TRANSPOSE", "FULLY_CONNECTED", "DEPTH_TO_SPACE", "PAD", "MEAN",
            "BATCH_MATMUL", "CAST", "MUL", "STRIDED_SLICE", "RELU", "DELEGATE"}


def _raw_and_normalized(rng, n):
    raw = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    return raw, ((raw / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)


def _calibrated(model, rng, batches=3):
    for _ in range(batches):
        model(rng.normal(size=(8, 32, 32, 3)).astype(np.float32), training=True)
    return model


@pytest.mark.parametrize("conv,tile_size", [("normal", 4), ("flex", 4), ("static", 6),
                                            ("flex", 2)])
def test_float_model_matches_keras_at_any_batch(conv, tile_size, tmp_path):
    rng = np.random.default_rng(0)
    model = _calibrated(models.resnet18_like(conv, tile_size, width_multiplier=0.125), rng)
    path = str(tmp_path / "model.tflite")
    info = litert.export_litert(model, path, normalization=(MEAN, STD))
    assert not info["integer"] and os.path.getsize(path) == info["bytes"]
    runner = litert.interpreter(path)
    for batch in (1, 5):
        raw, normalized = _raw_and_normalized(rng, batch)
        expected = model.predict(normalized, verbose=0)
        logits = litert.predict(runner, raw)
        assert logits.dtype == np.float32 and logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def _quantized(conv, tile_size, per_tap, rng, **kwargs):
    model = models.resnet18_like(conv, tile_size, width_multiplier=0.125)
    model = quantization.quantize_model(model, per_tap=per_tap, **kwargs)
    return _calibrated(model, rng)


def test_integer_model_runs_builtin_int8_ops_in_both_runtimes(tmp_path):
    rng = np.random.default_rng(1)
    model = _quantized("flex", 4, True, rng)
    path = str(tmp_path / "f4.tflite")
    info = litert.export_litert(model, path, normalization=(MEAN, STD))
    assert info["integer"] and set(info["operators"]) <= BUILTINS
    runner = litert.interpreter(path, threads=2)
    detail = runner.get_input_details()[0]
    assert detail["dtype"] == np.uint8
    assert runner.get_output_details()[0]["dtype"] == np.float32
    assert set(litert.operators(runner)) <= BUILTINS
    # Every operator output between the input and the classifier's int32 sum is int8.
    details = runner.get_tensor_details()
    outputs = {details[i]["name"]: details[i]["dtype"] for op in runner._get_ops_details()
               for i in op["outputs"]}
    assert {np.dtype(dtype) for name, dtype in outputs.items()
            if name.startswith("layer")} == {np.dtype(np.int8)}
    raw, _ = _raw_and_normalized(rng, 3)
    logits = litert.predict(runner, raw)
    fallback = tf.lite.Interpreter(model_path=path)
    fallback.allocate_tensors()
    assert litert.predict(fallback, raw).shape == logits.shape


def test_integer_layers_read_the_trained_codes(tmp_path):
    """With the stem and classifier quantized (every range learned), the first block's
    convolution writes the codes the Keras model's fake quantization gives."""
    rng = np.random.default_rng(2)
    model = _quantized("normal", 4, False, rng, quantize_first=True, quantize_last=True)
    flatbuffer_info = litert.export_litert(model, str(tmp_path / "n.tflite"), batch_size=4)
    runner = tf.lite.Interpreter(model_path=str(tmp_path / "n.tflite"),
                                 experimental_preserve_all_tensors=True)
    runner.allocate_tensors()
    _, normalized = _raw_and_normalized(rng, 4)
    runner.set_tensor(runner.get_input_details()[0]["index"], normalized)
    runner.invoke()
    # The stem reads the model's input codes: equal but at float32 rounding ties.  The first
    # block reads BatchNorm + ReLU requantised in one int8 operator, where about 0.1% of
    # the codes round the other way than in float32; its sums of 72 codes then differ by
    # one in a few percent of its outputs.
    for name, allowed in (("quant_conv1", 1e-3), ("quant_layer1.0.conv1", 0.03)):
        wrapper = model.get_layer(name)
        probe = tf_keras.Model(model.inputs, call_node(model, wrapper).output_tensors)
        expected = tf.function(lambda x: probe(x, training=False))(normalized).numpy()
        scale = output_scale(wrapper, "output")[1]
        lowered = runner.get_tensor(flatbuffer_info["tensors"][name]).astype(np.int64)
        assert np.abs(lowered - quantize(expected, scale, 8)).max() <= 1
        assert np.mean(lowered != quantize(expected, scale, 8)) <= allowed


@pytest.mark.slow
def test_a_searched_mixed_architecture_exports(tmp_path):
    """Per-layer conv modes, tile sizes and bit-widths, as bin/search.py writes them."""
    rng = np.random.default_rng(4)
    modes = [("normal", None, 8), ("flex", 2, 6), ("static", 4, 8), ("flex", 6, 8)]
    layers = models.searchable_layers()
    architecture = {}
    for i, layer in enumerate(layers):
        conv, tile, bits = modes[i % len(modes)]
        tile = None if tile is None else max(t for t in layer.tile_sizes if t <= tile)
        architecture[layer.name] = {"conv": conv, "tile_size": tile, "bits": bits}
    model = _calibrated(models.resnet18_like(width_multiplier=0.125,
                                             architecture=architecture), rng)
    info = litert.export_litert(model, str(tmp_path / "mixed.tflite"), (MEAN, STD))
    assert info["integer"] and set(info["winograd"]) == {
        name for name, choice in architecture.items() if choice["conv"] != "normal"}
    raw, _ = _raw_and_normalized(rng, 2)
    logits = litert.predict(litert.interpreter(str(tmp_path / "mixed.tflite")), raw)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


@pytest.mark.slow
def test_a_file_xnnpack_refuses_runs_on_the_builtin_kernels(tmp_path):
    """An untrained 4-bit F6 layer's output range is far finer than one accumulator step."""
    rng = np.random.default_rng(5)
    model = _quantized("flex", 6, False, rng, bits=4)
    path = str(tmp_path / "f6.tflite")
    info = litert.export_litert(model, path, (MEAN, STD))
    assert any("output_transform" in name for name in info["xnnpack_refused"])
    with pytest.warns(UserWarning, match="builtin kernels"):
        runner = litert.interpreter(path)
    assert "DELEGATE" not in litert.operators(runner)
    assert litert.predict(runner, _raw_and_normalized(rng, 2)[0]).shape == (2, 10)


def test_runs_litert_cannot_express_are_refused_and_nothing_is_written(tmp_path):
    rng = np.random.default_rng(3)
    path = str(tmp_path / "x.tflite")
    with pytest.raises(ValueError, match="at most 8"):
        litert.export_litert(_quantized("flex", 4, False, rng, bits=16), path, (MEAN, STD))
    mixed = models.resnet18_like(width_multiplier=0.125, architecture={
        name: {"conv": "flex", "tile_size": 2, "bits": None if i == 3 else 8}
        for i, name in enumerate(layer.name for layer in models.searchable_layers())})
    with pytest.raises(ValueError, match="float in a quantized model"):
        litert.export_litert(_calibrated(mixed, rng), path, (MEAN, STD))
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="normalization must be .* 3 values"):
        litert.export_litert(_calibrated(models.resnet18_like(width_multiplier=0.125), rng),
                             path, ((0.5, 0.5), (0.2, 0.2)))


def _bin(program, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", f"{program}.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_export_and_evaluate_binaries(tmp_path):
    config = RunConfig(conv="flex", tile_size=4, quantize=True, per_tap=True, dataset="digits",
                       width_multiplier=0.125, epochs=1, steps_per_epoch=2,
                       out_dir=str(tmp_path / "runs"))
    model_dir = train_lib.run(config)["model_dir"]
    tf_keras.backend.clear_session()
    path = str(tmp_path / "out" / "f4.tflite")
    export = _bin("export", f"--modelDir={model_dir}", f"--litert={path}")
    assert export.returncode == 0, export.stderr[-3000:]
    assert "integer (int8)" in export.stdout and os.path.isfile(path)
    again = _bin("export", f"--modelDir={model_dir}", f"--litert={path}")
    assert again.returncode != 0 and "--litert" in again.stderr.strip().splitlines()[-1]
    evaluate = _bin("evaluate", f"--modelDir={model_dir}", f"--litert={path}")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    line = [x for x in evaluate.stdout.splitlines() if x.startswith("LiteRT")][0]
    accuracy = float(line.split("accuracy ")[1].split(",")[0])
    agreement = float(line.rsplit(": ", 1)[1])
    assert 0 <= accuracy <= 1 and 0.5 <= agreement <= 1  # a tiny 2-step model: loosely
    floor = [x for x in evaluate.stdout.splitlines() if "under input noise N(0, 0.0001)" in x]
    assert len(floor) == 1 and 0.5 <= float(floor[0].rsplit(": ", 1)[1]) <= 1
    assert "(359 examples)" in line  # digits' test split
