#!/usr/bin/env python
"""Per-layer latency of the native INT8 Winograd kernel against the convolutions a user has.

One 3x3 stride-1 'same' convolution, C -> C channels, at the ResNet-18-like
model's shapes (width 0.5: 32x32x32, 16x16x64, 8x8x128, 4x4x256; ``--width 1``
doubles the channels), per batch size and thread count:

- ``litert_int8``: a LiteRT int8 CONV_2D (per-channel int8 weights, int8
  activations; ai-edge-litert, XNNPACK on) -- the peer a user would deploy;
- ``tf_fp32_onednn`` / ``tf_fp32_eigen``: ``tf.nn.conv2d`` in float32 in a
  ``tf.function``, with oneDNN on and off (each in a process of its own, with
  ``threads`` intra-op threads);
- ``ncnn_int8``: ncnn's int8 convolution (pip ``ncnn``, where it installs;
  :mod:`bench.ncnn_peer`), the fastest of its three int8 paths, timed in turns
  in a process of its own: Winograd F(4,3) (``4``), F(2,3) (``2``) and im2col
  GEMM (``g``); its float input is quantized and its output dequantized inside
  the layer, in the time;
- ``wa_f2`` / ``wa_f4`` / ``wa_f6``: the native kernel on a flex, per-tap 8-bit
  layer (:func:`wa_tf.deploy.native.synthetic_layer`).

LiteRT and the native kernels are timed in one process and take turns call by
call (interleaved, so that a load change hits them alike); each figure is the
median of ``--reps`` calls from Python after a warm-up.  Ratios are against
``litert_int8`` of the same row.

Examples:
  bench/winograd_int8_bench.py --quick
  bench/winograd_int8_bench.py --stages --tile_sizes 4     # where the time goes, roofline
  bench/winograd_int8_bench.py --width 0.5 1 --batch_sizes 1 8 --json=layers.json
  bench/winograd_int8_bench.py --from_json=layers.json --plot=layers.png   # redraw
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved_ms, machine_lines, run_worker  # noqa: E402

BASE_SHAPES = ((32, 64), (16, 128), (8, 256), (4, 512))  # width 1.0


def shapes(width):
    """(size, channels) of the model's 3x3 convolutions at a width multiplier."""
    return [(hw, max(1, int(round(c * width)))) for hw, c in BASE_SHAPES]


def litert_conv(hw, c, batch):
    """A LiteRT int8 CONV_2D (3x3, 'same', C -> C) from TensorFlow's converter."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.normal(0, 0.1, (3, 3, c, c)).astype(np.float32))
    bias = tf.constant(rng.normal(0, 0.1, (c,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((batch, hw, hw, c), tf.float32)])
    def conv(x):
        return tf.nn.conv2d(x, kernel, 1, "SAME") + bias

    converter = tf.lite.TFLiteConverter.from_concrete_functions([conv.get_concrete_function()],
                                                                conv)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [rng.uniform(-1, 1, (batch, hw, hw, c)).astype(np.float32)] for _ in range(4))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _litert_call(blob, threads):
    from wa_tf.deploy import litert  # pylint: disable=import-outside-toplevel
    runner = litert.interpreter(blob, threads)
    detail = runner.get_input_details()[0]
    runner.set_tensor(detail["index"], np.random.default_rng(0).integers(
        -128, 128, detail["shape"]).astype(np.int8))
    return runner.invoke


def _wa_call(tile_size, hw, c, batch, threads):
    from wa_tf.deploy import native  # pylint: disable=import-outside-toplevel
    kernel = native.winograd_layer(native.synthetic_layer(tile_size, c=c, k=c, flex=True,
                                                          per_tap=True, hw=(8, 8)))
    x = np.random.default_rng(1).integers(-128, 128, (batch, hw, hw, c)).astype(np.int8)
    return kernel.bind(x, threads), kernel.isa


def _tf_worker(cases, threads, reps, warmup):
    """Times tf.nn.conv2d float32 for each (hw, c, batch); prints one JSON line."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    out = {}
    for hw, c, batch in cases:
        x = tf.random.normal((batch, hw, hw, c))
        kernel = tf.random.normal((3, 3, c, c))
        conv = tf.function(lambda v, k=kernel: tf.nn.conv2d(v, k, 1, "SAME"))
        out[f"{hw}x{hw}x{c}/{batch}"] = interleaved_ms({"tf": lambda: conv(x).numpy()}, reps,
                                                     warmup)["tf"]
    print(json.dumps(out), flush=True)


def _worker(flag, cases, threads, reps, warmup, env):
    cmd = [sys.executable, os.path.abspath(__file__), flag, json.dumps(cases),
           "--threads", str(threads), "--reps", str(reps), "--warmup", str(warmup)]
    result = run_worker(cmd, env=env, timeout=1800)
    if "error" in result:
        raise RuntimeError(f"the {flag[2:]} failed: {result['error']}")
    return result


def _tf_times(cases, threads, reps, warmup, onednn):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1" if onednn else "0",
               TF_CPP_MIN_LOG_LEVEL="3")
    return _worker("--tf_worker", cases, threads, reps, warmup, env)


def _ncnn_worker(cases, threads, reps, warmup):
    """Times ncnn's int8 paths for each (hw, c, batch), in turns; prints one JSON line."""
    from bench import ncnn_peer  # pylint: disable=import-outside-toplevel
    print(json.dumps({f"{hw}x{hw}x{c}/{batch}": ncnn_peer.time_paths(hw, c, batch, threads,
                                                                      reps, warmup)
                      for hw, c, batch in cases}), flush=True)


def _ncnn_times(cases, threads, reps, warmup):
    """ncnn in a process of its own: its OpenMP workers spin after each call and would
    take the cores from the kernels timed next (on 2 cores, 2-thread figures doubled)."""
    return _worker("--ncnn_worker", cases, threads, reps, warmup, dict(os.environ))


def _best_ncnn(ms):
    """(ms, path) of ncnn's fastest path in `ms` ({path: ms})."""
    return min((t, name) for name, t in ms.items())


def layer_table(widths=(0.5,), tile_sizes=(2, 4, 6), batch_sizes=(1,), threads=(1, 2),
                reps=100, warmup=10, tf_peers=True, ncnn=True):
    """Measures every row; returns (rows, isa) and prints the table."""
    if ncnn:
        from bench import ncnn_peer  # pylint: disable=import-outside-toplevel
        ncnn = ncnn_peer.available()
        if not ncnn:
            print("ncnn is not installed (pip install ncnn): its column is left out")
    cases = [(hw, c, batch) for width in widths for hw, c in shapes(width)
             for batch in batch_sizes]
    rows, isa, blobs = [], None, {}
    header = (f"{'layer':<12}{'batch':>6}{'thr':>4}{'litert_int8':>12}"
              + ("".join(f"{name:>16}" for name in ("tf_fp32_onednn", "tf_fp32_eigen"))
                 if tf_peers else "")
              + (f"{'ncnn_int8':>12}" if ncnn else "")
              + "".join(f"{f'wa_f{m}':>9}" for m in tile_sizes)
              + "".join(f"{f'x F{m}':>7}" for m in tile_sizes))
    for n_threads in threads:
        tf_times = ({"onednn": _tf_times(cases, n_threads, reps, warmup, True),
                     "eigen": _tf_times(cases, n_threads, reps, warmup, False)}
                    if tf_peers else {})
        ncnn_times = _ncnn_times(cases, n_threads, reps, warmup) if ncnn else {}
        for hw, c, batch in cases:
            if (hw, c, batch) not in blobs:
                blobs[hw, c, batch] = litert_conv(hw, c, batch)
            calls = {"litert_int8": _litert_call(blobs[hw, c, batch], n_threads)}
            for m in tile_sizes:
                calls[f"wa_f{m}"], isa = _wa_call(m, hw, c, batch, n_threads)
            ms = interleaved_ms(calls, reps, warmup)
            key = f"{hw}x{hw}x{c}/{batch}"
            best = _best_ncnn(ncnn_times[key]) if ncnn else None
            if best:
                peers_ncnn = {"ncnn_int8_ms": best[0], "ncnn_path": best[1],
                              **{f"ncnn_{name}_ms": t for name, t in ncnn_times[key].items()}}
            else:
                peers_ncnn = {}
            peers = {f"tf_fp32_{name}_ms": t[key] for name, t in tf_times.items()}
            line = (f"{f'{hw}x{hw}x{c}':<12}{batch:>6}{n_threads:>4}{ms['litert_int8']:>12.3f}"
                    + "".join(f"{peers[f'tf_fp32_{name}_ms']:>16.3f}"
                              for name in ("onednn", "eigen") if tf_peers)
                    + (f"{best[0]:>10.3f} {best[1]}" if best else "")
                    + "".join(f"{ms[f'wa_f{m}']:>9.3f}" for m in tile_sizes)
                    + "".join(f"{ms['litert_int8'] / ms[f'wa_f{m}']:>7.2f}" for m in tile_sizes))
            if not rows:
                print(header)
            print(line, flush=True)
            for m in tile_sizes:
                rows.append({"shape": f"{hw}x{hw}x{c}", "F": m, "batch": batch,
                             "threads": n_threads, "wa_int8_ms": ms[f"wa_f{m}"],
                             "litert_int8_ms": ms["litert_int8"], **peers, **peers_ncnn})
    return rows, isa


def stage_table(widths=(0.5,), tile_sizes=(4,), reps=200):
    """Prints each stage's time at batch 1, 1 thread, and the GEMMs' roofline."""
    from wa_tf.deploy import native  # pylint: disable=import-outside-toplevel
    from wa_tf.kernels import winograd_int8  # pylint: disable=import-outside-toplevel
    peak = winograd_int8.peak_gemm_macs_per_ns()
    print(f"GEMM roofline: {peak:.1f} G int8 MAC/s (vpmaddwd alone; 0: no AVX2)")
    rows = []
    for hw, c in [s for width in widths for s in shapes(width)]:
        for m in tile_sizes:
            kernel = native.winograd_layer(native.synthetic_layer(m, c=c, k=c, flex=True,
                                                                  per_tap=True, hw=(8, 8)))
            x = np.random.default_rng(1).integers(-128, 128, (1, hw, hw, c)).astype(np.int8)
            stages = kernel.stage_times(x, reps)
            macs = stages["hadamard"][1]
            floor = macs / peak / 1e3 if peak else float("nan")
            print(f"{hw}x{hw}x{c} F{m}: " + ", ".join(
                f"{name} {s * 1e6:.1f} us" for name, (s, _) in stages.items())
                + f"; GEMM {macs / stages['hadamard'][0] / 1e9:.1f} G MAC/s, "
                f"floor {floor:.1f} us", flush=True)
            rows.append({"shape": f"{hw}x{hw}x{c}", "F": m, "peak_gmacs": peak,
                         **{f"{name}_us": s * 1e6 for name, (s, _) in stages.items()}})
    return rows


def plot(rows, cpu, path, batch=1, threads=1):
    """Bar chart, per layer shape: each kernel's speed-up over LiteRT's int8 CONV_2D."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
    rows = [r for r in rows if r["batch"] == batch and r["threads"] == threads]
    layers = list(dict.fromkeys(r["shape"] for r in rows))
    series = {}
    if any("ncnn_int8_ms" in r for r in rows):
        series["ncnn int8 (its fastest path)"] = lambda r: r.get("ncnn_int8_ms")
    for m in sorted({r["F"] for r in rows}):
        series[f"wa_tf native F{m}"] = lambda r, m=m: r["wa_int8_ms"] if r["F"] == m else None
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (name, get) in enumerate(series.items()):
        values = []
        for layer in layers:
            found = [r["litert_int8_ms"] / get(r) for r in rows
                     if r["shape"] == layer and get(r) is not None]
            values.append(found[0] if found else np.nan)
        ax.bar(np.arange(len(layers)) + (i - (len(series) - 1) / 2) * width, values, width,
               label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(layers)), layers)
    ax.set_ylabel("speed-up over LiteRT int8 CONV_2D (XNNPACK)")
    ax.set_title(f"3x3 convolution C -> C, batch {batch}, {threads} thread(s); {cpu}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, nargs="+", default=[0.5])
    parser.add_argument("--tile_sizes", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no_tf", action="store_true", help="skip the tf.nn.conv2d peers")
    parser.add_argument("--no_ncnn", action="store_true", help="skip the ncnn peer")
    parser.add_argument("--stages", action="store_true",
                        help="only the kernel's stage times (batch 1, 1 thread) and the GEMM "
                             "roofline")
    parser.add_argument("--quick", action="store_true",
                        help="width 0.5, batch 1, 100 reps (a few minutes)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None,
                        help="also draw batch 1, 1 thread's speed-ups over LiteRT here (.png; "
                             "matplotlib)")
    parser.add_argument("--from_json", default=None,
                        help="draw --plot from this earlier --json file, measuring nothing")
    parser.add_argument("--tf_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ncnn_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tf_worker:
        return _tf_worker(json.loads(args.tf_worker), args.threads[0], args.reps, args.warmup)
    if args.ncnn_worker:
        return _ncnn_worker(json.loads(args.ncnn_worker), args.threads[0], args.reps,
                            args.warmup)
    if (args.plot or args.from_json) and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install matplotlib)")
    if args.from_json:
        try:
            with open(args.from_json, encoding="utf-8") as f:
                saved = json.load(f)
            rows, cpu = saved["layers"], saved["cpu"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--from_json: {args.from_json} is not a --json file of this bench "
                         f"({type(e).__name__}: {e})")
        return plot(rows, cpu, args.plot or "layers.png")
    if args.quick:
        args.width, args.batch_sizes, args.reps, args.warmup = [0.5], [1], 100, 10
    print("\n".join(machine_lines()))
    if args.stages:
        return stage_table(args.width, args.tile_sizes)
    rows, isa = layer_table(args.width, args.tile_sizes, args.batch_sizes, args.threads,
                            args.reps, args.warmup, not args.no_tf, not args.no_ncnn)
    print(f"native kernel path: {isa}; x Fm = litert_int8 ms / wa_fm ms (higher is faster); "
          "ncnn_int8: its fastest path, 4 = F(4,3), 2 = F(2,3), g = im2col GEMM")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cpu": machine_lines()[0], "isa": isa, "layers": rows}, f, indent=1)
    if args.plot:
        plot(rows, machine_lines()[0], args.plot)
    return rows


if __name__ == "__main__":
    main()
