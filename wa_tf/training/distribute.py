"""tf.distribute strategies from command-line flags.

Follows the convention of the TF Model Garden (``official/common/distribute_utils.py``):
a ``--distribution_strategy`` name and ``--num_gpus`` select the strategy; the
model, optimizer, quantizers and metrics are then created under its scope and
``--batch_size`` is the global batch, split evenly across replicas.
"""

from typing import Optional

import numpy as np
import tensorflow as tf

from wa_tf.training.errors import ArgumentError

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored")


def hide_gpus():
    """Makes TensorFlow ignore every GPU (``--use_cpu``); call before any op runs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # devices already initialised
        raise RuntimeError("--use_cpu must take effect before TensorFlow initialises its "
                           "devices; it was applied too late") from e


def get_distribution_strategy(distribution_strategy: Optional[str] = None,
                              num_gpus: Optional[int] = None) -> tf.distribute.Strategy:
    """Returns the strategy named by ``--distribution_strategy`` and ``--num_gpus``.

    Args:
      distribution_strategy: One of :data:`STRATEGIES`, or None to choose:
        ``mirrored`` over all selected GPUs when there are several, else
        ``default``.  ``mirrored`` without GPUs mirrors over the logical CPU
        devices (one, unless virtual CPU devices were configured, as the tests do).
        ``multi_worker_mirrored`` reads the cluster from ``TF_CONFIG``.
      num_gpus: GPUs to use; None for all visible ones.

    Returns:
      A ``tf.distribute.Strategy``.

    Raises:
      ArgumentError (a ValueError): about 'distribution_strategy' or
        'num_gpus', for an unknown strategy name or an impossible GPU count.
    """
    # Visible physical GPUs: listing logical devices would initialise the
    # runtime, after which MultiWorkerMirroredStrategy can no longer be created.
    gpus = tf.config.get_visible_devices("GPU")
    if num_gpus is None:
        num_gpus = len(gpus)
    if num_gpus < 0 or num_gpus > len(gpus):
        raise ArgumentError("num_gpus", lambda n: f"{n('num_gpus')} must be between 0 and the "
                            f"{len(gpus)} visible GPU(s); got {num_gpus}")
    name = distribution_strategy or ("mirrored" if num_gpus > 1 else "default")
    name = name.lower()
    if name not in STRATEGIES:
        raise ArgumentError("distribution_strategy", lambda n: f"{n('distribution_strategy')} "
                            f"must be one of {', '.join(STRATEGIES)}; got "
                            f"{distribution_strategy!r}")
    if name in ("default", "one_device") and num_gpus > 1:
        raise ArgumentError("distribution_strategy", lambda n: f"{n('distribution_strategy')}="
                            f"{name} runs on one device; use mirrored for {n('num_gpus')}="
                            f"{num_gpus}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if num_gpus else "/cpu:0")
    if name == "mirrored":
        devices = ([f"/gpu:{i}" for i in range(num_gpus)] if num_gpus
                   else [d.name for d in tf.config.list_logical_devices("CPU")])
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.MultiWorkerMirroredStrategy()


def task_info(strategy: tf.distribute.Strategy):
    """(task_type, task_id) of this process; (None, None) outside a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return None, None
    return resolver.task_type, resolver.task_id


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the outputs: the chief, or worker 0 without a chief."""
    task_type, task_id = task_info(strategy)
    if task_type is None or task_type == "chief":
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def broadcast_string(strategy: tf.distribute.Strategy, text: str, max_len: int = 1024) -> str:
    """The chief's ``text`` on every worker of a multi-worker strategy.

    Workers must agree on the experiment folder the chief chose (its name holds
    the chief's clock).  Implemented as a SUM all-reduce of the chief's UTF-8
    bytes and zeros from the other workers, so no extra service is needed.
    Every worker must call it (it is a collective); single-worker strategies
    return ``text`` unchanged.
    """
    if task_info(strategy)[0] is None:
        return text
    data = text.encode("utf-8")
    if len(data) > max_len:
        raise ValueError(f"path too long to share between workers ({len(data)} > {max_len} bytes)")
    codes = np.zeros(max_len, np.int32)
    if is_chief(strategy):
        codes[:len(data)] = np.frombuffer(data, np.uint8)
    local_replicas = max(1, len(strategy.extended.worker_devices))

    def contribution():
        # Only the first local replica contributes, so the sum holds one copy.
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.where(replica_id % local_replicas == 0, tf.constant(codes), tf.zeros_like(codes))

    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(contribution), axis=None)
    return bytes(np.asarray(total).astype(np.uint8)).rstrip(b"\0").decode("utf-8")


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Number of worker processes (input pipelines) of the strategy's cluster."""
    if task_info(strategy)[0] is None:
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))
