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
command (same flags apart from :data:`~wa_tf.training.flags.RUNTIME_FLAGS`)
finds the newest unfinished folder whose lock is free and resumes there.
"""

import datetime
import fcntl
import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

from absl import flags as absl_flags

from wa_tf.training import flags as wa_flags

FLAGS_FILE = "FLAGS.txt"
REPORT_FILE = "report.txt"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"
LOG_DIR = "logs"
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"

RUNNING, FINISHED, NAN_LOSS = "running", "finished", "nan_loss"


def parent_dir(config: Mapping, model_name: str) -> str:
    """``<outDir>/<ModelName>[/Flex|/Static]/mult_<m>/bits_<b|FP>/lr_<lr>``."""
    parts = [config["outDir"], model_name]
    if not config["use_normal_conv"]:
        parts.append("Flex" if config["flex"] else "Static")
    parts += [f"mult_{config['mult']}", f"bits_{config['bits'] if config['Q'] else 'FP'}",
              f"lr_{config['lr']}"]
    return os.path.join(*parts)


def create(config: Mapping, model_name: str, now: Optional[datetime.datetime] = None) -> str:
    """Creates a new, empty experiment folder named after the UTC time.

    A folder that exists already (two runs started in the same second) is
    never reused: a ``_2``, ``_3``... suffix is added instead.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    base = os.path.join(parent_dir(config, model_name), now.strftime("%Y_%m_%d_%H_%M_%S"))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    path, suffix = base, 1
    while True:
        try:
            os.mkdir(path)  # atomic: fails if the folder exists
            return path
        except FileExistsError:
            suffix += 1
            path = f"{base}_{suffix}"


def flags_to_lines(config: Mapping) -> List[str]:
    """absl flagfile lines for `config` (None values are left out)."""
    lines = []
    for name, value in config.items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        else:
            lines.append(f"--{name}={value}")
    return lines


def write_flags(model_dir: str, config: Mapping):
    """Writes ``FLAGS.txt``, an absl flagfile reproducing the run."""
    _write_atomic(os.path.join(model_dir, FLAGS_FILE), "\n".join(flags_to_lines(config)) + "\n")


def read_flags(model_dir: str) -> Dict:
    """The flags of the run in `model_dir`, parsed from its ``FLAGS.txt``.

    Returns:
      A dict flag name -> value for every training flag (defaults for flags
      the file does not set).

    Raises:
      FlagError: naming --modelDir if the folder or its FLAGS.txt is missing
        or unreadable.
    """
    if not model_dir or not os.path.isdir(model_dir):
        raise wa_flags.FlagError(f"--modelDir: {model_dir!r} is not a directory")
    path = os.path.join(model_dir, FLAGS_FILE)
    if not os.path.isfile(path):
        raise wa_flags.FlagError(f"--modelDir: {model_dir} has no {FLAGS_FILE} "
                                 "(not an experiment folder of bin/train.py or bin/adapt.py)")
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    try:
        values(["read_flags", f"--flagfile={path}"])
    except absl_flags.Error as e:
        raise wa_flags.FlagError(f"--modelDir: cannot read {path}: "
                                 f"{str(e).splitlines()[0]}") from None
    return wa_flags.as_dict(values)


def same_command(a: Mapping, b: Mapping) -> bool:
    """Whether two flag dicts describe the same run (runtime flags aside)."""
    keys = (set(a) | set(b)) - set(wa_flags.RUNTIME_FLAGS)
    return all(a.get(k) == b.get(k) for k in keys)


def _write_atomic(path: str, text: str):
    # A reader (or a resumed run after SIGKILL) sees the old or the new file, never half.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_metrics(model_dir: str, metrics: Mapping):
    """Writes ``metrics.json`` atomically."""
    _write_atomic(os.path.join(model_dir, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")


def read_metrics(model_dir: str) -> Optional[Dict]:
    """``metrics.json`` of `model_dir`, or None when absent or unreadable."""
    try:
        with open(os.path.join(model_dir, METRICS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def append_report(model_dir: str, text: str):
    """Appends `text` (and a newline) to ``report.txt``."""
    with open(os.path.join(model_dir, REPORT_FILE), "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


class Lock:
    """An exclusive ``flock`` on ``<model_dir>/.lock``, held while training there.

    The kernel releases it when the process dies (SIGKILL included), so a free
    lock on an unfinished folder means nobody is training in it.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._file = None

    def acquire(self) -> bool:
        """Takes the lock without waiting; False if another process holds it."""
        f = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._file = f
        return True

    def release(self, remove: bool = False):
        """Releases the lock; `remove` also deletes the lock file (finished runs)."""
        if self._file is not None:
            if remove:
                os.remove(self.path)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def find_unfinished(config: Mapping, model_name: str) -> Tuple[Optional[str], Optional[Lock]]:
    """The newest unfinished folder of the same command whose lock is free.

    Returns:
      (folder, held lock), or (None, None) when there is none.
    """
    parent = parent_dir(config, model_name)
    if not os.path.isdir(parent):
        return None, None
    for name in sorted(os.listdir(parent), reverse=True):
        path = os.path.join(parent, name)
        metrics = read_metrics(path)
        if metrics is None or metrics.get("status") != RUNNING:
            continue
        try:
            if not same_command(read_flags(path), config):
                continue
        except wa_flags.FlagError:
            continue
        lock = Lock(path)
        if lock.acquire():
            return path, lock
    return None, None


def build_model(config: Mapping, num_classes: int, input_shape):
    """The ResNet-18-like model described by the flags."""
    from wa_tf import models  # pylint: disable=import-outside-toplevel
    return models.resnet18_like(
        conv=wa_flags.conv_mode(config), tile_size=config["F"],
        width_multiplier=config["mult"], num_classes=num_classes,
        bits=config["bits"] if config["Q"] else None, input_shape=tuple(input_shape),
        per_tap=config["per_tap"], warmup=config["warmup"], recompute=config["recompute"])


def checkpoint_path(model_dir: str, checkpoint: str = "best") -> str:
    """Resolves 'best', 'final' (or the reference's 'best_model.pt', 'model.pt')
    or a checkpoint path prefix to an existing checkpoint prefix.

    Raises:
      FlagError: naming --modelToLoad if there is no such checkpoint.
    """
    name = wa_flags.checkpoint_name(checkpoint)
    path = os.path.join(model_dir, CHECKPOINT_DIR, name) if name in ("best", "final") else name
    if not os.path.isfile(path + ".index"):
        raise wa_flags.FlagError(f"--modelToLoad: no checkpoint {path} (expected {path}.index; "
                                 "use final, best or a checkpoint path prefix)")
    return path


def restore_weights(model, path: str):
    """Restores `model`'s weights from a checkpoint prefix written by save_weights.

    Raises:
      FlagError: naming --modelToLoad if the checkpoint does not fit the model.
    """
    try:
        status = model.load_weights(path)
        status.assert_existing_objects_matched()
        status.expect_partial()  # the optimizer's slots are not needed here
    except (AssertionError, ValueError) as e:
        raise wa_flags.FlagError(f"--modelToLoad: checkpoint {path} does not fit the model "
                                 f"{model.name}: {str(e).splitlines()[0]}") from None


def dataset_meta(model_dir: str, config: Mapping) -> Dict:
    """num_classes and image_shape of a run: from metrics.json, else from the data."""
    metrics = read_metrics(model_dir) or {}
    meta = metrics.get("dataset")
    if meta and "num_classes" in meta and "image_shape" in meta:
        return meta
    from wa_tf import data  # pylint: disable=import-outside-toplevel
    _, info = data.load(config["dataset"], data_dir=config["data_dir"], seed=config["seed"])
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
      (model, flags dict).  The model is not compiled.

    Raises:
      FlagError (a ValueError): for a missing folder or checkpoint, or a
        checkpoint that does not fit the model.
    """
    config = read_flags(model_dir)
    path = checkpoint_path(model_dir, checkpoint)
    meta = dataset_meta(model_dir, config)
    model = build_model(config, meta["num_classes"], meta["image_shape"])
    restore_weights(model, path)
    return model, config
