#!/usr/bin/env python
"""Training-step time and peak memory of the whole ResNet-18-like model.

For normal / static / flex convolutions x F2, F4, F6 x FP32 / INT8 (and
optional XLA and recompute rows), each configuration runs in its own
subprocess, all in one invocation so the ratios to normal convolution compare
like with like.  One training step is what ``model.fit`` runs: forward,
backward and the AdamL2 update (wa_tf.training.train_lib.compile_model) on a
fixed random batch.

* step time: median over ``--steps`` steps after ``--warmup`` steps (the first
  traces and compiles the step);
* peak memory: TensorFlow's allocator peak during the timed steps
  (``tf.config.experimental.get_memory_info``, on the GPU or the CPU): weights,
  optimizer state, activations kept for the backward pass and temporaries.
  Only where the device keeps allocator statistics (GPUs, some CPUs): elsewhere
  (or with --memory=rss) the column is left out and the ratios use RSS growth;
* RSS growth: the growth of the process's peak resident set size from just
  before the model is built, which adds tracing, graphs and allocator caches.

With ``--same_process`` every configuration is built in one process and the
timed steps go round-robin, one step of each in turn: a machine whose speed
drifts (shared, throttled, or switching states) then slows every
configuration alike, and the step ratios are the ones to trust.  That mode
measures no memory (the models share the process); run without it for the
memory columns.

The header describes the machine and TensorFlow's kernel options
(bench/common.py).

Examples:
  bench/train_bench.py                       # the full table, batch 64, width 0.5
  bench/train_bench.py --quick --steps 5     # normal and flex F4, FP32 and INT8
  bench/train_bench.py --jit_compile --recompute
  bench/train_bench.py --quick --memory=rss  # RSS growth only, even where stats exist
  bench/train_bench.py --quick --same_process --steps 30   # step ratios on a drifting machine
"""

import contextlib
import json
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import common  # noqa: E402  (bench/common.py, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 64, "Batch size of a training step.")
flags.DEFINE_float("mult", 0.5, "Width multiplier of the model.")
flags.DEFINE_integer("steps", 10, "Timed steps per configuration (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, allocator warm-up).")
flags.DEFINE_boolean("quick", False, "Only normal and flex F4, FP32 and INT8.")
flags.DEFINE_list("configs", None, "Only these configurations, as named in the table "
                  "(e.g. normal-FP32,flex-F4-INT8).")
flags.DEFINE_boolean("jit_compile", False, "Add rows with the step compiled by XLA.")
flags.DEFINE_boolean("recompute", False, "Add Winograd rows with recompute=True "
                     "(the backward pass recomputes the Winograd pipeline).")
flags.DEFINE_integer("rounds", 1, "Measure every configuration this many times, round by "
                     "round (a load change on a shared machine then hits all alike); the "
                     "table gives the median step time and the largest peaks.")
flags.DEFINE_boolean("compare_tf", False, "Add Winograd rows with the pure-TF pipeline "
                     "(wa_tf.kernels turned off), named ...-pureTF.")
flags.DEFINE_enum("memory", "auto", list(common.MEASURES),
                  "Peak memory measure: TensorFlow's allocator statistics and RSS growth "
                  "(allocator), RSS growth only (rss), or auto (allocator where it works).")
flags.DEFINE_boolean("same_process", False, "Build every configuration in one process and "
                     "time their steps round-robin, one of each in turn, so that a drift in the "
                     "machine's speed hits all alike; no memory columns in this mode.")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.DEFINE_string("worker", None, "Internal: measure one configuration (JSON) and print "
                    "the result as JSON.")
flags.DEFINE_string("worker_all", None, "Internal: measure these configurations (JSON list) "
                    "round-robin in this process and print the results as JSON.")


def configurations():
    """(name, spec) of every configuration to measure, normal ones first."""
    modes = [("normal", None)] + [(c, f) for c in ("static", "flex") for f in (2, 4, 6)]
    if FLAGS.quick:
        modes = [("normal", None), ("flex", 4)]
    specs = []
    for conv, tile in modes:
        for bits in (None, 8):
            specs.append({"conv": conv, "tile_size": tile or 4, "bits": bits, "jit": False,
                          "recompute": False, "F": tile})
            if FLAGS.jit_compile:
                specs.append(dict(specs[-1], jit=True))
            if FLAGS.recompute and conv != "normal":
                specs.append(dict(specs[-1], jit=False, recompute=True))
            if FLAGS.compare_tf and conv != "normal":
                specs.append({"conv": conv, "tile_size": tile, "bits": bits, "jit": False,
                              "recompute": False, "F": tile, "tf": True})
    named = [(name_of(s), s) for s in specs]
    if FLAGS.configs:
        unknown = set(FLAGS.configs) - {n for n, _ in named}
        if unknown:
            raise app.UsageError(f"--configs: unknown {sorted(unknown)}; known: "
                                 f"{', '.join(n for n, _ in named)}")
        named = [(n, s) for n, s in named if n in FLAGS.configs]
    return named


def name_of(spec):
    parts = [spec["conv"]] + ([f"F{spec['F']}"] if spec["F"] else [])
    parts.append("INT8" if spec["bits"] else "FP32")
    parts += ["XLA"] * spec["jit"] + ["recompute"] * spec["recompute"]
    parts += ["pureTF"] * bool(spec.get("tf"))
    return "-".join(parts)


def _batch_iterator():
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    images = rng.normal(size=(FLAGS.batch_size, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=FLAGS.batch_size).astype(np.int64)
    return iter(tf.data.Dataset.from_tensors((images, labels)).repeat())


def _train_step(spec):
    """The model of `spec`, compiled; its training step, traced by the warm-up steps."""
    from wa_tf import models  # pylint: disable=import-outside-toplevel
    from wa_tf.training import train_lib  # pylint: disable=import-outside-toplevel
    model = models.resnet18_like(spec["conv"], tile_size=spec["tile_size"],
                                 width_multiplier=FLAGS.mult, bits=spec["bits"],
                                 recompute=spec["recompute"])
    train_lib.compile_model(model, lr=1e-3, jit_compile=spec["jit"])
    return model.make_train_function()


def measure_all(specs):
    """Runs every configuration in this process, steps round-robin; returns their results."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    import wa_tf  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from wa_tf import kernels  # pylint: disable=import-outside-toplevel
    iterator = _batch_iterator()
    steps, fused = [], []
    for spec in specs:
        # A step traced within kernels.disabled() keeps its pure-TF graph afterwards.
        with kernels.disabled() if spec.get("tf") else contextlib.nullcontext():
            step = _train_step(spec)
            for _ in range(FLAGS.warmup):
                float(step(iterator)["loss"])
            fused.append(kernels.available())
        steps.append(step)
    times = [[] for _ in specs]
    for _ in range(FLAGS.steps):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            float(step(iterator)["loss"])  # reading the loss waits for the step
            times[i].append(time.perf_counter() - start)
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    return [{"step_s": statistics.median(t), "step_s_all": t, "peak_bytes": None,
             "rss_growth_bytes": None, "kernels": k, "device": device, "memory": "none"}
            for t, k in zip(times, fused)]


def measure(spec, requested_memory):
    """Runs one configuration in this process; returns its measurements.

    ``memory`` in the result is the measure used (``common.memory_measure`` of
    `requested_memory`): with 'allocator', ``peak_bytes`` is the allocator peak
    of the timed steps; with 'rss' it is None.
    """
    if spec.get("tf"):
        os.environ["WA_TF_KERNELS"] = "0"  # read by wa_tf.kernels: the pure-TF pipeline
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    import wa_tf  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from wa_tf import kernels  # pylint: disable=import-outside-toplevel

    iterator = _batch_iterator()
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    memory = common.memory_measure(requested_memory, device)
    rss_before = common.peak_rss_bytes()
    step = _train_step(spec)
    for _ in range(FLAGS.warmup):
        float(step(iterator)["loss"])
    if memory == "allocator":
        tf.config.experimental.reset_memory_stats(device)
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        float(step(iterator)["loss"])  # reading the loss waits for the step
        times.append(time.perf_counter() - start)
    peak = None
    if memory == "allocator":
        peak = int(tf.config.experimental.get_memory_info(device)["peak"])
    return {"step_s": statistics.median(times), "peak_bytes": peak,
            "kernels": kernels.available(),
            "rss_growth_bytes": int(common.peak_rss_bytes() - rss_before), "device": device,
            "memory": memory}


def _worker_cmd(worker_flag):
    return [sys.executable, os.path.abspath(__file__), worker_flag,
            f"--batch_size={FLAGS.batch_size}", f"--mult={FLAGS.mult}",
            f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}"]


def run_config(name, spec, requested_memory):
    cmd = _worker_cmd(f"--worker={json.dumps(spec)}") + [f"--memory={requested_memory}"]
    return dict(common.run_worker(cmd), name=name, **spec)


def run_same_process(named):
    """Every configuration of `named` in one fresh process; one result each (or all failed)."""
    result = common.run_worker(_worker_cmd(f"--worker_all={json.dumps([s for _, s in named])}"))
    runs = result.get("results") or [result] * len(named)
    return [dict(run, name=name, **spec) for run, (name, spec) in zip(runs, named)]


def _combine(runs):
    """One configuration's rounds as one result: median step, largest peaks; failed if any did."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    result = dict(runs[0], step_s=statistics.median(r["step_s"] for r in runs),
                  rss_growth_bytes=max(r["rss_growth_bytes"] for r in runs),
                  step_s_rounds=[r["step_s"] for r in runs])
    if all(r["peak_bytes"] is not None for r in runs):
        result["peak_bytes"] = max(r["peak_bytes"] for r in runs)
    return result


def table(results, memory):
    """Markdown table with ratios to the normal convolution of the same precision/XLA.

    The "x normal" memory ratio is of the allocator peak with memory
    'allocator', of the RSS growth with 'rss'.
    """
    base = {(r["bits"], r["jit"]): r for r in results
            if r.get("conv") == "normal" and "error" not in r}
    ratio_key = "peak_bytes" if memory == "allocator" else "rss_growth_bytes"
    if memory == "none":
        lines = ["| config | step (s) | x normal |", "| --- | ---: | ---: |"]
    elif memory == "allocator":
        lines = ["| config | step (s) | x normal | allocator peak (MiB) | x normal "
                 "| RSS growth (MiB) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    else:
        lines = ["| config | step (s) | x normal | RSS growth (MiB) | x normal |",
                 "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r:
            empty = " |" * (lines[0].count("|") - 3)  # the columns after "failed"
            lines.append(f"| {r['name']} | failed: {r['error']} |{empty}")
            continue
        ref = base.get((r["bits"], r["jit"]))
        step_ratio = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        cells = [r["name"], f"{r['step_s']:.3f}", step_ratio]
        if memory == "none":
            lines.append("| " + " | ".join(cells) + " |")
            continue
        mem_ratio = f"{r[ratio_key] / ref[ratio_key]:.2f}" if ref and ref[ratio_key] > 0 else "-"
        if memory == "allocator":
            cells += [f"{r['peak_bytes'] / 2**20:.0f}", mem_ratio,
                      f"{r['rss_growth_bytes'] / 2**20:.0f}"]
        else:
            cells += [f"{r['rss_growth_bytes'] / 2**20:.0f}", mem_ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps(measure(json.loads(FLAGS.worker), FLAGS.memory)))
        return
    if FLAGS.worker_all:
        print(json.dumps({"results": measure_all(json.loads(FLAGS.worker_all))}))
        return
    # The parent runs nothing on the device (on a GPU it would hold memory the
    # workers need): each worker finds which measure works there.
    if FLAGS.rounds < 1:
        raise app.UsageError(f"--rounds must be >= 1, got {FLAGS.rounds}")
    if FLAGS.same_process and FLAGS.rounds > 1:
        raise app.UsageError("--same_process already interleaves the steps: --rounds must be 1")
    if FLAGS.steps < 1 or FLAGS.warmup < 1:
        raise app.UsageError(f"--steps and --warmup must be >= 1, got {FLAGS.steps} and "
                             f"{FLAGS.warmup} (the first step traces)")
    named = configurations()
    if FLAGS.same_process:
        print(f"measuring {', '.join(n for n, _ in named)} in one process ...",
              file=sys.stderr, flush=True)
        results = run_same_process(named)
    else:
        rounds = {name: [] for name, _ in named}
        for round_ in range(FLAGS.rounds):
            for name, spec in named:
                print(f"measuring {name} (round {round_ + 1}/{FLAGS.rounds}) ...",
                      file=sys.stderr, flush=True)
                rounds[name].append(run_config(name, spec, FLAGS.memory))
        results = [_combine(rounds[name]) for name, _ in named]
    measured = [r for r in results if "error" not in r]
    device = next((r["device"] for r in measured), "?")
    if FLAGS.same_process:
        memory = "none"
    elif measured and all(r["memory"] == "allocator" for r in measured):
        memory = "allocator"
    else:
        memory = "rss"
    common.print_machine()
    fused = sorted({r["name"] for r in measured if r.get("kernels") and r["conv"] != "normal"})
    print(f"fused tile kernels (wa_tf.kernels) in: {', '.join(fused) or 'no row'}")
    print(f"Training step of ResNet18-like, batch {FLAGS.batch_size}, width {FLAGS.mult}, "
          f"on {device}: median of {FLAGS.steps} steps after {FLAGS.warmup} warm-up steps"
          + (f", median over {FLAGS.rounds} interleaved rounds" if FLAGS.rounds > 1 else "")
          + (", all in one process, steps round-robin" if FLAGS.same_process else ""))
    if memory == "rss":
        print("Memory: RSS growth only (TensorFlow keeps no allocator statistics here, or "
              "--memory=rss): growth of each process's peak RSS from before its model is built.")
    print(table(results, memory))
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
