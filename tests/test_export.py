"""Tests of wa_tf.deploy.export: self-contained SavedModels of float and INT8 models."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tf_keras

from wa_tf import WinogradConv2D, kernels, quantization
from wa_tf.deploy import export

# Runs in a fresh interpreter that cannot import wa_tf, tf_keras or TF-MOT:
# loads each SavedModel with TensorFlow alone and writes its outputs.
_SERVE = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    BLOCKED = ("wa_tf", "tf_keras", "tensorflow_model_optimization")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            continue
        raise SystemExit(f"{name} is importable")

    import tensorflow as tf
    jobs = json.loads(sys.argv[1])
    for path, signature, inputs, output in jobs:
        fn = tf.saved_model.load(path).signatures[signature]
        x = np.load(inputs)
        np.save(output, fn(images=tf.constant(x))["logits"].numpy())
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
""")


def _serve_in_fresh_process(tmp_path, jobs):
    """[(savedmodel, signature, images)] -> outputs, computed without wa_tf."""
    specs = []
    for i, (path, signature, images) in enumerate(jobs):
        np.save(tmp_path / f"in{i}.npy", images)
        specs.append([str(path), signature, str(tmp_path / f"in{i}.npy"),
                      str(tmp_path / f"out{i}.npy")])
    env = {"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3"}
    # -I: isolated mode (no PYTHONPATH, no user site, script dir not on sys.path).
    proc = subprocess.run([sys.executable, "-I", "-c", _SERVE, json.dumps(specs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [np.load(spec[3]) for spec in specs]


def _model(tile_size=4, flex=True):
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((10, 10, 3))
    x = tf_keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.ReLU()(x)
    x = WinogradConv2D(8, tile_size=tile_size, flex=flex, name="wa")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="fc")(x))


def test_savedmodel_runs_without_wa_tf_and_matches_keras(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 10, 10, 3)).astype(np.float32)
    raw = rng.integers(0, 256, size=(3, 10, 10, 3)).astype(np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    float_model = _model(tile_size=6)
    export.export_saved_model(float_model, str(tmp_path / "float"),
                              raw_normalization=(mean, std))

    int8_model = quantization.quantize_model(_model(tile_size=4), bits=8, per_tap=True)
    for _ in range(2):  # calibrate the quantizer ranges
        int8_model(rng.normal(size=(4, 10, 10, 3)).astype(np.float32), training=True)
    export.export_saved_model(int8_model, str(tmp_path / "int8"))

    float_out, raw_out, int8_out = _serve_in_fresh_process(tmp_path, [
        (tmp_path / "float", "serving_default", images),
        (tmp_path / "float", "serving_raw", raw),
        (tmp_path / "int8", "serving_default", images[:2]),  # another batch size
    ])
    np.testing.assert_allclose(float_out, float_model(images, training=False).numpy(),
                               atol=1e-5, rtol=0)
    normalised = (raw / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(raw_out, float_model(normalised.astype(np.float32),
                                                    training=False).numpy(), atol=1e-5, rtol=0)
    # The INT8 model's fake-quantized inference with frozen ranges, in a graph
    # as model.predict runs it, with TensorFlow's ops as the SavedModel (the fused
    # kernels round differently, which can flip codes near a rounding tie).
    with kernels.disabled():
        expected = int8_model.predict(images[:2], verbose=0)
    np.testing.assert_allclose(int8_out, expected, atol=1e-5, rtol=0)
    # Serving did not update the ranges: the same output again.
    np.testing.assert_array_equal(int8_model.predict(images[:2], verbose=0), expected)


def test_load_serving(tmp_path):
    model = _model(tile_size=2, flex=False)
    path = export.export_saved_model(model, str(tmp_path / "m"))
    x = np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype(np.float32)
    predict = export.load_serving(path)
    np.testing.assert_allclose(predict(x).numpy(), model(x, training=False).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="signature must be one of"):
        export.load_serving(path, "serving_raw")
    with pytest.raises(ValueError, match="no SavedModel"):
        export.load_serving(str(tmp_path))


def test_export_rejects_bad_input(tmp_path):
    model = _model(tile_size=2, flex=False)
    with pytest.raises(ValueError, match="raw_normalization"):
        export.export_saved_model(model, str(tmp_path / "a"), raw_normalization=((0.5,), (0.2,)))
    a, b = tf_keras.Input((4, 4, 3)), tf_keras.Input((4, 4, 3))
    two_inputs = tf_keras.Model([a, b], tf_keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="single image input"):
        export.export_saved_model(two_inputs, str(tmp_path / "b"))


def _two_winograd_model():
    """Two Winograd layers with different tile sizes, flex and static."""
    tf_keras.utils.set_random_seed(1)
    inputs = tf_keras.Input((12, 12, 3))
    x = tf_keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = WinogradConv2D(8, tile_size=4, flex=True, name="wa4")(x)
    x = tf_keras.layers.ReLU()(x)
    x = WinogradConv2D(8, tile_size=2, flex=False, use_bias=True, name="wa2")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="fc")(x))


def _calibrated(model, bits, rng):
    """`model` quantized to `bits` with its ranges calibrated on two batches (None: as is)."""
    if not bits:
        return model
    model = quantization.quantize_model(model, bits=bits)
    for _ in range(2):
        model(rng.normal(size=(4, *model.input_shape[1:])).astype(np.float32), training=True)
    return model


def _serve_op_count(loaded, op):
    """How many `op` nodes the traced serving function holds."""
    library = loaded.signatures["serving_default"].graph.as_graph_def().library
    (serve,) = [f for f in library.function if f.signature.name.startswith("__inference_serve")]
    return sum(node.op == op for node in serve.node_def)


@pytest.mark.parametrize("bits", [None, 8])
def test_savedmodel_computes_winograd_weights_once(tmp_path, bits):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, 12, 12, 3)).astype(np.float32)
    model = _calibrated(_two_winograd_model(), bits, rng)
    if bits:
        with kernels.disabled():  # TensorFlow's ops, as the SavedModel
            expected = model.predict(images, verbose=0)
    else:
        expected = model(images, training=False).numpy()
    path = export.export_saved_model(model, str(tmp_path / "m"))
    loaded = tf.saved_model.load(path)

    # Per Winograd layer, a 2-D transform is two GEMMs: 2 for B_t d B_t^T and 2
    # for A_t M A_t^T, none for G g G^T; plus the Dense layer's one.
    assert _serve_op_count(loaded, "MatMul") == 2 * (2 + 2) + 1
    assert _serve_op_count(loaded, "BatchMatMulV2") == 2  # the element-wise stages
    assert sorted(v.name for v in loaded.winograd_weights) == [
        "wa2/winograd_weights:0", "wa4/winograd_weights:0"]
    # The kernels and G of the Winograd layers, as saved (in the model's variable order).
    index = {id(v): i for i, v in enumerate(model.variables)}
    stale = [loaded.model_variables[index[id(quantization.float_weight(layer, name))]]
             for layer in model.layers if isinstance(quantization.unwrap(layer), WinogradConv2D)
             for name in ("kernel", "G")]
    assert len(stale) == 4
    if not bits:  # the float graph does not even capture them
        captured = {id(t) for t in loaded.signatures["serving_default"].captured_inputs}
        assert not captured & {id(v.handle) for v in stale}
    # The served output does not depend on the kernels or G any more.
    for variable in stale:
        variable.assign(tf.fill(variable.shape, np.nan))
    served = loaded.signatures["serving_default"](images=tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [None, 8])
def test_fused_kernels_export(tmp_path, bits):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if not kernels.available():
        pytest.skip(f"fused kernels unavailable here: {kernels.unavailable_reason()}")
    rng = np.random.default_rng(3)
    images = rng.normal(size=(3, 12, 12, 3)).astype(np.float32)
    model = _calibrated(_two_winograd_model(), bits, rng)
    plain = tf.saved_model.load(export.export_saved_model(model, str(tmp_path / "plain")))
    fused = tf.saved_model.load(export.export_saved_model(model, str(tmp_path / "fused"),
                                                          fused_kernels=True))
    # The default export has TensorFlow's ops only; the fused one a kernel per tile stage.
    assert _serve_op_count(plain, "WaTileTransform") == 0
    assert _serve_op_count(fused, "WaTileTransform") == 2
    assert _serve_op_count(fused, "WaTileTransformAdjoint") == 2
    assert _serve_op_count(fused, "MatMul") == 1  # the Dense layer's only
    serve = lambda m: m.signatures["serving_default"](  # noqa: E731
        images=tf.constant(images))["logits"].numpy()
    # Each serves the model as it runs in process with the same ops (the two round
    # differently: an INT8 model may differ by a flipped code between them).
    np.testing.assert_allclose(serve(fused), model.predict(images, verbose=0), atol=1e-5,
                               rtol=0)
    with kernels.disabled():
        model.make_predict_function(force=True)
        np.testing.assert_allclose(serve(plain), model.predict(images, verbose=0), atol=1e-5,
                                   rtol=0)
    with kernels.disabled(), pytest.raises(ValueError, match="fused_kernels=True needs"):
        export.export_saved_model(model, str(tmp_path / "no"), fused_kernels=True)
