"""What a run writes into ``report.txt`` and ``metrics.json``, and its statuses.

The text of a new report, the reference's evaluation lines, the summary of an
adapted run's copied weights, and the ``metrics.json`` dict of a run from its
first epoch to its end (:func:`initial_metrics`, :func:`add_epoch`,
:func:`stop_on_nan`, :func:`finish`); :mod:`wa_tf.training.train_lib` decides
when each is written.
"""

from typing import Dict, List, Mapping, Optional, Sequence

from wa_tf.training.config import RunConfig
from wa_tf.training.run_folder import FLAGS_FILE, flags_to_lines

# A run's status in metrics.json.
RUNNING, FINISHED, NAN_LOSS = "running", "finished", "nan_loss"


def result_line(label: str, result: Mapping) -> str:
    """The reference's evaluation line: 'Val set: Average loss: ..., Accuracy: c/N (x%)'."""
    correct = round(result["accuracy"] * result["examples"])
    return (f"{label}: Average loss: {result['loss']:.4f}, Accuracy: {correct}/"
            f"{result['examples']} ({100 * result['accuracy']:.2f}%)")


def _group_by_weight(keys: Sequence[str]) -> str:
    """'A_t x16, B_t x16, ...': weight names with the number of layers having them."""
    counts = {}
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in counts.items())


def adapt_summary(source_dir: str, checkpoint: str, copied: Mapping[str, Sequence[str]],
                  from_source: Optional[Mapping] = None,
                  split_seed: Optional[int] = None) -> str:
    """What an adapted run took from its source run (printed and in report.txt).

    Args:
      source_dir: The source run's folder.
      checkpoint: The source checkpoint's path prefix.
      copied: :func:`wa_tf.quantization.copy_weights`'s report.
      from_source: Flag name -> value of the flags taken from the source run
        because the command line did not give them.
      split_seed: The seed of the source run's validation split, used here too.
    """
    lines = [f"Adapted from {source_dir} (checkpoint {checkpoint}): "
             f"copied {len(copied['copied'])} weights by layer name and shape."]
    for key, label in (("not_found", "Not in the checkpoint, kept as initialised"),
                       ("unused", "In the checkpoint but not in this model")):
        if copied[key]:
            lines.append(f"{label} ({len(copied[key])}, all listed in metrics.json): "
                         + _group_by_weight(copied[key]))
    if from_source:
        lines.append("From the source run's FLAGS.txt (not given on the command line): "
                     + " ".join(flags_to_lines(from_source)))
    if split_seed is not None:
        lines.append(f"Validation split: the source run's (seed {split_seed}).")
    return "\n".join(lines)


def new_report(command: str, config: RunConfig, layer_table: str,
               summary: Optional[str] = None) -> str:
    """The first part of ``report.txt``: command, flags, layer table (and adapt summary)."""
    report = [f"Command: {command}", "", FLAGS_FILE + ":"]
    report += ["  " + line for line in flags_to_lines(config.to_flag_dict())]
    report += ["", layer_table]
    if summary:
        report += ["", summary]
    return "\n".join(report)


def initial_metrics(program: str, model_name: str, info, config: RunConfig, steps: int,
                    num_replicas: int, lr_milestones: Sequence[float],
                    adapted: Optional[Mapping] = None, split_seed: Optional[int] = None,
                    calibration: Optional[Mapping] = None) -> Dict:
    """``metrics.json`` of a run that has not trained yet.

    Args:
      program: 'train' or 'adapt'.
      model_name: The model's name.
      info: The dataset's :class:`wa_tf.data.DatasetInfo`.
      config: The run's config.
      steps: Training steps per epoch.
      num_replicas: Replicas in sync.
      lr_milestones: Epochs at which the learning rate decays.
      adapted: adapt: {'model_dir', 'checkpoint', the lists of
        :func:`wa_tf.quantization.copy_weights`'s report, and 'from_source':
        the flags taken from the source run}.
      split_seed: The seed of the validation split; default ``config.seed``.
      calibration: --warmup's calibration: {'images', 'quantizers'}.
    """
    metrics = {
        "status": RUNNING,
        "program": program,
        "model": model_name,
        "dataset": {"name": info.name, "num_classes": info.num_classes,
                    "image_shape": list(info.image_shape), "mean": list(info.mean),
                    "std": list(info.std), "num_examples": dict(info.num_examples)},
        "epochs": config.epochs,
        "steps_per_epoch": steps,
        "global_batch_size": config.batch_size,
        "num_replicas": num_replicas,
        "lr_milestones": list(lr_milestones),
        "validation_split_seed": config.seed if split_seed is None else split_seed,
        "history": [],
        "best": None,
        "test": None,
    }
    if adapted:
        metrics["adapted_from"] = {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                   for k, v in adapted.items()}
    if calibration:
        metrics["warmup_calibration"] = dict(calibration)
    return metrics


def truncate_history(metrics: Dict, epochs_done: int):
    """Keeps the first `epochs_done` epochs of `metrics` (a resumed run) and their best."""
    metrics["history"] = metrics["history"][:epochs_done]
    best = max(metrics["history"], key=lambda h: h["val_accuracy"], default=None)
    metrics["best"] = {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"]} \
        if best else None


def add_epoch(metrics: Dict, record: Mapping) -> bool:
    """Appends an epoch's record; True if it is the new best validation accuracy."""
    metrics["history"].append(dict(record))
    if metrics["best"] is None or record["val_accuracy"] > metrics["best"]["val_accuracy"]:
        metrics["best"] = {"epoch": record["epoch"], "val_accuracy": record["val_accuracy"]}
        return True
    return False


def stop_on_nan(metrics: Dict, message: str):
    """Marks `metrics` as stopped on a NaN loss with `message`."""
    metrics["status"] = NAN_LOSS
    metrics["error"] = message


def results_text(dataset: str, test: Optional[Mapping], best_epoch: Optional[int]) -> List[str]:
    """The lines of the final results: test accuracy of the final and the best model.

    Args:
      dataset: The dataset's name.
      test: {'final': result, 'best': result} or None when there is no test split.
      best_epoch: The best validation epoch.
    """
    if not test:
        return [f"Dataset {dataset} has no test split: no test accuracy "
                "(the validation accuracy of each epoch is in metrics.json)."]
    return [result_line("Test set (final model)", test["final"]),
            result_line(f"Test set (best model, epoch {best_epoch})", test["best"])]


def finish(metrics: Dict, test: Optional[Mapping]):
    """Marks `metrics` as finished with the test results."""
    metrics["test"] = dict(test) if test else None
    metrics["status"] = FINISHED
