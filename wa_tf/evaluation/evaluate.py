"""Accuracy and loss evaluation of a training run or an exported SavedModel.

Evaluation runs a checkpoint of a training run (rebuilt with
:func:`wa_tf.training.experiment.load_model`) or a SavedModel written by
:func:`wa_tf.deploy.export.export_saved_model` over a dataset split, in inference mode.
The Winograd error report is :mod:`wa_tf.evaluation.error_report`; the command-line glue
of ``bin/evaluate.py`` and ``bin/export.py`` is :mod:`wa_tf.training.cli`.
"""

from typing import Optional

import numpy as np
import tensorflow as tf

from wa_tf import data
from wa_tf.deploy import litert
from wa_tf.deploy.export import load_serving
from wa_tf.training import experiment
from wa_tf.training.metrics import evaluate, keras_predict

SPLITS = ("test", "validation")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def split_dataset(flags: dict, split: str, batch_size: Optional[int] = None,
                  split_seed: Optional[int] = None):
    """The normalised, batched evaluation pipeline of a training run's dataset.

    Args:
      flags: The run's flags (:func:`wa_tf.training.experiment.read_flags`);
        uses ``dataset``, ``data_dir``, ``batch_size`` and ``seed``.
      split: 'test' or 'validation'.
      batch_size: Overrides the run's batch size.
      split_seed: The seed that chose the run's validation split, when it is
        not the run's ``seed`` (an adapted run validates on its source run's
        split: :func:`wa_tf.training.experiment.run_split_seed`).

    Returns:
      ``(dataset, info)`` as :func:`wa_tf.data.pipeline` and :func:`wa_tf.data.load`.

    Raises:
      ValueError: for an unknown split or one the dataset does not have.
    """
    _check_choice("split", split, SPLITS)
    seed = int(flags.get("seed", 1))
    splits, info = data.load(flags["dataset"], data_dir=flags.get("data_dir") or None,
                             seed=seed if split_seed is None else int(split_seed),
                             skip_corrupt=bool(flags.get("skip_corrupt", False)))
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
    _check_choice("split", split, SPLITS)
    model, flags = experiment.load_model(model_dir, checkpoint=checkpoint)
    dataset, _ = split_dataset(flags, split, batch_size, experiment.run_split_seed(model_dir))
    return evaluate(keras_predict(model), dataset)


def evaluate_savedmodel(path: str, model_dir: str, split: str = "test",
                        batch_size: Optional[int] = None) -> dict:
    """Accuracy and loss of an exported SavedModel on a training run's split.

    Args:
      path: SavedModel directory from :func:`wa_tf.deploy.export.export_saved_model`
        (its ``serving_default`` signature is used).
      model_dir: Experiment folder whose ``FLAGS.txt`` names the dataset.
      split: 'test' or 'validation'.
      batch_size: Overrides the run's batch size.

    Returns:
      :func:`evaluate`'s dict.
    """
    _check_choice("split", split, SPLITS)
    predict = load_serving(path)
    dataset, _ = split_dataset(experiment.read_flags(model_dir), split, batch_size,
                               experiment.run_split_seed(model_dir))
    return evaluate(predict, dataset)


def evaluate_litert(path: str, dataset: tf.data.Dataset, normalization=None, reference=None,
                    threads: int = 2, noise: float = 0.0) -> dict:
    """Accuracy and loss of a LiteRT file on a dataset, and its agreement with a reference.

    Args:
      path: A ``.tflite`` file from :func:`wa_tf.deploy.litert.export_litert`.
      dataset: Batched ``(images, labels)``, images normalised as in training.
      normalization: The ``(mean, std)`` the file normalises with, when it takes
        uint8 images (the dataset's images are turned back into them).
      reference: Optional ``predict`` (float images -> logits), e.g.
        :func:`keras_predict` of the run's own model: the result then has
        ``agreement``, the fraction of images whose top-1 class both give.
      threads: Interpreter threads.
      noise: With a reference, also its agreement with itself on the images
        plus Gaussian noise of this standard deviation (``self_agreement``):
        how many top-1 classes hang on differences far below one input code,
        the floor an integer model's ``agreement`` is read against.

    Returns:
      :func:`evaluate`'s dict, plus ``agreement`` (and ``self_agreement``).

    Raises:
      ValueError: for a negative ``noise``, or uint8 input without ``normalization``.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0; got {noise}")
    runner = litert.interpreter(path, threads)
    takes_raw = litert.input_details(runner)["dtype"] == np.uint8
    if takes_raw and normalization is None:
        raise ValueError(f"{path} takes uint8 images: give the normalization to recover them")
    counts = {"same": 0, "self": 0, "images": 0}
    rng = np.random.default_rng(0)

    def predict(images):
        images = images.numpy()
        logits = litert.predict(runner, litert.raw_images(images, normalization)
                                if takes_raw else images)
        if reference is not None:
            expected = np.argmax(np.asarray(reference(tf.constant(images))), -1)
            counts["same"] += int(np.sum(expected == np.argmax(logits, -1)))
            counts["images"] += len(images)
            if noise > 0:
                noisy = images + rng.normal(0.0, noise, images.shape).astype(images.dtype)
                counts["self"] += int(np.sum(
                    expected == np.argmax(np.asarray(reference(tf.constant(noisy))), -1)))
        return tf.constant(logits)

    result = evaluate(predict, dataset)
    if reference is not None:
        result["agreement"] = counts["same"] / max(counts["images"], 1)
        if noise > 0:
            result["self_agreement"] = counts["self"] / max(counts["images"], 1)
    return result


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
