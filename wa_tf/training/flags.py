"""Command-line flags shared by ``bin/train.py`` and ``bin/adapt.py``.

The reference's flags keep their names and defaults (``--use_normal_conv`` /
``--static`` / ``--flex``, ``--F``, ``--Q``, ``--bits``, ``--mult``, ``--epochs``,
``--batch_size``, ``--lr``, ``--use_cpu``, ``--seed``, ``--outDir``,
``--modelDir``, ``--modelToLoad``, ``--warmup``); the others are wa_tf's.

:func:`define_common_flags` defines the flags that several binaries share
(``--use_cpu``, ``--seed``, ``--data_dir``, ``--batch_size``), once, for all of
them.

:func:`from_flags` converts the flags, once, into the typed
:class:`~wa_tf.training.config.RunConfig` the library reads.  Bad input is
reported as one line naming the flag, by :mod:`wa_tf.training.flag_errors` (the
mechanism every binary shares): the library's
:class:`~wa_tf.training.errors.ArgumentError` names a config field or argument,
:func:`flag_message` spells it as its flag (:data:`FLAG_NAMES`), and
:func:`parse_argv` / :func:`run_main` / :func:`start` print it (and absl's own
parsing errors) as ``error: ...`` on stderr with a non-zero exit.
"""

import sys
from typing import Callable, Dict, Mapping, Optional

from absl import flags

from wa_tf.data import DATASETS
from wa_tf.training import distribute, flag_errors
from wa_tf.training.config import FLAG_NAMES, FROM_SOURCE, MODE_FLAGS, RunConfig
from wa_tf.training.distribute import STRATEGIES
from wa_tf.training.errors import ArgumentError, TrainingStopped

MODES = tuple(MODE_FLAGS.values())
# Flags that adapt.py takes from --modelDir's FLAGS.txt unless given.
FROM_MODEL_DIR = tuple(FLAG_NAMES[field] for field in FROM_SOURCE)

# The shared one-line errors (wa_tf.training.flag_errors), under the names the binaries used.
EXIT_BAD_INPUT = flag_errors.EXIT_BAD_INPUT
fail = flag_errors.fail
parse_argv = flag_errors.parse_argv

# The flags several binaries share: name -> (definer, default, help).  A binary
# may give its own default and add a note to the help (define_common_flags).
COMMON_FLAGS = {
    "use_cpu": (flags.DEFINE_boolean, False, "Run on the CPU even when GPUs are present."),
    "seed": (flags.DEFINE_integer, 1, "Random seed."),
    "data_dir": (flags.DEFINE_string, None, "Data folder: for image_folder, "
                 "<split>/<class>/<image>; for cifar10/cifar100, the TFDS data directory."),
    "batch_size": (flags.DEFINE_integer, 64, "Batch size."),
}


def define_common_flags(*names: str, flag_values: flags.FlagValues = flags.FLAGS,
                        defaults: Optional[Mapping[str, object]] = None,
                        notes: Optional[Mapping[str, str]] = None):
    """Defines the shared flags `names` (:data:`COMMON_FLAGS`) on `flag_values`.

    Every binary that has ``--use_cpu``, ``--seed``, ``--data_dir`` or
    ``--batch_size`` defines it here, so that it is spelled and parsed the same
    everywhere; ``--use_cpu`` hides the GPUs before TensorFlow starts
    (:func:`wa_tf.training.distribute.hide_gpus`).

    Args:
      *names: Keys of :data:`COMMON_FLAGS`, defined in this order.
      flag_values: Where to define them (absl's global FLAGS by default).
      defaults: name -> this binary's default, where it differs.
      notes: name -> what the flag means in this binary, added to the help
        in parentheses.
    """
    # The flags belong to the caller's module, as if it had defined them (absl
    # lists a module's own flags under --helpshort), as absl names modules.
    module = sys._getframe(1).f_globals.get("__name__")  # pylint: disable=protected-access
    module = sys.argv[0] if module == "__main__" else module
    for name in names:
        define, default, help_text = COMMON_FLAGS[name]
        default = (defaults or {}).get(name, default)
        note = (notes or {}).get(name)
        if note:
            help_text = f"{help_text[:-1]} ({note})."
        define(name, default, help_text, flag_values=flag_values, module_name=module)


def apply_use_cpu(flag_values: flags.FlagValues = flags.FLAGS):
    """Applies ``--use_cpu`` as bin/train.py does: hides the GPUs when it is set.

    For the binaries that do not train through
    :class:`~wa_tf.training.train_lib.Runner` (which applies ``RunConfig.use_cpu``
    the same way); call it before TensorFlow initialises its devices.
    """
    if flag_values["use_cpu"].value:
        distribute.hide_gpus()


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
    define_common_flags("batch_size", flag_values=fv,
                        notes={"batch_size": "global: split across replicas"})
    flags.DEFINE_float("lr", 0.001, "Initial learning rate of Adam (adapt.py: --modelDir's "
                       "unless given).", flag_values=fv)
    define_common_flags("use_cpu", "seed", flag_values=fv, notes={
        "use_cpu": "adapt.py: --modelDir's unless given",
        "seed": "weights, data order, validation split; adapt.py: --modelDir's unless "
                "given, and always --modelDir's validation split"})
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
    define_common_flags("data_dir", flag_values=fv)
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


def flag_message(error: ValueError, names: Optional[Mapping[str, str]] = None) -> str:
    """`error`'s message with each argument spelled as its flag (``tile_size`` -> ``--F``).

    :func:`wa_tf.training.flag_errors.flag_message` with the training binaries' names.

    Args:
      error: An error of the library.
      names: Argument -> flag name, for arguments whose flag differs from
        :data:`~wa_tf.training.config.FLAG_NAMES` (another binary's flags);
        other arguments keep their own name.
    """
    return flag_errors.flag_message(error, dict(FLAG_NAMES, **(names or {})))


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


def _errors():
    """flag_errors.run's options for bin/train.py and bin/adapt.py."""
    # Only the library's ArgumentError is bad input: another ValueError raised
    # while training is a bug, and keeps its traceback.
    return dict(bad_input=(FlagError, ArgumentError), failed=(TrainingStopped,))


def run_main(fn: Callable[[RunConfig], object], program: str,
             flag_values: flags.FlagValues = flags.FLAGS):
    """Converts the flags (:func:`from_flags`) and calls ``fn(config)``.

    Through :func:`wa_tf.training.flag_errors.run`, bad input ends the program with one
    ``error:`` line naming the flag: bad flag values, and the library's
    :class:`~wa_tf.training.errors.ArgumentError` (missing data or
    checkpoints, checkpoints that do not fit).  A run stopped on a NaN loss
    (:class:`~wa_tf.training.errors.TrainingStopped`) ends with one line and
    exit code 1; other exceptions keep their traceback.
    """
    return flag_errors.run(lambda: fn(from_flags(flag_values, program)), FLAG_NAMES,
                           flag_values=flag_values, **_errors())


def start(fn: Callable[[RunConfig], object], program: str):
    """Runs bin/train.py or bin/adapt.py: parses the flags, then :func:`run_main`."""
    flag_errors.start(lambda: fn(from_flags(flags.FLAGS, program)), FLAG_NAMES, **_errors())
