"""Checks of the benchmarks' shared helpers and of layer_bench's --interleave without
allocator statistics (issues #22 and #23)."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from wa_tf.machine import ISA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def _load(name):
    # bench/ is no package: load bench/<name>.py under a name of its own.
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_common():
    return _load("common")


def test_machine_lines_without_isa_flags(monkeypatch):
    common = _load_common()
    monkeypatch.setattr(common, "cpu_info", lambda: ("Test CPU 9000", []))
    lines = common.machine_lines()
    assert lines[0].startswith("cpu: Test CPU 9000, ")
    assert lines[0].endswith("ISA: none of " + ",".join(ISA_FLAGS[:5]))


def test_machine_lines_lists_the_isa_flags(monkeypatch):
    common = _load_common()
    monkeypatch.setattr(common, "cpu_info", lambda: ("Test CPU 9000", ["avx", "avx2"]))
    assert common.machine_lines()[0].endswith("ISA: avx avx2")


def test_layer_bench_interleave_measures_rss_growth():
    # --memory=rss forces the RSS measure even where allocator statistics exist.
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "layer_bench.py"), "--interleave", "--memory=rss",
         "--repeats=1", "--shapes=4x4x8", "--batch_size=1", "--tiles=2", "--noforward"],
        capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("device "))
    assert "round-robin" in header
    assert "memory: RSS growth (first steps, in run order)" in header
    rows = [line.split() for line in lines if line.strip().startswith("4x4x8")]
    assert [" ".join(row[1:-4]) for row in rows] == ["tf.nn.conv2d", "F2 static", "F2 flex"]
    for row in rows:
        assert float(row[-4]) > 0  # ms
        assert float(row[-2]) >= 0  # RSS growth, MiB
    assert float(rows[0][-3]) == 1.0  # conv2d's time ratio to itself


def test_ncnn_peer_computes_the_int8_convolution():
    """The ncnn peer's int8 layer matches numpy's (check() asserts, and asserts that
    transposed weights would not match); its saturated probe shows F(4,3) ran."""
    pytest.importorskip("ncnn")
    peer = _load("ncnn_peer")
    err, wraps = peer.check(8, 32, winograd=True)
    assert err >= 0 and wraps
    _, wraps = peer.check(8, 32, winograd=False)
    assert not wraps  # the im2col GEMM sums exactly
    assert peer.conv_int8(8, 32, batch=2)() is not None


def test_winograd_int8_bench_plots_a_saved_run(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"shape": shape, "F": m, "batch": 1, "threads": 1, "wa_int8_ms": 0.1 * m,
             "litert_int8_ms": 0.3, "ncnn_int8_ms": 0.2}
            for shape in ("16x16x64", "8x8x128") for m in (2, 4)]
    saved = tmp_path / "layers.json"
    saved.write_text(json.dumps({"cpu": "cpu: Test CPU", "layers": rows}))
    out = tmp_path / "layers.png"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "winograd_int8_bench.py"),
                           f"--from_json={saved}", f"--plot={out}"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_winograd_int8_bench_refuses_a_file_it_did_not_write(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"rows": []}))
    for path in (bad, tmp_path / "missing.json"):
        proc = subprocess.run([sys.executable, os.path.join(BENCH, "winograd_int8_bench.py"),
                               f"--from_json={path}", f"--plot={tmp_path / 'x.png'}"],
                              capture_output=True, text=True, check=False, timeout=300)
        assert proc.returncode == 2
        assert f"error: --from_json: {path} is not a --json file" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_interleaved_turns_time_all_but_the_first_call_of_each():
    interleaved_ms = _load_common().interleaved_ms
    calls = {"a": [], "b": []}
    clock = {"n": 0}

    def call(name):
        def run():
            calls[name].append(clock["n"])
            clock["n"] += 1
            if len(calls[name]) % 4 == 1:  # a turn's first call: slow (cold caches)
                time.sleep(0.02)
        return run

    ms = interleaved_ms({"a": call("a"), "b": call("b")}, reps=6, warmup=1, block=4)
    assert len(calls["a"]) == len(calls["b"]) == 4 * (1 + 2)  # warmup turn + ceil(6 / 3)
    assert calls["a"][:4] == [0, 1, 2, 3] and calls["b"][:4] == [4, 5, 6, 7]  # turns of 4
    assert max(ms.values()) < 10  # the slow first calls are not timed
    assert interleaved_ms({"a": call("a")}, reps=3, warmup=0)["a"] >= 0
    with pytest.raises(ValueError, match="block must be >= 1"):
        interleaved_ms({"a": call("a")}, reps=1, warmup=0, block=0)
