"""Training and adaptation of the ResNet-18-like models (``bin/train.py``, ``bin/adapt.py``).

As the reference (jafermarq/WinogradAwareNets ``train.py``): Adam with learning
rate ``--lr`` and PyTorch's coupled weight decay 4e-5
(:class:`~wa_tf.training.optimizer.AdamL2`), the learning rate x0.1 from the
epochs at 3/5 and 4/5 of training, cross-entropy on logits, the weights of the
best validation epoch kept, and the test accuracy of the final and of the
best model printed at the end.

Each epoch is one ``model.fit`` call over a freshly built input pipeline whose
shuffling and augmentation are seeded by (``--seed``, epoch), so the data of
an epoch does not depend on what ran before in the process.  After every
epoch the model, optimizer and epoch number go to ``backup/`` through a
``tf.train.CheckpointManager``; a run killed at any moment and started again
with the same command resumes after the last completed epoch, in the same
folder (see :mod:`wa_tf.training.experiment`), and ends with the metrics of an
uninterrupted run.  A NaN loss stops training without saving the NaN weights.

:class:`~wa_tf.training.runner.Runner` holds one run; the epoch mechanics are
in :mod:`~wa_tf.training.schedule`, an adapted run's source in
:mod:`~wa_tf.training.source_run`.  This module is the entry point of the
binaries (:func:`run`, :func:`adapt`) and re-exports those modules' public names.
"""

from typing import Dict, Mapping, Union

from wa_tf.training.config import RunConfig
from wa_tf.training.runner import Runner as Runner
from wa_tf.training.schedule import LR_DECAY as LR_DECAY
from wa_tf.training.schedule import LR_MILESTONES as LR_MILESTONES
from wa_tf.training.schedule import compile_model as compile_model
from wa_tf.training.schedule import distributed_dataset as distributed_dataset
from wa_tf.training.schedule import learning_rate as learning_rate
from wa_tf.training.schedule import lr_milestones as lr_milestones
from wa_tf.training.schedule import steps_per_epoch as steps_per_epoch
from wa_tf.training.source_run import FIXED_BY_SOURCE as FIXED_BY_SOURCE
from wa_tf.training.source_run import SourceRun as SourceRun


def run(config: Union[RunConfig, Mapping]) -> Dict:
    """Trains a model from scratch as ``bin/train.py``.

    Args:
      config: The run's config (a flag dict, as :func:`wa_tf.training.flags.as_dict`
        returns, is converted).

    Returns:
      {'model_dir': experiment folder, 'metrics': the metrics.json content}.

    Raises:
      ArgumentError: for bad input, before anything is written.
      TrainingStopped: when the loss becomes NaN.
    """
    return Runner(RunConfig.of(config), "train").run()


def adapt(config: Union[RunConfig, Mapping]) -> Dict:
    """Initialises a model from `config.model_dir`'s checkpoint, then trains it, as
    ``bin/adapt.py`` (see :func:`run`)."""
    return Runner(RunConfig.of(config), "adapt").run()
