"""Training of Winograd-aware models: flags, experiment folders, distribution, train loop.

Modules:
  config: :class:`~wa_tf.training.config.RunConfig`, the typed configuration of a run.
  errors: :class:`~wa_tf.training.errors.ArgumentError`, the library's error about
    its arguments.
  flags: the absl flags of ``bin/train.py`` / ``bin/adapt.py``, their conversion
    into a RunConfig, and the one-line errors naming a flag.
  run_folder: what every run folder (training, search, sweep) shares: atomic writes,
    ``FLAGS.txt``, ``report.txt``, the lock, finding an unfinished or the newest run.
  experiment: experiment folders, ``FLAGS.txt``, ``report.txt``, ``metrics.json``, resuming,
    :func:`~wa_tf.training.experiment.read_flags` and
    :func:`~wa_tf.training.experiment.load_model`.
  distribute: tf.distribute strategies from ``--distribution_strategy`` / ``--num_gpus``.
  optimizer: :class:`~wa_tf.training.optimizer.AdamL2`, PyTorch's Adam with weight decay.
  metrics: accuracy and loss of a model over a dataset.
  run_report: what a run writes into ``report.txt`` and ``metrics.json``, its statuses.
  schedule: the learning-rate schedule, steps and seeds of the epochs, the compiled model.
  source_run: :class:`~wa_tf.training.source_run.SourceRun`, an adapted run's source.
  runner: :class:`~wa_tf.training.runner.Runner`, one training or adaptation run.
  train_lib: :func:`~wa_tf.training.train_lib.run` and
    :func:`~wa_tf.training.train_lib.adapt`, the libraries behind the binaries.
  flag_errors: the one mapping of library errors to one-line flag errors of the binaries.
  cli: the run-loading flags and glue shared by ``bin/evaluate.py`` and ``bin/export.py``.
"""
