"""Tests of wa_tf.training.flag_errors, the one-line flag errors of every binary, and the
common flags."""
import os
import re
import subprocess
import sys

import pytest
from absl import flags as absl_flags

from wa_tf.training import cli, flag_errors
from wa_tf.training import flags as wa_flags
from wa_tf.training.errors import ArgumentError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ("train", "adapt", "evaluate", "export", "search", "sweep", "latency_table")


# -- flag_message: the library's error as one line naming the flag ------------------------

def test_argument_error_spells_every_argument_as_its_flag():
    error = ArgumentError("tile_size", lambda n: f"{n('tile_size')} is bad, see {n('model_dir')}")
    names = {"tile_size": "F", "model_dir": "modelDir"}
    assert flag_errors.flag_message(error, names) == "--F is bad, see --modelDir"
    # An argument the binary has no flag for keeps its name, spelled as a flag.
    assert flag_errors.flag_message(error, {"tile_size": "F"}) == "--F is bad, see --model_dir"
    assert str(error) == "tile_size is bad, see model_dir"  # the library's own spelling


def test_value_error_leading_argument_is_spelled_as_its_flag():
    names = {"bits": "bits", "bits_candidates": "bits_candidates", "model_dir": "modelDir"}
    message = flag_errors.flag_message
    assert message(ValueError("bits_candidates has duplicates"), names) \
        == "--bits_candidates has duplicates"
    assert message(ValueError("model_dir: '/x' is not a directory"), names) \
        == "--modelDir: '/x' is not a directory"
    # Only a whole leading word that is one of the binary's arguments.
    assert message(ValueError("bitsy is not a flag"), names) == "bitsy is not a flag"
    assert message(ValueError("the bits are wrong"), names) == "the bits are wrong"
    assert message(ValueError("bits must be 2..16"), {}) == "bits must be 2..16"
    # A binary's own message already names its flag.
    assert message(ValueError("--split must be one of test, validation"), names) \
        == "--split must be one of test, validation"


def test_flag_message_is_one_line_with_a_subject():
    message = flag_errors.flag_message
    assert message(ValueError("first line\nsecond line")) == "first line"
    assert message(ValueError("")) == "ValueError"
    assert message(ValueError("no folder /a: b"), subject="--modelDir") \
        == "--modelDir: no folder /a: b"
    # A message that names a flag keeps it: the subject is not added.
    assert message(ArgumentError("model_dir", lambda n: f"{n('model_dir')}: gone"),
                   {"model_dir": "modelDir"}, subject="--checkpoint") == "--modelDir: gone"


def test_the_binaries_spell_through_flag_errors():
    """train/adapt (FLAG_NAMES) and evaluate/export (cli.FLAG_NAMES) use the one mechanism."""
    error = ArgumentError("checkpoint", lambda n: f"{n('checkpoint')}: no checkpoint x")
    assert wa_flags.flag_message(error) == "--modelToLoad: no checkpoint x"
    assert str(cli.flag_error("--checkpoint", error)) == "--checkpoint: no checkpoint x"
    assert wa_flags.fail is flag_errors.fail and wa_flags.parse_argv is flag_errors.parse_argv
    assert wa_flags.EXIT_BAD_INPUT == flag_errors.EXIT_BAD_INPUT == 2


# -- run: the binary's main, bad input as one line ------------------------------------------

def _run(fn, capsys, **options):
    values = absl_flags.FlagValues()
    with pytest.raises(SystemExit) as exit_info:
        flag_errors.run(fn, {"model_dir": "modelDir"}, flag_values=values, **options)
    return exit_info.value.code, capsys.readouterr().err


def test_run_ends_bad_input_with_one_line(capsys):
    def bad():
        raise ArgumentError("model_dir", lambda n: f"{n('model_dir')}: '/x' is not a directory\n"
                            "more detail")
    code, err = _run(bad, capsys)
    assert code == flag_errors.EXIT_BAD_INPUT
    assert err == "error: --modelDir: '/x' is not a directory\n"


def test_run_failed_work_and_other_errors(capsys):
    def stopped():
        raise RuntimeError("stopped: NaN loss")
    code, err = _run(stopped, capsys, failed=(RuntimeError,))
    assert (code, err) == (flag_errors.EXIT_FAILED, "error: stopped: NaN loss\n")
    # Errors that are not bad input keep their traceback (here: propagate).
    with pytest.raises(ValueError, match="a bug"):
        flag_errors.run(lambda: (_ for _ in ()).throw(ValueError("a bug")),
                        bad_input=(ArgumentError,), flag_values=absl_flags.FlagValues())
    assert flag_errors.run(lambda: 7, flag_values=absl_flags.FlagValues()) == 7


def test_parse_argv_errors_are_one_line(capsys):
    values = absl_flags.FlagValues()
    absl_flags.DEFINE_integer("n", 1, "n", flag_values=values)
    with pytest.raises(SystemExit) as exit_info:
        flag_errors.parse_argv(["x", "--n=abc"], values)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


# -- the common flags -----------------------------------------------------------------------

def _defined(define):
    values = absl_flags.FlagValues()
    define(values)
    return values


def test_common_flags_are_defined_once_for_every_binary():
    train = _defined(wa_flags.define_flags)
    run = _defined(cli.define_run_flags)
    search = _defined(lambda v: wa_flags.define_common_flags(
        "batch_size", "data_dir", "seed", "use_cpu", flag_values=v,
        notes={"seed": "weights, data order, sampling, splits"}))
    for name, (_, default, help_text) in wa_flags.COMMON_FLAGS.items():
        for values in (train, run, search):
            if name not in values:
                continue
            flag = values[name]
            assert type(flag) is type(search[name]), name  # the same parser everywhere
            assert flag.help.startswith(help_text[:-1]), (name, flag.help)
        assert search[name].default == default
    # A binary may give its own default and say what the flag means there.
    assert run["batch_size"].default is None and "overrides the run's" in run["batch_size"].help
    assert train["batch_size"].default == 64 and "split across replicas" in train["batch_size"].help
    assert "sampling" in search["seed"].help
    # FLAGS.txt keeps its order: the common flags where they always were.
    names = wa_flags.flag_names(train)
    start = names.index("epochs")
    assert names[start:start + 5] == ["epochs", "batch_size", "lr", "use_cpu", "seed"]
    assert names[names.index("dataset") + 1] == "data_dir"


def test_apply_use_cpu_hides_the_gpus_as_train_lib_does(monkeypatch):
    calls = []
    monkeypatch.setattr(wa_flags.distribute, "hide_gpus", lambda: calls.append(1))
    values = _defined(lambda v: wa_flags.define_common_flags("use_cpu", flag_values=v))
    values(["x"])
    wa_flags.apply_use_cpu(values)
    assert calls == []
    values(["x", "--use_cpu"])
    wa_flags.apply_use_cpu(values)
    assert calls == [1]


# -- every binary: bad input is one line, exit status 2, no traceback -------------------------

# TensorFlow's C++ runtime logs a few lines to stderr when it loads (as in test_cli.py).
_TF_NATIVE_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl|"
                            r"To enable the following instructions)")


def _bin(program, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", f"{program}.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


BAD_INPUT = [
    ("train", ["--flex", "--dataset=digits", "--batch_size=0", "--outDir={out}"],
     "error: --batch_size must be a positive integer; got 0"),
    ("adapt", ["--flex", "--modelDir={missing}", "--outDir={out}"],
     "error: --modelDir: '{missing}' is not a directory"),
    # --use_cpu is evaluate's flag too.
    ("evaluate", ["--modelDir={missing}", "--use_cpu"],
     "error: --modelDir: '{missing}' is not a directory"),
    ("export", ["--modelDir={missing}", "--export_dir={out}"],
     "error: --modelDir: '{missing}' is not a directory"),
    # --use_cpu is search's flag too: parsed, then the bad --batch_size reported.
    ("search", ["--use_cpu", "--batch_size=0", "--dataset=digits", "--outDir={out}"],
     "error: --batch_size must be a positive integer; got 0"),
    ("search", ["--no_such_flag", "--outDir={out}"],
     "error: Unknown command line flag 'no_such_flag'"),
    ("sweep", ["--results_dir={out}"], "error: --config is required"),
    ("latency_table", ["--batch_size=0", "--output={out}/table.json"],
     "error: --batch_size must be a positive integer; got 0"),
    ("evaluate", ["--modelDir={missing}", "extra"], "error: unexpected arguments: extra"),
]


@pytest.mark.parametrize("program,argv,start", BAD_INPUT,
                         ids=[f"{p}:{' '.join(a)}" for p, a, _ in BAD_INPUT])
def test_every_binary_reports_bad_input_in_one_line(program, argv, start, tmp_path):
    fill = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out")}
    proc = _bin(program, *[a.format(**fill) for a in argv])
    assert proc.returncode == flag_errors.EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if not _TF_NATIVE_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith(start.format(**fill)), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_search_runs_with_use_cpu(tmp_path):
    proc = _bin("search", "--use_cpu", "--dataset=digits", "--mult=0.125", "--batch_size=16",
                "--steps_per_epoch=1", "--epochs=1", "--candidates=normal,F2",
                "--bits_candidates=FP", f"--outDir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = os.listdir(tmp_path / "Search")
    assert os.path.isfile(tmp_path / "Search" / run / "architecture.json")
