#!/usr/bin/env python
"""The fused kernels, op by op, against TensorFlow's ops and a direct convolution.

Two tables, each timed in one process with the rows taking turns call by call (so
that a load change hits them alike), median of ``--repeats`` calls:

1. Fake quantization, on a Winograd-domain tensor of the ResNet-18-like model's
   first stage (F4, batch 64, 32x32x32: shape (36, 4096, 32), 19 MB in float32):
   ``x * s`` (one elementwise TensorFlow pass, read and write), and
   ``wa_tf.quantization.quantizers.fake_quant`` / ``fake_quant_codes`` with the fused kernel
   and with TensorFlow's ops (``wa_tf.kernels.disabled()``).
2. The pieces of one F(m x m, 3 x 3) layer at ``--layer`` (batch ``--batch_size``,
   C filters): ``tf.nn.conv2d`` forward, the input transform, the batched GEMM
   ``V U``, the output transform, and the backward pass's ops (the output
   transform's gradient with and without the transform's own, the input
   transform's, the weights' gradient ``dU``, the GEMM ``dM U^T``), the output
   stage of a quantized layer (M fake-quantized to floats then transformed,
   against M quantized to codes that the output transform decodes), and the
   gradient of ``U = G g G^T`` for the kernel and a flex layer's G, as
   TensorFlow's matmul gradient and as :func:`wa_tf.layers.winograd_weights`
   computes it; ``--layer=4x4x256`` gives the last stage's weights).

A call's time ends when a one-element slice of its result is on the host: the
result itself stays in TensorFlow's memory (``.numpy()`` would copy it, which for
a 19 MB tensor costs more than the op).

Usage:
  python bench/kernel_bench.py
  python bench/kernel_bench.py --layer=16x16x64 --tile_size=4 --repeats=60
"""
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import wa_tf  # noqa: E402,F401
from wa_tf import kernels, layers, transforms  # noqa: E402
from wa_tf.quantization import quantizers  # noqa: E402

import common  # noqa: E402  (bench/common.py, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_list("shape", ["36", "4096", "32"],
                  "Shape of the fake-quantized tensor (positions, tiles, C).")
flags.DEFINE_string("layer", "32x32x32", "HxWxC input of the layer whose ops are timed.")
flags.DEFINE_integer("tile_size", 4, "Output tile size m of F(m x m, 3 x 3).")
flags.DEFINE_integer("batch_size", 64, "Batch size of the layer.", lower_bound=1)
flags.DEFINE_integer("repeats", 40, "Timed calls per row (after 3 warm-up calls).",
                     lower_bound=1)
flags.DEFINE_integer("bits", 8, "Quantization bits.")


def _synced(fn):
    """`fn` traced, returning one element of its (first) result: the host waits for it
    without copying the whole tensor."""
    def first_element():
        out = fn()
        out = out[0] if isinstance(out, (list, tuple)) else out
        return tf.reshape(out, [-1])[:1]
    return tf.function(first_element)


def _time(rows):
    """Median ms of each row's calls, the rows taking turns."""
    times = {name: [] for name in rows}
    for rep in range(3 + FLAGS.repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn().numpy()
            if rep >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _quantization_rows(shape):
    x = tf.random.stateless_normal(shape, seed=(0, 1))
    range_ = tf.constant(3.0)
    codes = quantizers.fake_quant_codes(x, range_, FLAGS.bits)[1]
    scale = quantizers.quant_scale(range_, FLAGS.bits)

    def min_max():
        return tf.stack([tf.reduce_min(x), tf.reduce_max(x)])

    fused = {
        "x * s (one TF pass)": _synced(lambda: x * range_),
        "fake_quant, fused": _synced(lambda: quantizers.fake_quant(x, range_, FLAGS.bits)),
        "fake_quant_codes, fused": _synced(
            lambda: quantizers.fake_quant_codes(x, range_, FLAGS.bits)[:2]),
        "min and max, fused": _synced(lambda: tf.stack(kernels.min_max(x))),
        "from_codes, fused": _synced(lambda: quantizers.from_codes(codes, scale)),
    }
    plain = {
        "fake_quant, TF ops": _synced(lambda: quantizers.fake_quant(x, range_, FLAGS.bits)),
        "fake_quant_codes, TF ops": _synced(
            lambda: quantizers.fake_quant_codes(x, range_, FLAGS.bits)[:2]),
        "min and max, TF ops": _synced(min_max),
        "from_codes, TF ops": _synced(lambda: quantizers.from_codes(codes, scale)),
    }
    # Traced in their first call: the TF rows with the kernels off.
    for fn in fused.values():
        fn()
    with kernels.disabled():
        for fn in plain.values():
            fn()
    return {**fused, **plain}


def _layer_rows(h, w, c):
    m = FLAGS.tile_size
    n = FLAGS.batch_size
    x = tf.random.stateless_normal((n, h, w, c), seed=(0, 2))
    kernel = tf.random.stateless_normal((3, 3, c, c), seed=(0, 3)) * 0.05
    a_t, b_t, g = (tf.constant(v, tf.float32) for v in transforms.winograd_matrices(m, 3))
    at_t = tf.transpose(a_t)
    geo = transforms.tile_geometry(h, w, m, 3, "same")
    tiles = (m, geo.pad_top, geo.pad_left, geo.n_h, geo.n_w)
    out_tiles = (m, 0, 0, geo.n_h, geo.n_w)
    u = layers.winograd_weights(kernel, g)
    v = kernels.tile_transform(x, b_t, *tiles)
    mm = tf.matmul(v, u)
    dy = tf.random.stateless_normal((n, geo.out_h, geo.out_w, c), seed=(0, 4))

    du = tf.random.stateless_normal(u.shape, seed=(0, 5))
    qmin, qmax = quantizers.code_limits(FLAGS.bits)
    code_dtype = tf.int8 if FLAGS.bits <= 8 else tf.int16
    m_scale = tf.reduce_max(tf.abs(mm)) / ((qmax - qmin) / 2)

    def weights_grad(transform):
        with tf.GradientTape() as tape:
            tape.watch([kernel, g])
            u = transform(kernel, g)
        return tape.gradient(u, [kernel, g], output_gradients=du)

    def tf_matmul_weights(kernel, g):  # winograd_weights with TensorFlow's matmul gradient
        t = g.shape[0]
        kron = tf.reshape(g[:, None, :, None] * g[None, :, None, :], [t * t, 9])
        return tf.reshape(tf.matmul(kron, tf.reshape(kernel, [9, -1])), u.shape)

    def output_grad():
        with tf.GradientTape() as tape:
            tape.watch([mm, at_t])
            y = kernels.tile_transform_adjoint(mm, at_t, *out_tiles, geo.out_h, geo.out_w)
        return tape.gradient(y, [mm, at_t], output_gradients=dy)

    return {
        "conv2d forward": _synced(lambda: tf.nn.conv2d(x, kernel, 1, "SAME")),
        "input transform V": _synced(lambda: kernels.tile_transform(x, b_t, *tiles)),
        "GEMMs M = V U": _synced(lambda: tf.matmul(v, u)),
        "output transform": _synced(lambda: kernels.tile_transform_adjoint(
            mm, at_t, *out_tiles, geo.out_h, geo.out_w)),
        "quantized M, then the output transform": _synced(
            lambda: kernels.tile_transform_adjoint(
                kernels.fake_quant(mm, m_scale, qmin, qmax), at_t, *out_tiles, geo.out_h,
                geo.out_w)),
        "  M's codes alone, read by the output transform": _synced(
            lambda: kernels.tile_transform_adjoint_codes(
                kernels.quantize(mm, m_scale, qmin, qmax, code_dtype), m_scale, at_t,
                *out_tiles, geo.out_h, geo.out_w)),
        "output transform gradient dM": _synced(
            lambda: kernels.tile_transform(dy, at_t, *out_tiles)),
        "  with dA_t (flex)": _synced(output_grad),
        "GEMMs dV = dM U^T": _synced(lambda: tf.matmul(mm, u, transpose_b=True)),
        "weights' gradient dU (V recomputed)": _synced(
            lambda: kernels.tile_transform_weight_grad(x, b_t, mm, *tiles)),
        "weights' transform gradient (kernel, G), TF's matmul gradient": _synced(
            lambda: weights_grad(tf_matmul_weights)),
        "  as layers.winograd_weights computes it": _synced(
            lambda: weights_grad(layers.winograd_weights)),
        "input transform gradient dx": _synced(lambda: kernels.tile_transform_backprop(
            v, x, b_t, *tiles, mat_grad=False)[0]),
        "  with dB_t (flex)": _synced(lambda: kernels.tile_transform_backprop(
            v, x, b_t, *tiles, mat_grad=True)),
    }


def _print_table(title, results):
    print(title)
    print("| op | ms |")
    print("| --- | ---: |")
    for name, ms in results.items():
        print(f"| {name} | {ms:.2f} |")


def main(argv):
    del argv
    try:
        shape = [int(v) for v in FLAGS.shape]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1:
        raise app.UsageError(f"--shape must be positive integers, got {FLAGS.shape}")
    try:
        h, w, c = (int(v) for v in FLAGS.layer.split("x"))
    except ValueError:
        h = w = c = 0
    if min(h, w, c) < 1:
        raise app.UsageError(f"--layer must be HxWxC, positive integers, e.g. 32x32x32, got "
                             f"{FLAGS.layer!r}")
    if FLAGS.tile_size not in (2, 4, 6):
        raise app.UsageError(f"--tile_size must be 2, 4 or 6, got {FLAGS.tile_size}")
    reason = kernels.unavailable_reason()
    if reason:
        raise app.UsageError(f"the fused kernels cannot run here: {reason}")
    quantization = _time(_quantization_rows(shape))
    layer = _time(_layer_rows(h, w, c))
    common.print_machine()
    size_mb = 4 * shape[0] * shape[1] * shape[2] / 2**20
    _print_table(f"fake quantization: tensor {shape} float32 ({size_mb:.1f} MiB), "
                 f"{FLAGS.bits} bits, median of {FLAGS.repeats} interleaved calls", quantization)
    print()
    _print_table(f"F{FLAGS.tile_size} layer ops at {FLAGS.batch_size}x{h}x{w}x{c} -> {c} "
                 f"filters, median of {FLAGS.repeats} interleaved calls", layer)


if __name__ == "__main__":
    app.run(main)
