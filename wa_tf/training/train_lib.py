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

Distribution: the model, optimizer, quantizers and metrics are created under
the strategy's scope, ``--batch_size`` is the global batch, and the input is
distributed with ``distribute_datasets_from_function`` and per-replica
batches.  Under ``multi_worker_mirrored`` the chief writes the experiment
folder; the other workers save into temporary folders they delete at the end.
"""

import os
import shutil
import sys
import time
from typing import Dict, List, Mapping, Optional

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf import quantization
from wa_tf.training import distribute
from wa_tf.training import experiment
from wa_tf.training import flags as wa_flags
from wa_tf.training.optimizer import WEIGHT_DECAY, AdamL2

LR_DECAY = 0.1
LR_MILESTONES = (3 / 5, 4 / 5)
# Seeds of consecutive epochs are this far apart; multi-worker input pipelines
# add their index (< this) to the seed.
_EPOCH_SEED_STRIDE = 1000


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
    from wa_tf import data  # pylint: disable=import-outside-toplevel

    def dataset_fn(context):
        return data.pipeline(split, context.get_per_replica_batch_size(global_batch), info,
                             training=training, seed=seed, input_context=context)

    return strategy.distribute_datasets_from_function(dataset_fn)


def steps_per_epoch(num_train: int, global_batch: int, num_workers: int,
                    limit: Optional[int] = None) -> int:
    """Full training steps in an epoch (each worker reads its own shard), capped by `limit`."""
    per_worker = global_batch // num_workers
    steps = (num_train // num_workers) // per_worker
    if steps < 1:
        raise wa_flags.FlagError(f"--batch_size={global_batch} is larger than the "
                                 f"{num_train} training examples")
    return min(steps, limit) if limit else steps


def _group_by_weight(keys: List[str]) -> str:
    """'A_t x16, B_t x16, ...': weight names with the number of layers having them."""
    counts = {}
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in counts.items())


def _result_line(label: str, result: Mapping) -> str:
    """The reference's evaluation line: 'Val set: Average loss: ..., Accuracy: c/N (x%)'."""
    correct = round(result["accuracy"] * result["examples"])
    return (f"{label}: Average loss: {result['loss']:.4f}, Accuracy: {correct}/"
            f"{result['examples']} ({100 * result['accuracy']:.2f}%)")


class _NanGuard(tf_keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite."""

    def __init__(self):
        super().__init__()
        self.bad_step = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.bad_step = batch + 1
            self.model.stop_training = True


class _OneEpoch(tf_keras.callbacks.Callback):
    """Ends ``fit`` after one epoch, so ``fit(initial_epoch=e, epochs=N)`` runs
    epoch e only while the progress bar still shows 'Epoch e+1/N'."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


class _Run:
    """State of one training run: strategy, data, model and experiment folder."""

    def __init__(self, config: Mapping, program: str):
        self.config = dict(config)
        self.program = program
        self.source_model_dir = None
        self.adapted = None
        self.model_dir = None
        self.work_dir = None  # where this process writes: model_dir, or a worker temp dir
        self.lock = None
        self.resumed = False
        self._predict = None

    # -- setup (bad input raises FlagError before anything is written) -------

    def setup(self):
        config = self.config
        if config["use_cpu"]:
            distribute.hide_gpus()
        try:
            self.strategy = distribute.get_distribution_strategy(
                config["distribution_strategy"], config["num_gpus"])
        except ValueError as e:
            raise wa_flags.FlagError(str(e)) from None
        self.chief = distribute.is_chief(self.strategy)
        replicas = self.strategy.num_replicas_in_sync
        if config["batch_size"] % replicas:
            raise wa_flags.FlagError(f"--batch_size={config['batch_size']} must be divisible "
                                     f"by the {replicas} replicas")
        if self.program == "adapt":
            self._resolve_adapt_flags()
        tf_keras.utils.set_random_seed(config["seed"])
        self._load_data()
        with self.strategy.scope():
            try:
                self.model = experiment.build_model(config, self.info.num_classes,
                                                    self.info.image_shape)
            except ValueError as e:
                raise wa_flags.FlagError(str(e)) from None
            compile_model(self.model, config["lr"], config["jit_compile"])
            # Create the optimizer's variables now, so checkpoints restore into them.
            self.model.optimizer.build(self.model.trainable_variables)
        if self.program == "adapt":
            self._copy_source_weights()

    def _resolve_adapt_flags(self):
        """Takes the architecture flags (width, dataset) from --modelDir's FLAGS.txt.

        A None value means "as --modelDir"; a value that differs is an error.
        """
        config = self.config
        self.source_model_dir = config["modelDir"]
        source = experiment.read_flags(self.source_model_dir)
        for name in wa_flags.FIXED_BY_MODEL_DIR:
            if config[name] is not None and config[name] != source[name]:
                raise wa_flags.FlagError(
                    f"--{name} is fixed by --modelDir ({source[name]}); got {config[name]}")
            config[name] = source[name]
        if not config["data_dir"]:
            config["data_dir"] = source["data_dir"]
        self.source_config = source
        # Fail before anything is written if the checkpoint is missing.
        self.source_checkpoint = experiment.checkpoint_path(
            self.source_model_dir, config["modelToLoad"])

    def _load_data(self):
        from wa_tf import data  # pylint: disable=import-outside-toplevel
        config = self.config
        try:
            self.splits, self.info = data.load(config["dataset"], data_dir=config["data_dir"],
                                               seed=config["seed"])
        except ValueError as e:
            raise wa_flags.FlagError(f"--data_dir/--dataset: {e}") from None
        # The raw training split is cached once; each epoch's pipeline reads from it.
        self.train_split = self.splits["train"].cache()
        self.num_workers = distribute.num_workers(self.strategy)
        self.steps = steps_per_epoch(self.info.num_examples["train"], config["batch_size"],
                                     self.num_workers, config["steps_per_epoch"])

    def _copy_source_weights(self):
        meta = experiment.dataset_meta(self.source_model_dir, self.source_config)
        if meta["num_classes"] != self.info.num_classes:
            raise wa_flags.FlagError(f"--modelDir: its model has {meta['num_classes']} classes, "
                                     f"the dataset {self.info.num_classes}")
        # The source model is only read: built outside the strategy, then dropped.
        source = experiment.build_model(self.source_config, meta["num_classes"],
                                        meta["image_shape"])
        experiment.restore_weights(source, self.source_checkpoint)
        try:
            self.adapted = quantization.copy_weights(source, self.model)
        except ValueError as e:
            raise wa_flags.FlagError(f"--modelToLoad: {e}") from None
        del source

    # -- experiment folder ----------------------------------------------------

    def open_folder(self):
        """Chooses (chief) and shares (all workers) the experiment folder."""
        config, name = self.config, self.model.name
        path = ""
        if self.chief:
            if config["resume"]:
                path, self.lock = experiment.find_unfinished(config, name)
            self.resumed = bool(path)
            if not path:
                path = experiment.create(config, name)
                self.lock = experiment.Lock(path)
                self.lock.acquire()
        self.model_dir = distribute.broadcast_string(self.strategy, path or "")
        task_type, task_id = distribute.task_info(self.strategy)
        self.work_dir = (self.model_dir if self.chief else
                         os.path.join(self.model_dir, f"workertemp_{task_type}_{task_id}"))
        os.makedirs(self.work_dir, exist_ok=True)
        if self.chief and not self.resumed:
            self._write_new_folder()

    def _write_new_folder(self):
        config = self.config
        experiment.write_flags(self.model_dir, config)
        report = [f"Command: {' '.join(sys.argv)}", "", experiment.FLAGS_FILE + ":"]
        report += ["  " + line for line in experiment.flags_to_lines(config)]
        report += ["", self._layer_table()]
        if self.adapted:
            report += ["", self._adapt_summary()]
        experiment.append_report(self.model_dir, "\n".join(report))
        experiment.write_metrics(self.model_dir, self._initial_metrics())

    def _layer_table(self):
        from wa_tf import models  # pylint: disable=import-outside-toplevel
        return models.layer_table(self.model)

    def _adapt_summary(self):
        a = self.adapted
        lines = [f"Adapted from {self.source_model_dir} (checkpoint {self.source_checkpoint}): "
                 f"copied {len(a['copied'])} weights by layer name and shape."]
        for key, label in (("not_found", "Not in the checkpoint, kept as initialised"),
                           ("unused", "In the checkpoint but not in this model")):
            if a[key]:
                lines.append(f"{label} ({len(a[key])}, all listed in metrics.json): "
                             + _group_by_weight(a[key]))
        return "\n".join(lines)

    def _initial_metrics(self):
        info = self.info
        metrics = {
            "status": experiment.RUNNING,
            "program": self.program,
            "model": self.model.name,
            "dataset": {"name": info.name, "num_classes": info.num_classes,
                        "image_shape": list(info.image_shape), "mean": list(info.mean),
                        "std": list(info.std), "num_examples": dict(info.num_examples)},
            "epochs": self.config["epochs"],
            "steps_per_epoch": self.steps,
            "global_batch_size": self.config["batch_size"],
            "num_replicas": self.strategy.num_replicas_in_sync,
            "lr_milestones": lr_milestones(self.config["epochs"]),
            "history": [],
            "best": None,
            "test": None,
        }
        if self.adapted:
            metrics["adapted_from"] = {"model_dir": self.source_model_dir,
                                       "checkpoint": self.source_checkpoint,
                                       **{k: list(v) for k, v in self.adapted.items()}}
        return metrics

    # -- training -------------------------------------------------------------

    def _path(self, *parts):
        return os.path.join(self.work_dir, *parts)

    def _save_weights(self, name):
        self.model.save_weights(self._path(experiment.CHECKPOINT_DIR, name))

    def train(self):
        config = self.config
        epochs = config["epochs"]
        backup = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer,
                                     epoch=tf.Variable(0, dtype=tf.int64))
        manager = tf.train.CheckpointManager(backup, self._path(experiment.BACKUP_DIR),
                                             max_to_keep=1)
        metrics = (experiment.read_metrics(self.model_dir) if self.chief else None) \
            or self._initial_metrics()
        start_epoch = 0
        if manager.latest_checkpoint:
            backup.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            start_epoch = int(backup.epoch.numpy())
        metrics["history"] = metrics["history"][:start_epoch]
        best = max(metrics["history"], key=lambda h: h["val_accuracy"], default=None)
        metrics["best"] = {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"]} \
            if best else None

        print(self._layer_table())
        print(f"Output dir: {self.model_dir}")
        if self.adapted:
            print(self._adapt_summary())
        print(f"Learning rate decay at: {[round(m, 6) for m in lr_milestones(epochs)]}")
        if self.resumed:
            print(f"Resuming the unfinished run in {self.model_dir} after epoch "
                  f"{start_epoch}/{epochs}")
            if self.chief:
                experiment.append_report(self.model_dir, f"Resumed after epoch {start_epoch}.")
        sys.stdout.flush()

        writer = tf.summary.create_file_writer(self._path(experiment.LOG_DIR))
        verbose = 1 if sys.stdout.isatty() else 2
        for epoch in range(start_epoch, epochs):
            lr = learning_rate(epoch, epochs, config["lr"])
            self.model.optimizer.learning_rate.assign(lr)
            train_data = distributed_dataset(
                self.strategy, self.train_split, config["batch_size"], self.info, True,
                config["seed"] + _EPOCH_SEED_STRIDE * epoch)
            guard = _NanGuard()
            started = time.time()
            history = self.model.fit(
                train_data, epochs=epochs, initial_epoch=epoch, steps_per_epoch=self.steps,
                callbacks=[guard, _OneEpoch()], verbose=verbose)
            if guard.bad_step is not None:
                self._stop_on_nan(metrics, manager, backup, epoch, guard.bad_step)
            logs = {k: float(v[-1]) for k, v in history.history.items()}
            val = self._evaluate("validation")
            print(_result_line("Val set", val))
            record = {"epoch": epoch + 1, "lr": lr, "loss": logs["loss"],
                      "accuracy": logs["accuracy"], "val_loss": val["loss"],
                      "val_accuracy": val["accuracy"],
                      "seconds": round(time.time() - started, 2)}
            metrics["history"].append(record)
            if metrics["best"] is None or record["val_accuracy"] > metrics["best"]["val_accuracy"]:
                metrics["best"] = {"epoch": epoch + 1, "val_accuracy": record["val_accuracy"]}
                self._save_weights("best")
                print(f"New best model found (val accuracy {100 * record['val_accuracy']:.2f}%): "
                      f"saved to {os.path.join(self.model_dir, experiment.CHECKPOINT_DIR, 'best')}")
            with writer.as_default(step=epoch):
                for tag, key in (("Train/Loss", "loss"), ("Train/Accuracy", "accuracy"),
                                 ("Train/lr", "lr"), ("Val/Loss", "val_loss"),
                                 ("Val/Accuracy", "val_accuracy")):
                    tf.summary.scalar(tag, record[key])
            writer.flush()
            if self.chief:
                experiment.write_metrics(self.model_dir, metrics)
            # Last: a kill before this line redoes the epoch, and the epoch's
            # metrics and best checkpoint are rewritten identically.
            backup.epoch.assign(epoch + 1)
            manager.save()
            sys.stdout.flush()
        self._finish(metrics, writer, epochs)

    def _stop_on_nan(self, metrics, manager, backup, epoch, step):
        message = (f"training stopped: the loss is NaN at epoch {epoch + 1}, step {step}; "
                   "nothing was saved from that epoch")
        if manager.latest_checkpoint:
            backup.restore(manager.latest_checkpoint)
            message += (f"; the last good state (the end of epoch {int(backup.epoch.numpy())}) "
                        f"is in {os.path.join(self.model_dir, experiment.BACKUP_DIR)} and the "
                        "best model in "
                        f"{os.path.join(self.model_dir, experiment.CHECKPOINT_DIR, 'best')}")
        if self.chief:
            metrics["status"] = experiment.NAN_LOSS
            metrics["error"] = message
            experiment.write_metrics(self.model_dir, metrics)
            experiment.append_report(self.model_dir, message)
        self._release()
        raise wa_flags.TrainingStopped(message)

    def _evaluate(self, split):
        """Loss and accuracy of the model on a whole split (None if there is no such split).

        Evaluation runs on the undistributed split in the strategy's
        cross-replica context: exact over every example, and no replica ever
        gets an empty batch (which oneDNN's CPU convolution mishandles).
        """
        from wa_tf.evaluate import evaluate, keras_predict  # pylint: disable=import-outside-toplevel
        from wa_tf import data  # pylint: disable=import-outside-toplevel
        if split not in self.splits:
            return None
        if self._predict is None:
            self._predict = keras_predict(self.model)
        dataset = data.pipeline(self.splits[split], self.config["batch_size"], self.info,
                                training=False, seed=self.config["seed"])
        return evaluate(self._predict, dataset)

    def _finish(self, metrics, writer, epochs):
        config = self.config
        self._save_weights("final")
        lines = []
        test = {}
        if "test" not in self.splits:
            lines.append(f"Dataset {config['dataset']} has no test split: no test accuracy "
                         "(the validation accuracy of each epoch is in metrics.json).")
        else:
            test["final"] = self._evaluate("test")
            best_path = self._path(experiment.CHECKPOINT_DIR, "best")
            self.model.load_weights(best_path).expect_partial()
            test["best"] = self._evaluate("test")
            test["best"]["epoch"] = metrics["best"]["epoch"]
            for name, step in (("final", epochs), ("best", epochs + 1)):
                r = test[name]
                label = "final model" if name == "final" else \
                    f"best model, epoch {metrics['best']['epoch']}"
                lines.append(_result_line(f"Test set ({label})", r))
                with writer.as_default(step=step):
                    tf.summary.scalar("Test/Accuracy", r["accuracy"])
        writer.flush()
        print("\n".join(lines))
        if self.chief:
            metrics["test"] = test or None
            metrics["status"] = experiment.FINISHED
            experiment.write_metrics(self.model_dir, metrics)
            experiment.append_report(self.model_dir, "\n".join(["", "Results:"] + lines))
            shutil.rmtree(self._path(experiment.BACKUP_DIR), ignore_errors=True)
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self._release(finished=True)
        self.metrics = metrics

    def _release(self, finished=False):
        if self.lock is not None:
            self.lock.release(remove=finished)
            self.lock = None


def _run(config: Mapping, program: str) -> Dict:
    run = _Run(config, program)
    run.setup()
    run.open_folder()
    try:
        run.train()
    finally:
        run._release()  # pylint: disable=protected-access
    return {"model_dir": run.model_dir, "metrics": run.metrics}


def run(config: Mapping) -> Dict:
    """Trains a model from scratch as ``bin/train.py``.

    Args:
      config: Flag values (:func:`wa_tf.training.flags.as_dict`), validated.

    Returns:
      {'model_dir': experiment folder, 'metrics': the metrics.json content}.

    Raises:
      FlagError: for bad input, before anything is written.
      TrainingStopped: when the loss becomes NaN.
    """
    return _run(config, "train")


def adapt(config: Mapping) -> Dict:
    """Initialises a model from --modelDir's checkpoint, then trains it, as ``bin/adapt.py``."""
    return _run(config, "adapt")
