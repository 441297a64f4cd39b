"""Training of Winograd-aware models: flags, experiment folders, distribution, train loop.

Modules:
  flags: the absl flags of ``bin/train.py`` / ``bin/adapt.py`` and their validation.
  experiment: experiment folders, ``FLAGS.txt``, ``metrics.json``, resuming,
    :func:`~wa_tf.training.experiment.read_flags` and
    :func:`~wa_tf.training.experiment.load_model`.
  distribute: tf.distribute strategies from ``--distribution_strategy`` / ``--num_gpus``.
  optimizer: :class:`~wa_tf.training.optimizer.AdamL2`, PyTorch's Adam with weight decay.
  train_lib: :func:`~wa_tf.training.train_lib.run` and
    :func:`~wa_tf.training.train_lib.adapt`, the libraries behind the binaries.
"""
