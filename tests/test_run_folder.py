"""Tests of wa_tf.training.run_folder: atomic writes, FLAGS.txt, report, lock, run search."""
import datetime
import json
import os
import subprocess
import sys

import pytest

from wa_tf.training import run_folder


def test_write_text_replaces_whole_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "state.txt")
    run_folder.write_text(path, "old\n")
    run_folder.write_text(path, "new\n")
    assert open(path, encoding="utf-8").read() == "new\n"
    assert os.listdir(tmp_path) == ["state.txt"]


def test_write_text_fsyncs_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    run_folder.write_text(str(tmp_path / "f"), "x")
    assert calls == ["fsync", "replace"]


def test_a_failing_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.json")
    run_folder.write_json(path, {"epoch": 1})

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)  # the new text is half on disk when this fails
    with pytest.raises(OSError, match="No space"):
        run_folder.write_json(path, {"epoch": 2})
    monkeypatch.undo()
    assert run_folder.read_json(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_an_unserialisable_value_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "search.json")
    run_folder.write_json(path, {"status": "running"})
    with pytest.raises(TypeError):
        run_folder.write_json(path, {"status": object()})
    assert run_folder.read_json(path) == {"status": "running"}
    assert os.listdir(tmp_path) == ["search.json"]


def test_json_round_trip_and_format(tmp_path):
    value = {"status": "running", "history": [{"epoch": 1, "val_accuracy": 0.5}], "best": None,
             "costs": {"layer1.0.conv1": {"F4/8": 1.5}}, "name": "ü"}
    path = str(tmp_path / "state.json")
    run_folder.write_json(path, value)
    assert run_folder.read_json(path) == value
    # The format the three writers always used: indent 2 and a final newline.
    assert open(path, encoding="utf-8").read() == json.dumps(value, indent=2) + "\n"


@pytest.mark.parametrize("content", [None, "", "{\"status\": ", "not json"])
def test_read_json_of_a_missing_or_broken_file_is_none(tmp_path, content):
    path = tmp_path / "state.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert run_folder.read_json(str(path)) is None


def test_flags_to_lines_and_flags_file(tmp_path):
    flags = {"lr": 0.001, "Q": True, "per_tap": False, "architecture": None,
             "bits_candidates": "8,FP", "mult": 0.5}
    lines = ["--lr=0.001", "--Q", "--noper_tap", "--bits_candidates=8,FP", "--mult=0.5"]
    assert run_folder.flags_to_lines(flags) == lines
    run_folder.write_flags(str(tmp_path), flags)
    assert (tmp_path / run_folder.FLAGS_FILE).read_text(encoding="utf-8") == \
        "\n".join(lines) + "\n"
    assert run_folder.FLAGS_FILE == "FLAGS.txt"


def test_append_report_ends_every_part_with_one_newline(tmp_path):
    run_folder.append_report(str(tmp_path), "Command: x\n\n")
    run_folder.append_report(str(tmp_path), "Results:")
    assert (tmp_path / "report.txt").read_text(encoding="utf-8") == "Command: x\nResults:\n"


def test_create_names_folders_after_utc_time_and_never_reuses_one(tmp_path):
    now = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    parent = str(tmp_path / "Search")
    first = run_folder.create(parent, now)
    second = run_folder.create(parent, now)
    third = run_folder.create(parent, now)
    assert first == os.path.join(parent, "2024_01_02_03_04_05")
    assert second == first + "_2" and third == first + "_3"
    assert all(os.path.isdir(p) and not os.listdir(p) for p in (first, second, third))


def test_lock_excludes_a_second_holder_and_is_freed_by_release(tmp_path):
    first, second = run_folder.Lock(str(tmp_path)), run_folder.Lock(str(tmp_path))
    assert first.acquire()
    assert not second.acquire()
    assert run_folder.lock_held(str(tmp_path))
    first.release()
    assert not run_folder.lock_held(str(tmp_path))
    assert second.acquire()
    second.release(remove=True)
    assert not os.path.exists(tmp_path / run_folder.LOCK_FILE)
    second.release()  # releasing twice is harmless


def test_lock_of_a_killed_process_is_free(tmp_path):
    holder = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\ntime.sleep(600)", str(tmp_path / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_folder.lock_held(str(tmp_path))
        assert not run_folder.Lock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not run_folder.lock_held(str(tmp_path))


def _runs(parent, *names):
    for name in names:
        os.makedirs(os.path.join(parent, name))
    return [os.path.join(parent, name) for name in names]


def test_find_unfinished_takes_the_newest_matching_folder_with_a_free_lock(tmp_path):
    parent = str(tmp_path)
    old, mid, new, other = _runs(parent, "2024_01_01_00_00_00", "2024_01_02_00_00_00",
                                 "2024_01_03_00_00_00", "2024_01_04_00_00_00")
    seen = []

    def matches(path):
        seen.append(path)
        return path != other

    path, lock = run_folder.find_unfinished(parent, matches)
    assert (path, seen) == (new, [other, new])  # newest first, stops at the first free one
    path2, lock2 = run_folder.find_unfinished(parent, matches)  # `new` is locked now
    assert path2 == mid
    lock.release()
    lock2.release()
    assert run_folder.find_unfinished(parent, lambda p: p == old)[0] == old


def test_find_unfinished_without_a_match_or_parent(tmp_path):
    _runs(str(tmp_path), "2024_01_01_00_00_00")
    assert run_folder.find_unfinished(str(tmp_path), lambda p: False) == (None, None)
    assert run_folder.find_unfinished(str(tmp_path / "absent"), lambda p: True) == (None, None)


def test_find_runs_and_newest_run(tmp_path):
    root = str(tmp_path)
    assert run_folder.find_runs(root) == [] and run_folder.newest_run(root) is None
    older = os.path.join(root, "Model", "lr_0.01", "2024_01_01_00_00_00")
    newer = os.path.join(root, "Other", "2024_02_01_00_00_00")
    for run in (older, newer):
        os.makedirs(os.path.join(run, "checkpoints", "nested"))
        run_folder.write_flags(run, {"lr": 0.01})
        # A FLAGS.txt inside a run (a copy) is not another run: run folders are not searched.
        run_folder.write_flags(os.path.join(run, "checkpoints", "nested"), {})
    os.makedirs(os.path.join(root, "Model", "lr_0.01", "2024_03_01_00_00_00"))  # no FLAGS.txt
    assert sorted(run_folder.find_runs(root)) == [older, newer]
    assert run_folder.newest_run(root) == newer
