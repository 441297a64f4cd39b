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

from cli_helpers import TINY, make_source_run, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    code, err = run_cli(program, argv, capsys)
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
    """A finished INT8 normal-convolution run to adapt from (cli_helpers.make_source_run)."""
    return make_source_run(tmp_path_factory)


def _adapt_runner(model_dir, *argv):
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    wa_flags.parse_argv(["adapt", f"--modelDir={model_dir}", "--static", "--F=2", "--Q",
                         "--epochs=1", "--steps_per_epoch=1", "--noresume", *argv], values)
    return train_lib.Runner(wa_flags.from_flags(values, "adapt"), "adapt")


def _image_set(split):
    return {np.asarray(image).tobytes() for image, _ in split}


@pytest.mark.slow  # long end-to-end: keeps the default run within ~15 minutes
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
