"""One training or adaptation run: :class:`Runner`.

:class:`Runner` holds one run, in the shape of Model Garden's
``OrbitExperimentRunner``: construction builds the strategy, data, model and
experiment folder in small ``_build_*`` steps (and restores a backup), and
:meth:`Runner.run` loops over the epochs with ``_train_epoch`` and
``_end_epoch``; what goes into ``report.txt`` and ``metrics.json`` is composed
by :mod:`~wa_tf.training.run_report`.

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
from typing import Dict, Optional

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf import data, models, quantization
from wa_tf.models import architecture
from wa_tf.training import distribute, experiment, run_report
from wa_tf.training.config import FLAG_NAMES, RunConfig
from wa_tf.training.errors import ArgumentError, TrainingStopped
from wa_tf.training.metrics import evaluate, keras_predict
from wa_tf.training.schedule import (
    EPOCH_SEED_STRIDE,
    NanGuard,
    OneEpoch,
    compile_model,
    distributed_dataset,
    learning_rate,
    lr_milestones,
    steps_per_epoch,
)
from wa_tf.training.source_run import SourceRun


class Runner:
    """One training (or adaptation) run.

    Construction builds everything and writes nothing before the input is
    known to be good (a bad value, data folder or checkpoint raises
    :class:`~wa_tf.training.errors.ArgumentError` first); it then chooses
    the experiment folder (a new one, or an unfinished one of the same command
    to resume) and restores the last backup.  :meth:`run` trains the
    remaining epochs.

    Example:
      >>> result = Runner(RunConfig(conv="flex", dataset="digits")).run()
    """

    def __init__(self, config: RunConfig, program: str = "train"):
        config.validate(program)
        self.program = program
        self.source = (SourceRun.read(config.model_dir, config.checkpoint)
                       if program == "adapt" else None)
        # Field -> value of what an adapted run took from its source run.
        self.config, self.from_source = (self.source.resolve(config) if self.source
                                         else (config, {}))
        # An adapted run validates on its source run's validation split, so its
        # best epoch is never chosen on images the source model trained on.
        self.split_seed = self.source.split_seed if self.source else self.config.seed
        self.strategy = self._build_strategy()
        self.chief = distribute.is_chief(self.strategy)
        tf_keras.utils.set_random_seed(self.config.seed)
        if self.config.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.splits, self.info = self._build_data()
        # The raw training split is cached once; each epoch's pipeline reads from it.
        self.train_split = self.splits["train"].cache()
        self.steps = steps_per_epoch(self.info.num_examples["train"], self.config.batch_size,
                                     distribute.num_workers(self.strategy),
                                     self.config.steps_per_epoch)
        self.model = self._build_model()
        self._predict = self._build_predict()
        self.adapted = self._build_adapted()
        self.calibration = self._build_calibration()
        self.lock, self.resumed, self.model_dir = self._build_folder()
        try:
            task_type, task_id = distribute.task_info(self.strategy)
            # Where this process writes: the folder, or a worker's temporary folder.
            self.work_dir = (self.model_dir if self.chief else os.path.join(
                self.model_dir, f"workertemp_{task_type}_{task_id}"))
            os.makedirs(self.work_dir, exist_ok=True)
            if self.chief and self.resumed:
                self._check_resumed_architecture()
            if self.chief and not self.resumed:
                self._write_new_folder()
            self.backup, self.manager = self._build_backup()
            self.start_epoch = self._restore_backup()
            self.metrics = self._build_metrics()
            self.writer = tf.summary.create_file_writer(self._path(experiment.LOG_DIR))
        except BaseException:
            self._release()
            raise

    # -- construction ---------------------------------------------------------

    def _build_strategy(self) -> tf.distribute.Strategy:
        config = self.config
        if config.use_cpu:
            distribute.hide_gpus()
        strategy = distribute.get_distribution_strategy(config.distribution_strategy,
                                                        config.num_gpus)
        replicas = strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise ArgumentError("batch_size", lambda n: f"{n('batch_size')}={config.batch_size}"
                                f" must be divisible by the {replicas} replicas")
        return strategy

    def _build_data(self):
        config = self.config
        try:
            return data.load(config.dataset, data_dir=config.data_dir, seed=self.split_seed,
                             skip_corrupt=config.skip_corrupt)
        except ValueError as e:
            # data.load's messages name its own arguments (data_dir, skip_corrupt).
            text = str(e).removeprefix("data_dir: ")
            raise ArgumentError("data_dir", lambda n, text=text: (
                f"{n('data_dir')}/{n('dataset')}: "
                + text.replace("skip_corrupt", n("skip_corrupt")))) from None

    def _build_model(self) -> tf_keras.Model:
        config = self.config
        with self.strategy.scope():
            try:
                model = experiment.build_model(config, self.info.num_classes,
                                               self.info.image_shape)
            except ValueError as e:
                raise ArgumentError(None, str(e)) from None
            compile_model(model, config.lr, config.jit_compile)
            # Create the optimizer's variables now, so checkpoints restore into them.
            model.optimizer.build(model.trainable_variables)
        return model

    def _build_adapted(self) -> Optional[Dict]:
        """adapt: copies the source run's weights; returns what was copied (else None)."""
        if self.source is None:
            return None
        source_dir = self.source.model_dir
        meta = experiment.dataset_meta(source_dir, self.source.config)
        if meta["num_classes"] != self.info.num_classes:
            raise ArgumentError("model_dir", lambda n: f"{n('model_dir')}: its model has "
                                f"{meta['num_classes']} classes, the dataset "
                                f"{self.info.num_classes}")
        # The source model is only read: built outside the strategy, then dropped.
        source = experiment.build_model(self.source.config, meta["num_classes"],
                                        meta["image_shape"], source_dir)
        experiment.restore_weights(source, self.source.checkpoint)
        try:
            copied = quantization.copy_weights(source, self.model)
        except ValueError as e:
            raise ArgumentError("checkpoint", lambda n, e=e: f"{n('checkpoint')}: {e}") from None
        # In the flags' order, as FLAGS.txt lists them.
        from_source = {flag: self.from_source[name] for name, flag in FLAG_NAMES.items()
                       if name in self.from_source}
        return {"model_dir": source_dir, "checkpoint": self.source.checkpoint, **copied,
                "from_source": from_source}

    def _build_calibration(self) -> Optional[Dict]:
        """--warmup: sets the ranges the source checkpoint had no statistics for.

        One inference pass over the first training batch (not augmented):
        the warm-up quantizers without statistics (those of the Winograd
        layers: transforms, Winograd-domain stages) take its range, with
        BatchNorm on its copied moving statistics, as the adapted model
        computes at inference; no weight or BatchNorm statistic changes.
        Without it they take their range from the first training step, with
        BatchNorm on the batch's statistics.

        Returns:
          {'images': batch size, 'variables': names of the variables set}, or
          None without --warmup or --Q.
        """
        if not (self.config.warmup and self.config.quantize):
            return None
        weights = quantization.named_weights(self.model)
        before = {key: v.numpy() for key, v in weights.items()}
        images, _ = next(iter(data.pipeline(self.splits["train"], self.config.batch_size,
                                            self.info, training=False, seed=self.config.seed)))
        self._predict(images)
        changed = [key for key, v in weights.items() if not np.array_equal(v.numpy(), before[key])]
        return {"images": int(images.shape[0]), "variables": changed}

    def _build_folder(self):
        """Chooses (chief) and shares (all workers) the experiment folder.

        Returns:
          (held lock or None, whether an unfinished run is resumed, folder).
        """
        path, lock, resumed = "", None, False
        if self.chief:
            if self.config.resume:
                path, lock = experiment.find_unfinished(self.config, self.model.name)
            resumed = bool(path)
            if not path:
                path = experiment.create(self.config, self.model.name)
                lock = experiment.Lock(path)
                lock.acquire()
        return lock, resumed, distribute.broadcast_string(self.strategy, path)

    def _build_backup(self):
        backup = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer,
                                     epoch=tf.Variable(0, dtype=tf.int64))
        manager = tf.train.CheckpointManager(backup, self._path(experiment.BACKUP_DIR),
                                             max_to_keep=1)
        return backup, manager

    def _restore_backup(self) -> int:
        """Restores the last completed epoch's state, if any; returns the epochs done."""
        if not self.manager.latest_checkpoint:
            return 0
        self.backup.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.backup.epoch.numpy())

    def _build_metrics(self) -> Dict:
        metrics = (experiment.read_metrics(self.model_dir) if self.chief else None) \
            or self._initial_metrics()
        run_report.truncate_history(metrics, self.start_epoch)
        return metrics

    def _build_predict(self):
        return keras_predict(self.model)

    def _initial_metrics(self) -> Dict:
        return run_report.initial_metrics(
            self.program, self.model.name, self.info, self.config, self.steps,
            self.strategy.num_replicas_in_sync, lr_milestones(self.config.epochs),
            self.adapted, self.split_seed, self.calibration)

    def _adapt_summary(self) -> Optional[str]:
        if not self.adapted:
            return None
        summary = run_report.adapt_summary(
            self.adapted["model_dir"], self.adapted["checkpoint"], self.adapted,
            self.adapted["from_source"], self.split_seed)
        if self.calibration:
            summary += (f"\nWarm-up: {len(self.calibration['variables'])} quantizer state "
                        "variables set by an inference pass over "
                        f"{self.calibration['images']} training images.")
        return summary

    def _layer_table(self) -> str:
        return models.layer_table(self.model)

    def _check_resumed_architecture(self):
        """A resumed run's architecture file must still describe its model."""
        if not self.config.architecture:
            return
        copy = os.path.join(self.model_dir, experiment.ARCHITECTURE_FILE)
        if os.path.isfile(copy) and (architecture.load_architecture(copy)
                                     != architecture.load_architecture(self.config.architecture)):
            raise ArgumentError("architecture", lambda n: f"{n('architecture')}: "
                                f"{self.config.architecture} changed since the run in "
                                f"{self.model_dir} started (its copy: {copy}); restore it, "
                                f"or start a new run with {n('resume')}=false")

    def _write_new_folder(self):
        if self.config.architecture:
            architecture.save_architecture(
                architecture.load_architecture(self.config.architecture),
                os.path.join(self.model_dir, experiment.ARCHITECTURE_FILE))
        experiment.write_flags(self.model_dir, self.config)
        experiment.append_report(self.model_dir, run_report.new_report(
            " ".join(sys.argv), self.config, self._layer_table(), self._adapt_summary()))
        experiment.write_metrics(self.model_dir, self._initial_metrics())

    # -- training -------------------------------------------------------------

    def run(self) -> Dict:
        """Trains the remaining epochs, then tests the final and the best model.

        Returns:
          {'model_dir': experiment folder, 'metrics': the metrics.json content}.

        Raises:
          TrainingStopped: when the loss becomes NaN or infinite.
        """
        try:
            self._print_banner()
            for epoch in range(self.start_epoch, self.config.epochs):
                self._end_epoch(epoch, *self._train_epoch(epoch))
            self._finish()
        finally:
            self._release()
        return {"model_dir": self.model_dir, "metrics": self.metrics}

    def _print_banner(self):
        epochs = self.config.epochs
        print(self._layer_table())
        print(f"Output dir: {self.model_dir}")
        if self.adapted:
            print(self._adapt_summary())
        print(f"Learning rate decay at: {[round(m, 6) for m in lr_milestones(epochs)]}")
        if self.resumed:
            print(f"Resuming the unfinished run in {self.model_dir} after epoch "
                  f"{self.start_epoch}/{epochs}")
            if self.chief:
                experiment.append_report(self.model_dir,
                                         f"Resumed after epoch {self.start_epoch}.")
        sys.stdout.flush()

    def _train_epoch(self, epoch: int):
        """Trains one epoch; returns (its record without validation, start time)."""
        config = self.config
        lr = learning_rate(epoch, config.epochs, config.lr)
        self.model.optimizer.learning_rate.assign(lr)
        train_data = distributed_dataset(
            self.strategy, self.train_split, config.batch_size, self.info, True,
            config.seed + EPOCH_SEED_STRIDE * epoch)
        guard = NanGuard()
        started = time.time()
        history = self.model.fit(
            train_data, epochs=config.epochs, initial_epoch=epoch, steps_per_epoch=self.steps,
            callbacks=[guard, OneEpoch()], verbose=1 if sys.stdout.isatty() else 2)
        if guard.bad_step is not None:
            self._stop_on_nan(epoch, guard.bad_step)
        logs = {k: float(v[-1]) for k, v in history.history.items()}
        return {"epoch": epoch + 1, "lr": lr, "loss": logs["loss"],
                "accuracy": logs["accuracy"]}, started

    def _end_epoch(self, epoch: int, record: Dict, started: float):
        """Validates, keeps the best model, writes summaries, metrics and the backup."""
        val = self._evaluate("validation")
        print(run_report.result_line("Val set", val))
        record = dict(record, val_loss=val["loss"], val_accuracy=val["accuracy"],
                      seconds=round(time.time() - started, 2))
        if run_report.add_epoch(self.metrics, record):
            self._save_weights("best")
            print(f"New best model found (val accuracy {100 * record['val_accuracy']:.2f}%): "
                  f"saved to {os.path.join(self.model_dir, experiment.CHECKPOINT_DIR, 'best')}")
        with self.writer.as_default(step=epoch):
            for tag, key in (("Train/Loss", "loss"), ("Train/Accuracy", "accuracy"),
                             ("Train/lr", "lr"), ("Val/Loss", "val_loss"),
                             ("Val/Accuracy", "val_accuracy")):
                tf.summary.scalar(tag, record[key])
        self.writer.flush()
        if self.chief:
            experiment.write_metrics(self.model_dir, self.metrics)
        # Last: a kill before this line redoes the epoch, and the epoch's
        # metrics and best checkpoint are rewritten identically.
        self.backup.epoch.assign(epoch + 1)
        self.manager.save()
        sys.stdout.flush()

    def _stop_on_nan(self, epoch: int, step: int):
        message = (f"training stopped: the loss is NaN at epoch {epoch + 1}, step {step}; "
                   "nothing was saved from that epoch")
        if self.manager.latest_checkpoint:
            self.backup.restore(self.manager.latest_checkpoint)
            message += (f"; the last good state (the end of epoch "
                        f"{int(self.backup.epoch.numpy())}) is in "
                        f"{os.path.join(self.model_dir, experiment.BACKUP_DIR)} and the best "
                        "model in "
                        f"{os.path.join(self.model_dir, experiment.CHECKPOINT_DIR, 'best')}")
        if self.chief:
            run_report.stop_on_nan(self.metrics, message)
            experiment.write_metrics(self.model_dir, self.metrics)
            experiment.append_report(self.model_dir, message)
        self._release()
        raise TrainingStopped(message)

    def _evaluate(self, split: str) -> Optional[Dict]:
        """Loss and accuracy of the model on a whole split (None if there is no such split).

        Evaluation runs on the undistributed split in the strategy's
        cross-replica context: exact over every example, and no replica ever
        gets an empty batch (which oneDNN's CPU convolution mishandles).
        """
        if split not in self.splits:
            return None
        dataset = data.pipeline(self.splits[split], self.config.batch_size, self.info,
                                training=False, seed=self.config.seed)
        return evaluate(self._predict, dataset)

    def _finish(self):
        epochs = self.config.epochs
        self._save_weights("final")
        test = {}
        if "test" in self.splits:
            test["final"] = self._evaluate("test")
            self.model.load_weights(self._path(experiment.CHECKPOINT_DIR, "best")).expect_partial()
            test["best"] = self._evaluate("test")
            test["best"]["epoch"] = self.metrics["best"]["epoch"]
            for name, step in (("final", epochs), ("best", epochs + 1)):
                with self.writer.as_default(step=step):
                    tf.summary.scalar("Test/Accuracy", test[name]["accuracy"])
        self.writer.flush()
        lines = run_report.results_text(self.config.dataset, test,
                                        self.metrics["best"]["epoch"] if test else None)
        print("\n".join(lines))
        if self.chief:
            run_report.finish(self.metrics, test)
            experiment.write_metrics(self.model_dir, self.metrics)
            experiment.append_report(self.model_dir, "\n".join(["", "Results:"] + lines))
            shutil.rmtree(self._path(experiment.BACKUP_DIR), ignore_errors=True)
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self._release(finished=True)

    # -- helpers --------------------------------------------------------------

    def _path(self, *parts) -> str:
        return os.path.join(self.work_dir, *parts)

    def _save_weights(self, name: str):
        self.model.save_weights(self._path(experiment.CHECKPOINT_DIR, name))

    def _release(self, finished: bool = False):
        if self.lock is not None:
            self.lock.release(remove=finished)
            self.lock = None
