"""End-to-end tests of bin/train.py and bin/adapt.py, and their handling of bad input."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tf_keras
from absl import flags as absl_flags

from wa_tf import data, models, quantization
from wa_tf.evaluation.evaluate import evaluate_checkpoint
from wa_tf.training import experiment, train_lib
from wa_tf.training import flags as wa_flags
from wa_tf.training.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=digits", "--mult=0.125", "--steps_per_epoch=2"]
RESULT = re.compile(r"Test set \((final model|best model, epoch \d+)\): Average loss: ([\d.]+), "
                    r"Accuracy: (\d+)/(\d+) \(([\d.]+)%\)")


def _bin(program, *args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bin", f"{program}.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _output_dir(stdout):
    return re.search(r"^Output dir: (.+)$", stdout, re.M).group(1)


def _check_results(stdout, metrics):
    """The printed test accuracies are those of metrics.json."""
    printed = {m.group(1).split(",")[0]: m for m in RESULT.finditer(stdout)}
    assert set(printed) == {"final model", "best model"}, stdout[-2000:]
    for name, key in (("final model", "final"), ("best model", "best")):
        m, result = printed[name], metrics["test"][key]
        assert int(m.group(4)) == result["examples"] == 359  # digits' test split
        assert int(m.group(3)) == round(result["accuracy"] * 359)
        assert float(m.group(5)) == pytest.approx(100 * result["accuracy"], abs=0.006)


def _check_folder(path, epochs):
    for name in ("FLAGS.txt", "report.txt", "metrics.json", "checkpoints/best.index",
                 "checkpoints/final.index"):
        assert os.path.isfile(os.path.join(path, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(path, "logs")))
    assert not os.path.exists(os.path.join(path, "backup"))  # removed once finished
    assert not os.path.exists(os.path.join(path, ".lock"))
    metrics = experiment.read_metrics(path)
    assert metrics["status"] == experiment.FINISHED and len(metrics["history"]) == epochs
    report = open(os.path.join(path, "report.txt"), encoding="utf-8").read()
    assert "TRAINABLE VARIABLES INFORMATION" in report and "Test set (final model)" in report
    return metrics


def test_train_normal_then_adapt_to_flex_int8(tmp_path):
    out = str(tmp_path / "experiments")
    train = _bin("train", "--use_normal_conv", "--epochs=2", f"--outDir={out}", *TINY)
    assert "TRAINABLE VARIABLES INFORMATION - arch: ResNet18Like" in train.stdout
    assert "Learning rate decay at: [1.2, 1.6]" in train.stdout
    normal_dir = _output_dir(train.stdout)
    assert os.path.relpath(os.path.dirname(normal_dir), out) == os.path.join(
        "ResNet18Like", "mult_0.125", "bits_FP", "lr_0.001")
    metrics = _check_folder(normal_dir, epochs=2)
    _check_results(train.stdout, metrics)
    assert len(re.findall(r"^Val set: Average loss", train.stdout, re.M)) == 2
    flags = experiment.read_flags(normal_dir)
    assert flags["use_normal_conv"] and flags["mult"] == 0.125 and flags["dataset"] == "digits"
    # The best checkpoint reloads from FLAGS.txt alone and scores what was printed.
    reloaded = evaluate_checkpoint(normal_dir, "test", checkpoint="best")
    assert reloaded["accuracy"] == pytest.approx(metrics["test"]["best"]["accuracy"], abs=1e-9)
    tf_keras.backend.clear_session()

    adapt = _bin("adapt", f"--modelDir={normal_dir}", "--flex", "--F=4", "--Q", "--bits=8",
                 "--epochs=1", "--steps_per_epoch=2", f"--outDir={out}")
    assert "TRAINABLE VARIABLES INFORMATION - arch: ResNet18LikeF4" in adapt.stdout
    assert f"Adapted from {normal_dir}" in adapt.stdout
    flex_dir = _output_dir(adapt.stdout)
    assert os.path.relpath(os.path.dirname(flex_dir), out) == os.path.join(
        "ResNet18LikeF4", "Flex", "mult_0.125", "bits_8", "lr_0.001")
    metrics = _check_folder(flex_dir, epochs=1)
    _check_results(adapt.stdout, metrics)
    adapted = metrics["adapted_from"]
    assert adapted["model_dir"] == normal_dir
    assert "layer1.0.conv1/kernel" in adapted["copied"] and "conv1/kernel" in adapted["copied"]
    assert "layer1.0.conv1/A_t" in adapted["not_found"]
    # Width and dataset came from --modelDir's FLAGS.txt.
    flags = experiment.read_flags(flex_dir)
    assert flags["mult"] == 0.125 and flags["dataset"] == "digits"
    assert flags["modelDir"] == normal_dir
    assert experiment.read_metrics(normal_dir)["status"] == experiment.FINISHED  # untouched


def _cli(program, argv, capsys):
    """Runs a binary's flag parsing and main in-process; returns (exit code, stderr)."""
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    fn = train_lib.run if program == "train" else train_lib.adapt
    with pytest.raises(SystemExit) as exit_info:
        wa_flags.parse_argv([program] + argv, values)
        wa_flags.run_main(fn, program, values)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def wrong_run(tmp_path_factory):
    """An experiment folder whose final checkpoint belongs to a wider model than its FLAGS.txt."""
    path = str(tmp_path_factory.mktemp("wrong_run"))
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    values(["x", "--use_normal_conv", *TINY])
    experiment.write_flags(path, wa_flags.as_dict(values))
    experiment.write_metrics(path, {"status": experiment.FINISHED,
                                    "dataset": {"num_classes": 10, "image_shape": [32, 32, 3]}})
    models.resnet18_like("normal", width_multiplier=0.25).save_weights(
        os.path.join(path, "checkpoints", "final"))
    tf_keras.backend.clear_session()
    return path


BAD_INPUT = [
    ("train", ["--flex", "--F=3"], "--F must be one of 2, 4, 6"),
    ("train", ["--flex", "--F=abc"], "--F=abc"),
    ("train", ["--flex", "--Q", "--bits=17"], "--bits must be an integer from 2 to 16"),
    ("train", ["--flex", "--bits=1"], "--bits must be an integer from 2 to 16"),
    ("train", ["--flex", "--mult=0"], "--mult must be in (0, 1]"),
    ("train", ["--flex", "--mult=1.5"], "--mult must be in (0, 1]"),
    ("train", ["--flex", "--static"], "exactly one of --use_normal_conv, --static, --flex"),
    ("train", [], "exactly one of --use_normal_conv, --static, --flex is required; got none"),
    ("train", ["--flex", "--dataset=image_folder"], "--data_dir is required"),
    ("train", ["--flex", "--dataset=image_folder", "--data_dir=/no/such/dir"], "--data_dir"),
    ("train", ["--flex", "--no_such_flag"], "no_such_flag"),
    ("adapt", ["--flex"], "--modelDir is required"),
    ("adapt", ["--flex", "--modelDir=/no/such/run"],
     "--modelDir: '/no/such/run' is not a directory"),
    ("adapt", ["--flex", "--modelDir={empty}"], "has no FLAGS.txt"),
    ("adapt", ["--flex", "--modelDir={wrong}", "--modelToLoad=best"],
     "--modelToLoad: no checkpoint"),
    ("adapt", ["--flex", "--modelDir={wrong}"], "--modelToLoad: checkpoint"),
    ("adapt", ["--flex", "--modelDir={wrong}", "--mult=0.5"], "--mult is fixed by --modelDir"),
    ("train", ["--flex", "--Q", "--warmup"], "--warmup is for adapting a model (bin/adapt.py)"),
]


@pytest.mark.parametrize("program,argv,message", BAD_INPUT,
                         ids=[f"{p}:{' '.join(a)}" for p, a, _ in BAD_INPUT])
def test_bad_input_exits_with_one_line_naming_the_flag(program, argv, message, tmp_path,
                                                       wrong_run, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    before = sorted(os.listdir(wrong_run))
    argv = [a.format(empty=empty, wrong=wrong_run) for a in argv] + [f"--outDir={out}"]
    code, err = _cli(program, argv, capsys)
    assert code == wa_flags.EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()  # nothing written
    assert sorted(os.listdir(wrong_run)) == before


# TensorFlow's C++ runtime logs a few lines to stderr when it loads, whatever
# TF_CPP_MIN_LOG_LEVEL says (TF 2.21); they are not the program's output.
_TF_NATIVE_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl|"
                            r"To enable the following instructions)")


def test_binaries_report_bad_input_without_traceback(tmp_path):
    for program, argv, start in (("train", ["--flex", "--static"], "error: exactly one of"),
                                 ("adapt", ["--flex", "--F=5"], "error: --F must be")):
        proc = _bin(program, *argv, f"--outDir={tmp_path}", check=False)
        assert proc.returncode == wa_flags.EXIT_BAD_INPUT
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        lines = [line for line in proc.stderr.splitlines() if not _TF_NATIVE_LOG.match(line)]
        assert len(lines) == 1 and lines[0].startswith(start), proc.stderr
    assert not os.listdir(tmp_path)


def test_flagfile_reruns_the_same_configuration(tmp_path):
    """FLAGS.txt is an absl flagfile: bin/train.py --flagfile=FLAGS.txt parses to the same flags."""
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    values(["x", "--static", "--F=2", "--Q", "--bits=6", *TINY])
    config = wa_flags.as_dict(values)
    experiment.write_flags(str(tmp_path), config)
    again = absl_flags.FlagValues()
    wa_flags.define_flags(again)
    wa_flags.parse_argv(["x", f"--flagfile={tmp_path / 'FLAGS.txt'}"], again)
    assert wa_flags.as_dict(again) == config
    assert np.isclose(again["mult"].value, 0.125)


@pytest.mark.parametrize("path", sorted(
    os.path.join("configs", f) for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".flags")))
def test_config_flagfiles_are_valid(path):
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    wa_flags.parse_argv(["x", f"--flagfile={os.path.join(ROOT, path)}"], values)
    program = "adapt" if os.path.basename(path).startswith("adapt") else "train"
    if program == "adapt":
        values["modelDir"].value = "<the run to adapt>"  # given on the command line
    wa_flags.from_flags(values, program)
    assert any(values[name].present for name in wa_flags.MODES)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished INT8 normal-convolution run (lr 0.002, seed 3) to adapt from."""
    out = tmp_path_factory.mktemp("source") / "runs"
    config = RunConfig(conv="normal", quantize=True, dataset="digits", width_multiplier=0.125,
                       epochs=1, steps_per_epoch=2, lr=0.002, seed=3, out_dir=str(out))
    result = train_lib.run(config)
    tf_keras.backend.clear_session()
    return str(out), result["model_dir"]


def _adapt_runner(model_dir, *argv):
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    wa_flags.parse_argv(["adapt", f"--modelDir={model_dir}", "--static", "--F=2", "--Q",
                         "--epochs=1", "--steps_per_epoch=1", "--noresume", *argv], values)
    return train_lib.Runner(wa_flags.from_flags(values, "adapt"), "adapt")


def _image_set(split):
    return {np.asarray(image).tobytes() for image, _ in split}


def test_adapt_takes_source_settings_and_validates_on_its_split(source_run, tmp_path,
                                                                monkeypatch):
    """outDir, lr, seed, use_cpu come from --modelDir unless given; the validation split
    is always the source run's, whatever --seed says."""
    out, source_dir = source_run
    monkeypatch.chdir(tmp_path)  # a relative ./experiments would land here
    runner = _adapt_runner(source_dir, "--seed=7")
    try:
        config = runner.config
        assert (config.out_dir, config.lr, config.seed, config.use_cpu) == (out, 0.002, 7, False)
        assert runner.model_dir.startswith(os.path.join(out, "ResNet18LikeF2", "Static"))
        assert not os.path.exists(tmp_path / "experiments")
        # digits' validation split is chosen by the seed: the source run's (3), not 7.
        source_val = _image_set(data.load("digits", seed=3)[0]["validation"])
        assert source_val != _image_set(data.load("digits", seed=7)[0]["validation"])
        assert _image_set(runner.splits["validation"]) == source_val
        report = open(os.path.join(runner.model_dir, "report.txt"), encoding="utf-8").read()
        line = [ln for ln in report.splitlines() if ln.startswith("From the source run's")]
        assert line == [f"From the source run's FLAGS.txt (not given on the command line): "
                        f"--lr=0.002 --nouse_cpu --outDir={out}"], report
        assert "Validation split: the source run's (seed 3)." in report
        metrics = experiment.read_metrics(runner.model_dir)
        assert metrics["validation_split_seed"] == 3
        assert metrics["adapted_from"]["from_source"] == {"outDir": out, "lr": 0.002,
                                                          "use_cpu": False}
        assert experiment.read_flags(runner.model_dir)["seed"] == 7
    finally:
        runner.run()
    # A flag given on the command line wins.
    explicit = wa_flags.from_flags(_parsed("--static", f"--modelDir={source_dir}", "--lr=0.01",
                                           f"--outDir={tmp_path}"), "adapt")
    assert explicit.lr == 0.01 and explicit.out_dir == str(tmp_path) and explicit.seed is None


def _parsed(*argv):
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    wa_flags.parse_argv(["x", *argv], values)
    return values


def _state(model):
    return {key: v.numpy() for key, v in quantization.named_weights(model).items()}


@pytest.mark.slow  # end to end, over a minute on 2 cores
def test_adapt_warmup_calibrates_the_ranges_the_source_lacks(source_run, tmp_path):
    """--warmup sets the Winograd-domain ranges before the first step from an inference
    pass; everything else is as without it."""
    _, source_dir = source_run
    source, _ = experiment.load_model(source_dir, "final")
    images = next(iter(data.pipeline(data.load("digits", seed=3)[0]["test"], 64,
                                     data.load("digits", seed=3)[1], training=False)))[0]
    expected = source(images, training=False).numpy()
    outputs, states, metrics = {}, {}, {}
    for warmup in (False, True):
        runner = _adapt_runner(source_dir, f"--outDir={tmp_path / str(warmup)}",
                               "--warmup" if warmup else "--nowarmup")
        try:
            states[warmup] = _state(runner.model)
            outputs[warmup] = runner.model(images, training=False).numpy()
            not_found = runner.adapted["not_found"]
        finally:
            runner.run()
        metrics[warmup] = experiment.read_metrics(runner.model_dir)
    assert states[False].keys() == states[True].keys()
    stages = [k for k in states[True] if k.rsplit("/", 1)[1].startswith(
        ("weights_winograd_", "input_winograd_", "hadamard_"))]
    assert len(stages) == 8 * 2 * 9  # 16 WinogradConv2D layers x 3 stages x (min, max, init)
    for key in stages:
        assert key in not_found
        if key.endswith("_initialized"):
            assert states[False][key] == 0 and states[True][key] == 1, key
    assert "warmup_calibration" not in metrics[False]
    assert sorted(metrics[True]["warmup_calibration"]["variables"]) == sorted(
        k for k in stages if not np.array_equal(states[False][k], states[True][k]))
    assert any(np.any(states[True][k] != 0) for k in stages if k.endswith("_max"))
    for key in states[True].keys() - set(stages):
        np.testing.assert_array_equal(states[True][key], states[False][key], err_msg=key)
    # The copied F(2x2, 3x3) model computes what the INT8 source computes, up to
    # quantization, once its Winograd-domain ranges are set; without them (scale 1
    # until the first training step) it is several times further off.
    errors = {w: np.abs(outputs[w] - expected) for w in (False, True)}
    assert errors[True].max() < 0.15 * np.abs(expected).max()
    assert errors[False].mean() > 3 * errors[True].mean()


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
    code, err = _cli("train", argv, capsys)
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
    code, err = _cli("train", [f"--architecture={arch_path}", *extra, *TINY,
                               f"--outDir={out}"], capsys)
    lines = err.strip().splitlines()
    assert code == wa_flags.EXIT_BAD_INPUT and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_architecture_file_errors_name_the_flag(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"layer1.0.conv1": {"conv": "flex", "tile_size": 5}}')
    for path, message in ((bad, "tile_size"), (tmp_path / "missing.json", "missing.json")):
        code, err = _cli("train", [f"--architecture={path}", *TINY,
                                   f"--outDir={tmp_path / 'out'}"], capsys)
        lines = err.strip().splitlines()
        assert code == wa_flags.EXIT_BAD_INPUT and len(lines) == 1, err
        assert lines[0].startswith("error: --architecture") and message in lines[0], err
    # A file valid on its own but naming too few layers fails before anything is written.
    partial = tmp_path / "partial.json"
    partial.write_text('{"layer1.0.conv1": {"conv": "flex", "tile_size": 4, "bits": 8}}')
    code, err = _cli("train", [f"--architecture={partial}", *TINY,
                               f"--outDir={tmp_path / 'out'}"], capsys)
    assert code == wa_flags.EXIT_BAD_INPUT and "layer1.0.conv2" in err, err
    assert not (tmp_path / "out").exists()
