"""Measures the inference latency of every candidate of the search space.

Each candidate runs in its deployed form, FP32, on the CPU: a ``tf.function``
with its weights frozen as constants.

* normal: ``tf.nn.conv2d`` (TensorFlow's own direct convolution kernel).
* F(m x m, 3 x 3): the Winograd-domain weights ``U = G g G^T`` are computed
  once, in numpy, and frozen; what is timed is the input transform (tile
  extraction and ``B_t d B_t^T``), the ``t^2`` element-wise GEMMs and the output
  transform (``A_t M A_t^T`` and untiling), with the pipeline functions of
  :mod:`wa_tf.layers`.  Static and flex layers are the same graph at
  inference: only the values of their constant transforms differ.

:func:`measure_table` returns the JSON table that :class:`wa_tf.search.cost.TableCost`
reads (``bin/latency_table.py`` prints and writes it).
"""

import datetime
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

import wa_tf
from wa_tf import transforms
from wa_tf.layers import apply_transform, extract_tiles, untile
from wa_tf.machine import cpu_model
from wa_tf.search import cost

WARMUP_CALLS = 3


def winograd_weights(kernel: np.ndarray, m: int) -> np.ndarray:
    """``U = G g G^T`` of a ``(r, r, C_in, C_out)`` kernel, as ``(t*t, C_in, C_out)``.

    Positions are row-major (``U[a*t + b]``), the layout
    :func:`winograd_inference` expects.
    """
    r, _, c, k = kernel.shape
    _, _, g = transforms.winograd_matrices(m, r)
    t = m + r - 1
    u = np.einsum("ai,ijck,bj->abck", g, np.asarray(kernel, np.float64), g)
    return u.reshape(t * t, c, k)


def winograd_inference(x, u, a_t, b_t, m: int, r: int):
    """The deployed Winograd convolution ('same' padding) with precomputed weights.

    Args:
      x: (N, H, W, C_in) input.
      u: (t*t, C_in, C_out) Winograd-domain weights (:func:`winograd_weights`).
      a_t: (m, t) output transform.
      b_t: (t, t) input transform.
      m: Output tile size.
      r: Kernel size.

    Returns:
      (N, H, W, C_out), the convolution of `x` with the kernel of `u`.
    """
    t = m + r - 1
    n = x.shape[0]
    c, k = u.shape[1], u.shape[2]
    d, geo = extract_tiles(x, m, r, "same")
    out_h, out_w, n_h, n_w = geo[:4]
    v = tf.reshape(apply_transform(b_t, d), [t * t, -1, c])
    mm = tf.matmul(v, u)
    # M is row-major, read as column-major: untile undoes the transposed tiles.
    y = apply_transform(a_t, tf.reshape(mm, [t * t, -1]))
    return untile(y, m, n, n_h, n_w, k, out_h, out_w)


def deployed_layer(layer: cost.LayerSpec, candidate: cost.Candidate, batch_size: int,
                   seed: int = 0, jit_compile: bool = False):
    """The deployed FP32 form of `layer` as `candidate`, and an input to time it on.

    Returns:
      ``(fn, x, kernel)``: ``fn(x)`` is a traced ``tf.function`` with frozen
      weights computing the 'same' convolution of `x` with `kernel` (numpy,
      ``(r, r, C_in, C_out)``).  Every candidate of the same layer and seed
      gets the same kernel and input.  With `jit_compile`, XLA compiles it.

    Raises:
      ValueError: For an integer bit-width (measured in FP32 only) or a
        candidate not offered for `layer`.
    """
    if candidate.bits is not None:
        raise ValueError(f"latencies are measured in FP32 only; got {candidate.key!r}")
    if not cost.is_allowed(layer, candidate):
        raise ValueError(f"{candidate.name} is not offered for {layer.describe()}")
    rng = np.random.default_rng(seed)
    r = layer.kernel_size
    kernel = (rng.standard_normal((r, r, layer.in_channels, layer.out_channels))
              / np.sqrt(r * r * layer.in_channels)).astype(np.float32)
    x = tf.constant(rng.standard_normal(
        (batch_size, layer.height, layer.width, layer.in_channels)).astype(np.float32))
    spec = tf.TensorSpec(x.shape, tf.float32)
    if candidate.algorithm == cost.NORMAL:
        frozen = tf.constant(kernel)

        @tf.function(input_signature=[spec], jit_compile=jit_compile)
        def fn(inputs):
            return tf.nn.conv2d(inputs, frozen, 1, "SAME")
    else:
        m = candidate.tile_size
        a_t, b_t, _ = transforms.winograd_matrices(m, r)
        u = tf.constant(winograd_weights(kernel, m), tf.float32)
        a_t, b_t = tf.constant(a_t, tf.float32), tf.constant(b_t, tf.float32)

        @tf.function(input_signature=[spec], jit_compile=jit_compile)
        def fn(inputs):
            return winograd_inference(inputs, u, a_t, b_t, m, r)
    return fn, x, kernel


def median_ms(fns: Sequence[Callable], x, repeats: int,
              warmup: int = WARMUP_CALLS) -> List[float]:
    """Median wall time of each ``fn(x)`` of `fns` over `repeats` calls, in ms.

    After `warmup` calls each, the functions are timed in turns (one call of
    each per round), so that load from other processes on a shared machine
    falls on all of them alike rather than on whichever ran during a busy spell.
    On the CPU a ``tf.function`` call returns once its graph has run.
    """
    for fn in fns:
        for _ in range(warmup):
            fn(x)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn(x)
            fn_times.append(time.perf_counter() - start)
    return [float(np.median(t) * 1e3) for t in times]


def tabulate(layers: Sequence[cost.LayerSpec], names: Sequence[str],
             batch_sizes: Sequence[int], repeats: int,
             time_layer: Callable[[cost.LayerSpec, List[cost.Candidate], int], List[float]],
             metadata: Dict, caller: str,
             progress: Optional[Callable[[str], None]] = None) -> Dict:
    """A latency table: `time_layer` run once per layer shape and batch size.

    Args:
      layers: The layers to time (:func:`wa_tf.search.cost.searchable_layers`), named.
      names: Candidate names ('normal', 'F2', 'F4', 'F6').
      batch_sizes: Batch sizes to time each at.
      repeats: Timed calls per configuration (checked here; `time_layer` uses it).
      time_layer: ``(layer, allowed candidates, batch) -> ms of each candidate``.
      metadata: The table's metadata besides the date, version, batch sizes,
        repeats and statistic.
      caller: The measuring function's name, for error messages.
      progress: Called with one line per configuration timed.

    Returns:
      A table in :class:`wa_tf.search.cost.TableCost`'s format.

    Raises:
      ValueError: On bad arguments.
    """
    if not layers or any(layer.name is None for layer in layers):
        raise ValueError(f"{caller} needs named layers (wa_tf.search.cost.searchable_layers)")
    if not names:
        raise ValueError(f"{caller} needs at least one candidate name")
    candidates = cost.candidates(names)
    batch_sizes = sorted(set(batch_sizes))
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers; got {batch_sizes}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer; got {repeats!r}")
    latency = {str(b): {} for b in batch_sizes}
    measured = {}  # (shape key, batch) -> {candidate key: ms}
    for layer in layers:
        for batch in batch_sizes:
            key = (layer.shape_key, batch)
            if key not in measured:
                allowed = [c for c in candidates if cost.is_allowed(layer, c)]
                times = time_layer(layer, allowed, batch)
                measured[key] = {c.key: round(ms, 4) for c, ms in zip(allowed, times)}
                if progress:
                    progress(f"{layer.shape_key} batch {batch}: " + ", ".join(
                        f"{k} {ms:.3f}" for k, ms in measured[key].items()) + " ms")
            latency[str(batch)][layer.name] = dict(measured[key])
    return {
        "format": cost.TABLE_FORMAT,
        "version": cost.TABLE_VERSION,
        "metadata": {
            "device": metadata["device"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wa_tf_version": wa_tf.__version__,
            "batch_sizes": batch_sizes,
            "repeats": repeats,
            "statistic": "median",
            **{k: v for k, v in metadata.items() if k != "device"},
        },
        "latency_ms": latency,
    }


def measure_table(layers: Sequence[cost.LayerSpec], names: Sequence[str] = cost.CANDIDATE_NAMES,
                  batch_sizes: Sequence[int] = (1,), repeats: int = 20,
                  device: Optional[str] = None, jit_compile: bool = False,
                  progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Times every allowed candidate of every layer; returns a latency table.

    Layers of the same shape are timed once and share the figure.

    Args:
      layers: The layers to time (:func:`wa_tf.search.cost.searchable_layers`), named.
      names: Candidate names ('normal', 'F2', 'F4', 'F6').
      batch_sizes: Batch sizes to time each at.
      repeats: Timed calls per configuration (the median is kept).
      device: The table's device description; default: the CPU model.
      jit_compile: Compile each layer with XLA (fused kernels) rather than
        running TensorFlow's graph of ops.
      progress: Called with one line per configuration timed.

    Returns:
      A table in :class:`wa_tf.search.cost.TableCost`'s format, with
      ``"derive_bits": "analytic"`` (integer bit-widths are not measured).

    Raises:
      ValueError: On bad arguments.
    """
    def time_layer(layer, allowed, batch):
        built = [deployed_layer(layer, c, batch, jit_compile=jit_compile) for c in allowed]
        return median_ms([fn for fn, _, _ in built], built[0][1], repeats)

    metadata = {"device": device or f"{cpu_model()} (CPU), TensorFlow {tf.__version__}",
                "precision": "fp32", "jit_compile": bool(jit_compile),
                "derive_bits": "analytic"}
    with tf.device("/CPU:0"):
        return tabulate(layers, names, batch_sizes, repeats, time_layer, metadata,
                        "measure_table", progress)


def format_table(table: Dict, layers: Sequence[cost.LayerSpec]) -> str:
    """The table's latencies as text: one row per layer, one column per candidate and batch.

    Ends with the totals of the uniform architectures (every layer the same
    candidate; F6 falls back to F4 where its tile does not fit).
    """
    batches = sorted(table["latency_ms"], key=int)
    keys = []
    for batch in batches:
        for entries in table["latency_ms"][batch].values():
            keys += [k for k in entries if k not in keys]
    header = ["layer", "input", "C_out"] + [f"{k} b{b}" for b in batches for k in keys]
    rows = []
    for layer in layers:
        row = [layer.name, f"{layer.height}x{layer.width}x{layer.in_channels}",
               str(layer.out_channels)]
        for batch in batches:
            entries = table["latency_ms"][batch].get(layer.name, {})
            row += [f"{entries[k]:.3f}" if k in entries else "-" for k in keys]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) if i >= 2 else v.ljust(w)
                       for i, (v, w) in enumerate(zip(r, widths))) for r in [header] + rows]
    analytic = cost.AnalyticCost()
    lines.append("")
    lines.append("uniform architectures (F6 -> F4 where its tile does not fit): measured ms per "
                 "call, analytic M FP32 MAC-equivalents per image at batch 1")
    for key in keys:
        candidate = cost.Candidate.parse(key)
        conv = "normal" if candidate.algorithm == cost.NORMAL else "static"
        try:
            arch = cost.uniform_architecture(layers, conv, candidate.tile_size or 2)
        except ValueError:
            continue
        parts = []
        for batch in batches:
            try:
                total = cost.model_cost(arch, layers, cost.TableCost(
                    "<measured>", batch_size=int(batch), table=table))
                parts.append(f"batch {batch}: {total:.3f} ms")
            except ValueError:
                parts.append(f"batch {batch}: -")
        parts.append(f"analytic: {cost.model_cost(arch, layers, analytic) / 1e6:.2f} M")
        lines.append(f"  all {key:<6} " + ", ".join(parts))
    return "\n".join(lines)
