#!/usr/bin/env python
"""The fused kernels' fake quantization against TensorFlow's ops, and one memory pass.

On a Winograd-domain tensor of the ResNet-18-like model's first stage (F4, batch
64, 32x32x32: shape (36, 4096, 32), 19 MB in float32), times in one process:

* ``x * s``: one elementwise TensorFlow pass (read and write the tensor), the
  floor any one-pass kernel meets on a memory-bound machine;
* ``wa_tf.quantizers.fake_quant`` and ``fake_quant_codes`` (scalar scale), with
  the fused kernel and with TensorFlow's ops (``wa_tf.kernels.disabled()``).

Each row is the median of ``--repeats`` calls of a traced function; the rows
take turns call by call, so that a load change hits them alike.

Usage:
  python bench/kernel_bench.py
  python bench/kernel_bench.py --shape=36,1024,64 --repeats=50
"""
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import wa_tf  # noqa: E402,F401
import tensorflow as tf  # noqa: E402
from wa_tf import kernels, quantizers  # noqa: E402
import common  # noqa: E402  (bench/common.py, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_list("shape", ["36", "4096", "32"], "Shape of the tensor (positions, tiles, C).")
flags.DEFINE_integer("repeats", 40, "Timed calls per row (after 3 warm-up calls).")
flags.DEFINE_integer("bits", 8, "Quantization bits.")


def main(argv):
    del argv
    try:
        shape = [int(v) for v in FLAGS.shape]
    except ValueError:
        raise app.UsageError(f"--shape must be integers, got {FLAGS.shape}") from None
    reason = kernels.unavailable_reason()
    if reason:
        raise app.UsageError(f"the fused kernels cannot run here: {reason}")
    x = tf.random.stateless_normal(shape, seed=(0, 1))
    range_ = tf.constant(3.0)
    fused = {
        "x * s (one TF pass)": tf.function(lambda: x * range_),
        "fake_quant, fused": tf.function(lambda: quantizers.fake_quant(x, range_, FLAGS.bits)),
        "fake_quant_codes, fused": tf.function(
            lambda: quantizers.fake_quant_codes(x, range_, FLAGS.bits)[:2]),
    }
    plain = {
        "fake_quant, TF ops": tf.function(lambda: quantizers.fake_quant(x, range_, FLAGS.bits)),
        "fake_quant_codes, TF ops": tf.function(
            lambda: quantizers.fake_quant_codes(x, range_, FLAGS.bits)[:2]),
    }
    # Traced in their first call: the TF rows with the kernels off.
    for fn in fused.values():
        fn()
    with kernels.disabled():
        for fn in plain.values():
            fn()
    rows = {**fused, **plain}
    times = {name: [] for name in rows}
    for rep in range(3 + FLAGS.repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            out = fn()
            _ = (out[0] if isinstance(out, (list, tuple)) else out).numpy()
            if rep >= 3:
                times[name].append(time.perf_counter() - start)
    common.print_machine()
    size_mb = x.numpy().nbytes / 2**20
    print(f"tensor {shape} float32 ({size_mb:.1f} MiB), {FLAGS.bits} bits, median of "
          f"{FLAGS.repeats} interleaved calls")
    print("| op | ms |")
    print("| --- | ---: |")
    for name in rows:
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.2f} |")


if __name__ == "__main__":
    app.run(main)
