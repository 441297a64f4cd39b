"""The typed configuration of a training run, and the errors about its values.

:class:`RunConfig` is what :mod:`~wa_tf.training.train_lib` and
:mod:`~wa_tf.training.experiment` read; the binaries build it once from their
absl flags (:func:`wa_tf.training.flags.from_flags`), in the manner of Model
Garden's ``ExperimentConfig``.  Its fields have Python names; on the command
line and in ``FLAGS.txt`` they keep the reference's flag names
(:data:`FLAG_NAMES`), so a ``FLAGS.txt`` converts to and from a RunConfig
without loss (:meth:`RunConfig.from_flag_dict`, :meth:`RunConfig.to_flag_dict`).

Bad values raise :class:`~wa_tf.training.errors.ArgumentError` naming the field.
"""

import dataclasses
from typing import Dict, Mapping, Optional, Union

from wa_tf.choices import CONV_MODES, MAX_BITS, MIN_BITS, TILE_SIZES, valid_bits
from wa_tf.data import DATASETS
from wa_tf.models.architecture import load_architecture
from wa_tf.training.distribute import STRATEGIES
from wa_tf.training.errors import ArgumentError
from wa_tf.transforms import is_int

# The reference's mode flags, one per conv mode, in the order they are defined.
MODE_FLAGS = {"normal": "use_normal_conv", "static": "static", "flex": "flex"}
# Field -> flag name, in the order the flags are defined (FLAGS.txt's line
# order after the mode flags).  Fields absent here have the flag's name.
FLAG_NAMES = {
    "tile_size": "F", "quantize": "Q", "bits": "bits", "warmup": "warmup",
    "width_multiplier": "mult", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "use_cpu": "use_cpu", "seed": "seed", "out_dir": "outDir", "model_dir": "modelDir",
    "checkpoint": "modelToLoad", "dataset": "dataset", "data_dir": "data_dir",
    "steps_per_epoch": "steps_per_epoch", "per_tap": "per_tap", "recompute": "recompute",
    "jit_compile": "jit_compile", "distribution_strategy": "distribution_strategy",
    "num_gpus": "num_gpus", "resume": "resume", "deterministic": "deterministic",
    "skip_corrupt": "skip_corrupt", "architecture": "architecture",
}
# Fields an adapt config may leave None: the source run's value is used.
FROM_SOURCE = ("width_multiplier", "dataset", "out_dir", "lr", "seed", "use_cpu")
PROGRAMS = ("train", "adapt")

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Configuration of one ``bin/train.py`` / ``bin/adapt.py`` run.

    Attributes:
      conv: 'normal', 'static' or 'flex' (``--use_normal_conv``, ``--static``, ``--flex``).
      tile_size: Winograd tile size m of F(m x m, 3 x 3) (``--F``).
      quantize: Quantization-aware training (``--Q``).
      bits: Bit-width with ``quantize`` (``--bits``).
      warmup: adapt: calibrate the quantizer ranges the source run has no
        statistics for on a training batch before the first step (``--warmup``).
      width_multiplier: Width of the residual stages (``--mult``).
      epochs: Number of epochs.
      batch_size: Global batch size.
      lr: Initial learning rate.
      use_cpu: Hide the GPUs.
      seed: Seed of the weights, the data order and the validation split.
      out_dir: Folder receiving the experiment folders (``--outDir``).
      model_dir: adapt: the source run's experiment folder (``--modelDir``).
      checkpoint: adapt: the source checkpoint (``--modelToLoad``).
      dataset: Dataset name.
      data_dir: Data folder (image_folder) or TFDS data directory.
      steps_per_epoch: Cap on the training steps of an epoch.
      per_tap: One quantization range per Winograd tap.
      recompute: Recompute Winograd layers in the backward pass.
      jit_compile: XLA-compile the training step.
      distribution_strategy: tf.distribute strategy name, or None to choose.
      num_gpus: GPUs to use, or None for all.
      resume: Resume the newest unfinished run of the same command.
      deterministic: Enable TensorFlow's op determinism.
      architecture: Path of an architecture JSON file giving each searchable
        convolution's conv, tile size and bits (:mod:`wa_tf.models.architecture`);
        then `conv` is None and `quantize`/`bits`/`tile_size` do not apply.
      skip_corrupt: image_folder: skip files that are not JPEG/PNG/GIF/BMP
        images (with a warning) instead of stopping before training.

    In an adapt config the fields of :data:`FROM_SOURCE` may be None: the
    source run's value is used.
    """

    conv: Optional[str]
    tile_size: int = 4
    quantize: bool = False
    bits: int = 8
    warmup: bool = False
    width_multiplier: Optional[float] = 0.5
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.001
    use_cpu: bool = False
    seed: int = 1
    out_dir: str = "experiments/"
    model_dir: Optional[str] = None
    checkpoint: str = "model.pt"
    dataset: Optional[str] = "cifar10"
    data_dir: Optional[str] = None
    steps_per_epoch: Optional[int] = None
    per_tap: bool = False
    recompute: bool = False
    jit_compile: bool = False
    distribution_strategy: Optional[str] = None
    num_gpus: Optional[int] = None
    resume: bool = True
    deterministic: bool = False
    skip_corrupt: bool = False
    architecture: Optional[str] = None

    @property
    def bits_or_none(self) -> Optional[int]:
        """`bits` with quantization, else None (float, or per layer with an architecture)."""
        return self.bits if self.quantize and not self.architecture else None

    def replace(self, **changes) -> "RunConfig":
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def validate(self, program: str = "train") -> "RunConfig":
        """Checks every value; raises :class:`ArgumentError` about the first bad one.

        Args:
          program: 'train' or 'adapt'.  An adapt config needs `model_dir`, and
            may leave `width_multiplier`, `dataset` and `data_dir` to the source run.

        Returns:
          self, for chaining.
        """
        if program not in PROGRAMS:
            raise ValueError(f"program must be one of {', '.join(PROGRAMS)}; got {program!r}")
        if self.architecture:
            self._validate_architecture()
        elif self.conv not in CONV_MODES:
            raise ArgumentError("conv", lambda n: f"{n('conv')} must be one of "
                                f"{', '.join(CONV_MODES)}; got {self.conv!r}")
        if self.tile_size not in TILE_SIZES or not is_int(self.tile_size):
            raise ArgumentError("tile_size", lambda n: f"{n('tile_size')} must be one of 2, 4, "
                                f"6 (F(2x2,3x3), F(4x4,3x3), F(6x6,3x3)); got {self.tile_size}")
        if not valid_bits(self.bits):
            raise ArgumentError("bits", lambda n: f"{n('bits')} must be an integer from "
                                f"{MIN_BITS} to {MAX_BITS}; got {self.bits}")
        mult = self.width_multiplier
        if mult is not None and not 1 / 64 <= mult <= 1:
            raise ArgumentError("width_multiplier", lambda n: f"{n('width_multiplier')} must "
                                "be in (0, 1] (and at least 1/64, so every stage has a "
                                f"channel); got {mult}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ArgumentError(name, lambda n, name=name, value=value:
                                    f"{n(name)} must be a positive integer; got {value}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ArgumentError("steps_per_epoch", lambda n: f"{n('steps_per_epoch')} must be "
                                f"a positive integer; got {self.steps_per_epoch}")
        if program == "train":
            for name in FROM_SOURCE:
                if getattr(self, name) is None:
                    raise ArgumentError(name, lambda n, name=name: f"{n(name)} is required")
        if self.lr is not None and not self.lr > 0:
            raise ArgumentError("lr", lambda n: f"{n('lr')} must be positive; got {self.lr}")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ArgumentError("dataset", lambda n: f"{n('dataset')} must be one of "
                                f"{', '.join(DATASETS)}; got {self.dataset!r}")
        # adapt takes data_dir from the source run when not given.
        if self.dataset == "image_folder" and not self.data_dir and program != "adapt":
            raise ArgumentError("data_dir", lambda n: f"{n('data_dir')} is required with "
                                f"{n('dataset')}=image_folder (a folder with "
                                "<split>/<class>/<image> files)")
        strategy = self.distribution_strategy
        if strategy is not None and strategy.lower() not in STRATEGIES:
            raise ArgumentError("distribution_strategy", lambda n: f"{n('distribution_strategy')}"
                                f" must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ArgumentError("num_gpus", lambda n: f"{n('num_gpus')} must be >= 0; "
                                f"got {self.num_gpus}")
        if self.out_dir is not None and not self.out_dir:
            raise ArgumentError("out_dir", lambda n: f"{n('out_dir')} must not be empty")
        if program == "adapt" and not self.model_dir:
            raise ArgumentError("model_dir", lambda n: f"{n('model_dir')} is required: the "
                                "experiment folder of the model to adapt")
        if program == "train" and self.warmup:
            raise ArgumentError("warmup", lambda n: f"{n('warmup')} is for adapting a model "
                                "(bin/adapt.py): it calibrates the ranges its source run has "
                                "no statistics for; a model trained from scratch takes every "
                                "range from its first training batch")
        return self

    def _validate_architecture(self):
        if self.conv is not None:
            raise ArgumentError("architecture", lambda n: f"{n('architecture')} gives each "
                                "layer's convolution: it cannot be combined with "
                                + ", ".join(n(f) for f in MODE_FLAGS.values()))
        if self.quantize:
            raise ArgumentError("architecture", lambda n: f"{n('architecture')} gives each "
                                f"layer's bits: it cannot be combined with {n('quantize')}")
        try:
            load_architecture(self.architecture)
        except ValueError as e:
            raise ArgumentError("architecture", lambda n, e=e: f"{n('architecture')}: "
                                f"{str(e).splitlines()[0]}") from None

    # -- conversion from and to the reference's flags (FLAGS.txt) -------------

    @classmethod
    def from_flag_dict(cls, values: Mapping) -> "RunConfig":
        """The config of flag values keyed by the reference's flag names.

        Flags missing from `values` (an older ``FLAGS.txt``) take their defaults.

        Raises:
          ArgumentError: about 'conv' unless exactly one mode flag is set.
        """
        modes = [flag for flag in MODE_FLAGS.values() if values.get(flag)]
        if values.get("architecture") and not modes:
            fields = {field: values[flag] for field, flag in FLAG_NAMES.items() if flag in values}
            return cls(conv=None, **fields)
        if len(modes) != 1:
            raise ArgumentError("conv", lambda n: "exactly one of "
                                + ", ".join(n(f) for f in MODE_FLAGS.values())
                                + " is required; got "
                                + (" ".join(n(f) for f in modes) if modes else "none"))
        conv = next(mode for mode, flag in MODE_FLAGS.items() if flag == modes[0])
        fields = {field: values[flag] for field, flag in FLAG_NAMES.items() if flag in values}
        return cls(conv=conv, **fields)

    def to_flag_dict(self) -> Dict:
        """Flag name -> value, in the flags' definition order (``FLAGS.txt``'s order)."""
        values = {flag: self.conv == mode for mode, flag in MODE_FLAGS.items()}
        values.update({flag: getattr(self, field) for field, flag in FLAG_NAMES.items()})
        return values

    @classmethod
    def of(cls, config: Union["RunConfig", Mapping]) -> "RunConfig":
        """`config` itself, or the config of a flag dict (see :meth:`from_flag_dict`)."""
        return config if isinstance(config, cls) else cls.from_flag_dict(config)
