"""Forward+backward time and peak memory of WinogradConv2D against tf.nn.conv2d.

For each stage shape of the ResNet-18-like model (width 0.5, batch 64) and
each of F2/F4/F6 x static/flex, measures in one process the median time of a
forward+backward step (gradients for the input and every trainable weight)
and the peak memory the step allocates, and prints both as ratios to a direct
convolution with the same shapes measured in the same run.  Rows marked
``fwd`` time the forward pass alone (inference), as ratios to conv2d's forward.

Usage:
  python bench/layer_bench.py                    # all stages
  python bench/layer_bench.py --shapes=16x16x64  # the issue's target shape
  python bench/layer_bench.py --recompute --jit_compile
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

import wa_tf  # noqa: E402,F401
import tensorflow as tf  # noqa: E402
from wa_tf.layers import WinogradConv2D  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("shapes", ["32x32x32", "16x16x64", "8x8x128", "4x4x256"],
                  "HxWxC input shapes (filters = C), the ResNet-18-like stages at width 0.5.")
flags.DEFINE_list("tiles", ["2", "4", "6"], "Tile sizes m of F(m x m, 3 x 3).")
flags.DEFINE_integer("repeats", 20, "Timed steps per configuration (after 3 warm-up steps).")
flags.DEFINE_bool("jit_compile", False, "Also time XLA-compiled steps.")
flags.DEFINE_bool("recompute", False, "Also time recompute=True (gradient checkpointing).")
flags.DEFINE_bool("forward", True, "Also time forward-only (inference) steps.")

_DEVICE = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


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


def measure(layer_fn, variables, x, jit=False, forward=False):
    """Returns (median seconds, peak bytes above the pre-step level) of fwd+bwd (or fwd)."""
    step = _forward_fn(layer_fn, x, jit) if forward else _step_fn(layer_fn, variables, x, jit)
    for _ in range(3):
        out = step()
    _ = [o.numpy() for o in out]
    tf.config.experimental.reset_memory_stats(_DEVICE)
    base = tf.config.experimental.get_memory_info(_DEVICE)["current"]
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        out = step()
        _ = out[0].numpy()  # synchronise
        times.append(time.perf_counter() - t0)
    peak = tf.config.experimental.get_memory_info(_DEVICE)["peak"] - base
    return float(np.median(times)), peak


def main(argv):
    del argv
    print(f"device {_DEVICE}, batch {FLAGS.batch_size}, median of {FLAGS.repeats} fwd+bwd steps")
    header = f"{'input':>14} {'layer':>18} {'ms':>8} {'x conv':>7} {'MiB':>8} {'x conv':>7}"
    print(header)
    print("-" * len(header))
    variants = [("", False, False, False)]
    if FLAGS.forward:
        variants.append((" fwd", False, False, True))
    if FLAGS.jit_compile:
        variants.append((" xla", True, False, False))
    if FLAGS.recompute:
        variants.append((" recompute", False, True, False))
    for shape in FLAGS.shapes:
        h, w, c = (int(v) for v in shape.split("x"))
        x = tf.random.normal((FLAGS.batch_size, h, w, c))
        kernel = tf.Variable(tf.random.normal((3, 3, c, c)) * 0.05)
        conv = {}  # forward-only? -> (seconds, bytes) of the direct convolution
        for forward in sorted({v[3] for v in variants}):
            conv[forward] = measure(lambda z: tf.nn.conv2d(z, kernel, 1, "SAME"), [kernel], x,
                                    forward=forward)
            name = "tf.nn.conv2d" + (" fwd" if forward else "")
            print(f"{shape:>14} {name:>18} {conv[forward][0] * 1e3:8.2f} {1.0:7.2f} "
                  f"{conv[forward][1] / 2**20:8.1f} {1.0:7.2f}")
        for m in (int(v) for v in FLAGS.tiles):
            for flex in (False, True):
                for suffix, jit, recompute, forward in variants:
                    layer = WinogradConv2D(c, tile_size=m, flex=flex, recompute=recompute)
                    layer.build(x.shape)
                    t, mem = measure(layer, layer.trainable_variables, x, jit, forward)
                    conv_t, conv_m = conv[forward]
                    name = f"F{m} {'flex' if flex else 'static'}{suffix}"
                    print(f"{shape:>14} {name:>18} {t * 1e3:8.2f} {t / conv_t:7.2f} "
                          f"{mem / 2**20:8.1f} {mem / max(conv_m, 1):7.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
