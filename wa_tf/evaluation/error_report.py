"""The Winograd error report: how far each Winograd-aware layer is from a float convolution.

For every :class:`~wa_tf.layers.WinogradConv2D` of a model (plain or
TF-MOT-wrapped), the report measures the error of its output against the
exact float convolution on the inputs the layer really sees::

    rel_error = ||y_wa - y_exact||_2 / ||y_exact||_2

``y_wa`` is the layer as the model runs it at inference: its input quantizer
(the ``<layer>_input_quant`` layer, when present), its current transforms
(learned ones in flex mode), every quantized stage with frozen ranges, and its
output quantizer.  ``y_exact = tf.nn.conv2d(x, kernel) (+ bias)`` uses the float
kernel and the same float input ``x``, captured from the model on real images
with a functional sub-model (run in a graph, as ``model.predict``).  Float
layers show ~1e-6; untrained static F4/F6 layers at 8 bits show errors of the
order of the output itself, which is why they do not train, and flex training
learns transforms that bring the error down (the paper's finding).

:func:`write_report` writes the table, its JSON form and a PNG bar chart, as
``bin/evaluate.py --error_report`` does.
"""

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf.layers import WinogradConv2D, winograd_conv
from wa_tf.plotting import pyplot
from wa_tf.quantization import float_weight, input_quant_layer, unwrap
from wa_tf.quantization.quantizers import fake_quant
from wa_tf.quantization.tfmot_adapter import call_inputs
from wa_tf.transforms import STAGES


def winograd_layers(model: tf_keras.Model) -> List[tf_keras.layers.Layer]:
    """The WinogradConv2D layers of a functional model (wrapped or not), in order."""
    return [layer for layer in model.layers if isinstance(unwrap(layer), WinogradConv2D)]


def error_report(model: tf_keras.Model, images, batch_size: int = 64) -> List[dict]:
    """Relative error of every Winograd-aware layer against a float convolution.

    Args:
      model: A functional tf_keras model (float or quantized).
      images: Float32 NHWC images as the model takes them (normalised).
      batch_size: Images per forward pass.

    The model is left as it was found: every variable (warm-up quantizer
    ranges set during the report included) is restored afterwards.

    Returns:
      One dict per WinogradConv2D, in model order, with keys ``layer``,
      ``tile_size``, ``flex``, ``bits`` (None for float), ``per_tap``,
      ``input_shape``, ``rel_error`` (L2, see the module docstring) and
      ``max_error`` (max |y_wa - y_exact| / max |y_exact|).

    Raises:
      ValueError: if the model has no WinogradConv2D layer.
    """
    layers = winograd_layers(model)
    if not layers:
        raise ValueError("model has no WinogradConv2D layer: nothing to report")
    images = np.asarray(images, np.float32)
    if len(images) == 0:
        raise ValueError("images is empty: the error report needs at least one image")
    # The float input of each layer: before its input quantizer, when it has one.
    entries = [(layer, input_quant_layer(layer)) for layer in layers]
    probes = tf_keras.Model(model.inputs,
                            [call_inputs(model, quant or layer) for layer, quant in entries])
    # In a graph, as model.predict and SavedModels run the model.
    capture = tf.function(lambda x: probes(x, training=False), reduce_retracing=True)

    def comparison(layer, quant):
        """Squared errors and maxima of one layer, compiled once per layer."""
        base = unwrap(layer)
        kernel = float_weight(layer, "kernel")
        bias = float_weight(layer, "bias") if base.use_bias else None

        transforms = [float_weight(layer, name) for name in ("A_t", "B_t", "G")]

        def only_stage(stage):
            """A stage hook quantizing `stage` alone, with its range (read, not updated)."""
            quantizer, variables = base.stage_quantizers[stage]

            def quantize(name, t):
                if name != stage:
                    return t
                return fake_quant(t, quantizer.inference_range(variables, t),
                                  quantizer.num_bits)
            return quantize

        @tf.function(reduce_retracing=True)
        def compare(x):
            y_wa = layer(quant(x, training=False) if quant is not None else x, training=False)
            y_exact = tf.nn.conv2d(x, tf.cast(kernel, x.dtype), strides=1,
                                   padding=base.padding.upper())
            if bias is not None:
                y_exact += tf.cast(bias, x.dtype)
            y_exact64 = tf.cast(y_exact, tf.float64)
            diff = tf.cast(y_wa, tf.float64) - y_exact64
            stats = [tf.reduce_sum(diff ** 2), tf.reduce_sum(y_exact64 ** 2),
                     tf.reduce_max(tf.abs(diff)), tf.reduce_max(tf.abs(y_exact64))]
            # One Winograd stage quantized at a time (float input, kernel and
            # transforms otherwise): which stage the error comes from.
            weights = [tf.cast(w, x.dtype) for w in (kernel, *transforms)]
            for stage in STAGES if base.stage_quantizers else ():
                y_stage = winograd_conv(x, *weights, base.tile_size, base.padding,
                                        quantize=only_stage(stage))
                if bias is not None:
                    y_stage += tf.cast(bias, x.dtype)
                stats.append(tf.reduce_sum((tf.cast(y_stage, tf.float64) - y_exact64) ** 2))
            return tf.stack(stats)
        return compare

    compares = [comparison(layer, quant) for layer, quant in entries]
    # At inference, a warm-up quantizer without a range takes one from the
    # first batch it sees, so the numbers show the layers as they would run;
    # the report then puts every variable back as it found it.
    state = [variable.read_value() for variable in model.variables]
    try:
        stats, shapes = _run(capture, compares, images, batch_size)
    finally:
        for variable, value in zip(model.variables, state):
            variable.assign(value)
    rows = []
    for (layer, _), shape, stat in zip(entries, shapes, stats):
        sq_err, sq_ref, max_err, max_ref = stat[:4]
        base = unwrap(layer)
        rows.append({
            "layer": base.name,
            "tile_size": base.tile_size,
            "flex": base.flex,
            "bits": base.quantization.bits if base.quantization else None,
            "per_tap": bool(base.quantization and base.quantization.per_tap),
            "input_shape": shape,
            "rel_error": math.sqrt(sq_err / sq_ref) if sq_ref > 0 else float("nan"),
            "max_error": max_err / max_ref if max_ref > 0 else float("nan"),
            "stage_errors": {stage: math.sqrt(e / sq_ref) if sq_ref > 0 else float("nan")
                             for stage, e in zip(STAGES, stat[4:])},
        })
    return rows


def _run(capture, compares, images, batch_size):
    """Each layer's statistics over all images, and the layers' input shapes."""
    stats, shapes = [None] * len(compares), []
    for start in range(0, len(images), batch_size):
        inputs = capture(images[start:start + batch_size])
        inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        shapes = [tuple(x.shape[1:]) for x in inputs]
        for i, x in enumerate(inputs):
            s = compares[i](x).numpy()
            if stats[i] is None:
                stats[i] = s
            else:  # sums of squares add up, maxima take the max
                stats[i][:2] += s[:2]
                stats[i][2:4] = np.maximum(stats[i][2:4], s[2:4])
                stats[i][4:] += s[4:]
    return stats, shapes


_STAGE_NAMES = {"weights_winograd": "U", "input_winograd": "V", "hadamard": "M"}


def format_report(rows: Sequence[dict]) -> str:
    """The error report as a fixed-width text table."""
    header = f"{'layer':<28}{'F':>3}{'mode':>7}{'bits':>6}{'per_tap':>9}{'input':>16}" \
             f"{'rel_error':>12}{'max_error':>12}" + "".join(
                 f"{'only ' + _STAGE_NAMES[s]:>12}" for s in STAGES)
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = "x".join(str(d) for d in row["input_shape"])
        bits = "FP" if row["bits"] is None else str(row["bits"])
        lines.append(f"{row['layer']:<28}{row['tile_size']:>3}"
                     f"{'flex' if row['flex'] else 'static':>7}{bits:>6}"
                     f"{str(row['per_tap']):>9}{shape:>16}"
                     f"{row['rel_error']:>12.4g}{row['max_error']:>12.4g}"
                     + "".join(f"{row.get('stage_errors', {}).get(s, float('nan')):>12.4g}"
                               for s in STAGES))
    lines.append("rel_error: ||y - conv2d|| / ||conv2d|| of the layer as it runs; 'only X': "
                 "the same with only stage X quantized (U = G g G^T, V = B^T d B, "
                 "M = element-wise stage), float input, kernel and transforms otherwise")
    return "\n".join(lines)


def plot_report(rows: Sequence[dict], path: str, title: Optional[str] = None) -> str:
    """Bar chart (log scale) of each layer's relative error, written as a PNG.

    Args:
      rows: :func:`error_report`'s rows.
      path: Output ``.png`` path.
      title: Plot title.

    Returns:
      ``path``.

    Raises:
      ImportError: if matplotlib is not installed (``pip install matplotlib``,
        or the package's ``plot`` extra).
    """
    try:
        plt = pyplot()
    except ImportError as e:
        raise ImportError("the error-report plot needs matplotlib: "
                          "pip install matplotlib (or wa_tf[plot])") from e
    names = [row["layer"] for row in rows]
    errors = [row["rel_error"] for row in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.0))
    ax.bar(range(len(rows)), errors, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("relative L2 error vs float conv")
    ax.set_title(title or "Winograd-aware layers: output error")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_dict(rows: Sequence[dict]) -> Dict[str, list]:
    """JSON-serialisable form of the report rows."""
    return {"layers": [dict(row, input_shape=list(row["input_shape"])) for row in rows]}




def write_report(rows: Sequence[dict], report_dir: str, title: str) -> Tuple[str, str]:
    """Writes ``error_report.txt`` (title and table), ``.json`` and ``.png`` to a folder.

    Args:
      rows: :func:`error_report`'s rows.
      report_dir: Output folder (created).
      title: First line of the text file and title of the plot.

    Returns:
      ``(table, png_path)``: :func:`format_report`'s table and the plot written.

    Raises:
      ImportError: if matplotlib is not installed (the text and JSON files are
        written first).
    """
    table = format_report(rows)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "error_report.txt"), "w", encoding="utf-8") as f:
        f.write(title + "\n" + table + "\n")
    with open(os.path.join(report_dir, "error_report.json"), "w", encoding="utf-8") as f:
        json.dump(report_dict(rows), f, indent=2)
    return table, plot_report(rows, os.path.join(report_dir, "error_report.png"), title)
