"""The epoch mechanics of a run: learning-rate schedule, steps, seeds, compiled model.

As the reference: the learning rate x0.1 from the epochs at 3/5 and 4/5 of
training; Adam with PyTorch's coupled weight decay; each epoch one ``model.fit``
call over an input pipeline seeded by (``--seed``, epoch), ended after that
epoch (:class:`OneEpoch`) or at the first NaN loss (:class:`NanGuard`).
"""

from typing import List, Optional

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf import data
from wa_tf.training.errors import ArgumentError
from wa_tf.training.optimizer import WEIGHT_DECAY, AdamL2

LR_DECAY = 0.1
LR_MILESTONES = (3 / 5, 4 / 5)
# Seeds of consecutive epochs are this far apart; multi-worker input pipelines
# add their index (< this) to the seed.
EPOCH_SEED_STRIDE = 1000


def lr_milestones(epochs: int) -> List[float]:
    """The reference's milestones ``[epochs * 3/5, epochs * 4/5]``."""
    return [epochs * m for m in LR_MILESTONES]


def learning_rate(epoch: int, epochs: int, base_lr: float) -> float:
    """Learning rate of 0-based `epoch`: x0.1 for every milestone <= epoch.

    For integer milestones this is PyTorch's MultiStepLR as the reference
    steps it; the reference never decays at non-integer milestones (its
    MultiStepLR compares epoch numbers with floats), here the first epoch at
    or after the milestone decays.
    """
    return base_lr * LR_DECAY ** sum(m <= epoch for m in lr_milestones(epochs))


def compile_model(model: tf_keras.Model, lr: float, jit_compile: bool = False,
                  weight_decay: float = WEIGHT_DECAY):
    """Compiles `model` as the reference trains: Adam + L2, cross-entropy, accuracy.

    Call under the strategy's scope, as the optimizer creates variables.
    """
    model.compile(
        optimizer=AdamL2(learning_rate=lr, l2=weight_decay),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile)
    return model


def distributed_dataset(strategy: tf.distribute.Strategy, split: tf.data.Dataset,
                        global_batch: int, info, training: bool, seed: int):
    """`split` batched by :func:`wa_tf.data.pipeline` and distributed over replicas."""

    def dataset_fn(context):
        return data.pipeline(split, context.get_per_replica_batch_size(global_batch), info,
                             training=training, seed=seed, input_context=context)

    return strategy.distribute_datasets_from_function(dataset_fn)


def steps_per_epoch(num_train: int, batch_size: int, num_workers: int,
                    limit: Optional[int] = None) -> int:
    """Full training steps in an epoch (each worker reads its own shard), capped by `limit`.

    Raises:
      ArgumentError: about 'batch_size' if not one batch fits in the examples.
    """
    per_worker = batch_size // num_workers
    steps = (num_train // num_workers) // per_worker
    if steps < 1:
        raise ArgumentError("batch_size", lambda n: f"{n('batch_size')}={batch_size} is "
                            f"larger than the {num_train} training examples")
    return min(steps, limit) if limit else steps


class NanGuard(tf_keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite."""

    def __init__(self):
        super().__init__()
        self.bad_step = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.bad_step = batch + 1
            self.model.stop_training = True


class OneEpoch(tf_keras.callbacks.Callback):
    """Ends ``fit`` after one epoch, so ``fit(initial_epoch=e, epochs=N)`` runs
    epoch e only while the progress bar still shows 'Epoch e+1/N'."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True
