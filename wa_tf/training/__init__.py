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
  train_lib: :class:`~wa_tf.training.train_lib.Runner`,
    :func:`~wa_tf.training.train_lib.run` and
    :func:`~wa_tf.training.train_lib.adapt`, the libraries behind the binaries.
"""
