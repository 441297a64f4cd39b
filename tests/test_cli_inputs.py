"""End-to-end tests of bin/train.py on bad input: corrupt image folders, architecture files."""
import os

import numpy as np
import pytest
import tf_keras
from absl import flags as absl_flags

from wa_tf import models, quantization
from wa_tf.evaluation.evaluate import evaluate_checkpoint
from wa_tf.training import experiment, train_lib
from wa_tf.training import flags as wa_flags

from cli_helpers import TINY, make_source_run, run_cli


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished INT8 normal-convolution run to adapt from (cli_helpers.make_source_run)."""
    return make_source_run(tmp_path_factory)


def _image_folder_with_a_text_file(root):
    """10 small JPEGs per class in train/ and test/, and one text file named .jpg."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(10):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                    f.write(tf_keras.backend.get_value(_encode_jpeg(pixels)))
    bad = os.path.join(root, "train", "dog", "7.jpg")
    with open(bad, "w", encoding="utf-8") as f:
        f.write("not an image\n")
    return bad


def _encode_jpeg(pixels):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.io.encode_jpeg(pixels)


def test_corrupt_image_is_named_in_one_line_or_skipped(tmp_path, capsys):
    root = str(tmp_path / "images")
    bad = _image_folder_with_a_text_file(root)
    out = tmp_path / "out"
    argv = ["--use_normal_conv", "--dataset=image_folder", f"--data_dir={root}", "--mult=0.125",
            "--steps_per_epoch=1", "--epochs=1", "--batch_size=8", f"--outDir={out}"]
    code, err = run_cli("train", argv, capsys)
    assert code == wa_flags.EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0] and "--skip_corrupt" in lines[0], err
    assert not out.exists()  # stopped before anything was written
    # --skip_corrupt: trains on the 19 readable training images, and says it is on.
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    wa_flags.parse_argv(["train"] + argv + ["--skip_corrupt"], values)
    config = wa_flags.from_flags(values, "train")
    assert config.skip_corrupt
    train_lib.run(config)
    (run,) = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files
              if f == "metrics.json"]
    metrics = experiment.read_metrics(os.path.dirname(run))
    assert metrics["status"] == experiment.FINISHED
    counts = metrics["dataset"]["num_examples"]
    assert counts["train"] + counts["validation"] == 19 and counts["test"] == 20
    assert "--skip_corrupt" in open(os.path.join(os.path.dirname(run), "FLAGS.txt")).read()


def _mixed_architecture(path, width=0.125):
    """normal / static F2 / flex F4 / flex F6 layers with 8, 16 and float bits."""
    from wa_tf.models import architecture  # pylint: disable=import-outside-toplevel
    layers = models.searchable_layers(width, (32, 32, 3))
    choices = {}
    for i, layer in enumerate(layers):
        kind = i % 4
        if kind == 0:
            choices[layer.name] = {"conv": "normal", "tile_size": None, "bits": 8}
        elif kind == 1:
            choices[layer.name] = {"conv": "static", "tile_size": 2, "bits": 16}
        elif kind == 2:
            choices[layer.name] = {"conv": "flex", "tile_size": 4, "bits": 8}
        else:
            choices[layer.name] = {"conv": "flex", "tile_size": 6 if 6 in layer.tile_sizes else 4,
                                   "bits": None}
    architecture.save_architecture(choices, path)
    return choices


@pytest.mark.slow  # end to end, over a minute on 2 cores
def test_train_and_adapt_with_an_architecture_file(source_run, tmp_path, capsys):
    from wa_tf.deploy import export  # pylint: disable=import-outside-toplevel
    from wa_tf.models import architecture  # pylint: disable=import-outside-toplevel
    arch_path = str(tmp_path / "mixed.json")
    choices = _mixed_architecture(arch_path)
    out = tmp_path / "out"
    argv = [f"--architecture={arch_path}", *TINY, "--epochs=1", f"--outDir={out}"]
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    wa_flags.parse_argv(["train"] + argv, values)
    result = train_lib.run(wa_flags.from_flags(values, "train"))
    run = result["model_dir"]
    assert os.path.relpath(os.path.dirname(run), out) == os.path.join(
        "ResNet18LikeSearched", "mult_0.125", "bits_mixed", "lr_0.001")
    assert result["metrics"]["status"] == experiment.FINISHED
    copy = os.path.join(run, "architecture.json")
    assert architecture.load_architecture(copy).to_dict() == \
        architecture.load_architecture(choices).to_dict()
    report = open(os.path.join(run, "report.txt"), encoding="utf-8").read()
    assert "F(6x6,3x3)" in report and "F(2x2,3x3)" in report and "16" in report
    # The run reloads from its own copy, even once the original file is gone.
    os.remove(arch_path)
    model, _ = experiment.load_model(run, "final")
    assert model.name == "ResNet18LikeSearched"
    layer = quantization.unwrap(model.get_layer("quant_layer1.0.conv2"))
    assert (layer.tile_size, layer.flex, layer.quantization.bits) == (2, False, 16)
    assert not any(ly.name == "quant_layer1.1.conv2" for ly in model.layers)  # float layer
    reloaded = evaluate_checkpoint(run, "test", checkpoint="final")
    assert reloaded["accuracy"] == pytest.approx(
        result["metrics"]["test"]["final"]["accuracy"], abs=1e-9)
    exported = export.export_saved_model(model, str(tmp_path / "saved"))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(export.load_serving(exported)(x), model(x, training=False),
                               rtol=1e-5, atol=1e-5)
    tf_keras.backend.clear_session()
    # Adapting a normal run into the architecture copies its kernels.
    _mixed_architecture(arch_path)
    _, normal_dir = source_run
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    wa_flags.parse_argv(["adapt", f"--modelDir={normal_dir}", f"--architecture={arch_path}",
                         "--epochs=1", "--steps_per_epoch=1", f"--outDir={out}"], values)
    adapted = train_lib.adapt(wa_flags.from_flags(values, "adapt"))
    metrics = adapted["metrics"]
    assert "layer1.0.conv2/kernel" in metrics["adapted_from"]["copied"]
    assert "layer1.1.conv1/A_t" in metrics["adapted_from"]["not_found"]  # a flex F4 layer
    assert os.path.isfile(os.path.join(adapted["model_dir"], "architecture.json"))


ARCH_BAD_INPUT = [
    (["--flex"], "--architecture gives each layer's convolution"),
    (["--Q"], "--architecture gives each layer's"),
    (["--F=4"], "cannot be combined with --F"),
]


@pytest.mark.parametrize("extra,message", ARCH_BAD_INPUT, ids=[a[0] for a, _ in ARCH_BAD_INPUT])
def test_architecture_bad_input_is_one_line(extra, message, tmp_path, capsys):
    arch_path = str(tmp_path / "mixed.json")
    _mixed_architecture(arch_path)
    out = tmp_path / "out"
    code, err = run_cli("train", [f"--architecture={arch_path}", *extra, *TINY,
                               f"--outDir={out}"], capsys)
    lines = err.strip().splitlines()
    assert code == wa_flags.EXIT_BAD_INPUT and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_architecture_file_errors_name_the_flag(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"layer1.0.conv1": {"conv": "flex", "tile_size": 5}}')
    for path, message in ((bad, "tile_size"), (tmp_path / "missing.json", "missing.json")):
        code, err = run_cli("train", [f"--architecture={path}", *TINY,
                                   f"--outDir={tmp_path / 'out'}"], capsys)
        lines = err.strip().splitlines()
        assert code == wa_flags.EXIT_BAD_INPUT and len(lines) == 1, err
        assert lines[0].startswith("error: --architecture") and message in lines[0], err
    # A file valid on its own but naming too few layers fails before anything is written.
    partial = tmp_path / "partial.json"
    partial.write_text('{"layer1.0.conv1": {"conv": "flex", "tile_size": 4, "bits": 8}}')
    code, err = run_cli("train", [f"--architecture={partial}", *TINY,
                               f"--outDir={tmp_path / 'out'}"], capsys)
    assert code == wa_flags.EXIT_BAD_INPUT and "layer1.0.conv2" in err, err
    assert not (tmp_path / "out").exists()
