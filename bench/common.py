"""What every benchmark shares: the machine description and the peak-memory measures.

Figures from different machines are only comparable when the machine and
TensorFlow's kernel options are known, so every benchmark prints
:func:`machine_lines` in its header.

Peak memory is measured one of two ways (:func:`memory_measure` picks one):

* ``allocator``: TensorFlow's allocator statistics
  (``tf.config.experimental.get_memory_info``), exact bytes of the tensors the
  device holds.  GPUs keep them; most CPUs do not (``reset_memory_stats``
  raises ``Cannot reset memory stats for device 'CPU:0'``, or the peak stays 0).
* ``rss``: growth of the peak resident set size (``VmHWM`` of
  ``/proc/self/status``, else ``getrusage``) of a fresh process per
  configuration, from just before the measured work; it adds what TensorFlow
  traces and caches on the way, so compare it only with the same measure.
  Where a benchmark runs every configuration in one process (layer_bench's
  ``--interleave``), a configuration's peak cannot be separated from the
  ones run before it: the figure is then the growth of the process's peak
  across that configuration's first steps, in run order, 0 where it stays
  below an earlier configuration's peak.
"""
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from wa_tf.machine import ISA_FLAGS, cpu_info

MEASURES = ("auto", "allocator", "rss")


def _onednn_enabled():
    """Whether TensorFlow runs oneDNN kernels (TF_ENABLE_ONEDNN_OPTS, else TF's default)."""
    try:
        # TensorFlow has no public API for it; its own tests read this flag.
        # pylint: disable=import-outside-toplevel
        from tensorflow.python.util import _pywrap_util_port
        return "on" if _pywrap_util_port.IsMklEnabled() else "off"
    except (ImportError, AttributeError):
        return "unknown"


def machine_lines():
    """Lines describing the machine and TensorFlow's kernel options, for a benchmark header."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    model, isa = cpu_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(details.get("device_name", gpu.name))
    threads = tf.config.threading
    inter, intra = (threads.get_inter_op_parallelism_threads(),
                    threads.get_intra_op_parallelism_threads())
    env = lambda name: os.environ.get(name, "unset")  # noqa: E731
    return [
        f"cpu: {model}, {os.cpu_count()} cores ({usable} usable), "
        f"ISA: {' '.join(isa) or 'none of ' + ','.join(ISA_FLAGS[:5])}",
        f"gpu: {', '.join(gpus) or 'none'}",
        f"tensorflow {tf.__version__} (python {platform.python_version()}): "
        f"oneDNN {_onednn_enabled()} (TF_ENABLE_ONEDNN_OPTS={env('TF_ENABLE_ONEDNN_OPTS')}), "
        f"inter/intra-op threads {inter or 'auto'}/{intra or 'auto'} "
        f"(OMP_NUM_THREADS={env('OMP_NUM_THREADS')}), "
        f"XLA auto-jit {tf.config.optimizer.get_jit() or 'off'} "
        f"(TF_XLA_FLAGS={env('TF_XLA_FLAGS')})",
        # Both can make an AVX-512 CPU run AVX2 code, to measure what such a CPU runs.
        f"instruction sets used: oneDNN up to ONEDNN_MAX_CPU_ISA={env('ONEDNN_MAX_CPU_ISA')}, "
        f"wa_tf.kernels compiled for -march={_kernels_target()}",
    ]


def _kernels_target():
    from wa_tf import kernels  # pylint: disable=import-outside-toplevel
    try:
        return kernels.target()
    except ValueError as e:
        return f"? ({e})"


def print_machine():
    for line in machine_lines():
        print(line)


def allocator_stats_work(device):
    """Whether TensorFlow's allocator keeps a peak for `device` (reset works, peak grows)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
        tf.config.experimental.reset_memory_stats(device)
        with tf.device(device):
            x = tf.ones((256, 1024))
            _ = float(tf.reduce_sum(x * 2.0))
        return tf.config.experimental.get_memory_info(device)["peak"] > 0
    except (ValueError, RuntimeError, tf.errors.OpError):
        return False


def memory_measure(requested, device):
    """'allocator' or 'rss': the measure `requested` ('auto' picks) works on `device`.

    Raises:
      ValueError: If 'allocator' is requested and `device` keeps no statistics.
    """
    if requested not in MEASURES:
        raise ValueError(f"memory measure must be one of {', '.join(MEASURES)}; got {requested!r}")
    if requested == "rss":
        return "rss"
    if allocator_stats_work(device):
        return "allocator"
    if requested == "allocator":
        raise ValueError(f"TensorFlow keeps no allocator statistics for {device} here; "
                         "use --memory=rss (or auto)")
    return "rss"


def _status_bytes(key):
    """A ``/proc/self/status`` size (VmRSS, VmHWM) in bytes, or None without /proc."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    """Current resident set size (falls back to the peak where /proc is missing)."""
    current = _status_bytes("VmRSS")
    return current if current is not None else peak_rss_bytes()


def peak_rss_bytes():
    """Peak resident set size of this process so far."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_worker(cmd, env=None, timeout=None):
    """Runs `cmd` (a benchmark in worker mode) in a fresh process; its last stdout line as JSON.

    Args:
      cmd: The command line.
      env: The process's environment (default: this one's).
      timeout: Seconds before the worker is killed (``subprocess.TimeoutExpired``).

    Returns:
      The decoded dict, or ``{"error": <last stderr line>}`` when it failed.
    """
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved_ms(calls, reps, warmup, block=1):
    """Median ms of each zero-argument call in `calls` ({name: call}), timed in turns.

    Each round calls every function `block` times in a row, so that load from other
    processes on a shared machine falls on all of them alike; the first `warmup`
    rounds are not timed.  With ``block > 1`` the first call of each turn is not
    timed either: it refills the caches the other calls evicted (whole models of
    several MiB each), which a model served on its own does not pay.  Python's
    garbage collector is off meanwhile, as in `timeit`: with TensorFlow loaded,
    one of its collections takes milliseconds and lands on whichever call
    happened to allocate.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}")
    times = {name: [] for name in calls}
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        timed = block - 1 if block > 1 else 1  # timed calls per turn
        for rep in range(warmup + -(-reps // timed)):
            for name, call in calls.items():
                for i in range(block):
                    start = time.perf_counter()
                    call()
                    if rep >= warmup and (block == 1 or i > 0):
                        times[name].append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}
