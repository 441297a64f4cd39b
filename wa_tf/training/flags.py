"""Command-line flags shared by ``bin/train.py`` and ``bin/adapt.py``.

The reference's flags keep their names and defaults (``--use_normal_conv`` /
``--static`` / ``--flex``, ``--F``, ``--Q``, ``--bits``, ``--mult``, ``--epochs``,
``--batch_size``, ``--lr``, ``--use_cpu``, ``--seed``, ``--outDir``,
``--modelDir``, ``--modelToLoad``, ``--warmup``); the others are wa_tf's.

Bad input is reported as one line naming the flag: :func:`validate` raises
:class:`FlagError`, and :func:`parse_argv` / :func:`run_main` turn it (and
absl's own parsing errors) into ``error: ...`` on stderr and a non-zero exit.
"""

import sys
from typing import Callable, Dict, Mapping

from absl import flags
from absl import logging

from wa_tf.data import DATASETS
from wa_tf.training.distribute import STRATEGIES

MODES = ("use_normal_conv", "static", "flex")
TILE_SIZES = (2, 4, 6)
# The reference's names for the final and best checkpoints, accepted by --modelToLoad.
CHECKPOINT_ALIASES = {"model.pt": "final", "best_model.pt": "best", "final": "final",
                      "best": "best"}
# Flags that change how a run executes, not what it computes: a run resumed with
# other values of these is still "the same command" (see experiment.find_unfinished).
RUNTIME_FLAGS = ("use_cpu", "distribution_strategy", "num_gpus", "jit_compile", "resume")
# Architecture flags that adapt.py takes from --modelDir's FLAGS.txt.
FIXED_BY_MODEL_DIR = ("mult", "dataset")

EXIT_BAD_INPUT = 2


class FlagError(ValueError):
    """A flag has a bad value; the message starts with the flag's name."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
    """Defines the training flags on `flag_values` (absl's global FLAGS by default)."""
    fv = flag_values
    # The reference's flags.
    flags.DEFINE_boolean("use_normal_conv", False, "Use normal Conv2D layers.", flag_values=fv)
    flags.DEFINE_boolean("static", False, "Winograd-aware layers with fixed (Cook-Toom) "
                         "transforms.", flag_values=fv)
    flags.DEFINE_boolean("flex", False, "Winograd-aware layers with learnable transforms.",
                         flag_values=fv)
    flags.DEFINE_integer("F", 4, "Winograd tile size m of F(m x m, 3 x 3): 2, 4 or 6.",
                         flag_values=fv)
    flags.DEFINE_boolean("Q", False, "Quantization-aware training.", flag_values=fv)
    flags.DEFINE_integer("bits", 8, "Bit-width of weights and activations with --Q (2..16).",
                         flag_values=fv)
    flags.DEFINE_boolean("warmup", False, "Winograd-domain quantizers take their range from "
                         "the incoming batch until they have statistics (for adapting).",
                         flag_values=fv)
    flags.DEFINE_float("mult", 0.5, "Width multiplier of the residual stages, in (0, 1].",
                       flag_values=fv)
    flags.DEFINE_integer("epochs", 10, "Number of epochs.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Global batch size (split across replicas).",
                         flag_values=fv)
    flags.DEFINE_float("lr", 0.001, "Initial learning rate of Adam.", flag_values=fv)
    flags.DEFINE_boolean("use_cpu", False, "Train on the CPU even when GPUs are present.",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 1, "Random seed (weights, data order, validation split).",
                         flag_values=fv)
    flags.DEFINE_string("outDir", "experiments/", "Folder that receives the experiment "
                        "folders.", flag_values=fv)
    flags.DEFINE_string("modelDir", None, "adapt.py: experiment folder of the model to start "
                        "from.", flag_values=fv)
    flags.DEFINE_string("modelToLoad", "model.pt", "adapt.py: checkpoint in --modelDir: "
                        "model.pt or final (the final model), best_model.pt or best (best "
                        "validation accuracy), or a checkpoint path prefix.", flag_values=fv)
    # wa_tf's flags.
    flags.DEFINE_string("dataset", "cifar10", f"Dataset: {', '.join(DATASETS)}.",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "image_folder: folder with <split>/<class>/<image>; "
                        "cifar10/cifar100: the TFDS data directory.", flag_values=fv)
    flags.DEFINE_integer("steps_per_epoch", None, "Train at most this many steps per epoch "
                         "(quick runs); default: the whole training split.", flag_values=fv)
    flags.DEFINE_boolean("per_tap", False, "With --Q: one quantization range per Winograd tap "
                         "(t x t position) instead of per tensor.", flag_values=fv)
    flags.DEFINE_boolean("recompute", False, "Recompute Winograd layers in the backward pass "
                         "instead of keeping their intermediate tensors: less memory, more "
                         "compute.", flag_values=fv)
    flags.DEFINE_boolean("jit_compile", False, "Compile the training step with XLA.",
                         flag_values=fv)
    flags.DEFINE_string("distribution_strategy", None, f"One of {', '.join(STRATEGIES)}; "
                        "default: mirrored over all GPUs when there are several, else default.",
                        flag_values=fv)
    flags.DEFINE_integer("num_gpus", None, "GPUs to use (default: all visible).",
                         flag_values=fv)
    flags.DEFINE_boolean("resume", True, "Resume the newest unfinished experiment folder of "
                         "the same command, if there is one (--noresume: always start anew).",
                         flag_values=fv)


def flag_names(flag_values: flags.FlagValues = flags.FLAGS):
    """Names of the training flags, in definition order."""
    probe = flags.FlagValues()
    define_flags(probe)
    return [name for name in probe if name in flag_values]


def as_dict(flag_values: flags.FlagValues = flags.FLAGS) -> Dict:
    """The training flags' values as a plain dict."""
    return {name: flag_values[name].value for name in flag_names(flag_values)}


def conv_mode(config: Mapping) -> str:
    """'normal', 'static' or 'flex' from the three mode flags (validated)."""
    return "normal" if config["use_normal_conv"] else ("static" if config["static"] else "flex")


def validate(config: Mapping, program: str = "train"):
    """Checks flag values; raises FlagError naming the first bad flag.

    Args:
      config: Flag values (:func:`as_dict`); for 'adapt', --mult and --dataset
        may be None (taken from --modelDir's FLAGS.txt).
      program: 'train' or 'adapt' (adapt needs --modelDir).
    """
    modes = [f"--{m}" for m in MODES if config[m]]
    if len(modes) != 1:
        raise FlagError("exactly one of --use_normal_conv, --static, --flex is required; got "
                        + (" ".join(modes) if modes else "none"))
    if config["F"] not in TILE_SIZES:
        raise FlagError(f"--F must be one of 2, 4, 6 (F(2x2,3x3), F(4x4,3x3), F(6x6,3x3)); "
                        f"got {config['F']}")
    if not 2 <= config["bits"] <= 16:
        raise FlagError(f"--bits must be an integer from 2 to 16; got {config['bits']}")
    if config["mult"] is not None and not 1 / 64 <= config["mult"] <= 1:
        raise FlagError(f"--mult must be in (0, 1] (and at least 1/64, so every stage has a "
                        f"channel); got {config['mult']}")
    for name in ("epochs", "batch_size"):
        if config[name] < 1:
            raise FlagError(f"--{name} must be a positive integer; got {config[name]}")
    if config["steps_per_epoch"] is not None and config["steps_per_epoch"] < 1:
        raise FlagError(f"--steps_per_epoch must be a positive integer; "
                        f"got {config['steps_per_epoch']}")
    if not config["lr"] > 0:
        raise FlagError(f"--lr must be positive; got {config['lr']}")
    if config["dataset"] is not None and config["dataset"] not in DATASETS:
        raise FlagError(f"--dataset must be one of {', '.join(DATASETS)}; "
                        f"got {config['dataset']!r}")
    # adapt.py takes --data_dir from --modelDir's FLAGS.txt when not given.
    if config["dataset"] == "image_folder" and not config["data_dir"] and program != "adapt":
        raise FlagError("--data_dir is required with --dataset=image_folder "
                        "(a folder with <split>/<class>/<image> files)")
    if config["distribution_strategy"] is not None and \
            config["distribution_strategy"].lower() not in STRATEGIES:
        raise FlagError(f"--distribution_strategy must be one of {', '.join(STRATEGIES)}; "
                        f"got {config['distribution_strategy']!r}")
    if config["num_gpus"] is not None and config["num_gpus"] < 0:
        raise FlagError(f"--num_gpus must be >= 0; got {config['num_gpus']}")
    if not config["outDir"]:
        raise FlagError("--outDir must not be empty")
    if program == "adapt" and not config["modelDir"]:
        raise FlagError("--modelDir is required: the experiment folder of the model to adapt")


def checkpoint_name(model_to_load: str) -> str:
    """'final', 'best' or the path given by --modelToLoad."""
    return CHECKPOINT_ALIASES.get(model_to_load, model_to_load)


def fail(message: str, code: int = EXIT_BAD_INPUT):
    """Prints one ``error:`` line on stderr and exits with `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_argv(argv, flag_values: flags.FlagValues = flags.FLAGS):
    """absl ``flags_parser`` for ``app.run``: one-line errors instead of absl's usage text."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])


class TrainingStopped(RuntimeError):
    """Training stopped early (NaN loss); the message says what was kept."""


def run_main(fn: Callable[[Dict], object], program: str,
             flag_values: flags.FlagValues = flags.FLAGS):
    """Validates the flags and calls ``fn(config)``; bad input exits with one line.

    The library raises :class:`FlagError` for bad input (it converts the
    ValueErrors of data loading, model building and checkpoint loading), and
    :class:`TrainingStopped` when training stops on a NaN loss; both end the
    program with one ``error:`` line, other exceptions keep their traceback.
    """
    if "verbosity" in flag_values and not flag_values["verbosity"].present:
        # TensorFlow's INFO lines (one per checkpoint) would bury the progress bar.
        logging.set_verbosity(logging.WARNING)
    config = as_dict(flag_values)
    if program == "adapt":
        # Not given: taken from --modelDir's FLAGS.txt (see train_lib.adapt).
        for name in FIXED_BY_MODEL_DIR:
            if not flag_values[name].present:
                config[name] = None
    try:
        validate(config, program)
        fn(config)
    except FlagError as e:
        fail(str(e).splitlines()[0])
    except TrainingStopped as e:
        fail(str(e).splitlines()[0], code=1)
