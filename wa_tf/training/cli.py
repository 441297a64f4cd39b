"""Command-line glue shared by ``bin/evaluate.py`` and ``bin/export.py``.

Both binaries name a training run with ``--modelDir`` and ``--checkpoint``, may
override its ``--data_dir`` and ``--batch_size``, and report bad input as one
``error:`` line through :mod:`wa_tf.training.flag_errors`.  The library functions they
call raise ``ValueError``s about their own arguments; :data:`FLAG_NAMES` says
which flag sets each, and the functions here name the flag that set the argument.
"""

from typing import Mapping

from absl import flags

from wa_tf import data
from wa_tf.training import experiment, flag_errors
from wa_tf.training import flags as wa_flags

# Library argument -> flag of these binaries (see wa_tf.training.flag_errors.flag_message):
# experiment.read_flags / load_model name the run's folder and checkpoint
# model_dir and checkpoint, wa_tf.data names data_dir and batch_size.
FLAG_NAMES: Mapping[str, str] = {"model_dir": "modelDir", "checkpoint": "checkpoint",
                                 "data_dir": "data_dir", "batch_size": "batch_size"}


def define_run_flags(flag_values=None):
    """Defines --modelDir, --checkpoint, --data_dir and --batch_size.

    --data_dir and --batch_size are the binaries' common flags
    (:func:`wa_tf.training.flags.define_common_flags`); here they override the
    run's values.
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("modelDir", None, "Experiment folder of a bin/train.py or "
                        "bin/adapt.py run.", flag_values=fv)
    overrides = "when given, overrides the run's"
    wa_flags.define_common_flags("data_dir", "batch_size", flag_values=fv,
                                 defaults={"batch_size": None},
                                 notes={"data_dir": overrides, "batch_size": overrides})
    flags.DEFINE_string("checkpoint", "best", "Checkpoint of the run: best (best validation "
                        "accuracy), final, or a checkpoint path prefix.", flag_values=fv)


def flag_error(flag: str, error: Exception) -> ValueError:
    """A library error about the argument ``flag`` sets, as one line naming ``flag``.

    The message is :func:`wa_tf.training.flag_errors.flag_message`'s with
    :data:`FLAG_NAMES`: its arguments are spelled as these binaries' flags
    (``"checkpoint: no checkpoint ..."`` -> ``"--checkpoint: no checkpoint ..."``),
    and one that names no flag first gets ``flag`` as its subject.
    """
    return ValueError(flag_errors.flag_message(error, FLAG_NAMES, subject=flag))


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
    fv = _run_flag_values(flag_values)
    try:
        config = experiment.read_flags(fv.modelDir)
    except ValueError as e:
        raise flag_error("--modelDir", e) from None
    return run_config(config, fv)


def load_run(flag_values=None):
    """The model and flags of the run named by --modelDir / --checkpoint / --data_dir.

    Raises:
      ValueError: naming --modelDir for a missing or invalid folder, and
        --checkpoint for a missing checkpoint or one that does not fit the model.
    """
    fv = _run_flag_values(flag_values)
    config = read_run_flags(fv)
    # The folder is valid: what fails from here on is the checkpoint.
    try:
        model, _ = experiment.load_model(fv.modelDir, checkpoint=fv.checkpoint)
    except ValueError as e:
        raise flag_error("--checkpoint", e) from None
    return model, config


def run_split_seed(flag_values=None) -> int:
    """The seed of the validation split of the run named by --modelDir."""
    fv = _run_flag_values(flag_values)
    try:
        return experiment.run_split_seed(fv.modelDir)
    except ValueError as e:
        raise flag_error("--modelDir", e) from None


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
    meta = (experiment.read_metrics(model_dir) or {}).get("dataset") or {}
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    _, info = data.load(config["dataset"], data_dir=config.get("data_dir") or None,
                        seed=int(config.get("seed", 1)),
                        skip_corrupt=bool(config.get("skip_corrupt", False)))
    return info.mean, info.std
