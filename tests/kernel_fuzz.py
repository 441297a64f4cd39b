"""Calls every fused-kernel op with bad and extreme attributes and shapes.

Usage: ``python kernel_fuzz.py SEED [CASES]``.

Run by tests/test_kernels_fuzz.py in a process of its own, since an op that
aborts takes its process with it.  Each case is printed before it runs; a case
passes when the op returns or raises a TensorFlow error (or, for attributes
the Python wrapper refuses, TypeError/ValueError).  The last line says how many
cases ran.
"""
import itertools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from wa_tf.kernels.dispatch import ops  # noqa: E402

INTS = [-(2 ** 31), -7, -1, 0, 1, 2, 3, 4, 6, 17, 2 ** 24, 2 ** 31 - 1]
DIMS = [0, 1, 2, 3, 5, 16, 17]
FLOATS = [-1e30, -129.0, -128.0, -1.0, 0.0, 1.0, 127.0, 255.0, 32768.0, float("nan"),
          float("inf")]
GEO = ("stride", "pad_top", "pad_left", "n_h", "n_w")


def _tensor(rng, rank, dtype=np.float32, dims=None):
    shape = [int(rng.choice(dims or DIMS)) for _ in range(rank)]
    if dtype in (np.int8, np.int16):
        return tf.constant(rng.integers(-100, 100, size=shape).astype(dtype))
    return tf.constant(rng.normal(size=shape).astype(dtype))


def _geometry(rng):
    # Mostly plausible values, sometimes extreme ones.
    return {k: int(rng.choice(INTS if rng.random() < 0.3 else [0, 1, 2, 3, 4])) for k in GEO}


def _matched_case(rng, library):
    """Shapes consistent with the geometry, attributes extreme: reaches the kernels' loops."""
    p, q = (int(rng.choice([1, 2, 4, 6, 8, 17])) for _ in range(2))
    geo = _geometry(rng)
    n, c = int(rng.choice([0, 1, 2])), int(rng.choice([0, 1, 5, 17]))
    tiles = max(0, n * geo["n_h"] * geo["n_w"]) if abs(geo["n_h"] * geo["n_w"]) < 10 ** 4 else 3
    x = tf.zeros([n, int(rng.choice(DIMS)), int(rng.choice(DIMS)), c])
    mat = tf.zeros([p, q])
    z = tf.zeros([p * p, tiles, c])
    height, width = (int(rng.choice(INTS)) for _ in range(2))
    return rng.choice([
        lambda: library.wa_tile_transform(x, mat, **geo),
        lambda: library.wa_tile_transform_adjoint(z, mat, height=height, width=width, **geo),
        lambda: library.wa_tile_transform_grad(z, x, mat, height=height, width=width, **geo),
        lambda: library.wa_tile_transform_adjoint_grad(x, z, mat, **geo),
        lambda: library.wa_tile_transform_weight_grad(x, mat, z, tf.ones([1]), qmin=-128.0,
                                                      qmax=127.0, **geo),
    ])


def _random_case(rng, library):
    """Any shapes and attributes."""
    geo = _geometry(rng)
    hw = {"height": int(rng.choice(INTS)), "width": int(rng.choice(INTS))}
    q = {"qmin": float(rng.choice(FLOATS)), "qmax": float(rng.choice(FLOATS))}
    codes_dtype = rng.choice([np.int8, np.int16])
    t = lambda rank, dtype=np.float32: _tensor(rng, rank, dtype)  # noqa: E731
    r = lambda: int(rng.integers(0, 5))  # noqa: E731
    return rng.choice([
        lambda: library.wa_tile_transform(t(r()), t(r()), **geo),
        lambda: library.wa_tile_transform_adjoint(t(r()), t(r()), **hw, **geo),
        lambda: library.wa_tile_transform_adjoint_codes(t(r(), codes_dtype), t(r()), t(2), **hw,
                                                        **geo),
        lambda: library.wa_tile_transform_grad(t(r()), t(r()), t(2), **hw, **geo),
        lambda: library.wa_tile_transform_adjoint_grad(t(4), t(r()), t(2), **geo),
        lambda: library.wa_tile_transform_adjoint_grad_codes(t(4), t(3, codes_dtype), t(r()),
                                                             t(2), **geo),
        lambda: library.wa_tile_transform_weight_grad(t(r()), t(2), t(r()), t(r()), **q, **geo),
        lambda: library.wa_fake_quant(t(r()), t(r()), **q),
        lambda: library.wa_fake_quant_codes(t(r()), t(r()), Tcodes=codes_dtype, **q),
        lambda: library.wa_quantize(t(r()), t(r()), Tcodes=codes_dtype, **q),
        lambda: library.wa_min_max(t(r()), per_axis=bool(rng.integers(2))),
        lambda: library.wa_from_codes(t(r(), codes_dtype), t(r())),
    ])


def main():
    rng = np.random.default_rng(int(sys.argv[1]))
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    library = ops()
    outcomes = {"ran": 0, "refused": 0}
    for i, graph in itertools.product(range(count), (False, True)):
        case = (_matched_case if i % 2 else _random_case)(rng, library)
        print(f"case {i} ({'graph' if graph else 'eager'}): seed {sys.argv[1]}", flush=True)
        try:
            if graph:  # shape functions run while tracing
                tf.function(case).get_concrete_function()
            else:
                case()
            outcomes["ran"] += 1
        except (tf.errors.OpError, TypeError, ValueError):
            outcomes["refused"] += 1
    print(f"all {2 * count} cases ran: {outcomes['ran']} computed, {outcomes['refused']} "
          "refused with an error", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
