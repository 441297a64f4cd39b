#!/usr/bin/env python
"""ncnn's int8 3x3 convolution as a benchmark peer (pip package ``ncnn``, optional).

The layer is ncnn's own int8 inference path: a ``Convolution`` with
``int8_scale_term=1`` whose weights are stored as int8 in the model bin, run with
``opt.use_int8_inference``.  The bin is written as ncnn's ``Convolution::load_model``
reads it (src/layer/convolution.cpp, src/modelbin.cpp):

1. weights, ``mb.load(size, 0)``: the uint32 tag ``0x000D4B38`` (int8 data), then
   the int8 weights [out][in][ky][kx], zero-padded to a multiple of 4 bytes;
2. bias, ``mb.load(num_output, 1)``: raw float32, no tag;
3. ``weight_data_int8_scales``: num_output raw float32 (q = round(w * scale));
4. ``bottom_blob_int8_scales``: 1 raw float32 (the input's scale).

With ``int8_scale_term <= 100`` there is no top scale, so the output is float32
(int32 sums dequantized with 1 / (s_in * s_w[p]), plus bias); the float32 input
is quantized inside the layer (round, clamp to +-127).  Both costs are in the time.

On x86, ``Convolution_x86::create_pipeline_int8_x86`` picks for a 3x3 s1 layer with
more than 8 channels: Winograd F(4,3) if ``use_winograd_convolution`` and
``use_winograd43_convolution``, F(2,3) if only ``use_winograd23_convolution``, else
the im2col GEMM (``use_sgemm_convolution``); no shape heuristic applies to int8.

Example:
  bench/ncnn_peer.py          # checks the width-0.5 shapes, then times both widths
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved_ms, machine_lines  # noqa: E402

PATHS = {"4": 4, "2": 2, "g": False}  # conv_int8's winograd argument per path: F(4,3), F(2,3), GEMM
_INT8_TAG = 0x000D4B38  # ModelBinFromDataReader::load: "int8 data" follows


def available():
    """Whether the ``ncnn`` package imports (it is an optional peer, not a dependency)."""
    try:
        import ncnn  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def _layer(c, seed):
    """int8 weights with per-output-channel scales, a bias, and the input scale."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (c, c, 3, 3)).astype(np.float32)  # [out][in][ky][kx], ncnn's order
    w_scale = (127.0 / np.abs(w).reshape(c, -1).max(axis=1)).astype(np.float32)
    wq = np.clip(np.round(w * w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    bias = rng.normal(0, 0.1, c).astype(np.float32)
    return wq, w_scale, bias, np.float32(127.0)  # inputs in [-1, 1]


def _net(hw, c, wq, w_scale, bias, x_scale, threads, winograd):
    """An ncnn Net holding one int8 Convolution, built in memory."""
    import ncnn  # pylint: disable=import-outside-toplevel
    tile = 4 if winograd is True else int(winograd or 0)
    if tile not in (0, 2, 4):
        raise ValueError(f"winograd must be a bool, 2 or 4, not {winograd!r}")
    net = ncnn.Net()
    opt = net.opt  # options must be set before load_param to reach create_pipeline
    opt.use_vulkan_compute = False
    opt.use_int8_inference = True
    opt.use_packing_layout = True
    opt.lightmode = True
    opt.num_threads = threads
    opt.use_winograd_convolution = bool(tile)
    opt.use_winograd43_convolution = tile == 4
    opt.use_winograd23_convolution = tile == 2
    opt.use_winograd63_convolution = False  # fp32 only; off so that nothing else picks it
    opt.use_sgemm_convolution = True  # the non-Winograd int8 path: im2col + int8 GEMM
    # Param: 0=num_output 1=kernel 3=stride 4=pad 5=bias_term 6=weight_data_size 8=int8_scale_term.
    param = (f"7767517\n2 2\nInput in0 0 1 in0 0={hw} 1={hw} 2={c}\n"
             f"Convolution conv0 1 1 in0 out0 0={c} 1=3 3=1 4=1 5=1 6={wq.size} 8=1\n")
    weights = wq.tobytes() + bytes(-wq.size % 4)  # int8 blobs are padded to 4 bytes
    blob = (np.uint32(_INT8_TAG).tobytes() + weights + bias.astype("<f4").tobytes()
            + w_scale.astype("<f4").tobytes() + np.float32(x_scale).astype("<f4").tobytes())
    if net.load_param_mem(param) != 0:
        raise RuntimeError("ncnn rejected the param text")
    net.load_model_mem(blob)  # copies the bytes (DataReaderFromMemoryCopy); returns nothing
    return net


def _input(hw, c, batch, x_scale, seed):
    """float32 (batch, c, hw, hw) inputs on the int8 grid, so ncnn's rounding is unambiguous."""
    q = np.random.default_rng(seed + 1).integers(-127, 128, (batch, c, hw, hw))
    return q.astype(np.int32), (q / x_scale).astype(np.float32)


def _mat(x):
    """An ncnn Mat of x (batch, c, h, w): one image, or a batch riding in Mat.n."""
    import ncnn  # pylint: disable=import-outside-toplevel
    return ncnn.Mat(x[0]) if len(x) == 1 else ncnn.Mat(x, batch_index=0)


def _forward(net, x, unpack, mat=None):
    """One forward of x (batch, c, h, w); unpack=False leaves ncnn's packed output as is."""
    import ncnn  # pylint: disable=import-outside-toplevel
    if len(x) > 1 and not hasattr(ncnn.Mat, "n"):  # ncnn before NCNN_BATCH (July 2026)
        return [_forward(net, image[None], unpack) for image in x]
    ex = net.create_extractor()  # fresh each call: an extractor caches the blobs it computed
    # A batched Mat makes Net run a layer without support_batch once per image.
    ex.input("in0", _mat(x) if mat is None else mat)
    ret, out = ex.extract("out0", 0 if unpack else 1)
    if ret != 0:
        raise RuntimeError(f"ncnn extract failed: {ret}")
    return out


def conv_int8(hw, c, batch=1, threads=1, winograd=True, seed=0):
    """A zero-arg callable running one int8 3x3 'same' convolution C -> C in ncnn.

    Args:
      hw: input height and width.
      c: input and output channels.
      batch: images per call; ncnn's layers are batch-1: a batched Mat (Mat.n, ncnn
        since July 2026) makes its Net run the layer once per image and copy each
        result into one batched output (older ncnn: one extractor per image).
      threads: ncnn's num_threads (fixed at load time: ncnn keeps its GEMM tiling).
      winograd: True or 4 for Winograd F(4,3), 2 for F(2,3), False for im2col GEMM.
      seed: seeds the weights and the input.

    Returns:
      ``run()``: one forward of a float32 (batch, c, hw, hw) input to a float32 output
      (dequantized with bias, left in ncnn's packed layout, e.g. pack8 on AVX2).
      The float -> int8 input quantization and the dequantization are included.
    """
    wq, w_scale, bias, x_scale = _layer(c, seed)
    net = _net(hw, c, wq, w_scale, bias, x_scale, threads, winograd)
    _, x = _input(hw, c, batch, x_scale, seed)
    import ncnn  # pylint: disable=import-outside-toplevel
    mat = _mat(x) if len(x) == 1 or hasattr(ncnn.Mat, "n") else None  # built once, not timed

    def run():
        return _forward(net, x, unpack=False, mat=mat)

    run.net = (net, mat, x)  # keeps the Net and the input alive with the closure
    return run


def _reference_int32(xq, wq):
    """Exact int32 sums of a 3x3 'same' convolution: xq (c, h, w), wq (o, c, 3, 3)."""
    c, h, w = xq.shape
    padded = np.pad(xq.astype(np.int64), ((0, 0), (1, 1), (1, 1)))
    acc = np.zeros((wq.shape[0], h * w), np.int64)
    for ky in range(3):
        for kx in range(3):
            patch = padded[:, ky:ky + h, kx:kx + w].reshape(c, -1)
            acc += wq[:, :, ky, kx].astype(np.int64) @ patch
    return acc.reshape(-1, h, w)


def check(hw, c, winograd=True, seed=0):
    """Asserts ncnn's output matches a numpy int8 reference; prints one line.

    The reference dequantizes exact int32 sums of the same int8 input and weights.
    It must match within 2% of max |output|, and a reference with the weights'
    in/out channels swapped must not, so that the check can fail.  All three paths
    sum exactly on such data, so the path is told apart by a saturating probe: with
    every input and weight at 127, F(4,3)'s int32 holds 576x the sum and wraps once
    that passes 2**31 (C >= 26); F(2,3) (4x) and the GEMM stay exact.
    """
    wq, w_scale, bias, x_scale = _layer(c, seed)
    net = _net(hw, c, wq, w_scale, bias, x_scale, 1, winograd)
    xq, x = _input(hw, c, 1, x_scale, seed)
    got = np.array(_forward(net, x, unpack=True)).reshape(c, hw, hw)
    scale_in = (1.0 / (x_scale * w_scale.astype(np.float64)))[:, None, None]
    acc = _reference_int32(xq[0], wq)
    want = acc * scale_in + bias[:, None, None]
    wrong = _reference_int32(xq[0], wq.transpose(1, 0, 2, 3)) * scale_in + bias[:, None, None]
    tol = 0.02 * np.abs(want).max()
    err, err_wrong = np.abs(got - want).max(), np.abs(got - wrong).max()
    full = np.full((c, c, 3, 3), 127, np.int8)
    probe = _net(hw, c, full, np.ones(c, np.float32), np.zeros(c, np.float32), x_scale, 1,
                 winograd)
    sat = np.array(_forward(probe, np.ones((1, c, hw, hw), np.float32), unpack=True))
    sat_want = _reference_int32(np.full((c, hw, hw), 127), full) / x_scale
    wraps = not np.allclose(sat.reshape(c, hw, hw), sat_want, rtol=1e-5)
    print(f"ncnn int8 {hw}x{hw}x{c} winograd={winograd}: max err {err:.2e} "
          f"(tol {tol:.2e}, transposed weights {err_wrong:.2e}); saturated probe "
          f"{'wraps: F(4,3) ran' if wraps else 'exact'}", flush=True)
    assert err <= tol, f"ncnn differs from the reference: {err} > {tol}"
    assert err_wrong > tol, "the check cannot tell transposed weights apart"
    return err, wraps


def time_paths(hw, c, batch=1, threads=1, reps=200, warmup=20):
    """Median ms of each path of :data:`PATHS` on one layer, timed in turns."""
    calls = {name: conv_int8(hw, c, batch, threads, winograd=path) for name, path in PATHS.items()}
    return interleaved_ms(calls, reps, warmup)


def main():
    """Checks the width-0.5 shapes, then times every path at both widths (1 thread)."""
    # pylint: disable=import-outside-toplevel
    from bench.winograd_int8_bench import BASE_SHAPES, shapes
    if not available():
        print("ncnn is not installed (pip install ncnn)")
        return
    print(*machine_lines(), sep="\n")
    for hw, c in shapes(0.5):
        for path in PATHS.values():
            check(hw, c, path)
    print(f"{'layer':<12}{'ncnn_f43':>10}{'ncnn_f23':>10}{'ncnn_gemm':>10}  (ms, median of 200)")
    for hw, c in shapes(0.5) + list(BASE_SHAPES):
        ms = time_paths(hw, c)
        print(f"{f'{hw}x{hw}x{c}':<12}" + "".join(f"{ms[name]:>10.3f}" for name in PATHS),
              flush=True)


if __name__ == "__main__":
    main()
