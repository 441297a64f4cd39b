#!/usr/bin/env python
"""Latency of LiteRT models in ai-edge-litert (XNNPACK on): each against a baseline.

Times every ``.tflite`` file given (``bin/export.py --litert``) at batch 1 (or
``--batch_sizes``) with 1 and 2 interpreter threads, in one process: per
setting the models take turns of 10 invocations, the first of each untimed
(interleaved, so that a load change on a shared machine hits them alike, and
each timed with its own weights in the caches, as served alone) and each
reports the median of ``--reps`` invocations after ``--warmup`` turns.  Ratios
are against the first file (``--models BASE=a.tflite OTHER=b.tflite``),
measured in the same run.

Without ``--models`` it builds its own: the ResNet-18-like model (width
``--mult``) with normal convolutions and with flex F(4x4, 3x3), INT8 per tap,
the latter lowered to builtin operators and with native Winograd operators
(``transforms='native'``), quantizer ranges calibrated on two random batches
(latency does not depend on the values).

Examples:
  bench/deploy_bench.py --quick
  bench/deploy_bench.py --quick --layers --json=deploy.json   # models and layers, < 5 minutes
  bench/deploy_bench.py --architectures fastest=configs/architectures/fastest_int8_avx2.json
  bench/deploy_bench.py --models normal=runs/normal.tflite f4=runs/f4.tflite --json=out.json
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved_ms, machine_lines  # noqa: E402
from bench.winograd_int8_bench import layer_table  # noqa: E402
from wa_tf.deploy import litert  # noqa: E402


def _build_models(mult, folder, architectures=()):
    from wa_tf import models  # pylint: disable=import-outside-toplevel  # only without --models
    rng = np.random.default_rng(0)
    paths = {}
    for name, conv, transforms in (("normal_int8", "normal", "int8"),
                                   ("flex_f4_int8_pertap", "flex", "int8"),
                                   ("flex_f4_int8_native", "flex", "native")):
        model = models.resnet18_like(conv, 4, width_multiplier=mult, bits=8, per_tap=True)
        for _ in range(2):
            model(rng.normal(size=(8, 32, 32, 3)).astype(np.float32), training=True)
        paths[name] = os.path.join(folder, f"{name}.tflite")
        litert.export_litert(model, paths[name], normalization=((0.5,) * 3, (0.25,) * 3),
                             transforms=transforms)
    for item in architectures:  # NAME=architecture.json, 8-bit: native Winograd operators
        name, path = item.split("=", 1)
        model = models.resnet18_like(architecture=path, width_multiplier=mult, per_tap=True)
        for _ in range(2):
            model(rng.normal(size=(8, 32, 32, 3)).astype(np.float32), training=True)
        paths[name] = os.path.join(folder, f"{name}.tflite")
        litert.export_litert(model, paths[name], normalization=((0.5,) * 3, (0.25,) * 3),
                             transforms="native")
    return paths


def _time(paths, batch, threads, reps, warmup):
    runners, inputs = {}, {}
    for name, path in paths.items():
        runner = litert.interpreter(path, threads)
        detail = litert.input_details(runner)
        shape = (batch,) + detail["shape"][1:]
        runner.resize_tensor_input(detail["index"], shape)
        runner.allocate_tensors()
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, shape).astype(detail["dtype"]) if detail["dtype"] == np.uint8 \
            else rng.normal(size=shape).astype(detail["dtype"])
        runner.set_tensor(detail["index"], data)
        runners[name], inputs[name] = runner, data
    # Turns of 10 invocations per model, the first untimed: each model is timed with its
    # weights in the caches, as when it is served alone (a turn of one left the
    # Winograd models, of 10+ MiB each, refilling them from memory on every call).
    return interleaved_ms({name: runner.invoke for name, runner in runners.items()}, reps,
                          warmup, block=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="NAME=PATH.tflite ...; the first is the baseline")
    parser.add_argument("--mult", type=float, default=0.5, help="width of the built models")
    parser.add_argument("--architectures", nargs="*", default=[],
                        help="NAME=architecture.json ...: also build these (8-bit, native "
                             "Winograd operators)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="20 reps (a minute or two)")
    parser.add_argument("--layers", action="store_true",
                        help="also time single layers: the native int8 Winograd kernel "
                             "against LiteRT's int8 CONV_2D and tf.nn.conv2d "
                             "(bench/winograd_int8_bench.py; width 0.5, F4, batch 1 with "
                             "--quick)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 20, 3
    print("\n".join(machine_lines()))
    print(f"runtime: {litert.runtime_name()} (XNNPACK on)")
    with tempfile.TemporaryDirectory() as folder:
        if args.models:
            paths = dict(item.split("=", 1) for item in args.models)
        else:
            paths = _build_models(args.mult, folder, args.architectures)
        sizes = {name: os.path.getsize(path) for name, path in paths.items()}
        base = next(iter(paths))
        rows = []
        print(f"{'model':<24}{'batch':>6}{'threads':>8}{'ms':>9}{'x ' + base:>22}{'MiB':>7}")
        for batch in args.batch_sizes:
            for threads in args.threads:
                ms = _time(paths, batch, threads, args.reps, args.warmup)
                for name in paths:
                    rows.append({"model": name, "batch": batch, "threads": threads,
                                 "ms": ms[name], "ratio": ms[name] / ms[base],
                                 "mib": sizes[name] / 2 ** 20})
                    print(f"{name:<24}{batch:>6}{threads:>8}{ms[name]:>9.3f}"
                          f"{ms[name] / ms[base]:>22.2f}{sizes[name] / 2 ** 20:>7.2f}")
    layers = None
    if args.layers:
        quick = dict(widths=(0.5,), tile_sizes=(4,), batch_sizes=(1,), reps=50, warmup=5) \
            if args.quick else dict(widths=(0.5, 1.0), batch_sizes=tuple(args.batch_sizes))
        layers, isa = layer_table(threads=tuple(args.threads), **quick)
        print(f"native kernel path: {isa}")
    if args.json:
        summary = {row["model"]: row["ms"] for row in rows
                   if row["batch"] == 1 and row["threads"] == 1}
        model = ({"wa_f4_int8_ms": summary["flex_f4_int8_native"],
                  "litert_normal_int8_ms": summary["normal_int8"]}
                 if {"flex_f4_int8_native", "normal_int8"} <= set(summary) else None)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cpu": machine_lines()[0], "baseline": base, "models": rows,
                       "layers": layers, "model": model}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
