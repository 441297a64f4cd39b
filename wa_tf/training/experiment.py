"""Experiment folders: naming, flags, metrics, resuming and reloading.

A run writes into ``<outDir>/<ModelName>/<Flex|Static>/mult_<m>/bits_<b|FP>/
lr_<lr>/<UTC timestamp>/`` (no Flex/Static level for normal convolutions), as
the reference does::

    FLAGS.txt          absl flagfile: ``bin/train.py --flagfile=FLAGS.txt`` reruns it
    report.txt         layer table, configuration and results
    metrics.json       status, dataset, per-epoch history, best epoch, test results
    logs/              TensorBoard summaries
    checkpoints/best   weights of the best validation epoch (save_weights prefix)
    checkpoints/final  weights after the last epoch
    backup/            fault-tolerance state (model + optimizer + epoch) of the
                       last completed epoch; removed when the run finishes
    .lock              held (flock) by the process training in the folder

An existing folder is never reused for a new run.  A run is *unfinished*
while ``metrics.json`` says ``"status": "running"``; re-running the same
command (same flags apart from :data:`RUNTIME_FLAGS`) finds the newest
unfinished folder whose lock is free and resumes there.

The files are written with :mod:`~wa_tf.training.run_folder`'s primitives
(atomic writes, the lock, the search for an unfinished folder), which search
and sweep share.

What goes into ``report.txt`` and ``metrics.json`` is composed by
:mod:`~wa_tf.training.run_report`; :mod:`~wa_tf.training.train_lib` decides when.
"""

import datetime
import os
from typing import Dict, Mapping, Optional, Tuple, Union

from absl import flags as absl_flags

from wa_tf import data, models
from wa_tf.training import flags as wa_flags
from wa_tf.training import run_folder
from wa_tf.training.config import RunConfig
from wa_tf.training.errors import ArgumentError

# Re-exported: train_lib, evaluate, search and sweep read a run folder's files and
# statuses through this module.
from wa_tf.training.run_folder import FLAGS_FILE as FLAGS_FILE
from wa_tf.training.run_folder import LOCK_FILE as LOCK_FILE
from wa_tf.training.run_folder import REPORT_FILE as REPORT_FILE
from wa_tf.training.run_folder import Lock as Lock
from wa_tf.training.run_folder import append_report as append_report
from wa_tf.training.run_folder import flags_to_lines as flags_to_lines
from wa_tf.training.run_report import FINISHED as FINISHED
from wa_tf.training.run_report import NAN_LOSS as NAN_LOSS
from wa_tf.training.run_report import RUNNING as RUNNING

METRICS_FILE = "metrics.json"
LOG_DIR = "logs"
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"
ARCHITECTURE_FILE = "architecture.json"

# Flags that change how a run executes, not what it computes: a run resumed with
# other values of these is still "the same command" (see find_unfinished).
RUNTIME_FLAGS = ("use_cpu", "distribution_strategy", "num_gpus", "jit_compile", "resume")
# The reference's names for the final and best checkpoints, accepted as checkpoint names.
CHECKPOINT_ALIASES = {"model.pt": "final", "best_model.pt": "best", "final": "final",
                      "best": "best"}


def parent_dir(config: RunConfig, model_name: str) -> str:
    """``<outDir>/<ModelName>[/Flex|/Static]/mult_<m>/bits_<b|FP>/lr_<lr>``."""
    parts = [config.out_dir, model_name]
    if config.conv not in (None, "normal"):
        parts.append(config.conv.capitalize())
    bits = "mixed" if config.architecture else config.bits if config.quantize else "FP"
    parts += [f"mult_{config.width_multiplier}", f"bits_{bits}", f"lr_{config.lr}"]
    return os.path.join(*parts)


def out_dir_of(model_dir: str, config: RunConfig, model_name: Optional[str] = None) -> str:
    """The ``outDir`` a run's folder lies in: `model_dir` without its
    ``<ModelName>/.../lr_<lr>/<time>`` part.

    A folder that was moved or renamed out of that layout gives its recorded
    ``config.out_dir`` instead.

    Args:
      model_dir: The run's experiment folder.
      config: The run's config.
      model_name: The run's model name (``metrics.json``'s ``model``); by
        default the reference's name for `config`.
    """
    if model_name is None:
        model_name = (models.architecture_name(architecture_file(model_dir, config))
                      if config.architecture else models.model_name(config.conv,
                                                                    config.tile_size))
    tail = parent_dir(config.replace(out_dir="."), model_name).split(os.sep)[1:]
    parts = os.path.normpath(model_dir).split(os.sep)[:-1]  # without <time>
    head = parts[:len(parts) - len(tail)]
    if len(parts) >= len(tail) and parts[len(head):] == tail:
        return os.sep.join(head) or ("." if not head else os.sep)
    return config.out_dir


def split_seed(metrics: Mapping, config: RunConfig) -> int:
    """The seed that chose a run's validation split (its ``seed`` unless
    ``metrics.json`` records another, as an adapted run does)."""
    return int(metrics.get("validation_split_seed", config.seed))


def run_split_seed(model_dir: str) -> int:
    """The seed that chose the validation split of the run in `model_dir`."""
    return split_seed(read_metrics(model_dir) or {}, read_config(model_dir))


def create(config: RunConfig, model_name: str, now: Optional[datetime.datetime] = None) -> str:
    """Creates a new, empty experiment folder named after the UTC time.

    A folder that exists already (two runs started in the same second) is
    never reused: a ``_2``, ``_3``... suffix is added instead.
    """
    return run_folder.create(parent_dir(config, model_name), now)


def _flag_dict(config: Union[RunConfig, Mapping]) -> Mapping:
    return config.to_flag_dict() if isinstance(config, RunConfig) else config


def write_flags(model_dir: str, config: Union[RunConfig, Mapping]):
    """Writes ``FLAGS.txt``, an absl flagfile reproducing the run.

    Args:
      model_dir: The experiment folder.
      config: The run's config, or its flag dict (flag name -> value).
    """
    run_folder.write_flags(model_dir, _flag_dict(config))


def read_flags(model_dir: str) -> Dict:
    """The flags of the run in `model_dir`, parsed from its ``FLAGS.txt``.

    Returns:
      A dict flag name -> value for every training flag (defaults for flags
      the file does not set).

    Raises:
      ArgumentError: about 'model_dir' if the folder or its FLAGS.txt is
        missing or unreadable.
    """
    if not model_dir or not os.path.isdir(model_dir):
        raise ArgumentError("model_dir", lambda n: f"{n('model_dir')}: {model_dir!r} is not "
                            "a directory")
    path = os.path.join(model_dir, FLAGS_FILE)
    if not os.path.isfile(path):
        raise ArgumentError("model_dir", lambda n: f"{n('model_dir')}: {model_dir} has no "
                            f"{FLAGS_FILE} (not an experiment folder of bin/train.py or "
                            "bin/adapt.py)")
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    try:
        values(["read_flags", f"--flagfile={path}"])
    except absl_flags.Error as e:
        reason = str(e).splitlines()[0]
        raise ArgumentError("model_dir", lambda n: f"{n('model_dir')}: cannot read {path}: "
                            f"{reason}") from None
    return wa_flags.as_dict(values)


def read_config(model_dir: str) -> RunConfig:
    """The :class:`RunConfig` of the run in `model_dir` (see :func:`read_flags`)."""
    flag_values = read_flags(model_dir)
    try:
        return RunConfig.from_flag_dict(flag_values)
    except ArgumentError as e:
        # `e` is bound as a default: the message is composed again after this block.
        raise ArgumentError("model_dir", lambda n, inner=e: f"{n('model_dir')}: {model_dir}/"
                            f"{FLAGS_FILE}: {inner.message(n)}") from None


def same_command(a: Union[RunConfig, Mapping], b: Union[RunConfig, Mapping]) -> bool:
    """Whether two configs (or flag dicts) describe the same run (runtime flags aside)."""
    a, b = _flag_dict(a), _flag_dict(b)
    keys = (set(a) | set(b)) - set(RUNTIME_FLAGS)
    return all(a.get(k) == b.get(k) for k in keys)


def write_metrics(model_dir: str, metrics: Mapping):
    """Writes ``metrics.json`` atomically."""
    run_folder.write_json(os.path.join(model_dir, METRICS_FILE), metrics)


def read_metrics(model_dir: str) -> Optional[Dict]:
    """``metrics.json`` of `model_dir`, or None when absent or unreadable."""
    return run_folder.read_json(os.path.join(model_dir, METRICS_FILE))


def find_unfinished(config: RunConfig, model_name: str) -> Tuple[Optional[str], Optional[Lock]]:
    """The newest unfinished folder of the same command whose lock is free.

    Returns:
      (folder, held lock), or (None, None) when there is none.
    """

    def matches(path):
        metrics = read_metrics(path)
        if metrics is None or metrics.get("status") != RUNNING:
            return False
        try:
            return same_command(read_flags(path), config)
        except ArgumentError:  # no or an invalid FLAGS.txt: not a run of this command
            return False

    return run_folder.find_unfinished(parent_dir(config, model_name), matches)


def architecture_file(model_dir: Optional[str], config: RunConfig) -> str:
    """The architecture file of a run: its folder's copy, else ``config.architecture``."""
    if model_dir:
        copy = os.path.join(model_dir, ARCHITECTURE_FILE)
        if os.path.isfile(copy):
            return copy
    return config.architecture


def build_model(config: Union[RunConfig, Mapping], num_classes: int, input_shape,
                model_dir: Optional[str] = None):
    """The ResNet-18-like model described by a run's config (or flag dict).

    With an architecture, the copy in `model_dir` (when given and present)
    is used: the file named on the command line may have changed since.
    """
    config = RunConfig.of(config)
    if config.architecture:
        return models.resnet18_like(
            architecture=architecture_file(model_dir, config),
            width_multiplier=config.width_multiplier, num_classes=num_classes,
            input_shape=tuple(input_shape), per_tap=config.per_tap, warmup=config.warmup,
            recompute=config.recompute)
    return models.resnet18_like(
        conv=config.conv, tile_size=config.tile_size,
        width_multiplier=config.width_multiplier, num_classes=num_classes,
        bits=config.bits_or_none, input_shape=tuple(input_shape), per_tap=config.per_tap,
        warmup=config.warmup, recompute=config.recompute)


def checkpoint_name(checkpoint: str) -> str:
    """'final', 'best' or the checkpoint path prefix `checkpoint` names."""
    return CHECKPOINT_ALIASES.get(checkpoint, checkpoint)


def checkpoint_path(model_dir: str, checkpoint: str = "best") -> str:
    """Resolves 'best', 'final' (or the reference's 'best_model.pt', 'model.pt')
    or a checkpoint path prefix to an existing checkpoint prefix.

    Raises:
      ArgumentError: about 'checkpoint' if there is no such checkpoint.
    """
    name = checkpoint_name(checkpoint)
    path = os.path.join(model_dir, CHECKPOINT_DIR, name) if name in ("best", "final") else name
    if not os.path.isfile(path + ".index"):
        raise ArgumentError("checkpoint", lambda n: f"{n('checkpoint')}: no checkpoint {path} "
                            f"(expected {path}.index; use final, best or a checkpoint path "
                            "prefix)")
    return path


def restore_weights(model, path: str):
    """Restores `model`'s weights from a checkpoint prefix written by save_weights.

    Raises:
      ArgumentError: about 'checkpoint' if the checkpoint does not fit the model.
    """
    try:
        status = model.load_weights(path)
        status.assert_existing_objects_matched()
        status.expect_partial()  # the optimizer's slots are not needed here
    except (AssertionError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise ArgumentError("checkpoint", lambda n: f"{n('checkpoint')}: checkpoint {path} "
                            f"does not fit the model {model.name}: {reason}") from None


def dataset_meta(model_dir: str, config: Union[RunConfig, Mapping]) -> Dict:
    """num_classes and image_shape of a run: from metrics.json, else from the data."""
    metrics = read_metrics(model_dir) or {}
    meta = metrics.get("dataset")
    if meta and "num_classes" in meta and "image_shape" in meta:
        return meta
    config = RunConfig.of(config)
    _, info = data.load(config.dataset, data_dir=config.data_dir, seed=config.seed,
                        skip_corrupt=config.skip_corrupt)
    return {"num_classes": info.num_classes, "image_shape": list(info.image_shape)}


def load_model(model_dir: str, checkpoint: str = "best"):
    """Rebuilds a run's model from its ``FLAGS.txt`` and restores a checkpoint.

    Example:
      >>> model, flags = load_model("experiments/ResNet18LikeF4/Flex/.../2024_01_01_00_00_00")

    Args:
      model_dir: The experiment folder.
      checkpoint: 'best', 'final', the reference's 'best_model.pt' /
        'model.pt', or a checkpoint path prefix.

    Returns:
      (model, flags dict as :func:`read_flags` returns it).  The model is not compiled.

    Raises:
      ArgumentError (a ValueError): about 'model_dir' for a missing folder, about
        'checkpoint' for a missing checkpoint or one that does not fit the model.
    """
    flag_values = read_flags(model_dir)
    path = checkpoint_path(model_dir, checkpoint)
    meta = dataset_meta(model_dir, flag_values)
    model = build_model(flag_values, meta["num_classes"], meta["image_shape"], model_dir)
    restore_weights(model, path)
    return model, flag_values


# -- report.txt and metrics.json contents -------------------------------------
