"""Measures the int8 inference latency of every candidate, as deployed on this CPU.

The int8 counterpart of :mod:`wa_tf.search.latency`, for wiNAS on real time:

* normal: a LiteRT int8 ``CONV_2D`` (per-channel int8 weights, int8
  activations), run by ai-edge-litert with XNNPACK, as the builtin operators
  of an exported model run;
* F(m x m, 3 x 3): the native int8 Winograd kernel
  (:mod:`wa_tf.kernels.winograd_int8`) on a flex, per-tap 8-bit layer, as the
  ``--litert_transforms=native`` operators of an exported model run.

Both are called from Python in turns (interleaved, :func:`wa_tf.search.latency.median_ms`)
and the median kept; the table has :class:`wa_tf.search.cost.TableCost`'s format with
``"precision": "int8"``.
"""

from typing import Callable, Dict, Optional, Sequence

import numpy as np

from wa_tf.deploy import litert, native
from wa_tf.deploy.tflite_graph import Graph, options
from wa_tf.machine import cpu_model
from wa_tf.search import cost, latency

WARMUP_CALLS = 5


def litert_conv_int8(height: int, width: int, in_channels: int, out_channels: int,
                     batch_size: int = 1, kernel_size: int = 3, seed: int = 0) -> bytes:
    """A LiteRT model of one int8 'same' convolution (random per-channel weights)."""
    rng = np.random.default_rng(seed)
    r = kernel_size
    g = Graph()
    s_in, s_out = 2.0 / 255, 4.0 / 255
    x = g.tensor("x", [batch_size, height, width, in_channels], "int8", s_in, 0)
    w_scale = rng.uniform(0.5, 1.5, out_channels) / (127 * np.sqrt(r * r * in_channels))
    codes = rng.integers(-127, 128, (out_channels, r, r, in_channels))
    w = g.constant("w", codes, "int8", w_scale, axis=0)
    b = g.constant("b", np.zeros(out_channels, np.int32), "int32", s_in * w_scale, axis=0)
    y = g.tensor("y", [batch_size, height, width, out_channels], "int8", s_out, 0)
    g.op("CONV_2D", [x, w, b], [y], options("Conv2D", padding="same", stride=1))
    return g.finish([x], [y])


def deployed_int8_layer(layer: cost.LayerSpec, candidate: cost.Candidate, batch_size: int,
                        threads: int = 1, seed: int = 0) -> Callable[[], object]:
    """A call running `layer` as `candidate` in int8 on one fixed random input.

    Raises:
      ValueError: for a candidate not offered for `layer`.
    """
    if not cost.is_allowed(layer, candidate):
        raise ValueError(f"{candidate.name} is not offered for {layer.describe()}")
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (batch_size, layer.height, layer.width,
                                 layer.in_channels)).astype(np.int8)
    if candidate.algorithm == cost.NORMAL:
        runner = litert.interpreter(litert_conv_int8(
            layer.height, layer.width, layer.in_channels, layer.out_channels, batch_size,
            layer.kernel_size, seed), threads)
        runner.set_tensor(runner.get_input_details()[0]["index"], x)
        return runner.invoke
    kernel = native.winograd_layer(native.synthetic_layer(
        candidate.tile_size, c=layer.in_channels, k=layer.out_channels, flex=True,
        per_tap=True, seed=seed, kernel_size=layer.kernel_size))
    return kernel.bind(x, threads)


def measure_int8_table(layers: Sequence[cost.LayerSpec],
                       names: Sequence[str] = cost.CANDIDATE_NAMES,
                       batch_sizes: Sequence[int] = (1,), repeats: int = 50, threads: int = 1,
                       device: Optional[str] = None,
                       progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Times every allowed candidate of every layer in int8; returns a latency table.

    Layers of the same shape are timed once and share the figure.

    Raises:
      ValueError: On bad arguments.
    """
    def time_layer(layer, allowed, batch):
        calls = [deployed_int8_layer(layer, c, batch, threads) for c in allowed]
        return latency.median_ms([lambda _, call=call: call() for call in calls], None,
                                 repeats, warmup=WARMUP_CALLS)

    metadata = {"device": device or f"{cpu_model()} (CPU), int8: LiteRT XNNPACK CONV_2D / "
                                     f"wa_tf native Winograd",
                "precision": "int8", "threads": int(threads), "derive_bits": "analytic"}
    return latency.tabulate(layers, names, batch_sizes, repeats, time_layer, metadata,
                            "measure_int8_table", progress)
