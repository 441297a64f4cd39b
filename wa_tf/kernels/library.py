"""Compiling the fused kernels' library, once per source, TensorFlow, Python and CPU target.

The library is built with the C++ compiler (``$CXX``, else ``g++``/``c++``) and
TensorFlow's headers (``tf.sysconfig``) into a cache folder (``$WA_TF_CACHE``,
else ``~/.cache/wa_tf``) under a name that keys everything the binary depends
on.  By default it is compiled for the CPU at hand (``-march=native``), so the
key holds this CPU's feature flags; ``WA_TF_KERNELS_MARCH`` names another
target (``x86-64-v3``: AVX2 + FMA), and the key then holds the target alone, so
that one build serves every machine of a cluster that shares the cache.

A build is guarded across processes by a lock file and bounded by a timeout
(``WA_TF_KERNELS_BUILD_TIMEOUT`` seconds, default 900), after which the compiler
is killed and the lock released.  A failed build is remembered in
``<library>.failed`` with the compiler's message, so that later processes do
not compile again for nothing; deleting that file retries.
"""

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import tensorflow as tf

from wa_tf.machine import cpu_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, name) for name in (
    "tile_transform.cc", "tile_adjoint.cc", "tile_weight_grad.cc", "fake_quant.cc"))
HEADERS = tuple(os.path.join(_HERE, name) for name in (
    "common.h", "tile_common.h", "tile_rows.h"))

# -fno-trapping-math / -fno-math-errno let rounding vectorize; they change no value.
_EXTRA_FLAGS = ("-fPIC", "-O3", "-fno-trapping-math", "-fno-math-errno", "-w")
_MARCH_ENV = "WA_TF_KERNELS_MARCH"
_TIMEOUT_ENV = "WA_TF_KERNELS_BUILD_TIMEOUT"
_DEFAULT_TIMEOUT = 900.0


def cache_dir():
    """Where built libraries are kept: ``$WA_TF_CACHE`` or ``~/.cache/wa_tf``."""
    return os.environ.get("WA_TF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "wa_tf")


def _check_target(march, source):
    if not march or not all(ch.isalnum() or ch in "-_.+" for ch in march):
        raise ValueError(f"{source}={march!r} is not a compiler target: give a -march "
                         "value such as native, x86-64-v3 or skylake-avx512")
    return march


def target():
    """The CPU the library is compiled for: ``$WA_TF_KERNELS_MARCH``, else ``native``.

    Raises:
      ValueError: if the variable is set to something that cannot be a ``-march`` value.
    """
    march = os.environ.get(_MARCH_ENV, "").strip() or "native"
    return _check_target(march, _MARCH_ENV)


def build_timeout():
    """Seconds a build may take: ``$WA_TF_KERNELS_BUILD_TIMEOUT``, else 900.

    Raises:
      ValueError: if the variable is not a positive number.
    """
    value = os.environ.get(_TIMEOUT_ENV, "").strip()
    if not value:
        return _DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{_TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def _build_key(march):
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            digest.update(f.read())
    parts = [tf.__version__, sys.version, " ".join(tf.sysconfig.get_compile_flags()),
             " ".join(tf.sysconfig.get_link_flags()), " ".join(_EXTRA_FLAGS), march]
    if march == "native":  # the library may use any instruction this CPU has
        parts.append(" ".join(cpu_flags()))
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def library_path():
    """The path of the library for this machine and target (it may not exist yet)."""
    return os.path.join(cache_dir(), f"wa_tf_kernels_{_build_key(target())}.so")


def failure_path(path=None):
    """The file that remembers a failed build of the library at `path` (default: this one's)."""
    return (path or library_path()) + ".failed"


def compile_command(compiler, march, source, output, extra=()):
    """The command that compiles one source file to an object file for `march`.

    Args:
      compiler: The C++ compiler (a path or a name on PATH).
      march: The ``-march`` value.
      source: A ``.cc`` file.
      output: The object file to write.
      extra: More compiler arguments.

    Raises:
      ValueError: if `march` cannot be a ``-march`` value.
    """
    march = _check_target(march, "march")
    return [compiler, "-c", *_EXTRA_FLAGS, f"-march={march}", *tf.sysconfig.get_compile_flags(),
            *extra, source, "-o", output]


def run_commands(cmds, deadline, verbose):
    """Runs `cmds` at once (each in a process group of its own); kills them all at `deadline`.

    Returns:
      None when all succeeded, else the first failure's message.
    """
    procs = []
    try:
        for cmd in cmds:
            if verbose:
                print(" ".join(cmd), flush=True)
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        for cmd, proc in zip(cmds, procs):
            try:
                out, _ = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return (f"the compiler ran past {_TIMEOUT_ENV}={build_timeout():g} s and was "
                        "stopped")
            if proc.returncode != 0:
                errors = [line for line in out.splitlines() if "error" in line]
                first = errors[0] if errors else f"{cmd[0]} exited with {proc.returncode}"
                return f"{first}\n{out[-4000:]}"
        return None
    finally:
        for proc in procs:  # the compiler's own children (cc1plus) too
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def locked(path, deadline):
    """Holds an exclusive lock on `path` + ``.lock`` (other processes wait until `deadline`)."""
    with open(path + ".lock", "a+b") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another process has held {path}.lock for longer than "
                                       f"{_TIMEOUT_ENV}={build_timeout():g} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remembered_failure(path):
    failed = failure_path(path)
    if not os.path.exists(failed):
        return None
    with open(failed, encoding="utf-8", errors="replace") as f:
        message = f.read()
    first = message.splitlines()[0] if message else "no message"
    return RuntimeError(f"compiling wa_tf/kernels failed earlier ({first}); delete {failed} "
                        f"to try again\n{message}")


def build(verbose=False):
    """Compiles the kernels for this machine unless already built; returns the library's path.

    Raises:
      RuntimeError: no C++ compiler, the compilation failed (now or, as remembered in
        :func:`failure_path`, earlier) or timed out, or another process's build held
        the lock past the timeout.
      ValueError: ``$WA_TF_KERNELS_MARCH`` or ``$WA_TF_KERNELS_BUILD_TIMEOUT`` is malformed.
    """
    path = library_path()
    timeout = build_timeout()
    if os.path.exists(path):
        return path
    failure = _remembered_failure(path)
    if failure:
        raise failure
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) found")
    os.makedirs(cache_dir(), exist_ok=True)
    deadline = time.monotonic() + timeout
    with locked(path, deadline):
        if os.path.exists(path):  # built by another process meanwhile
            return path
        failure = _remembered_failure(path)
        if failure:
            raise failure
        with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
            objects = [os.path.join(work, f"{i}.o") for i in range(len(SOURCES))]
            # One process per source, all at once: they share the cores.
            message = run_commands([compile_command(compiler, target(), source, obj)
                            for source, obj in zip(SOURCES, objects)], deadline, verbose)
            tmp = os.path.join(work, "library.so")
            if message is None:
                message = run_commands([[compiler, "-shared", *objects, "-o", tmp,
                                 *tf.sysconfig.get_link_flags()]], deadline, verbose)
            if message is not None:
                with open(failure_path(path), "w", encoding="utf-8") as f:
                    f.write(message)
                raise RuntimeError(f"compiling wa_tf/kernels failed: {message}\n"
                                   f"(remembered in {failure_path(path)}: delete it to retry)")
            # Renamed into place: concurrent readers never see half a file.
            os.replace(tmp, path)
    return path


def discard(path):
    """Removes a built library that cannot be loaded, so that :func:`build` compiles it again."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
