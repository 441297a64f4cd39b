"""Tests of wa_tf.evaluation.evaluate, wa_tf.evaluation.error_report, bin/evaluate.py and
bin/export.py."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from absl import flags as absl_flags

from wa_tf import WinogradConv2D, data, quantization
from wa_tf.deploy import integer, integer_export
from wa_tf.evaluation import error_report, evaluate
from wa_tf.training import cli, experiment
from wa_tf.training import flags as wa_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv_same(x, kernel):
    """Direct 'same' correlation in float64 numpy (odd square kernel)."""
    r = kernel.shape[0]
    pad = (r - 1) // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    return sum(np.einsum("nhwc,ck->nhwk", xp[:, i:i + h, j:j + w], kernel[i, j])
               for i in range(r) for j in range(r))


def _wa_model(layers):
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((12, 12, 3))
    x = tf_keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    for i, (tile_size, flex) in enumerate(layers):
        x = WinogradConv2D(6, tile_size=tile_size, flex=flex, name=f"wa{i}")(x)
        x = tf_keras.layers.ReLU()(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="fc")(x))


def test_evaluate_matches_numpy():
    model = _wa_model([(2, False)])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 12, 12, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=10)
    result = evaluate.evaluate(evaluate.keras_predict(model),
                               tf.data.Dataset.from_tensor_slices((images, labels)).batch(4))
    logits = model(images, training=False).numpy().astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert result["examples"] == 10
    assert result["loss"] == pytest.approx(-log_probs[np.arange(10), labels].mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    with pytest.raises(ValueError, match="empty"):
        evaluate.evaluate(evaluate.keras_predict(model),
                          tf.data.Dataset.from_tensor_slices((images, labels)).take(0).batch(4))


def test_error_report_float_layers_are_exact():
    model = _wa_model([(2, False), (4, True), (6, False)])
    images = np.random.default_rng(0).normal(size=(6, 12, 12, 3)).astype(np.float32)
    rows = error_report.error_report(model, images, batch_size=4)
    assert [row["layer"] for row in rows] == ["wa0", "wa1", "wa2"]
    assert [(row["tile_size"], row["flex"], row["bits"]) for row in rows] == [
        (2, False, None), (4, True, None), (6, False, None)]
    assert rows[0]["input_shape"] == (12, 12, 6)
    for row in rows:
        assert row["rel_error"] < 1e-5 and row["max_error"] < 1e-4
        assert row["stage_errors"] == {}  # nothing quantized


def test_error_report_quantized_against_independent_reference(tmp_path):
    model = quantization.quantize_model(_wa_model([(2, False), (4, False), (6, False)]), bits=8)
    rng = np.random.default_rng(0)
    for _ in range(3):  # calibrate
        model(rng.normal(size=(4, 12, 12, 3)).astype(np.float32), training=True)
    images = rng.normal(size=(5, 12, 12, 3)).astype(np.float32)
    rows = error_report.error_report(model, images, batch_size=3)
    assert [(row["layer"], row["bits"], row["per_tap"]) for row in rows] == [
        ("wa0", 8, False), ("wa1", 8, False), ("wa2", 8, False)]
    errors = {row["layer"]: row["rel_error"] for row in rows}
    # Static 8-bit F4 and F6 are far worse than F2 (issue 3's analysis).
    assert errors["wa1"] > 2 * errors["wa0"] and errors["wa2"] > 2 * errors["wa0"]
    # Per stage: the element-wise stage M is where F4 and F6 break down; each
    # single stage errs less than the whole pipeline with everything quantized.
    stages = {row["layer"]: row["stage_errors"] for row in rows}
    for name in ("wa1", "wa2"):
        assert set(stages[name]) == {"weights_winograd", "input_winograd", "hadamard"}
        assert stages[name]["hadamard"] == max(stages[name].values())
        assert stages[name]["hadamard"] > 5 * stages["wa0"]["hadamard"]
        assert all(0 < e < errors[name] for e in stages[name].values())

    # The same numbers from the integer pipeline and a numpy convolution.
    for name in ("wa0", "wa2"):
        wrapper = model.get_layer(f"quant_{name}")
        probe = tf_keras.Model(model.inputs, quantization.input_quant_layer(wrapper).input)
        x = tf.function(lambda v, p=probe: p(v, training=False))(images).numpy()
        y_ref = _conv_same(x, quantization.float_weight(wrapper, "kernel").numpy())
        y_int = integer.run_layer(integer_export.layer_arrays(wrapper), x)
        expected = np.linalg.norm(y_int - y_ref) / np.linalg.norm(y_ref)
        assert errors[name] == pytest.approx(expected, rel=1e-3)

    table = error_report.format_report(rows)
    assert "only M" in table
    assert all(re.search(rf"^{name}\s+{m}\s+static\s+8\s", table, re.M)
               for name, m in (("wa0", 2), ("wa1", 4), ("wa2", 6)))
    path = error_report.plot_report(rows, str(tmp_path / "plot" / "errors.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json.dumps(error_report.report_dict(rows)))["layers"][2]["tile_size"] == 6


def test_error_report_leaves_the_model_unchanged():
    model = quantization.quantize_model(_wa_model([(2, False), (4, True)]), bits=8, per_tap=True,
                                        warmup=True)
    rng = np.random.default_rng(0)
    model(rng.normal(size=(4, 12, 12, 3)).astype(np.float32), training=True)  # calibrate
    # Warm-up quantizers without a range yet (as after adapting a float checkpoint):
    # at inference they would take one from the first batch they see.
    emptied = 0
    for variable in model.variables:
        name = variable.name.split("/")[-1]
        if name.startswith(("input_winograd_", "hadamard_")):
            variable.assign(tf.zeros_like(variable))
            emptied += name.endswith("_initialized:0")
    assert emptied == 4  # two stages of two layers
    before = [v.numpy().copy() for v in model.variables]
    rows = error_report.error_report(model, rng.normal(size=(5, 12, 12, 3)).astype(np.float32),
                                     batch_size=3)
    assert len(rows) == 2 and all(np.isfinite(row["rel_error"]) for row in rows)
    assert len(model.variables) == len(before)
    changed = [v.name for v, value in zip(model.variables, before)
               if not np.array_equal(v.numpy(), value)]
    assert not changed


def test_error_report_needs_winograd_layers():
    inputs = tf_keras.Input((4, 4, 3))
    model = tf_keras.Model(inputs, tf_keras.layers.Conv2D(2, 3)(inputs))
    with pytest.raises(ValueError, match="no WinogradConv2D"):
        error_report.error_report(model, np.zeros((1, 4, 4, 3), np.float32))


# --------------------------------------------------------------------------
# bin/export.py and bin/evaluate.py on an experiment folder
# --------------------------------------------------------------------------


def _make_run(model_dir, **overrides):
    """An experiment folder as bin/train.py writes it (untrained weights, digits data)."""
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    values(["test"])
    config = wa_flags.as_dict(values)
    config.update(dataset="digits", batch_size=128, epochs=1, **overrides)
    os.makedirs(os.path.join(model_dir, experiment.CHECKPOINT_DIR))
    experiment.write_flags(model_dir, config)
    _, info = data.load("digits")
    experiment.write_metrics(model_dir, {"status": experiment.FINISHED, "dataset": {
        "name": info.name, "num_classes": info.num_classes,
        "image_shape": list(info.image_shape), "mean": list(info.mean), "std": list(info.std)}})
    tf_keras.utils.set_random_seed(0)
    model = experiment.build_model(config, info.num_classes, info.image_shape)
    for name in ("best", "final"):
        model.save_weights(os.path.join(model_dir, experiment.CHECKPOINT_DIR, name))
    return model


def _run_bin(script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", script), *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.slow  # end to end, over a minute on 2 cores
def test_export_and_evaluate_binaries(tmp_path):
    run = str(tmp_path / "run")
    _make_run(run, flex=True, F=4, mult=1 / 64)
    exported = str(tmp_path / "exported")
    proc = _run_bin("export.py", f"--modelDir={run}", f"--export_dir={exported}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "signatures: serving_default, serving_raw" in proc.stdout

    report_dir = str(tmp_path / "report")
    proc = _run_bin("evaluate.py", f"--modelDir={run}", f"--savedmodel={exported}",
                    "--error_report", "--error_images=40", f"--report_dir={report_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r"on test: accuracy ([\d.]+), loss ([\d.]+) \((\d+) examples\)",
                      proc.stdout)
    assert match, proc.stdout
    expected = evaluate.evaluate_checkpoint(run, split="test", checkpoint="best")
    in_process = evaluate.evaluate_savedmodel(exported, run, split="test")
    assert in_process["accuracy"] == expected["accuracy"]
    assert in_process["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert float(match.group(1)) == pytest.approx(expected["accuracy"], abs=1e-4)
    assert float(match.group(2)) == pytest.approx(expected["loss"], rel=1e-3)
    assert int(match.group(3)) == expected["examples"]
    assert "layer4.1.conv2" in proc.stdout
    with open(os.path.join(report_dir, "error_report.json"), encoding="utf-8") as f:
        rows = json.load(f)["layers"]
    assert len(rows) == 16 and all(row["rel_error"] < 1e-4 for row in rows)  # float model
    assert os.path.getsize(os.path.join(report_dir, "error_report.png")) > 1000

    # Bad input: one line naming the flag, no traceback.
    proc = _run_bin("evaluate.py", f"--modelDir={run}", "--split=train")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --split must be one of")
    assert "Traceback" not in proc.stderr


def _run_flags(*argv):
    values = absl_flags.FlagValues()
    cli.define_run_flags(values)
    values(["test", *argv])
    return values


def test_run_loading_errors_name_the_binaries_flags(tmp_path):
    with pytest.raises(ValueError, match=r"^--modelDir is required"):
        cli.load_run(_run_flags())
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"^--modelDir: .*missing.* is not a directory"):
        cli.load_run(_run_flags(f"--modelDir={missing}"))
    run = str(tmp_path / "run")
    _make_run(run, flex=True, F=2, mult=1 / 64)
    with pytest.raises(ValueError, match=r"^--checkpoint: no checkpoint .*nope") as error:
        cli.load_run(_run_flags(f"--modelDir={run}", f"--checkpoint={tmp_path / 'nope'}"))
    assert "--modelToLoad" not in str(error.value)  # adapt.py's flag, not these binaries'
    model, config = cli.load_run(_run_flags(f"--modelDir={run}", "--batch_size=7"))
    assert model.name == "ResNet18LikeF2" and config["batch_size"] == 7
    assert config["dataset"] == "digits"  # the rest from the run's FLAGS.txt
    # A library message that starts with its own name for the argument gets the flag's.
    assert str(cli.flag_error("--checkpoint", ValueError("checkpoint: no checkpoint x"))) \
        == "--checkpoint: no checkpoint x"
    assert str(cli.flag_error("--modelDir", ValueError("no folder /a: b"))) \
        == "--modelDir: no folder /a: b"


@pytest.mark.slow
def test_export_int8_run_with_layer_files(tmp_path):
    run = str(tmp_path / "run")
    model = _make_run(run, flex=True, F=4, Q=True, bits=8, mult=1 / 16)
    splits, info = data.load("digits")
    images = next(iter(data.pipeline(splits["test"], 32, info, training=False)))[0]
    model(images, training=True)  # calibrate the quantizers, then save again
    model.save_weights(os.path.join(run, experiment.CHECKPOINT_DIR, "best"))
    exported, layers = str(tmp_path / "exported"), str(tmp_path / "layers")
    proc = _run_bin("export.py", f"--modelDir={run}", f"--export_dir={exported}",
                    f"--npz_dir={layers}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from wa_tf import kernels  # pylint: disable=import-outside-toplevel
    from wa_tf.deploy.export import load_serving  # pylint: disable=import-outside-toplevel
    # The SavedModel runs TensorFlow's ops: the model's pure-TF pipeline, value for value.
    # (The fused CPU kernels round differently, and in an INT8 F4 model a code flipped near
    # a rounding tie grows through the output transform: docs/export_evaluate.md.)
    with kernels.disabled():
        model.make_predict_function(force=True)
        expected = model.predict(images, verbose=0)
    model.make_predict_function(force=True)
    np.testing.assert_allclose(load_serving(exported)(images).numpy(), expected, atol=1e-5)
    wrapper = model.get_layer("quant_layer2.0.conv1")
    probe = tf_keras.Model(model.inputs, [quantization.input_quant_layer(wrapper).input,
                                          wrapper.output])
    x, y = probe.predict(images, verbose=0)
    layer = integer.load_layer_npz(os.path.join(layers, "layer2.0.conv1.npz"))
    off = np.abs(integer.run_layer(layer, x) - y) > float(layer["output_scale"]) * (1 + 1e-5)
    # Float32 round-off of the fake-quantized model flips a code near a rounding
    # tie inside the pipeline for a handful of elements (see docs/export_evaluate.md).
    assert off.mean() < 1e-4


def test_litert_agreement_and_the_reference_s_own_floor(tmp_path):
    from wa_tf.deploy import litert  # pylint: disable=import-outside-toplevel
    pytest.importorskip("ai_edge_litert")
    inputs = tf_keras.Input((4, 4, 2))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2)(
        tf_keras.layers.GlobalAveragePooling2D()(inputs)))
    path = str(tmp_path / "m.tflite")
    litert.export_litert(model, path)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 4, 4, 2)).astype(np.float32)
    images[::2] -= images[::2].mean(axis=(1, 2, 3), keepdims=True)  # sums of exactly ~0
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(40, np.int64))).batch(8)

    def on_the_edge(x):  # top-1 decided by the sign of a sum that is ~0 for half the images
        s = tf.reduce_sum(x, axis=[1, 2, 3])
        return tf.stack([s, -s], axis=-1)

    result = evaluate.evaluate_litert(path, dataset, reference=on_the_edge, noise=1e-3)
    assert 0.5 < result["self_agreement"] < 0.95 and 0 <= result["agreement"] <= 1
    steady = evaluate.evaluate_litert(path, dataset, reference=lambda x: model(x), noise=1e-6)
    assert steady["self_agreement"] == 1.0 and steady["agreement"] == 1.0
    assert "self_agreement" not in evaluate.evaluate_litert(path, dataset, reference=on_the_edge)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        evaluate.evaluate_litert(path, dataset, reference=on_the_edge, noise=-1.0)
