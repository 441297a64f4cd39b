"""wa_tf.kernels' build cache and switches: failures remembered, timeouts, rebuilds, targets,
disabled() in every thread, and SavedModels that load without the library."""
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from wa_tf import kernels
from wa_tf.kernels import dispatch
from wa_tf.kernels import library as kbuild
from wa_tf.layers import WinogradConv2D


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler here: the pure-TF pipeline "
                    "runs, and the kernels' tests skip")
def test_the_kernels_build_wherever_a_compiler_exists():
    # Where a compiler exists a failed build is a failure, not a skipped kernel test.
    if kernels.dispatch.turned_off():
        pytest.skip("WA_TF_KERNELS=0")
    path = kernels.build()
    assert os.path.exists(path)
    assert kernels.build_error() is None, kernels.build_error()
    assert kernels.available() or tf.config.list_physical_devices("GPU")


def _fake_compiler(tmp_path, body):
    """A compiler that logs each call to calls.txt, then runs `body` (shell)."""
    script = tmp_path / "fake-cxx"
    script.write_text(f"#!/bin/sh\necho call >> {tmp_path}/calls.txt\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _calls(tmp_path):
    calls = tmp_path / "calls.txt"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_a_failed_build_is_remembered_until_its_file_is_deleted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WA_TF_CACHE", str(cache))
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "echo 'x.cc:1: error: no such type' "
                                                       ">&2; exit 1"))
    with pytest.raises(RuntimeError, match="x.cc:1: error: no such type"):
        kbuild.build()
    calls = _calls(tmp_path)
    assert calls >= 1
    failed = kbuild.failure_path()
    assert os.path.exists(failed) and "no such type" in open(failed, encoding="utf-8").read()
    # A later process (or call) does not compile again, and says how to retry.
    with pytest.raises(RuntimeError, match=f"failed earlier .*error: no such type.*delete "
                                           f"{failed} to try again"):
        kbuild.build()
    assert _calls(tmp_path) == calls
    os.unlink(failed)
    with pytest.raises(RuntimeError, match="no such type"):
        kbuild.build()
    assert _calls(tmp_path) > calls
    assert not list(cache.glob("*.so"))


def test_a_compiler_past_the_timeout_is_stopped_and_the_lock_released(tmp_path, monkeypatch):
    monkeypatch.setenv("WA_TF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WA_TF_KERNELS_BUILD_TIMEOUT", "1")
    # The compiler's own child (as g++'s cc1plus) must be stopped with it.
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, f"sleep 60 & echo $! > {tmp_path}/"
                                                       "child.txt; wait"))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="ran past WA_TF_KERNELS_BUILD_TIMEOUT=1 s"):
        kbuild.build()
    assert time.monotonic() - started < 30
    child = int((tmp_path / "child.txt").read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read()
    # The lock is free again: taking it does not wait.
    with kbuild.locked(kbuild.library_path(), time.monotonic()):
        pass
    assert "ran past" in open(kbuild.failure_path(), encoding="utf-8").read()


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_malformed_timeout_is_one_clear_line(value, monkeypatch):
    monkeypatch.setenv("WA_TF_KERNELS_BUILD_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"WA_TF_KERNELS_BUILD_TIMEOUT='{value}' must be a "
                                         "positive number of seconds"):
        kbuild.build()


def test_an_explicit_target_is_keyed_by_the_target_not_the_host(monkeypatch):
    # One x86-64-v3 build serves every machine sharing the cache; native builds are per CPU.
    paths = {}
    for host in (["avx2", "fma"], ["avx2", "avx512f", "fma"]):
        monkeypatch.setattr(kbuild, "cpu_flags", lambda host=host: host)
        for march in ("native", "x86-64-v3"):
            monkeypatch.setenv("WA_TF_KERNELS_MARCH", march)
            paths[(tuple(host), march)] = kbuild.library_path()
    assert paths[(("avx2", "fma"), "x86-64-v3")] == paths[(("avx2", "avx512f", "fma"),
                                                           "x86-64-v3")]
    assert paths[(("avx2", "fma"), "native")] != paths[(("avx2", "avx512f", "fma"), "native")]
    assert paths[(("avx2", "fma"), "native")] != paths[(("avx2", "fma"), "x86-64-v3")]


def test_an_unloadable_cached_library_is_rebuilt_once(tmp_path, monkeypatch):
    broken = tmp_path / "wa_tf_kernels_broken.so"
    broken.write_bytes(b"not a library")
    built = []

    def fake_build():
        built.append(1)
        return str(broken) if broken.exists() else kernels.build()
    monkeypatch.setattr(kbuild, "build", fake_build)
    library = dispatch._load()  # pylint: disable=protected-access
    assert len(built) == 2 and not broken.exists()
    assert hasattr(library, "wa_tile_transform")
    # Still unloadable after the rebuild: the error comes out (no third build).
    built.clear()

    def broken_build():
        built.append(1)
        broken.write_bytes(b"still not a library")
        return str(broken)
    monkeypatch.setattr(kbuild, "build", broken_build)
    with pytest.raises((OSError, tf.errors.OpError)):
        dispatch._load()  # pylint: disable=protected-access
    assert len(built) == 2


def test_disabled_holds_in_every_thread():
    seen = []
    with kernels.disabled():
        thread = threading.Thread(target=lambda: seen.append(kernels.available()))
        thread.start()
        thread.join()
    assert seen == [False]


@pytest.mark.skipif(not kernels.available(),
                    reason=f"fused kernels unavailable: {kernels.unavailable_reason()}")
def test_disabled_reaches_every_replica_of_a_strategy(distribute_scope):
    strategy = distribute_scope or tf.distribute.get_strategy()
    layer = WinogradConv2D(4, tile_size=4)
    x = tf.random.stateless_normal((2, 8, 8, 3), seed=(1, 1))
    layer(x)

    def op_types():
        step = tf.function(lambda: strategy.run(layer, args=(x,)))
        return {op.type for op in step.get_concrete_function().graph.get_operations()}
    assert "WaTileTransform" in op_types()
    with kernels.disabled():
        assert "WaTileTransform" not in op_types()


_SAVE = """
import sys
import numpy as np, tensorflow as tf, tf_keras
from wa_tf import kernels
from wa_tf.layers import WinogradConv2D
from wa_tf.quantization import quantize_model
assert kernels.available(), kernels.unavailable_reason()
inputs = tf_keras.Input((10, 9, 3))
y = WinogradConv2D(6, tile_size=4, flex=True, name="wa")(inputs)
y = tf_keras.layers.GlobalAveragePooling2D()(y)
model = tf_keras.Model(inputs, tf_keras.layers.Dense(3)(y))
if sys.argv[2] == "int8":
    model = quantize_model(model, bits=8, quantize_first=True)
x = tf.random.stateless_normal((5, 10, 9, 3), seed=(4, 4))
model.compile("adam", "mse")
model.fit(x, tf.zeros((5, 3)), epochs=1, verbose=0)  # traced with the kernels
step = tf.function(lambda v: model(v, training=False))
assert "WaTileTransform" in {op.type for op in step.get_concrete_function(x).graph.get_operations()}
with kernels.disabled():  # the saved graph holds these ops, so their output is the reference
    expected = model(x, training=False).numpy()
# The kernels sum in another order: at int8 a tie may round to the neighbouring code.
fused = model(x, training=False).numpy()
np.testing.assert_allclose(fused, expected, atol=(0.03 if sys.argv[2] == "int8" else 1e-5)
                           * np.abs(expected).max())
np.save(sys.argv[1] + "/expected.npy", expected)
np.save(sys.argv[1] + "/x.npy", x.numpy())
model.save(sys.argv[1] + "/keras_saved")
tf.saved_model.save(model, sys.argv[1] + "/tf_saved")
print("saved")
"""

# Loads without wa_tf, tf_keras or the kernels' library: an op of theirs would not resolve.
_LOAD = """
import sys
import numpy as np, tensorflow as tf
x = np.load(sys.argv[1] + "/x.npy")
expected = np.load(sys.argv[1] + "/expected.npy")
for name in ("keras_saved", "tf_saved"):
    loaded = tf.saved_model.load(sys.argv[1] + "/" + name)
    got = loaded.signatures["serving_default"](tf.constant(x))
    got = list(got.values())[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    print(name, "loaded")
assert "wa_tf" not in sys.modules
"""


@pytest.mark.skipif(not kernels.available(),
                    reason=f"fused kernels unavailable: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("precision", [pytest.param("float", marks=pytest.mark.slow), "int8"])
def test_a_saved_model_loads_where_the_kernels_are_absent(tmp_path, precision):
    subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path), precision], check=True,
                   capture_output=True, timeout=600)
    result = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path)], capture_output=True,
                            text=True, check=False, timeout=600,
                            env=dict(os.environ, WA_TF_KERNELS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras_saved loaded" in result.stdout and "tf_saved loaded" in result.stdout
    for name in ("keras_saved", "tf_saved"):
        graph = open(tmp_path / name / "saved_model.pb", "rb").read()
        assert b"WaTileTransform" not in graph and b"WaFakeQuant" not in graph


def test_fused_sums_are_the_same_bits_on_every_run():
    # The transform gradient sums its threads' parts in a fixed order.
    if not kernels.available():
        pytest.skip(f"fused kernels unavailable: {kernels.unavailable_reason()}")
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(4, 30, 30, 16)), tf.float32)
    mat = tf.constant(rng.normal(size=(6, 6)), tf.float32)
    dz = tf.constant(rng.normal(size=(36, 4 * 8 * 8, 16)), tf.float32)
    geo = (4, 1, 1, 8, 8)
    runs = [kernels.tile_transform_backprop(dz, x, mat, *geo)[1].numpy() for _ in range(20)]
    z = tf.constant(rng.normal(size=(36, 4 * 8 * 8, 16)), tf.float32)
    dx = tf.constant(rng.normal(size=(4, 30, 30, 16)), tf.float32)
    adjoint = []
    for _ in range(20):
        with tf.GradientTape() as tape:
            tape.watch(mat)
            out = kernels.tile_transform_adjoint(z, mat, *geo, 30, 30)
        adjoint.append(tape.gradient(out, mat, output_gradients=dx).numpy())
    for series in (runs, adjoint):
        assert all(np.array_equal(series[0], r) for r in series[1:])
        assert np.abs(series[0]).max() > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="no aarch64 cross compiler (Debian: apt-get install "
                           "g++-aarch64-linux-gnu)")
def test_the_generic_code_compiles_for_aarch64(tmp_path):
    # The kernels' C++ is portable: without x86 instructions it compiles for Arm.
    for i, source in enumerate(kbuild.SOURCES):
        out = tmp_path / f"{i}.o"
        result = subprocess.run(kbuild.compile_command("aarch64-linux-gnu-g++", "armv8-a",
                                                       source, str(out)),
                                capture_output=True, text=True, check=False, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert open(out, "rb").read(20)[18] == 183  # ELF e_machine: EM_AARCH64
