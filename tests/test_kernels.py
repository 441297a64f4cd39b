"""wa_tf.kernels: the fused tile kernels against numpy, their adjoint identity and gradients."""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from wa_tf import kernels, transforms
from wa_tf.layers import WinogradConv2D, WinogradQuantization
from wa_tf.machine import cpu_flags

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"fused kernels unavailable: {kernels.unavailable_reason()}")


def _numpy_tiles(x, mat, stride, pad_top, pad_left, n_h, n_w):
    """Independent reference: the tiles cut from a zero-padded copy, transformed one by one."""
    n, h, w, c = x.shape
    p, q = mat.shape
    big = np.zeros((n, pad_top + h + n_h * stride + q, pad_left + w + n_w * stride + q, c))
    big[:, pad_top:pad_top + h, pad_left:pad_left + w] = x
    z = np.zeros((p * p, n * n_h * n_w, c))
    for img in range(n):
        for th in range(n_h):
            for tw in range(n_w):
                tile = big[img, th * stride:th * stride + q, tw * stride:tw * stride + q]
                out = np.einsum("ai,ijc,bj->abc", mat, tile, mat)
                z[:, (img * n_h + th) * n_w + tw] = out.reshape(p * p, c)
    return z


# (x shape, mat shape, stride, pad_top, pad_left, n_h, n_w): overlapping tiles (stride < q),
# disjoint ones, tiles past the image, channel counts with and without a partial block.
GEOMETRIES = [
    ((2, 10, 9, 5), (6, 6), 4, 1, 1, 3, 3),
    ((1, 7, 8, 70), (4, 4), 2, 0, 0, 3, 3),
    ((3, 8, 8, 64), (6, 4), 4, 0, 0, 2, 2),
    ((2, 9, 11, 32), (8, 8), 6, 2, 1, 2, 2),
    ((1, 5, 5, 17), (3, 5), 3, 2, 0, 2, 1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,mat_shape,stride,pad_top,pad_left,n_h,n_w", GEOMETRIES)
def test_tile_transform_matches_numpy(shape, mat_shape, stride, pad_top, pad_left, n_h, n_w,
                                      dtype):
    rng = np.random.default_rng(sum(shape))
    x, mat = rng.normal(size=shape), rng.normal(size=mat_shape)
    z = kernels.tile_transform(tf.constant(x, dtype), tf.constant(mat, dtype), stride,
                               pad_top, pad_left, n_h, n_w)
    assert z.dtype == dtype
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(z, _numpy_tiles(x, mat, stride, pad_top, pad_left, n_h, n_w),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,mat_shape,stride,pad_top,pad_left,n_h,n_w", GEOMETRIES)
def test_adjoint_identity(shape, mat_shape, stride, pad_top, pad_left, n_h, n_w):
    # <T(x), z> == <x, T*(z)> for the tile transform T and its adjoint T*.
    rng = np.random.default_rng(len(shape) + stride)
    x, mat = rng.normal(size=shape), rng.normal(size=mat_shape)
    p = mat_shape[0]
    z = rng.normal(size=(p * p, shape[0] * n_h * n_w, shape[3]))
    tx = kernels.tile_transform(tf.constant(x), tf.constant(mat), stride, pad_top, pad_left,
                                n_h, n_w)
    tz = kernels.tile_transform_adjoint(tf.constant(z), tf.constant(mat), stride, pad_top,
                                        pad_left, n_h, n_w, shape[1], shape[2])
    assert tz.shape == shape
    np.testing.assert_allclose(np.sum(tx.numpy() * z), np.sum(x * tz.numpy()), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("code_dtype", [np.int8, np.int16])
@pytest.mark.parametrize("steps", [1, "per position"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[2]])
def test_adjoint_backprop_decodes_codes_as_from_codes(dtype, code_dtype, steps, geometry):
    # Codes decoded tile by tile inside the kernel: the adjoint's registered gradient at
    # z = from_codes(codes, scale), dz and dmat bit for bit (dmat's per-thread parts are
    # added in a fixed order).
    shape, mat_shape, stride, pad_top, pad_left, n_h, n_w = geometry
    p = mat_shape[0]
    rng = np.random.default_rng(p + stride)
    info = np.iinfo(code_dtype)
    codes = rng.integers(info.min, info.max, size=(p * p, shape[0] * n_h * n_w, shape[3]),
                         endpoint=True).astype(code_dtype)
    scale = rng.uniform(0.01, 0.1, size=1 if steps == 1 else p * p).astype(dtype)
    mat = tf.constant(rng.normal(size=mat_shape).astype(dtype))
    dx = tf.constant(rng.normal(size=shape).astype(dtype))
    geo = (stride, pad_top, pad_left, n_h, n_w)
    z = kernels.from_codes(tf.constant(codes), tf.constant(scale.reshape(-1, 1, 1)))
    with tf.GradientTape() as tape:
        tape.watch([z, mat])
        x = kernels.tile_transform_adjoint(z, mat, *geo, shape[1], shape[2])
    want = tape.gradient(x, [z, mat], output_gradients=dx)
    got = kernels.tile_transform_adjoint_backprop(dx, tf.constant(codes), tf.constant(scale),
                                                  mat, *geo)
    assert got[0].dtype == dtype and got[0].shape == z.shape and got[1].shape == mat.shape
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
    assert np.abs(got[1].numpy()).max() > 0
    message = rf"scale must have 1 value or one per index of codes's first axis \({p * p}\), got 2"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        kernels.tile_transform_adjoint_backprop(dx, tf.constant(codes),
                                                tf.constant(scale[:1].repeat(2)), mat, *geo)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("code_dtype", [np.int8, np.int16])
@pytest.mark.parametrize("steps", [1, "per position"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_adjoint_of_codes_equals_the_adjoint_of_the_decoded_values(dtype, code_dtype, steps,
                                                                   geometry):
    # Every geometry: overlapping, disjoint and cropped tiles, partial channel blocks.
    shape, mat_shape, stride, pad_top, pad_left, n_h, n_w = geometry
    p = mat_shape[0]
    rng = np.random.default_rng(p * stride + shape[3])
    info = np.iinfo(code_dtype)
    codes = rng.integers(info.min, info.max, size=(p * p, shape[0] * n_h * n_w, shape[3]),
                         endpoint=True).astype(code_dtype)
    scale = rng.uniform(0.01, 0.1, size=1 if steps == 1 else p * p).astype(dtype)
    mat = tf.constant(rng.normal(size=mat_shape).astype(dtype))
    geo = (stride, pad_top, pad_left, n_h, n_w, shape[1], shape[2])
    # Decoded with numpy, independently of the kernels' own decoding.
    z = codes.astype(dtype) * scale.reshape(-1, 1, 1)
    want = kernels.tile_transform_adjoint(tf.constant(z), mat, *geo)
    got = kernels.tile_transform_adjoint_codes(tf.constant(codes), tf.constant(scale), mat, *geo)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert np.abs(got.numpy()).max() > 0
    message = rf"scale must have 1 value or one per index of codes's first axis \({p * p}\), got 2"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        kernels.tile_transform_adjoint_codes(tf.constant(codes), tf.constant(scale[:1].repeat(2)),
                                             mat, *geo)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[4]])
def test_gradients_match_finite_differences(adjoint, geometry):
    shape, mat_shape, stride, pad_top, pad_left, n_h, n_w = geometry
    shape = (1,) + shape[1:3] + (3,)  # few channels: the numeric Jacobian stays small
    rng = np.random.default_rng(7)
    mat = tf.constant(rng.normal(size=mat_shape))
    p = mat_shape[0]
    if adjoint:
        arg = tf.constant(rng.normal(size=(p * p, n_h * n_w, 3)))
        fn = lambda z, m: kernels.tile_transform_adjoint(  # noqa: E731
            z, m, stride, pad_top, pad_left, n_h, n_w, shape[1], shape[2])
    else:
        arg = tf.constant(rng.normal(size=shape))
        fn = lambda x, m: kernels.tile_transform(x, m, stride, pad_top, pad_left,  # noqa: E731
                                                 n_h, n_w)
    theoretical, numerical = tf.test.compute_gradient(fn, [arg, mat])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise():
    x = tf.zeros((1, 4, 4, 2))
    with pytest.raises(tf.errors.InvalidArgumentError, match="at most|between 1 x 1 and 16"):
        kernels.tile_transform(x, tf.eye(17), 2, 0, 0, 1, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of n_h"):
        kernels.tile_transform_adjoint(tf.zeros((16, 3, 2)), tf.eye(4), 2, 0, 0, 2, 2, 4, 4)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="rank|4-D"):
        kernels.tile_transform(x[0], tf.eye(4), 2, 0, 0, 2, 2)


def test_layer_uses_the_kernels_and_xla_does_not():
    x = tf.random.stateless_normal((2, 8, 8, 3), seed=(1, 2))
    kernel = tf.random.stateless_normal((3, 3, 3, 4), seed=(1, 3))
    a_t, b_t, g = (tf.constant(v, tf.float32) for v in transforms.winograd_matrices(4, 3))
    from wa_tf.layers import winograd_conv  # pylint: disable=import-outside-toplevel

    def op_types(jit):
        fn = tf.function(lambda: winograd_conv(x, kernel, a_t, b_t, g, 4), jit_compile=jit)
        return {op.type for op in fn.get_concrete_function().graph.get_operations()}
    assert {"WaTileTransform", "WaTileTransformAdjoint"} <= op_types(False)
    assert not {"WaTileTransform", "WaTileTransformAdjoint"} & op_types(True)
    # Transforms larger than the kernels take (t = 17) run in TensorFlow ops.
    # (Any matrices of these shapes: only the graph's ops are looked at.)
    a17, b17, g17 = (tf.random.stateless_normal(shape, seed=(1, 4))
                     for shape in ((15, 17), (17, 17), (17, 3)))
    big = tf.function(lambda: winograd_conv(x, kernel, a17, b17, g17, 15))
    assert "WaTileTransform" not in {
        op.type for op in big.get_concrete_function().graph.get_operations()}
    assert big().shape == (2, 8, 8, 4)
    with kernels.disabled():
        assert not kernels.available()
        assert "WaTileTransform" not in op_types(False)


@pytest.mark.parametrize("flex", [True, False])
def test_a_quantized_layer_reads_m_as_codes_inside_the_kernels(flex):
    # The output transform, and a flex layer's A_t gradient, read M's int8 codes
    # directly: M is quantized to codes alone, never to float values
    # (tests/test_quantization.py compares the values with the pure-TF pipeline's).
    x = tf.random.stateless_normal((2, 9, 9, 3), seed=(8, 1))
    layer = WinogradConv2D(4, tile_size=4, flex=flex, quantization=WinogradQuantization(8))
    layer(x)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return tape.gradient(loss, layer.trainable_weights)
    ops = [op.type for op in step.get_concrete_function().graph.get_operations()]
    assert ("WaTileTransformAdjointGradCodes" in ops) == flex
    assert "WaTileTransformAdjointGrad" not in ops
    assert ops.count("WaTileTransformAdjointCodes") == 1 and ops.count("WaQuantize") == 1
    assert ops.count("WaFakeQuantCodes") == 1  # U's, kept for dV = dM U^T
    assert all(g is not None for g in step())


@pytest.mark.parametrize("flex", [True, False])
@pytest.mark.parametrize("per_tap", [False, True])
def test_a_quantized_layer_matches_the_pure_tf_pipeline(flex, per_tap):
    # Two training steps (tiles past the image, a partial channel block): output, every
    # gradient and the quantizers' state as the pure-TF pipeline computes them.
    batches = [tf.random.stateless_normal((2, 10, 9, 5), seed=(5, i)) * (i + 1)
               for i in range(2)]
    results, initial = [], None
    for context in (contextlib.nullcontext, kernels.disabled):
        layer = WinogradConv2D(6, tile_size=4, flex=flex,
                               quantization=WinogradQuantization(8, per_tap=per_tap))
        layer(batches[0])
        initial = initial or layer.get_weights()
        layer.set_weights(initial)
        with context():
            for x in batches:
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=True)
                    loss = tf.reduce_sum(y ** 2)
                grads = tape.gradient(loss, [x] + layer.trainable_weights)
        results.append([y] + grads + layer.non_trainable_weights)
    for got, want in zip(*results):
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert not np.array_equal(results[0][-1], initial[-1])  # the ranges moved


def _run_python(code, timeout, **env):
    """Runs `code` in a fresh interpreter, `env` added to the environment; it must succeed."""
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                            capture_output=True, text=True, check=False, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_without_a_compiler_the_layer_falls_back(tmp_path):
    # A fresh cache and a compiler that fails: one warning, the pure-TF pipeline, same values.
    code = (
        "import numpy as np, tensorflow as tf\n"
        "from wa_tf import kernels\n"
        "from wa_tf.layers import WinogradConv2D\n"
        "assert not kernels.available() and 'failed' in kernels.build_error()\n"
        "layer = WinogradConv2D(4, tile_size=4)\n"
        "x = tf.random.stateless_normal((2, 9, 7, 3), seed=(3, 4))\n"
        "np.testing.assert_allclose(layer(x), tf.nn.conv2d(x, layer.kernel, 1, 'SAME'),"
        " rtol=1e-4, atol=1e-4)\n"
        "try:\n"
        "    kernels.tile_transform(x, tf.eye(6), 4, 1, 1, 3, 2)\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable here: compiling' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('a direct call did not raise')\n"
        "print('fallback ok')\n")
    result = _run_python(code, 300, WA_TF_CACHE=str(tmp_path), CXX="false")
    assert "fallback ok" in result.stdout
    assert "fused Winograd kernels unavailable" in result.stderr
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.slow  # a build of its own, a few minutes
@pytest.mark.skipif("avx2" not in cpu_flags() or "fma" not in cpu_flags(),
                    reason="an x86-64-v3 (AVX2 + FMA) build needs such a CPU to run")
def test_a_build_for_another_target_computes_the_same(tmp_path):
    # WA_TF_KERNELS_MARCH=x86-64-v3: another library (AVX2 vectors where the CPU at
    # hand may have AVX-512), whose layer gradients match the pure-TF pipeline's.
    code = (
        "import numpy as np, tensorflow as tf\n"
        "from wa_tf import kernels\n"
        "from wa_tf.layers import WinogradConv2D\n"
        "assert kernels.available(), kernels.build_error()\n"
        "assert kernels.target() == 'x86-64-v3'\n"
        "print(kernels.library_path())\n"
        "layer = WinogradConv2D(24, tile_size=4, flex=True)\n"
        "x = tf.random.stateless_normal((2, 12, 10, 20), seed=(5, 6))\n"
        "def grads():\n"
        "    with tf.GradientTape() as tape:\n"
        "        tape.watch(x)\n"
        "        y = layer(x)\n"
        "        loss = tf.reduce_sum(y * tf.sin(y))\n"
        "    return [y] + tape.gradient(loss, [x] + layer.trainable_weights)\n"
        "fused = grads()\n"
        "with kernels.disabled():\n"
        "    plain = grads()\n"
        "for a, b in zip(fused, plain):\n"
        "    scale = float(tf.reduce_max(tf.abs(b)))\n"
        "    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * scale)\n"
        "print('target ok')\n")
    result = _run_python(code, 600, WA_TF_CACHE=str(tmp_path), WA_TF_KERNELS_MARCH="x86-64-v3")
    assert "target ok" in result.stdout
    built = result.stdout.split()[0]
    assert os.path.dirname(built) == str(tmp_path)
    assert os.path.basename(built) != os.path.basename(kernels.library_path())


def test_a_malformed_target_is_one_clear_line(tmp_path):
    env = dict(os.environ, WA_TF_CACHE=str(tmp_path), WA_TF_KERNELS_MARCH="x86 -O0")
    result = subprocess.run([sys.executable, "-m", "wa_tf.kernels"], env=env,
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 1
    assert ("WA_TF_KERNELS_MARCH='x86 -O0' is not a compiler target: give a -march value"
            in result.stderr.splitlines()[-1])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("quantized", [None, "per_tensor", "per_tap"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[3]])
def test_weight_grad_matches_the_product_with_v(geometry, quantized):
    from wa_tf.quantization import quantizers  # pylint: disable=import-outside-toplevel
    shape, mat_shape, stride, pad_top, pad_left, n_h, n_w = geometry
    rng = np.random.default_rng(11)
    x = tf.constant(rng.normal(size=shape))
    mat = tf.constant(rng.normal(size=(mat_shape[1], mat_shape[1])))  # a square input transform
    args = (stride, pad_top, pad_left, n_h, n_w)
    v = kernels.tile_transform(x, mat, *args)
    dm = tf.constant(rng.normal(size=(v.shape[0], v.shape[1], 6)))
    kwargs = {}
    if quantized:
        axes = [1, 2] if quantized == "per_tap" else None
        range_ = tf.reduce_max(tf.abs(v), axis=axes, keepdims=quantized == "per_tap") * 0.7
        v = quantizers.fake_quant(v, range_, 6)  # 0.7: some values clip
        qmin, qmax = quantizers.code_limits(6)
        kwargs = {"scale": quantizers.quant_scale(range_, 6, tf.float64), "qmin": qmin,
                  "qmax": qmax}
    du = kernels.tile_transform_weight_grad(x, mat, dm, *args, **kwargs)
    np.testing.assert_allclose(du, tf.matmul(v, dm, transpose_a=True), rtol=1e-12, atol=1e-12)
