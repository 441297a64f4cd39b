"""Command-line flags shared by ``bin/train.py`` and ``bin/adapt.py``.

The reference's flags keep their names and defaults (``--use_normal_conv`` /
``--static`` / ``--flex``, ``--F``, ``--Q``, ``--bits``, ``--mult``, ``--epochs``,
``--batch_size``, ``--lr``, ``--use_cpu``, ``--seed``, ``--outDir``,
``--modelDir``, ``--modelToLoad``, ``--warmup``); the others are wa_tf's.

:func:`from_flags` converts the flags, once, into the typed
:class:`~wa_tf.training.config.RunConfig` the library reads.  Bad input is
reported as one line naming the flag: the library's
:class:`~wa_tf.training.errors.ArgumentError` names a config field or argument,
:func:`flag_message` spells it as its flag, and :func:`parse_argv` /
:func:`run_main` print it (and absl's own parsing errors) as ``error: ...`` on
stderr with a non-zero exit.
"""

import sys
from typing import Callable, Dict, Mapping, Optional

from absl import flags, logging

from wa_tf.data import DATASETS
from wa_tf.training.config import FLAG_NAMES, FROM_SOURCE, MODE_FLAGS, RunConfig
from wa_tf.training.distribute import STRATEGIES
from wa_tf.training.errors import ArgumentError

MODES = tuple(MODE_FLAGS.values())
# Flags that adapt.py takes from --modelDir's FLAGS.txt unless given.
FROM_MODEL_DIR = tuple(FLAG_NAMES[field] for field in FROM_SOURCE)

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
    flags.DEFINE_boolean("warmup", False, "adapt.py: before the first step, quantizers with no "
                         "statistics in --modelDir's checkpoint (the Winograd-domain ones "
                         "after a normal-to-Winograd copy) take their range from an inference "
                         "pass over a training batch.", flag_values=fv)
    flags.DEFINE_float("mult", 0.5, "Width multiplier of the residual stages, in (0, 1].",
                       flag_values=fv)
    flags.DEFINE_integer("epochs", 10, "Number of epochs.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Global batch size (split across replicas).",
                         flag_values=fv)
    flags.DEFINE_float("lr", 0.001, "Initial learning rate of Adam (adapt.py: --modelDir's "
                       "unless given).", flag_values=fv)
    flags.DEFINE_boolean("use_cpu", False, "Train on the CPU even when GPUs are present "
                         "(adapt.py: --modelDir's unless given).", flag_values=fv)
    flags.DEFINE_integer("seed", 1, "Random seed (weights, data order, validation split; "
                         "adapt.py: --modelDir's unless given, and always --modelDir's "
                         "validation split).", flag_values=fv)
    flags.DEFINE_string("outDir", "experiments/", "Folder that receives the experiment "
                        "folders (adapt.py: --modelDir's unless given).", flag_values=fv)
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
    flags.DEFINE_boolean("deterministic", False, "Enable TensorFlow's op determinism "
                         "(tf.config.experimental.enable_op_determinism): bit-identical reruns "
                         "and resumes on any device, at some speed cost.", flag_values=fv)
    flags.DEFINE_boolean("skip_corrupt", False, "dataset=image_folder: skip files that are "
                         "not JPEG, PNG, GIF or BMP images, with a warning naming them (default: "
                         "stop before training with an error naming the first).", flag_values=fv)
    flags.DEFINE_string("architecture", None, "A mixed architecture: JSON file giving each "
                        "searchable 3x3 convolution's conv, tile size and bits (see "
                        "configs/architectures/, bin/search.py); replaces --use_normal_conv/"
                        "--static/--flex, --F, --Q and --bits.", flag_values=fv)


def flag_names(flag_values: flags.FlagValues = flags.FLAGS):
    """Names of the training flags, in definition order."""
    probe = flags.FlagValues()
    define_flags(probe)
    return [name for name in probe if name in flag_values]


def as_dict(flag_values: flags.FlagValues = flags.FLAGS) -> Dict:
    """The training flags' values as a plain dict."""
    return {name: flag_values[name].value for name in flag_names(flag_values)}


def flag_message(error: ArgumentError, names: Optional[Mapping[str, str]] = None) -> str:
    """`error`'s message with each argument spelled as its flag (``tile_size`` -> ``--F``).

    Args:
      error: An error of the library.
      names: Argument -> flag name, for arguments whose flag differs from
        :data:`~wa_tf.training.config.FLAG_NAMES` (another binary's flags);
        other arguments keep their own name.
    """
    spelling = dict(FLAG_NAMES, **(names or {}))
    return error.message(lambda argument: "--" + spelling.get(argument, argument))


def from_flags(flag_values: flags.FlagValues = flags.FLAGS, program: str = "train") -> RunConfig:
    """The validated :class:`RunConfig` of the parsed training flags.

    Args:
      flag_values: Parsed flags (:func:`define_flags`).
      program: 'train' or 'adapt'.  For adapt, the flags of
        :data:`FROM_MODEL_DIR` left off the command line are None: the run to
        adapt decides them.

    Raises:
      FlagError: naming the first bad flag.
    """
    values = as_dict(flag_values)
    if values.get("architecture"):
        given = [name for name in ("F", "Q", "bits") if flag_values[name].present]
        if given:
            raise FlagError(f"--architecture gives each layer's tile size and bits: it "
                            f"cannot be combined with {', '.join('--' + g for g in given)}")
    if program == "adapt":
        for name in FROM_MODEL_DIR:
            if not flag_values[name].present:
                values[name] = None
    try:
        return RunConfig.from_flag_dict(values).validate(program)
    except ArgumentError as e:
        raise FlagError(flag_message(e)) from None


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


def run_main(fn: Callable[[RunConfig], object], program: str,
             flag_values: flags.FlagValues = flags.FLAGS):
    """Converts the flags (:func:`from_flags`) and calls ``fn(config)``.

    Bad input ends the program with one ``error:`` line naming the flag: bad
    flag values, and the library's
    :class:`~wa_tf.training.errors.ArgumentError` (missing data or
    checkpoints, checkpoints that do not fit).  A run stopped on a NaN loss
    (:class:`~wa_tf.training.train_lib.TrainingStopped`) ends with one line and
    exit code 1; other exceptions keep their traceback.
    """
    from wa_tf.training.train_lib import TrainingStopped  # pylint: disable=import-outside-toplevel
    if "verbosity" in flag_values and not flag_values["verbosity"].present:
        # TensorFlow's INFO lines (one per checkpoint) would bury the progress bar.
        logging.set_verbosity(logging.WARNING)
    try:
        fn(from_flags(flag_values, program))
    except FlagError as e:
        fail(str(e).splitlines()[0])
    except ArgumentError as e:
        fail(flag_message(e).splitlines()[0])
    except TrainingStopped as e:
        fail(str(e).splitlines()[0], code=1)
