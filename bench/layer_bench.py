"""Forward+backward time and peak memory of WinogradConv2D against tf.nn.conv2d.

For each stage shape of the ResNet-18-like model (width 0.5, batch 64) and
each of F2/F4/F6 x static/flex, measures the median time of a forward+backward
step (gradients for the input and every trainable weight) and the peak memory
the step allocates, and prints both as ratios to a direct convolution with the
same shapes measured in the same run.  Rows marked ``fwd`` time the forward pass
alone (inference), as ratios to conv2d's forward pass.

Peak memory (see bench/common.py): TensorFlow's allocator peak above the
pre-step level where the device keeps allocator statistics (GPUs, some CPUs),
all configurations in one process; otherwise (or with --memory=rss) each
configuration runs in a fresh process and the column is that process's peak
RSS growth from just before its first step (tracing included).

With --interleave every configuration runs in this one process.  With
allocator statistics the column is still each configuration's allocator
peak above the pre-step level (one step after warm-up).  Without them (or
with --memory=rss) a configuration's own RSS peak cannot be separated from
those run before it, so the column is the growth of the process's peak RSS
across that configuration's first (warm-up) steps, tracing included, taken
one configuration at a time in the order the rows are printed: a row whose
peak stays below an earlier row's shows 0, and the figures depend on that
order.  The header names the measure ("allocator peak" or "RSS growth (first
steps, in run order)"); the timed steps then run round-robin as usual.

Usage:
  python bench/layer_bench.py                    # all stages
  python bench/layer_bench.py --shapes=16x16x64  # one stage
  python bench/layer_bench.py --recompute --jit_compile
  python bench/layer_bench.py --memory=rss       # peak RSS growth even where stats exist
  python bench/layer_bench.py --compare_tf       # also the pure-TF pipeline (no wa_tf.kernels)
  python bench/layer_bench.py --interleave       # a shape's rows timed round-robin
  python bench/layer_bench.py --interleave --memory=rss  # ... with RSS growth in run order

Winograd rows use wa_tf.kernels' fused tile kernels where they are available
(the header says); ``tf`` rows run the pure-TF pipeline in the same process.
"""
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import wa_tf  # noqa: E402,F401
from wa_tf import kernels  # noqa: E402
from wa_tf.layers import WinogradConv2D  # noqa: E402

import common  # noqa: E402  (bench/common.py, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("shapes", ["32x32x32", "16x16x64", "8x8x128", "4x4x256"],
                  "HxWxC input shapes (filters = C), the ResNet-18-like stages at width 0.5.")
flags.DEFINE_list("tiles", ["2", "4", "6"], "Tile sizes m of F(m x m, 3 x 3).")
flags.DEFINE_integer("repeats", 20, "Timed steps per configuration (after 3 warm-up steps).")
flags.DEFINE_bool("jit_compile", False, "Also time XLA-compiled steps.")
flags.DEFINE_bool("recompute", False, "Also time recompute=True (gradient checkpointing).")
flags.DEFINE_bool("forward", True, "Also time forward-only (inference) steps.")
flags.DEFINE_bool("compare_tf", False, "Also time each Winograd row with the pure-TF pipeline "
                  "(wa_tf.kernels turned off), in the same run.")
flags.DEFINE_enum("memory", "auto", list(common.MEASURES),
                  "Peak memory measure: TensorFlow's allocator statistics, the peak RSS growth "
                  "of a fresh process per configuration (with --interleave: of this process "
                  "across each configuration's first steps, in run order), or auto (allocator "
                  "where it works).")
flags.DEFINE_bool("interleave", False, "Time a shape's rows round-robin, one step of each in "
                  "turn, so that a drift in the machine's speed hits conv2d and the Winograd "
                  "rows alike.  All rows share one process: memory is each row's allocator "
                  "peak where the device keeps allocator statistics, otherwise (or with "
                  "--memory=rss) the growth of the process's peak RSS across each row's first "
                  "steps, taken one row at a time in run order (0 where a row stays below an "
                  "earlier row's peak).")
flags.DEFINE_string("worker", None, "Internal: measure one configuration (JSON) in this "
                    "process and print the result as JSON.")

_DEVICE = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
_WARMUP = 3


def _step_fn(layer_fn, variables, x, jit):
    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer_fn(x)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x] + variables)
    return step


def _forward_fn(layer_fn, x, jit):
    @tf.function(jit_compile=jit)
    def step():
        return [layer_fn(x)]
    return step


def measure(spec, memory):
    """Returns (median seconds, peak bytes) of the fwd+bwd step of one configuration.

    With memory 'allocator' the peak is the allocator's above the pre-step
    level during the timed steps; with 'rss' it is this process's peak RSS
    growth from before the first step (warm-up and tracing included).
    """
    # The step is traced in its first call: with the kernels off, it is pure TF.
    with kernels.disabled() if spec.get("tf") else contextlib.nullcontext():
        return _measure(spec, memory)


def _prepare(spec):
    """(step, peak RSS growth) of one configuration, traced and warmed up by its first calls.

    The growth is that of this process's peak RSS across the first calls
    (tracing included), from after the step's inputs and weights exist; 0
    where those calls stay below a peak the process reached before.
    """
    # The step is traced in its first call: with the kernels off, it is pure TF.
    with kernels.disabled() if spec.get("tf") else contextlib.nullcontext():
        step = _build_step(spec)
        peak_before = common.peak_rss_bytes()
        for _ in range(_WARMUP):
            out = step()
        _ = [o.numpy() for o in out]
        growth = common.peak_rss_bytes() - peak_before
    return step, growth


def measure_interleaved(specs, memory="allocator"):
    """(median seconds, peak bytes) of each of `specs`, steps timed round-robin.

    With memory 'allocator' the peak is each configuration's allocator peak
    above the pre-step level in one step after warm-up; with 'rss' it is the
    growth of this process's peak RSS across the configuration's warm-up
    steps, the configurations warmed up one at a time in the order of `specs`
    (see :func:`_prepare`).
    """
    if memory not in ("allocator", "rss"):
        raise ValueError(f"memory must be 'allocator' or 'rss'; got {memory!r}")
    prepared = [_prepare(spec) for spec in specs]
    steps = [step for step, _ in prepared]
    if memory == "rss":
        peaks = [growth for _, growth in prepared]
    else:
        peaks = []
        for step in steps:  # one configuration at a time: its own peak above the level before
            tf.config.experimental.reset_memory_stats(_DEVICE)
            base = tf.config.experimental.get_memory_info(_DEVICE)["current"]
            _ = step()[0].numpy()
            peaks.append(tf.config.experimental.get_memory_info(_DEVICE)["peak"] - base)
    times = [[] for _ in steps]
    for _ in range(FLAGS.repeats):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            _ = step()[0].numpy()  # synchronise
            times[i].append(time.perf_counter() - t0)
    return [(float(np.median(t)), peak) for t, peak in zip(times, peaks)]


def _build_step(spec):
    h, w, c = (int(v) for v in spec["shape"].split("x"))
    x = tf.random.stateless_normal((FLAGS.batch_size, h, w, c), (0, 1))
    if spec["m"] is None:
        kernel = tf.Variable(tf.random.stateless_normal((3, 3, c, c), (0, 2)) * 0.05)
        layer_fn, variables = (lambda z: tf.nn.conv2d(z, kernel, 1, "SAME")), [kernel]
    else:
        layer_fn = WinogradConv2D(c, tile_size=spec["m"], flex=spec["flex"],
                                  recompute=spec["recompute"])
        layer_fn.build(x.shape)
        variables = layer_fn.trainable_variables
    return (_forward_fn(layer_fn, x, spec["jit"]) if spec.get("forward")
            else _step_fn(layer_fn, variables, x, spec["jit"]))


def _measure(spec, memory):
    step = _build_step(spec)
    rss_before = common.rss_bytes()
    for _ in range(_WARMUP):
        out = step()
    _ = [o.numpy() for o in out]
    if memory == "allocator":
        tf.config.experimental.reset_memory_stats(_DEVICE)
        base = tf.config.experimental.get_memory_info(_DEVICE)["current"]
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        out = step()
        _ = out[0].numpy()  # synchronise
        times.append(time.perf_counter() - t0)
    if memory == "allocator":
        peak = tf.config.experimental.get_memory_info(_DEVICE)["peak"] - base
    else:
        peak = common.peak_rss_bytes() - rss_before
    return float(np.median(times)), peak


def _measure_in_fresh_process(spec):
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(spec)}",
           f"--batch_size={FLAGS.batch_size}", f"--repeats={FLAGS.repeats}"]
    result = common.run_worker(cmd)
    if "error" in result:
        raise RuntimeError(f"{spec}: {result['error']}")
    return result["seconds"], result["peak_bytes"]


def _memory_label(memory, interleave):
    """What the memory column holds, for the header."""
    if memory == "allocator":
        return ("allocator peak above the pre-step level, "
                + ("one step after warm-up, rows one at a time" if interleave else "timed steps"))
    if interleave:
        return ("RSS growth (first steps, in run order): growth of this one process's peak RSS "
                "across each row's warm-up steps (tracing included), rows warmed up one at a time "
                "in the order printed, 0 where a row stays below an earlier row's peak (all rows "
                "share one process, so not a per-row peak)")
    return "peak RSS growth of a fresh process per row, from before its first step"


def main(argv):
    del argv
    if FLAGS.worker:
        seconds, peak = measure(json.loads(FLAGS.worker), "rss")
        print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
        return
    try:
        memory = common.memory_measure(FLAGS.memory, _DEVICE)
    except ValueError as e:
        raise app.UsageError(f"--memory: {e}") from None
    run = (lambda spec: measure(spec, memory)) if memory == "allocator" \
        else _measure_in_fresh_process
    common.print_machine()
    print(f"fused tile kernels (wa_tf.kernels): "
          f"{'on' if kernels.available() else 'off: ' + kernels.unavailable_reason()}")
    mem_label = _memory_label(memory, FLAGS.interleave)
    print(f"device {_DEVICE}, batch {FLAGS.batch_size}, median of {FLAGS.repeats} fwd+bwd steps"
          f"{' (each shape round-robin)' if FLAGS.interleave else ''}; memory: {mem_label}")
    mem_column = "alloc MiB" if memory == "allocator" else "RSS+ MiB"
    header = f"{'input':>14} {'layer':>18} {'ms':>8} {'x conv':>7} {mem_column:>9} {'x conv':>7}"
    print(header)
    print("-" * len(header))
    variants = [("", False, False, False)]
    if FLAGS.forward:
        variants.append((" fwd", False, False, True))
    tf_variants = [(" tf", False, False, False)] + (
        [(" fwd tf", False, False, True)] if FLAGS.forward else []) if FLAGS.compare_tf else []
    if FLAGS.jit_compile:
        variants.append((" xla", True, False, False))
    if FLAGS.recompute:
        variants.append((" recompute", False, True, False))
    for shape in FLAGS.shapes:
        base = {"shape": shape, "m": None, "flex": False, "jit": False, "recompute": False,
                "forward": False}
        rows = [("tf.nn.conv2d", base)] + [("tf.nn.conv2d fwd", dict(base, forward=True))] * (
            FLAGS.forward)
        for m in (int(v) for v in FLAGS.tiles):
            for flex in (False, True):
                for suffix, jit, recompute, forward in variants + tf_variants:
                    rows.append((f"F{m} {'flex' if flex else 'static'}{suffix}",
                                 dict(base, m=m, flex=flex, jit=jit, recompute=recompute,
                                      forward=forward, tf=suffix.endswith(" tf"))))
        # Printed as measured, unless the rows run round-robin (all measured at once).
        results = (measure_interleaved([spec for _, spec in rows], memory) if FLAGS.interleave
                   else (run(spec) for _, spec in rows))
        conv = {}
        for (name, spec), (t, mem) in zip(rows, results):
            if spec["m"] is None:
                conv[spec["forward"]] = (t, mem)
            conv_t, conv_m = conv[spec["forward"]]
            mem_ratio = f"{mem / conv_m:7.2f}" if conv_m > 0 else f"{'-':>7}"
            print(f"{shape:>14} {name:>18} {t * 1e3:8.2f} {t / conv_t:7.2f} "
                  f"{mem / 2**20:9.1f} {mem_ratio}")
            sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
