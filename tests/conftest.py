"""Shared pytest fixtures.

Two virtual CPU devices are configured before TensorFlow initialises, so
distribution tests can run MirroredStrategy on a machine without GPUs
(the pattern of Larq's ``distribute_scope`` fixture).
"""
import itertools
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import wa_tf  # noqa: E402,F401

_strategy_ids = itertools.count(1)


@pytest.fixture(params=["default", "mirrored"])
def distribute_scope(request):
    """Runs a test with no strategy and under MirroredStrategy on 2 virtual CPUs."""
    if request.param == "default":
        yield None
    else:
        # Every MirroredStrategy numbers its collective ops from the same keys,
        # so a later test's collectives would collide with an earlier test's
        # (shape/type mismatch errors): give each strategy its own key range,
        # as TensorFlow's own tests do.
        tf.distribute.MirroredStrategy._collective_key_base = 1000 * next(_strategy_ids)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            yield strategy


@pytest.fixture(autouse=True)
def _clear_session():
    import tf_keras
    tf_keras.backend.clear_session()
    yield


@pytest.fixture(params=["fused", "tf"])
def pipeline(request):
    """Runs a test with wa_tf.kernels' fused tile kernels and with the pure-TF pipeline."""
    from wa_tf import kernels  # pylint: disable=import-outside-toplevel
    if request.param == "fused":
        if not kernels.available():
            pytest.skip(f"fused kernels unavailable here: {kernels.unavailable_reason()}")
        yield request.param
    else:
        with kernels.disabled():
            yield request.param
