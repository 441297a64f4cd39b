"""Fault tolerance: SIGKILL and re-run resumes exactly; a NaN loss stops cleanly."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags

from wa_tf import data, quantization
from wa_tf.training import experiment, schedule, train_lib
from wa_tf.training import flags as wa_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["--use_normal_conv", "--Q", "--dataset=digits", "--mult=0.125", "--epochs=3",
           "--steps_per_epoch=3"]


def _train_cmd(out_dir):
    return [sys.executable, os.path.join(ROOT, "bin", "train.py"), *COMMAND,
            f"--outDir={out_dir}"]


def _runs(out_dir):
    return [dp for dp, _, files in os.walk(out_dir) if "FLAGS.txt" in files]


def _comparable(metrics):
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]
    return history, metrics["best"], metrics["test"]


@pytest.mark.slow  # end to end, over a minute on 2 cores
def test_sigkill_then_same_command_resumes_to_identical_metrics(tmp_path):
    uninterrupted = subprocess.run(_train_cmd(tmp_path / "a"), cwd=ROOT, capture_output=True,
                                   text=True, timeout=900)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    out = tmp_path / "b"
    proc = subprocess.Popen(_train_cmd(out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Kill as soon as the first epoch's backup exists (mid-run, with the lock held).
    while not [r for r in _runs(out) if os.path.isfile(os.path.join(r, "backup", "checkpoint"))]:
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed_dir,) = _runs(out)
    assert experiment.read_metrics(killed_dir)["status"] == experiment.RUNNING

    resumed = subprocess.run(_train_cmd(out), cwd=ROOT, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"Resuming the unfinished run in {re.escape(killed_dir)} after epoch [12]/3",
                     resumed.stdout)
    assert _runs(out) == [killed_dir]  # the same folder, no new one
    expected = experiment.read_metrics(_runs(tmp_path / "a")[0])
    got = experiment.read_metrics(killed_dir)
    assert got["status"] == experiment.FINISHED
    assert _comparable(got) == _comparable(expected)
    assert not os.path.exists(os.path.join(killed_dir, "backup"))


def _config(out_dir):
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    values(["test", "--use_normal_conv", "--dataset=digits", "--mult=0.125", "--epochs=3",
            "--steps_per_epoch=2", f"--outDir={out_dir}"])
    return values


def _assert_stopped_by_nan_at_epoch_2(out_dir, capsys):
    """A run stopped by a NaN loss at epoch 2's first step: one error line, status nan_loss
    with epoch 1 recorded, a backup of the end of epoch 1; neither the backup nor the best
    checkpoint holds NaN weights.  Returns the run folder."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the loss is NaN at epoch 2, step 1" in err[0], err
    assert "the last good state (the end of epoch 1)" in err[0]
    (run,) = _runs(out_dir)
    metrics = experiment.read_metrics(run)
    assert metrics["status"] == experiment.NAN_LOSS and len(metrics["history"]) == 1
    backup = tf.train.latest_checkpoint(os.path.join(run, "backup"))
    assert tf.train.load_checkpoint(backup).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 1
    for path in (backup, os.path.join(run, "checkpoints", "best")):
        reader = tf.train.load_checkpoint(path)
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype.is_floating:
                assert np.isfinite(reader.get_tensor(name)).all(), (path, name)
    return run


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    pipeline = data.pipeline
    nan_epoch = 1  # 0-based: the second epoch's data is poisoned

    def poisoned(ds, batch_size, info, training, seed=1, input_context=None):
        batches = pipeline(ds, batch_size, info, training, seed, input_context)
        if training and seed == 1 + schedule.EPOCH_SEED_STRIDE * nan_epoch:
            batches = batches.map(lambda x, y: (x * np.nan, y))
        return batches

    monkeypatch.setattr(data, "pipeline", poisoned)
    values = _config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        wa_flags.run_main(train_lib.run, "train", values)
    assert exit_info.value.code == 1
    run = _assert_stopped_by_nan_at_epoch_2(tmp_path, capsys)
    assert not os.path.exists(os.path.join(run, "checkpoints", "final.index"))


def test_non_finite_quantizer_range_stops_with_nan_loss(tmp_path, monkeypatch, capsys):
    """A quantizer range corrupted to NaN after epoch 1 stops training at epoch 2's first
    step as a NaN loss does; the end of epoch 1 stays the last good state."""
    end_epoch = train_lib.Runner._end_epoch  # pylint: disable=protected-access
    corrupted = []

    def end_then_corrupt(runner, epoch, record, started):
        end_epoch(runner, epoch, record, started)
        if epoch == 0:
            key = "layer2.0.conv1/kernel_max"
            quantization.named_weights(runner.model)[key].assign(np.float32(np.nan))
            corrupted.append(key)

    monkeypatch.setattr(train_lib.Runner, "_end_epoch", end_then_corrupt)
    values = _config(tmp_path)
    values["Q"].value = True
    with pytest.raises(SystemExit) as exit_info:
        wa_flags.run_main(train_lib.run, "train", values)
    assert corrupted and exit_info.value.code == 1
    _assert_stopped_by_nan_at_epoch_2(tmp_path, capsys)


_DETERMINISM_SCRIPT = (
    "import hashlib, sys\n"
    "import wa_tf\n"
    "from absl import flags\n"
    "from tensorflow.python.framework import config\n"
    "from wa_tf.training import flags as wa_flags, train_lib\n"
    "values = flags.FlagValues()\n"
    "wa_flags.define_flags(values)\n"
    "values(sys.argv)\n"
    "runner = train_lib.Runner(wa_flags.from_flags(values))\n"
    "print('op determinism:', config.is_op_determinism_enabled())\n"
    "runner.run()\n"
    "digest = hashlib.sha256(b''.join(w.tobytes() for w in runner.model.get_weights()))\n"
    "print('weights:', digest.hexdigest())\n")


def _train_in_process_of_its_own(out, *flags):
    """Trains in a fresh process (op determinism cannot be turned off again); its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", _DETERMINISM_SCRIPT, "--dataset=digits", "--mult=0.125",
         "--epochs=1", "--steps_per_epoch=2", "--seed=5", f"--outDir={out}", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # long end-to-end: keeps the default run within ~15 minutes
def test_deterministic_flag_enables_op_determinism(tmp_path):
    """--deterministic turns on TensorFlow's op determinism for the run and is kept in
    FLAGS.txt."""
    for flag, expected in (("--deterministic", True), ("--nodeterministic", False)):
        out = tmp_path / flag
        stdout = _train_in_process_of_its_own(out, "--use_normal_conv", flag)
        assert f"op determinism: {expected}" in stdout
        (run,) = _runs(out)
        lines = open(os.path.join(run, "FLAGS.txt"), encoding="utf-8").read().splitlines()
        assert flag in lines


@pytest.mark.slow  # two flex trainings, about two minutes on 2 cores
def test_two_deterministic_flex_runs_end_with_the_same_weights(tmp_path):
    """Two flex F4 INT8 runs with one seed and --deterministic end with the same weights,
    bit for bit: the fused kernels sum their threads' parts in a fixed order."""
    digests = [re.search(r"weights: (\w+)", _train_in_process_of_its_own(
        tmp_path / name, "--flex", "--F=4", "--Q", "--deterministic")).group(1)
        for name in ("a", "b")]
    assert digests[0] == digests[1]
