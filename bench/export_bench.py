#!/usr/bin/env python
"""Inference latency of exported SavedModels: flex Winograd F4 against normal convolution.

Exports the ResNet-18-like model with normal convolutions and with flex
Winograd F(4x4, 3x3) convolutions, FP32 and INT8 (fake-quantized, the
quantizer ranges calibrated on two random training batches), through
:func:`wa_tf.deploy.export.export_saved_model`, where every Winograd layer's
``U = G g G^T`` is computed once.  A fresh process that imports TensorFlow
alone (no wa_tf, tf_keras or TF-MOT) then loads the SavedModels with
``tf.saved_model.load`` and times their ``serving_default`` signature, as a
deployment would run it: per batch size, the models take turns call by call
(interleaved, so that a load change on a shared machine hits them alike) and
each reports the median of ``--reps`` calls after ``--warmup`` calls.

The header describes the machine and TensorFlow's kernel options
(bench/common.py).

Where :mod:`wa_tf.kernels` can run, the flex model is also exported with
``fused_kernels=True`` (``... fused`` columns); its process loads the kernels'
library with ``tf.load_op_library`` (still no wa_tf).

Examples:
  bench/export_bench.py                           # batch 1 and 64, 15 reps
  bench/export_bench.py --reps 5 --batch_sizes 1  # quicker
  bench/export_bench.py --export_dir /tmp/exp     # keep (and reuse) the SavedModels
"""

import contextlib
import importlib.abc
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import common  # noqa: E402  (bench/common.py, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes to time.")
flags.DEFINE_integer("reps", 15, "Timed calls per model and batch size (median reported).")
flags.DEFINE_integer("warmup", 3, "Untimed calls first, per model and batch size.")
flags.DEFINE_float("mult", 0.5, "Width multiplier of the model.")
flags.DEFINE_integer("tile_size", 4, "Tile size m of the flex Winograd model.")
flags.DEFINE_string("export_dir", None, "Export into this folder and keep the SavedModels "
                    "(reused by the next run with the same folder); default: a temporary one.")
flags.DEFINE_string("worker", None, "Internal: time the SavedModels of this JSON "
                    "{name: path} with TensorFlow alone and print the result as JSON.")
flags.DEFINE_string("op_library", None, "Internal: the fused kernels' library, loaded by the "
                    "worker with tf.load_op_library.")

PRECISIONS = (("FP32", None), ("INT8", 8))


class _Block(importlib.abc.MetaPathFinder):
    """Makes wa_tf, tf_keras and TF-MOT unimportable (TensorFlow may try them)."""

    BLOCKED = ("wa_tf", "tf_keras", "tensorflow_model_optimization")

    def find_spec(self, name, path=None, target=None):
        del path, target
        if name.split(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"not available to the served model: {name}")
        return None


def export_models(directory, fused):
    """Exports normal and flex models, FP32 and INT8 (and flex with fused kernels); {name: path}."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    from wa_tf import models  # pylint: disable=import-outside-toplevel
    from wa_tf.deploy import export  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    paths = {}
    for label, bits in PRECISIONS:
        for conv in ("normal", "flex"):
            name = f"{conv}-{label}" if conv == "normal" else f"flex-F{FLAGS.tile_size}-{label}"
            model = None
            for kernels_on in (False, True) if conv == "flex" and fused else (False,):
                path = os.path.join(directory, name + "-fused" * kernels_on)
                paths[name + "-fused" * kernels_on] = path
                if os.path.exists(os.path.join(path, "saved_model.pb")):
                    continue  # exported by an earlier run into --export_dir
                if model is None:
                    model = models.resnet18_like(conv, tile_size=FLAGS.tile_size,
                                                 width_multiplier=FLAGS.mult, bits=bits)
                    if bits:  # ranges from two training batches, as after (a little) training
                        for _ in range(2):
                            model(rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                                  training=True)
                export.export_saved_model(model, path, fused_kernels=kernels_on)
    return paths


def time_savedmodels(paths, batch_sizes, reps, warmup):
    """{name: {batch: median seconds}} of each SavedModel's serving_default, interleaved."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if FLAGS.op_library:
        tf.load_op_library(FLAGS.op_library)
    loaded = {name: tf.saved_model.load(path) for name, path in paths.items()}
    serve = {name: m.signatures["serving_default"] for name, m in loaded.items()}
    results = {name: {} for name in paths}
    for batch in batch_sizes:
        images = tf.constant(np.random.default_rng(batch).normal(
            size=(batch, 32, 32, 3)).astype(np.float32))
        times = {name: [] for name in paths}
        for rep in range(warmup + reps):
            for name, fn in serve.items():
                start = time.perf_counter()
                fn(images=images)["logits"].numpy()
                if rep >= warmup:
                    times[name].append(time.perf_counter() - start)
        for name in paths:
            results[name][str(batch)] = statistics.median(times[name])
    return results


def main(argv):
    del argv
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    if FLAGS.worker:
        # Served as deployed: by TensorFlow alone (wa_tf sets TF_USE_LEGACY_KERAS,
        # with which TensorFlow would import tf_keras).
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
        sys.meta_path.insert(0, _Block())
        print(json.dumps(time_savedmodels(json.loads(FLAGS.worker), batch_sizes, FLAGS.reps,
                                          FLAGS.warmup)))
        return
    with contextlib.ExitStack() as stack:
        directory = FLAGS.export_dir or stack.enter_context(tempfile.TemporaryDirectory())
        from wa_tf import kernels  # pylint: disable=import-outside-toplevel
        fused = kernels.available()
        print("exporting ...", file=sys.stderr, flush=True)
        paths = export_models(directory, fused)
        print("timing ...", file=sys.stderr, flush=True)
        worker = [sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(paths)}",
                  f"--batch_sizes={','.join(FLAGS.batch_sizes)}",
                  f"--reps={FLAGS.reps}", f"--warmup={FLAGS.warmup}"]
        if fused:
            worker.append(f"--op_library={kernels.library_path()}")
        results = common.run_worker(worker)
    if "error" in results:
        raise SystemExit(f"timing failed: {results['error']}")
    common.print_machine()
    print(f"Exported ResNet18-like (width {FLAGS.mult}, 32x32x3 input), serving_default loaded "
          f"with tf.saved_model.load (TensorFlow alone): median of {FLAGS.reps} interleaved "
          f"calls after {FLAGS.warmup} warm-up calls, in ms")
    flex = f"flex F{FLAGS.tile_size}"
    header = f"| precision | batch | normal | {flex} | {flex} / normal |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    if fused:
        header += f" {flex} fused | fused / normal |"
        rule += " ---: | ---: |"
    print(header)
    print(rule)
    for label, _ in PRECISIONS:
        for batch in batch_sizes:
            normal = results[f"normal-{label}"][str(batch)]
            winograd = results[f"flex-F{FLAGS.tile_size}-{label}"][str(batch)]
            row = (f"| {label} | {batch} | {normal * 1e3:.2f} | {winograd * 1e3:.2f} "
                   f"| {winograd / normal:.2f} |")
            if fused:
                fused_t = results[f"flex-F{FLAGS.tile_size}-{label}-fused"][str(batch)]
                row += f" {fused_t * 1e3:.2f} | {fused_t / normal:.2f} |"
            print(row)


if __name__ == "__main__":
    app.run(main)
