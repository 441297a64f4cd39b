"""Tests of wa_tf.sweep and bin/sweep.py: running rows, skipping finished ones, the results."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from wa_tf import sweep
from wa_tf.training import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny runs, as in test_cli.py: digits (offline), width 0.125, 2 steps of one epoch.
TINY = ["--dataset=digits", "--mult=0.125", "--steps_per_epoch=2", "--epochs=1",
        "--batch_size=32"]


def _sweep_cli(*args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "sweep.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _write(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def _runs(results, row):
    """Experiment folders of a row, found by their metrics.json."""
    return sorted(os.path.dirname(p) for p in glob.glob(
        os.path.join(results, "runs", row, "**", "metrics.json"), recursive=True))


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.mark.slow  # end to end, over a minute on 2 cores
def test_sweep_runs_rows_then_skips_finished_rows(tmp_path):
    (tmp_path / "static_f2.flags").write_text("# a row's flagfile\n--static\n\n--F=2\n")
    config = _write(tmp_path / "tiny.json", {
        "description": "three tiny rows and a failing one",
        "flags": TINY,
        "rows": [
            {"name": "normal", "flags": ["--use_normal_conv"]},
            {"name": "flex_f2", "adapt_from": "normal", "flags": ["--flex", "--F=2"]},
            {"name": "static_f2", "flagfile": "static_f2.flags"},
            {"name": "bad", "flags": ["--static", "--bits=1"]},
            {"name": "after_bad", "adapt_from": "bad", "flags": ["--flex"]},
        ]})
    results = str(tmp_path / "results")
    first = _sweep_cli(f"--config={config}", f"--results_dir={results}")
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "bad: failed (exit status 2): error: --bits must be" in first.stdout
    assert "after_bad: blocked: row bad has no finished run" in first.stdout

    rows = {r["row"]: r for r in map(json.loads, _lines(os.path.join(results, "results.jsonl")))}
    assert list(rows) == ["normal", "flex_f2", "static_f2", "bad", "after_bad"]
    run_dirs = {}
    for name, conv, tile in (("normal", "normal", 4), ("flex_f2", "flex", 2),
                             ("static_f2", "static", 2)):
        (run_dir,) = _runs(results, name)  # each row in its own --outDir, exactly one run
        run_dirs[name] = run_dir
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
        r = rows[name]
        assert r["status"] == metrics["status"] == "finished"
        assert os.path.join(results, r["run_dir"]) == run_dir
        assert (r["conv"], r["F"], r["mult"], r["bits"]) == (conv, tile, 0.125, None)
        assert r["epochs"] == r["epochs_done"] == 1 and r["steps_per_epoch"] == 2
        assert r["val_accuracy"] == {"final": metrics["history"][-1]["val_accuracy"],
                                     "best": metrics["best"]["val_accuracy"], "best_epoch": 1}
        assert r["test_accuracy"] == {"final": metrics["test"]["final"]["accuracy"],
                                      "best": metrics["test"]["best"]["accuracy"]}
        assert r["seconds_per_epoch"] == pytest.approx(metrics["history"][0]["seconds"],
                                                       abs=0.01)
        assert r["flags"][:len(TINY)] == TINY
        assert r["flags"][-1 if name != "flex_f2" else -2] == \
            f"--outDir={os.path.join(results, 'runs', name)}"
        assert r["machines"][0]["cpu"] and r["reference_accuracy"] is None  # digits
    # The adapted row started from the normal row's run.
    with open(os.path.join(run_dirs["flex_f2"], "metrics.json"), encoding="utf-8") as f:
        assert json.load(f)["adapted_from"]["model_dir"] == run_dirs["normal"]
    assert rows["flex_f2"]["flags"][-1] == f"--modelDir={run_dirs['normal']}"
    assert "--static" in rows["static_f2"]["flags"] and "--F=2" in rows["static_f2"]["flags"]
    assert rows["bad"]["status"] == "failed" and rows["bad"]["error"].startswith(
        "error: --bits must be an integer from 2 to 16")
    assert rows["after_bad"]["status"] == "blocked"
    assert not _runs(results, "bad") and not _runs(results, "after_bad")

    table = _lines(os.path.join(results, "results.md"))
    for name in rows:
        assert sum(line.startswith(f"| {name} |") for line in table) == 1, name
    with open(os.path.join(results, "logs", "normal.log"), encoding="utf-8") as f:
        assert "Output dir: " + run_dirs["normal"] in f.read()
    try:
        import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        with open(os.path.join(results, "results.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib is not installed" in first.stdout

    # Again: the finished rows are skipped (no new run), the failed row is tried again.
    before = {p: os.path.getmtime(os.path.join(p, "metrics.json"))
              for name in run_dirs for p in _runs(results, name)}
    jsonl, md = _lines(os.path.join(results, "results.jsonl")), table
    second = _sweep_cli(f"--config={config}", f"--results_dir={results}")
    assert second.returncode == 1
    for name in run_dirs:
        assert f"{name}: finished in {run_dirs[name]}, skipped" in second.stdout
    assert {p: os.path.getmtime(os.path.join(p, "metrics.json"))
            for name in run_dirs for p in _runs(results, name)} == before
    assert "bad: failed (exit status 2)" in second.stdout
    assert _lines(os.path.join(results, "results.jsonl")) == jsonl
    assert _lines(os.path.join(results, "results.md")) == md


@pytest.mark.parametrize("rows, message", [
    ([{"name": "a", "flags": ["--use_normal_conv"]},
      {"name": "b", "adapt_from": "nope", "flags": ["--flex"]}],
     "row 'b': adapt_from 'nope' is not an earlier row of the sweep"),
    ([{"name": "a", "flagfile": "missing.flags"}],
     "row 'a': flagfile {dir}/missing.flags does not exist"),
    ([{"name": "a", "binary": "evaluate", "flags": ["--use_normal_conv"]}],
     "row 'a': unknown binary 'evaluate' (expected train or adapt)"),
])
def test_bad_sweep_file_is_one_line_and_exit_2(tmp_path, rows, message):
    config = _write(tmp_path / "bad.json", {"rows": rows})
    proc = _sweep_cli(f"--config={config}", f"--results_dir={tmp_path / 'results'}",
                      timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: sweep file {config}, {message.format(dir=tmp_path)}")
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "results")


@pytest.mark.parametrize("spec, message", [
    ({"rows": []}, "\"rows\" must be a non-empty list"),
    ({"rows": [{"name": "a"}], "flag": []}, "unknown key(s) flag"),
    ({"rows": [{"name": "a"}, {"name": "a"}]}, "row 'a': the name is used by an earlier row"),
    ({"rows": [{"name": "a/b"}]}, "\"name\" must be a string"),
    ({"rows": [{"name": "b", "adapt_from": "a"}, {"name": "a"}]},
     "row 'b': adapt_from 'a' is not an earlier row"),
    ({"rows": [{"name": "a"}, {"name": "b", "binary": "train", "adapt_from": "a"}]},
     "row 'b': adapt_from needs binary adapt, not train"),
    ({"rows": [{"name": "a", "flags": ["--outDir=x"]}]}, "--outDir=x is set by the sweep"),
    ({"rows": [{"name": "a", "flags": "--Q"}]}, "flags must be a list of strings"),
    ({"rows": [{"name": "a", "flags": ["Q"]}]}, "'Q' is not a flag"),
])
def test_load_sweep_rejects(tmp_path, spec, message):
    with pytest.raises(ValueError, match="^sweep file .*" + _escape(message)):
        sweep.load_sweep(_write(tmp_path / "s.json", spec))


def _escape(text):
    return re.escape(text)


def test_load_sweep_orders_flags_and_reads_flagfiles(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.flags").write_text("--F=6\n")
    (tmp_path / "row.flags").write_text("// comment\n  --flex\n# another\n"
                                        "--flagfile=sub/inner.flags\n--Q\n")
    path = _write(tmp_path / "s.json", {
        "flags": ["--mult=0.5"],
        "rows": [{"name": "normal", "flags": ["--use_normal_conv"]},
                 {"name": "flex", "adapt_from": "normal", "flagfile": "row.flags",
                  "flags": ["--epochs=5"]}]})
    s = sweep.load_sweep(path)
    assert s.name == "s" and [r.binary for r in s.rows] == ["train", "adapt"]
    assert s.row("flex").flags == ("--flex", "--F=6", "--Q", "--epochs=5")
    argv = sweep.row_argv(s, s.row("flex"), str(tmp_path / "res"), ["--epochs=1"], "/src/run")
    assert argv == ["--mult=0.5", "--flex", "--F=6", "--Q", "--epochs=5", "--epochs=1",
                    f"--outDir={tmp_path / 'res' / 'runs' / 'flex'}", "--modelDir=/src/run"]


def _fake_run(results, row, flags, metrics, stamp="2026_01_01_00_00_00"):
    run_dir = os.path.join(results, "runs", row, "Model", stamp)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "FLAGS.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(flags) + "\n")
    _write(os.path.join(run_dir, "metrics.json"), metrics)
    return run_dir


CIFAR_LIKE = {"name": "image_folder", "num_classes": 10, "image_shape": [32, 32, 3]}


def _finished(dataset=None, test=None):
    return {"status": "finished", "dataset": dataset or CIFAR_LIKE, "epochs": 3,
            "steps_per_epoch": 5, "best": {"epoch": 1, "val_accuracy": 0.5}, "test": test,
            "history": [{"epoch": 1, "val_accuracy": 0.5, "seconds": 10.0},
                        {"epoch": 2, "val_accuracy": 0.25, "seconds": 30.0},
                        {"epoch": 3, "val_accuracy": 0.375, "seconds": 12.0}]}


INT8 = ["--mult=0.5", "--Q", "--bits=8"]


@pytest.mark.parametrize("flags, dataset, expected", [
    (["--flex", "--F=4"] + INT8, None, 0.91),
    (["--static", "--F=4"] + INT8, None, 0.78),
    (["--use_normal_conv", "--F=2"] + INT8, None, 0.92),
    (["--use_normal_conv"] + INT8, {"name": "cifar10"}, 0.92),
    (["--flex", "--F=6"] + INT8, None, None),
    (["--flex", "--F=4", "--per_tap"] + INT8, None, None),
    (["--flex", "--F=4", "--mult=0.25", "--Q", "--bits=8"], None, None),
    (["--flex", "--F=4", "--mult=0.5", "--Q", "--bits=16"], None, None),
    (["--flex", "--F=4", "--mult=0.5"], None, None),
    (["--flex", "--F=4"] + INT8, {"name": "digits", "num_classes": 10,
                                  "image_shape": [32, 32, 3]}, None),
    (["--flex", "--F=4"] + INT8, {"name": "image_folder", "num_classes": 100,
                                  "image_shape": [32, 32, 3]}, None),
])
def test_reference_marked_only_on_its_configuration(tmp_path, flags, dataset, expected):
    results = str(tmp_path)
    _fake_run(results, "row", flags, _finished(dataset))
    s = sweep.Sweep("s", "s.json", "", (), (sweep.Row("row", "train", ()),))
    assert sweep.row_result(s, s.rows[0], results)["reference_accuracy"] == expected


def test_summarize_reads_the_run_files(tmp_path):
    results = str(tmp_path)
    _fake_run(results, "flex", ["--flex", "--F=4"] + INT8, _finished(), "2026_01_01_00_00_00")
    # A later, unfinished run of the same row is the one reported.
    unfinished = _finished()
    unfinished.update(status="running", history=unfinished["history"][:1])
    _fake_run(results, "flex", ["--flex", "--F=4"] + INT8, unfinished, "2026_01_02_00_00_00")
    _fake_run(results, "normal", ["--use_normal_conv"] + INT8,
              _finished({"name": "cifar10", "num_classes": 10, "image_shape": [32, 32, 3]},
                        test={"final": {"accuracy": 0.625}, "best": {"accuracy": 0.75}}))
    s = sweep.Sweep("s", "s.json", "", (), (
        sweep.Row("normal", "train", ()), sweep.Row("flex", "train", ()),
        sweep.Row("adapted", "adapt", (), adapt_from="flex"), sweep.Row("later", "train", ())))
    rows = sweep.summarize(s, results, print_fn=lambda line: None)
    normal, flex, adapted, later = rows
    assert normal["status"] == "finished" and normal["seconds_per_epoch"] == 12.0  # median
    assert normal["val_accuracy"] == {"final": 0.375, "best": 0.5, "best_epoch": 1}
    assert normal["test_accuracy"] == {"final": 0.625, "best": 0.75}
    assert flex["status"] == "unfinished" and flex["epochs_done"] == 1
    assert flex["run_dir"] == os.path.join("runs", "flex", "Model", "2026_01_02_00_00_00")
    assert adapted["status"] == "blocked" and later["status"] == "pending"
    table = _lines(os.path.join(results, "results.md"))
    assert "| flex | flex | 4 | 8 | no | scratch | 1/3 | 5 | 50.00 | 50.00 (1) | — | — | 91.00 " \
        "| 10.0 | — | unfinished |" in table
    # A run folder without metrics.json yet (a run just started): nothing to report.
    os.remove(os.path.join(results, "runs", "flex", "Model", "2026_01_02_00_00_00",
                           "metrics.json"))
    (flex,) = sweep.summarize(
        sweep.Sweep("s", "s.json", "", (), (sweep.Row("flex", "train", ()),)), results,
        print_fn=lambda line: None)
    assert flex["status"] == "pending" and "val_accuracy" not in flex


def test_no_test_split_is_said(tmp_path):
    results = str(tmp_path)
    _fake_run(results, "flex", ["--flex", "--F=4"] + INT8, _finished())
    s = sweep.Sweep("s", "s.json", "", (), (sweep.Row("flex", "train", ()),))
    (flex,) = sweep.summarize(s, results, print_fn=lambda line: None)
    assert flex["test_accuracy"] is None
    assert flex["test_note"] == "dataset image_folder has no test split"
    table = _lines(os.path.join(results, "results.md"))
    assert "| flex | flex | 4 | 8 | no | scratch | 3 | 5 | 37.50 | 50.00 (1) | — | — | 91.00 " \
        "| 12.0 | — | finished |" in table
    assert "No test accuracy: dataset image_folder has no test split." in table


def test_architecture_row_says_per_layer(tmp_path):
    # FLAGS.txt of an --architecture run: --flex and --F keep their defaults there.
    results = str(tmp_path)
    _fake_run(results, "arch", ["--flex", "--F=4", "--mult=0.5", "--per_tap",
                                "--architecture=configs/architectures/example_mixed.json"],
              _finished())
    s = sweep.Sweep("s", "s.json", "", (), (sweep.Row("arch", "train", ()),))
    (arch,) = sweep.summarize(s, results, print_fn=lambda line: None)
    assert arch["conv"] == "architecture" and arch["bits"] is None and arch["F"] is None
    table = _lines(os.path.join(results, "results.md"))
    assert any(line.startswith("| arch | architecture | — | per layer | yes | scratch |")
               for line in table)


def test_shipped_sweeps_load():
    proxy = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", "cifar10_proxy.json"))
    assert [r.name for r in proxy.rows] == [
        "normal_int8", "normal_int8_adapted", "static_f4_int8", "flex_f4_int8", "flex_f6_int8",
        "flex_f6_int8_pertap", "flex_f4_int8_pertap", "static_f2_int8", "static_f6_int8",
        "flex_f2_int8", "flex_f6_int8_15ep", "static_f6_int8_15ep"]
    assert all(r.adapt_from == "normal_int8" for r in proxy.rows[1:])
    assert "PROXY" in proxy.description
    paper = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", "paper_120ep.json"))
    assert len(paper.rows) == 13 and all(r.binary == "train" for r in paper.rows)
    for r in paper.rows:
        assert "--epochs=120" in r.flags and "--bits=8" in r.flags and "--mult=0.5" in r.flags


@pytest.mark.slow
def test_killed_sweep_resumes_inside_its_row(tmp_path):
    """SIGKILL the sweep during epoch 2: the binary dies with it, and the re-run
    finishes the row in the same folder."""
    config = _write(tmp_path / "s.json", {"flags": TINY[:-2] + ["--epochs=3"],
                                          "rows": [{"name": "normal",
                                                    "flags": ["--use_normal_conv"]}]})
    results = str(tmp_path / "results")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "sweep.py"),
                             f"--config={config}", f"--results_dir={results}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        runs = _runs(results, "normal")
        if runs:
            with open(os.path.join(runs[0], "metrics.json"), encoding="utf-8") as f:
                if len(json.load(f)["history"]) >= 1:
                    break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = _runs(results, "normal")
    for _ in range(100):  # the binary ends with the sweep and releases the run's lock
        lock = experiment.Lock(run_dir)
        if lock.acquire():
            lock.release()
            break
        time.sleep(0.2)
    else:
        pytest.fail("the row's binary outlived the sweep")
    again = _sweep_cli(f"--config={config}", f"--results_dir={results}")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert _runs(results, "normal") == [run_dir]
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["status"] == "finished" and len(metrics["history"]) == 3
