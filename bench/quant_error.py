"""Output error of a quantized static Winograd layer against a float convolution.

For F2/F4/F6 x bit-widths x per-tensor/per-tap ranges, one WinogradConv2D with
static transforms is quantized through ``wa_tf.quantization.quantize_model``
(everything the method quantizes: input, kernel, transforms, Winograd-domain
weights and input, element-wise stage, output), its ranges are calibrated on
the batch itself (one training-mode call: the first batch sets every range),
and its inference output ``y_q`` is compared with ``y = tf.nn.conv2d`` of the
float input and kernel:

    relative error = max|y_q - y| / max|y|

Random data: standard-normal input, Glorot-uniform kernel (the layer's
default), fixed seed.

Usage:
  python bench/quant_error.py
  python bench/quant_error.py --shape=8x16x16x32 --filters=32 --bits=4,8
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from absl import app, flags  # noqa: E402

import wa_tf  # noqa: E402,F401
from wa_tf.layers import WinogradConv2D  # noqa: E402
from wa_tf.quantization import quantize_model  # noqa: E402

import common  # noqa: E402  (bench/common.py, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "8x16x16x32", "NxHxWxC input shape.")
flags.DEFINE_integer("filters", 32, "Output channels.")
flags.DEFINE_list("tiles", ["2", "4", "6"], "Tile sizes m of F(m x m, 3 x 3).")
flags.DEFINE_list("bits", ["4", "6", "8", "10", "16"], "Bit-widths.")
flags.DEFINE_integer("seed", 0, "Random seed of the data and the kernel.")


def relative_error(x, kernel, tile_size, bits, per_tap):
    """max|y_q - y| / max|y| of a quantized static F(m, 3) layer, calibrated on `x`."""
    inputs = tf_keras.Input(x.shape[1:])
    layer = WinogradConv2D(kernel.shape[-1], tile_size=tile_size, flex=False)
    model = tf_keras.Model(inputs, layer(inputs))
    layer.kernel.assign(kernel)
    qmodel = quantize_model(model, bits=bits, per_tap=per_tap, quantize_first=True)
    qmodel(x, training=True)  # the first batch sets every range
    y_q = qmodel(x, training=False)
    y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    return float(tf.reduce_max(tf.abs(y_q - y)) / tf.reduce_max(tf.abs(y)))


def main(argv):
    del argv
    n, h, w, c = (int(v) for v in FLAGS.shape.split("x"))
    rng = np.random.default_rng(FLAGS.seed)
    x = tf.constant(rng.standard_normal((n, h, w, c)), tf.float32)
    limit = np.sqrt(6.0 / (9 * c + 9 * FLAGS.filters))
    kernel = tf.constant(rng.uniform(-limit, limit, (3, 3, c, FLAGS.filters)), tf.float32)
    common.print_machine()
    print(f"input {FLAGS.shape} -> {FLAGS.filters} filters, static transforms; "
          "relative error max|y_q - y| / max|y| against float tf.nn.conv2d")
    header = "| F | ranges | " + " | ".join(f"{b} bits" for b in FLAGS.bits) + " |"
    print(header)
    print("|" + "---|" * (2 + len(FLAGS.bits)))
    for tile in FLAGS.tiles:
        for per_tap in (False, True):
            errors = [relative_error(x, kernel, int(tile), int(b), per_tap) for b in FLAGS.bits]
            tf_keras.backend.clear_session()
            cells = " | ".join(f"{e:.2e}" for e in errors)
            print(f"| F{tile} | {'per-tap' if per_tap else 'per-tensor'} | {cells} |")


if __name__ == "__main__":
    app.run(main)
