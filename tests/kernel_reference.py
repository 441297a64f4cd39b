"""The fused kernels' layer against the pure-TF pipeline, at one intra-op thread count.

Run by tests/test_kernels_reference.py in a fresh interpreter per thread count
(TensorFlow fixes its thread pools when it starts): ``python kernel_reference.py
THREADS``.  Prints one line per case and exits 1 if any output or gradient is
off, or if the fused run is not bit-identical when repeated.

Every F(m, 3) with m = 2, 4, 6 (the kernels' specialised sizes 4/2, 6/4, 8/6 and
their transform-gradient paths), static and flex, float32 and float64,
unquantized, per-tensor and per-tap INT8, on odd sizes (a partial channel
block, tiles past the image) with 'same' and 'valid' padding.

Tolerances: ``2 γ_n Σ|terms|``, as tests/float_bounds.py derives them.  Quantized
pipelines run in float64 only, where a rounding decision flipped by summation
order has a chance of about 1e-13 per value; in float32 such flips are expected
on some CPUs, and the quantization stages themselves are checked bit for bit in
tests/test_kernels.py.
"""
import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))

from wa_tf import kernels  # noqa: E402
from wa_tf.layers import WinogradConv2D, WinogradQuantization  # noqa: E402

from float_bounds import abs_terms, chain_length, error_ratio, short_name  # noqa: E402

SHAPE, FILTERS = (2, 11, 9, 5), 7


def _run(layer, x, cotangent):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * cotangent)  # linear: the gradients see the cotangent only
    return [y] + tape.gradient(loss, [x] + layer.trainable_weights)


def check(m, flex, dtype, quantization, padding):
    """Returns the mismatches of one case (empty when it passes) and the largest error / bound."""
    rng = np.random.default_rng(m * 10 + flex)
    x = tf.constant(rng.normal(size=SHAPE), dtype)
    layer = WinogradConv2D(FILTERS, tile_size=m, flex=flex, padding=padding,
                           quantization=quantization, dtype=dtype)
    layer(x)
    initial = layer.get_weights()
    cotangent = tf.constant(rng.normal(size=layer(x).shape), dtype)
    runs = []
    # Pure TF, then the kernels twice.
    for context in (kernels.disabled, contextlib.nullcontext, contextlib.nullcontext):
        layer.set_weights(initial)
        with context():
            runs.append(_run(layer, x, cotangent))
    plain, fused, again = runs
    terms = abs_terms(layer, x, cotangent)
    n = chain_length(layer, SHAPE)
    names = ["y", "x"] + [short_name(v) for v in layer.trainable_weights]
    bounds = [terms[name] for name in names]
    errors, largest = [], 0.0
    for name, a, b, again_, bound in zip(names, fused, plain, again, bounds):
        worst = error_ratio(a, b, bound, n, dtype, normwise=quantization is not None)
        largest = max(largest, worst)
        if worst > 1:
            errors.append(f"{name}: |fused - pure TF| reaches {worst:.3g}x the bound")
        if not np.array_equal(np.asarray(again_), np.asarray(a)):
            errors.append(f"{name}: two fused runs differ")
        if np.abs(np.asarray(b)).max() == 0:
            errors.append(f"{name}: all zero (nothing compared)")
    return errors, largest


def main():
    if not kernels.available():
        print(f"kernels unavailable: {kernels.unavailable_reason()}")
        return 1
    failed = 0
    cases = [(m, flex, dtype, None, padding)
             for m in (2, 4, 6) for flex in (True, False) for dtype in (tf.float32, tf.float64)
             for padding in (("same", "valid") if m == 4 else ("same",))]
    cases += [(m, flex, tf.float64, WinogradQuantization(8, per_tap=per_tap), "same")
              for m in (2, 4, 6) for flex in (True, False) for per_tap in (False, True)]
    for case in cases:
        errors, largest = check(*case)
        m, flex, dtype, quantization, padding = case
        label = (f"F{m} {'flex' if flex else 'static'} {dtype.name} {padding} "
                 f"{quantization.get_config() if quantization else 'float'}")
        print(f"{'FAIL' if errors else 'ok'}: {label} (largest error {largest:.1e} of its bound)"
              + "".join(f"\n  {e}" for e in errors))
        failed += bool(errors)
    print(f"{len(cases) - failed} passed, {failed} failed at {sys.argv[1]} threads")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
