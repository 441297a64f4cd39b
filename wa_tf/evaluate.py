"""Accuracy / loss evaluation and the Winograd error report.

Evaluation runs a checkpoint of a training run (rebuilt with
:func:`wa_tf.training.experiment.load_model`) or a SavedModel written by
:func:`wa_tf.export.export_saved_model` over a dataset split, in inference mode.

The error report measures, for every :class:`~wa_tf.layers.WinogradConv2D` of a
model (plain or TF-MOT-wrapped), how far its output is from the exact float
convolution on the inputs the layer really sees::

    rel_error = ||y_wa - y_ref||_2 / ||y_ref||_2

``y_wa`` is the layer as the model runs it at inference: its input quantizer
(the ``<layer>_input_quant`` layer, when present), its current transforms
(learned ones in flex mode), every quantized stage with frozen ranges, and its
output quantizer.  ``y_ref = tf.nn.conv2d(x, kernel) (+ bias)`` uses the float
kernel and the same float input ``x``, captured from the model on real images
with a functional sub-model (run in a graph, as ``model.predict``).  Float
layers show ~1e-6; untrained static F4/F6 layers at 8 bits show errors of the
order of the output itself, which is why they do not train, and flex training
learns transforms that bring the error down (the paper's finding).

The last section holds the flag and error handling shared by ``bin/evaluate.py``
and ``bin/export.py``.
"""

import copy
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras
from absl import flags, logging

from wa_tf.layers import STAGES, WinogradConv2D
from wa_tf.quantization import float_weight, input_quant_layer, unwrap
from wa_tf.quantizers import fake_quant

SPLITS = ("test", "validation")


def evaluate(predict: Callable[[tf.Tensor], tf.Tensor], dataset: tf.data.Dataset) -> dict:
    """Mean cross-entropy loss and top-1 accuracy of ``predict`` over a dataset.

    Args:
      predict: Maps a float32 image batch to logits (a Keras model in inference
        mode, or a SavedModel signature from :func:`wa_tf.export.load_serving`).
      dataset: Batched ``(images, labels)`` with integer labels.

    Returns:
      ``{'loss': float, 'accuracy': float, 'examples': int}``.

    Raises:
      ValueError: if the dataset is empty.
    """
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in dataset:
        logits = tf.cast(predict(images), tf.float32)
        labels = tf.cast(labels, tf.int64)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        loss_sum += float(tf.reduce_sum(loss))
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == labels, tf.int64)))
        count += int(tf.shape(labels)[0])
    if count == 0:
        raise ValueError("dataset is empty: nothing to evaluate")
    return {"loss": loss_sum / count, "accuracy": correct / count, "examples": count}


def keras_predict(model: tf_keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """Inference-mode ``predict`` for :func:`evaluate`, compiled once per shape."""
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def split_dataset(flags: dict, split: str, batch_size: Optional[int] = None):
    """The normalised, batched evaluation pipeline of a training run's dataset.

    Args:
      flags: The run's flags (:func:`wa_tf.training.experiment.read_flags`);
        uses ``dataset``, ``data_dir``, ``batch_size`` and ``seed``.
      split: 'test' or 'validation'.
      batch_size: Overrides the run's batch size.

    Returns:
      ``(dataset, info)`` as :func:`wa_tf.data.pipeline` and :func:`wa_tf.data.load`.

    Raises:
      ValueError: for an unknown split or one the dataset does not have.
    """
    from wa_tf import data  # pylint: disable=import-outside-toplevel
    _check_choice("split", split, SPLITS)
    seed = int(flags.get("seed", 1))
    splits, info = data.load(flags["dataset"], data_dir=flags.get("data_dir") or None, seed=seed)
    if split not in splits:
        raise ValueError(f"split {split!r} is not available for dataset {flags['dataset']!r} "
                         f"(has {sorted(splits)})")
    batch_size = int(batch_size or flags.get("batch_size", 64))
    return data.pipeline(splits[split], batch_size, info, training=False, seed=seed), info


def evaluate_checkpoint(model_dir: str, split: str = "test", checkpoint: str = "best",
                        batch_size: Optional[int] = None) -> dict:
    """Accuracy and loss of a training run's checkpoint on a split.

    Args:
      model_dir: Experiment folder (holding ``FLAGS.txt`` and ``checkpoints/``).
      split: 'test' or 'validation'.
      checkpoint: 'best', 'final' or a checkpoint path.
      batch_size: Overrides the run's batch size.

    Returns:
      :func:`evaluate`'s dict.
    """
    from wa_tf.training import experiment  # pylint: disable=import-outside-toplevel
    _check_choice("split", split, SPLITS)
    model, flags = experiment.load_model(model_dir, checkpoint=checkpoint)
    dataset, _ = split_dataset(flags, split, batch_size)
    return evaluate(keras_predict(model), dataset)


def evaluate_savedmodel(path: str, model_dir: str, split: str = "test",
                        batch_size: Optional[int] = None) -> dict:
    """Accuracy and loss of an exported SavedModel on a training run's split.

    Args:
      path: SavedModel directory from :func:`wa_tf.export.export_saved_model`
        (its ``serving_default`` signature is used).
      model_dir: Experiment folder whose ``FLAGS.txt`` names the dataset.
      split: 'test' or 'validation'.
      batch_size: Overrides the run's batch size.

    Returns:
      :func:`evaluate`'s dict.
    """
    from wa_tf.export import load_serving  # pylint: disable=import-outside-toplevel
    from wa_tf.training import experiment  # pylint: disable=import-outside-toplevel
    _check_choice("split", split, SPLITS)
    predict = load_serving(path)
    dataset, _ = split_dataset(experiment.read_flags(model_dir), split, batch_size)
    return evaluate(predict, dataset)


def take_images(dataset: tf.data.Dataset, count: int) -> np.ndarray:
    """The first ``count`` images (fewer if the split is smaller) of a batched dataset."""
    batches, total = [], 0
    for images, _ in dataset:
        batches.append(images.numpy())
        total += len(batches[-1])
        if total >= count:
            break
    if not batches:
        raise ValueError("dataset is empty: no images for the error report")
    return np.concatenate(batches)[:count]


# --------------------------------------------------------------------------
# Winograd error report
# --------------------------------------------------------------------------


def _model_input(model, layer):
    """The input tensor of ``layer``'s call inside ``model``.

    ``layer.input`` is ambiguous for layers shared between graphs (TF-MOT's
    ``quantize_apply`` reuses the unquantized layers of the model it clones).
    """
    nodes = layer._inbound_nodes  # pylint: disable=protected-access
    network = model._network_nodes  # pylint: disable=protected-access
    for index, node in enumerate(nodes):
        if f"{layer.name}_ib-{index}" in network:
            return node.input_tensors
    raise ValueError(f"layer {layer.name!r} is not called in model {model.name!r}")


def winograd_layers(model: tf_keras.Model) -> List[tf_keras.layers.Layer]:
    """The WinogradConv2D layers of a functional model (wrapped or not), in order."""
    return [layer for layer in model.layers if isinstance(unwrap(layer), WinogradConv2D)]


def error_report(model: tf_keras.Model, images, batch_size: int = 64) -> List[dict]:
    """Relative error of every Winograd-aware layer against a float convolution.

    Args:
      model: A functional tf_keras model (float or quantized).
      images: Float32 NHWC images as the model takes them (normalised).
      batch_size: Images per forward pass.

    Returns:
      One dict per WinogradConv2D, in model order, with keys ``layer``,
      ``tile_size``, ``flex``, ``bits`` (None for float), ``per_tap``,
      ``input_shape``, ``rel_error`` (L2, see the module docstring) and
      ``max_error`` (max |y_wa - y_ref| / max |y_ref|).

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
                            [_model_input(model, quant or layer) for layer, quant in entries])
    # In a graph, as model.predict and SavedModels run the model.
    capture = tf.function(lambda x: probes(x, training=False), reduce_retracing=True)

    def comparison(layer, quant):
        """Squared errors and maxima of one layer, compiled once per layer."""
        base = unwrap(layer)
        kernel = float_weight(layer, "kernel")
        bias = float_weight(layer, "bias") if base.use_bias else None

        transforms = [float_weight(layer, name) for name in ("A_t", "B_t", "G")]

        def only_stage(stage):
            """A stage hook quantizing `stage` alone, with its frozen range."""
            quantizer, variables = base.stage_quantizers[stage]

            def quantize(name, t):
                if name != stage:
                    return t
                return fake_quant(t, quantizer.update_range(t, False, variables),
                                  quantizer.num_bits)
            return quantize

        @tf.function(reduce_retracing=True)
        def compare(x):
            y_wa = layer(quant(x, training=False) if quant is not None else x, training=False)
            y_ref = tf.nn.conv2d(x, tf.cast(kernel, x.dtype), strides=1,
                                 padding=base.padding.upper())
            if bias is not None:
                y_ref += tf.cast(bias, x.dtype)
            y_ref64 = tf.cast(y_ref, tf.float64)
            diff = tf.cast(y_wa, tf.float64) - y_ref64
            stats = [tf.reduce_sum(diff ** 2), tf.reduce_sum(y_ref64 ** 2),
                     tf.reduce_max(tf.abs(diff)), tf.reduce_max(tf.abs(y_ref64))]
            # One Winograd stage quantized at a time (float input, kernel and
            # transforms otherwise): which stage the error comes from.
            weights = [tf.cast(w, x.dtype) for w in (kernel, *transforms)]
            for stage in STAGES if base.stage_quantizers else ():
                y_stage = base._winograd(x, *weights, quantize=only_stage(stage))  # pylint: disable=protected-access
                if bias is not None:
                    y_stage += tf.cast(bias, x.dtype)
                stats.append(tf.reduce_sum((tf.cast(y_stage, tf.float64) - y_ref64) ** 2))
            return tf.stack(stats)
        return compare

    compares = [comparison(layer, quant) for layer, quant in entries]
    stats = [None] * len(entries)
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
    rows = []
    for (layer, _), shape, stat in zip(entries, shapes, stats):
        sq_err, sq_ref, max_err, max_ref = stat[:4]
        base = unwrap(layer)
        quantization = base.quantization or {}
        rows.append({
            "layer": base.name,
            "tile_size": base.tile_size,
            "flex": base.flex,
            "bits": int(quantization["bits"]) if quantization else None,
            "per_tap": bool(quantization.get("per_tap", False)),
            "input_shape": shape,
            "rel_error": math.sqrt(sq_err / sq_ref) if sq_ref > 0 else float("nan"),
            "max_error": max_err / max_ref if max_ref > 0 else float("nan"),
            "stage_errors": {stage: math.sqrt(e / sq_ref) if sq_ref > 0 else float("nan")
                             for stage, e in zip(STAGES, stat[4:])},
        })
    return rows


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
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
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


# --------------------------------------------------------------------------
# Command-line helpers of bin/evaluate.py and bin/export.py
# --------------------------------------------------------------------------


def define_run_flags(flag_values=None):
    """Defines --modelDir, --checkpoint, --data_dir and --batch_size.

    --data_dir and --batch_size are the training binaries' own flags
    (:mod:`wa_tf.training.flags`); here they override the run's values.
    """
    from wa_tf.training import flags as wa_flags  # pylint: disable=import-outside-toplevel
    fv = flags.FLAGS if flag_values is None else flag_values
    training = flags.FlagValues()
    wa_flags.define_flags(training)
    helps = {
        "modelDir": "Experiment folder of a bin/train.py or bin/adapt.py run.",
        "data_dir": training["data_dir"].help + " When given, overrides the run's.",
        "batch_size": "Batch size; when given, overrides the run's.",
    }
    for name, help_text in helps.items():
        flag = copy.deepcopy(training[name])
        flag.help = help_text
        flags.DEFINE_flag(flag, flag_values=fv)
    flags.DEFINE_string("checkpoint", "best", "Checkpoint of the run: best (best validation "
                        "accuracy), final, or a checkpoint path prefix.", flag_values=fv)


def _run_flag_values(flag_values):
    fv = flags.FLAGS if flag_values is None else flag_values
    if not fv.modelDir:
        raise ValueError("--modelDir is required: the experiment folder of a training run")
    return fv


def read_run_flags(flag_values=None) -> dict:
    """The flags of the run named by --modelDir, with --data_dir / --batch_size applied.

    Raises:
      ValueError: naming --modelDir, for a missing or invalid folder.
    """
    from wa_tf.training import experiment  # pylint: disable=import-outside-toplevel
    fv = _run_flag_values(flag_values)
    return run_config(experiment.read_flags(fv.modelDir), fv)


def load_run(flag_values=None):
    """The model and flags of the run named by --modelDir / --checkpoint / --data_dir.

    Raises:
      ValueError: naming the flag, for a missing folder or checkpoint.
    """
    from wa_tf.training import experiment  # pylint: disable=import-outside-toplevel
    fv = _run_flag_values(flag_values)
    try:
        model, config = experiment.load_model(fv.modelDir, checkpoint=fv.checkpoint)
    except ValueError as e:
        # load_model names adapt.py's flag for the checkpoint.
        raise ValueError(str(e).replace("--modelToLoad", "--checkpoint")) from None
    return model, run_config(config, fv)


def run_config(config: dict, flag_values=None) -> dict:
    """A run's flags with --data_dir / --batch_size applied when given."""
    fv = flags.FLAGS if flag_values is None else flag_values
    config = dict(config)
    for name in ("data_dir", "batch_size"):
        if fv[name].present:
            config[name] = fv[name].value
    return config


def run_normalization(model_dir: str, config: dict):
    """(mean, std) of a run's dataset: from its metrics.json, else from the data."""
    from wa_tf.training import experiment  # pylint: disable=import-outside-toplevel
    meta = (experiment.read_metrics(model_dir) or {}).get("dataset") or {}
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    from wa_tf import data  # pylint: disable=import-outside-toplevel
    _, info = data.load(config["dataset"], data_dir=config.get("data_dir") or None,
                        seed=int(config.get("seed", 1)))
    return info.mean, info.std


def run_cli(fn: Callable[[], object]):
    """Runs ``fn``; bad input (ValueError, missing matplotlib) exits with one line."""
    from wa_tf.training import flags as wa_flags  # pylint: disable=import-outside-toplevel
    if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
        # TensorFlow's INFO lines (SavedModel writing) would bury the results.
        logging.set_verbosity(logging.WARNING)
    try:
        fn()
    except (ValueError, ImportError) as e:
        wa_flags.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
