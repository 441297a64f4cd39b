"""The source run of an adapted run: its folder, checkpoint and fixed settings.

``bin/adapt.py`` starts from another run's checkpoint; :class:`SourceRun` reads
that run's flags and fills in (or checks) the settings the adapted run must
share with it (:data:`FIXED_BY_SOURCE`).
"""

import dataclasses

from wa_tf.training import experiment
from wa_tf.training.config import FROM_SOURCE, RunConfig
from wa_tf.training.errors import ArgumentError

# Config fields an adapted run must share with its source run (the architecture).
FIXED_BY_SOURCE = ("width_multiplier", "dataset")


@dataclasses.dataclass(frozen=True)
class SourceRun:
    """The run an adapted run starts from.

    Attributes:
      model_dir: Its experiment folder.
      config: Its config (from its ``FLAGS.txt``).
      checkpoint: The checkpoint path prefix to start from.
      split_seed: The seed that chose its validation split.
      out_dir: The folder its experiment folder lies in, as its ``outDir``
        (:func:`~wa_tf.training.experiment.out_dir_of`).
    """

    model_dir: str
    config: RunConfig
    checkpoint: str
    split_seed: int
    out_dir: str

    @classmethod
    def read(cls, model_dir: str, checkpoint: str) -> "SourceRun":
        """Reads the run in `model_dir`; fails before anything is written if the
        folder or the checkpoint is missing (ArgumentError)."""
        config = experiment.read_config(model_dir)
        path = experiment.checkpoint_path(model_dir, checkpoint)
        metrics = experiment.read_metrics(model_dir) or {}
        return cls(model_dir, config, path, experiment.split_seed(metrics, config),
                   experiment.out_dir_of(model_dir, config, metrics.get("model")))

    def resolve(self, config: RunConfig):
        """`config` with what the source run decides.

        The architecture (width, dataset) is the source run's; `out_dir`,
        `lr`, `seed` and `use_cpu` are the source run's unless set (not None),
        as the reference's configurator does; `data_dir` too when not given.

        Returns:
          (resolved config, {field: value} of the fields taken from the source
          run although `config` could have set them).

        Raises:
          ArgumentError: if `config` sets a field of :data:`FIXED_BY_SOURCE`
            to another value than the source run's.
        """
        changes, taken = {}, {}
        for name in FIXED_BY_SOURCE:
            mine, theirs = getattr(config, name), getattr(self.config, name)
            if mine is not None and mine != theirs:
                raise ArgumentError(name, lambda n, name=name, mine=mine, theirs=theirs:
                                    f"{n(name)} is fixed by {n('model_dir')} ({theirs}); "
                                    f"got {mine}")
            changes[name] = theirs
        for name in FROM_SOURCE:
            if name not in FIXED_BY_SOURCE and getattr(config, name) is None:
                changes[name] = taken[name] = (self.out_dir if name == "out_dir"
                                               else getattr(self.config, name))
        if not config.data_dir:
            changes["data_dir"] = self.config.data_dir
        return config.replace(**changes), taken
