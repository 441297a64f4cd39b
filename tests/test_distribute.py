"""Tests of tf.distribute training: strategies, replica equivalence, multi-worker."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import quantization
from wa_tf.layers import WinogradConv2D
from wa_tf.models import resnet
from wa_tf.training import distribute, experiment, train_lib
from wa_tf.training import flags as wa_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _new_collective_keys():
    # Every MirroredStrategy numbers its collective ops from the same keys: two
    # instances in one process that run different collectives collide unless
    # they start elsewhere (TF's own tests do this).  Called before and after a
    # test's strategy, so no other test's strategy shares its keys.
    tf.distribute.MirroredStrategy._collective_key_base += 100_000  # pylint: disable=protected-access


@pytest.fixture
def mirrored():
    """A factory of MirroredStrategy over conftest's 2 logical CPUs, with fresh collective keys."""
    def make():
        _new_collective_keys()
        return distribute.get_distribution_strategy("mirrored")
    yield make
    _new_collective_keys()


def test_strategies_from_flags(mirrored):
    assert distribute.get_distribution_strategy(None) is tf.distribute.get_strategy()
    one = distribute.get_distribution_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    strategy = mirrored()  # no GPUs: mirrored over the logical CPUs of conftest
    assert strategy.num_replicas_in_sync == 2
    assert distribute.is_chief(strategy) and distribute.num_workers(strategy) == 1
    with pytest.raises(ValueError, match="distribution_strategy must be one of"):
        distribute.get_distribution_strategy("parameter_server")
    with pytest.raises(ValueError, match="num_gpus must be between 0 and the 0"):
        distribute.get_distribution_strategy("mirrored", num_gpus=2)


def _tiny_model(bits):
    """The ResNet-18-like model's ingredients, small: float stem, the model's
    (synchronized) BatchNorm, a flex WinogradConv2D, float classifier (as
    quantize_model leaves the first and last layers by default)."""
    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = resnet._batch_norm("bn1")(x)  # pylint: disable=protected-access
    x = tf_keras.layers.ReLU(name="relu1")(x)
    x = WinogradConv2D(6, tile_size=2, flex=True, name="wa")(x)
    x = resnet._batch_norm("bn2")(x)  # pylint: disable=protected-access
    x = tf_keras.layers.ReLU(name="relu2")(x)
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = tf_keras.layers.Dense(10, name="linear")(x)
    model = tf_keras.Model(inputs, outputs)
    return model if bits is None else quantization.quantize_model(model, bits=bits)


def _train(strategy, bits, weights, images, labels, steps):
    with strategy.scope():
        model = _tiny_model(bits)
        # SGD, not Adam: Adam's m / sqrt(v) turns float round-off in near-zero
        # gradients into +-lr steps, which would hide what this test compares.
        model.compile(optimizer=tf_keras.optimizers.SGD(0.05),
                      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.set_weights(weights)
    global_batch = len(images) // steps

    def dataset_fn(context):
        # Consecutive per-replica batches make one global batch, in order.
        per_replica = context.get_per_replica_batch_size(global_batch)
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(per_replica)

    model.fit(strategy.distribute_datasets_from_function(dataset_fn), epochs=1,
              steps_per_epoch=steps, verbose=0)
    return model


@pytest.fixture
def floatx():
    """Sets tf_keras's float type for a test and restores it afterwards."""
    saved = tf_keras.backend.floatx()
    yield tf_keras.backend.set_floatx
    tf_keras.backend.set_floatx(saved)


@pytest.mark.parametrize("bits,dtype", [(None, "float32"), (8, "float64")],
                         ids=["float", "int8"])
def test_mirrored_matches_single_device(bits, dtype, floatx, mirrored):
    """Two replicas with half batches reach the single device's weights, BN
    statistics and quantizer ranges: BatchNorm is synchronized, quantizer
    ranges are reduced across replicas and the loss is scaled by the global batch.

    The INT8 model computes in float64: in float32 the two set-ups' different
    summation orders (BN statistics, gradients) move some values across an
    INT8 rounding boundary, after which they legitimately differ by whole
    quantization steps.  A missing synchronization shows as errors > 1e-2.
    """
    floatx(dtype)
    rng = np.random.default_rng(0)
    steps, global_batch = 3, 8
    images = rng.normal(size=(steps * global_batch, 8, 8, 3)).astype(dtype)
    labels = rng.integers(0, 10, size=steps * global_batch).astype(np.int64)
    tf_keras.utils.set_random_seed(0)
    reference = _tiny_model(bits)
    assert all(layer.synchronized for layer in reference.layers
               if isinstance(layer, tf_keras.layers.BatchNormalization)), \
        "BatchNormalization lost synchronized=True (quantize_model rebuilds layers from get_config)"
    init = reference.get_weights()
    single = _train(tf.distribute.OneDeviceStrategy("/cpu:0"), bits, init, images, labels, steps)
    two = _train(mirrored(), bits, init, images, labels, steps)
    moved = max(np.abs(w - v.numpy()).max() for w, v in zip(init, single.weights))
    assert moved > 1e-2  # training changed the weights
    for a, b in zip(single.weights, two.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5, rtol=0, err_msg=a.name)


@pytest.mark.slow  # long end-to-end: keeps the default run within ~15 minutes
def test_train_lib_run_mirrored(tmp_path):
    """bin/train.py's library under MirroredStrategy: per-replica input, global batch."""
    # lr 0.01: two steps move the logits away from zero, so that the loss
    # comparison below depends on every logit.
    config = _digits_config(tmp_path, distribution_strategy="mirrored", batch_size=32, lr=0.01)
    _new_collective_keys()
    try:
        result = train_lib.run(config)
    finally:
        _new_collective_keys()
    metrics = experiment.read_metrics(result["model_dir"])
    assert metrics["status"] == experiment.FINISHED
    assert metrics["num_replicas"] == 2 and metrics["global_batch_size"] == 32
    assert len(metrics["history"]) == 1
    # The reported figures equal a numpy evaluation of the saved model's
    # logits on the same raw images, normalised here from metrics.json's
    # statistics.  After the only epoch, the final weights are the ones the
    # epoch's validation pass saw.
    from wa_tf import data  # pylint: disable=import-outside-toplevel
    splits, _ = data.load("digits", seed=config["seed"])
    stats = metrics["dataset"]
    model, _ = experiment.load_model(result["model_dir"], "final")
    for split, reported in (("test", metrics["test"]["final"]),
                            ("validation", {"loss": metrics["history"][0]["val_loss"],
                                            "accuracy": metrics["history"][0]["val_accuracy"]})):
        images, labels = (np.stack(a) for a in zip(*splits[split].as_numpy_iterator()))
        assert len(labels) == stats["num_examples"][split]
        x = (images / 255.0 - np.array(stats["mean"])) / np.array(stats["std"])
        logits = model.predict(x.astype(np.float32), batch_size=64, verbose=0).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -log_probs[np.arange(len(labels)), labels].mean()
        correct = int((logits.argmax(axis=1) == labels).sum())
        assert 0 < correct < len(labels)  # neither trivial, so the counts below mean something
        assert round(reported["accuracy"] * len(labels)) == correct, split
        np.testing.assert_allclose(reported["loss"], loss, rtol=1e-5, err_msg=split)
    assert metrics["test"]["final"]["examples"] == stats["num_examples"]["test"]


def _digits_config(out_dir, **overrides):
    from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    values(["test", "--use_normal_conv", "--dataset=digits", "--mult=0.125", "--epochs=1",
            "--steps_per_epoch=2", f"--outDir={out_dir}"])
    config = wa_flags.as_dict(values)
    config.update(overrides)
    return config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # end to end, over a minute on 2 cores
def test_multi_worker_mirrored_two_local_workers(tmp_path):
    """Two worker processes on loopback ports train together; the chief writes the outputs."""
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs, logs = [], [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]  # pylint: disable=consider-using-with
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bin", "train.py"), "--use_normal_conv",
             "--dataset=digits", "--mult=0.125", "--epochs=2", "--steps_per_epoch=2",
             "--batch_size=32", "--distribution_strategy=multi_worker_mirrored",
             f"--outDir={tmp_path / 'out'}"],
            env=env, cwd=ROOT, stdout=logs[index], stderr=subprocess.STDOUT))
    deadline = time.time() + 600
    # A worker that fails leaves the other waiting in a collective: stop it too.
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p, log in zip(procs, logs):
        p.wait()
        log.close()
    outputs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    runs = [dp for dp, _, files in os.walk(tmp_path / "out") if "FLAGS.txt" in files]
    assert len(runs) == 1, runs  # one experiment folder, written by the chief
    run = runs[0]
    metrics = experiment.read_metrics(run)
    assert metrics["status"] == experiment.FINISHED and metrics["num_replicas"] == 2
    assert len(metrics["history"]) == 2
    assert os.path.isfile(os.path.join(run, "checkpoints", "final.index"))
    assert not [d for d in os.listdir(run) if d.startswith("workertemp")]  # cleaned up
    assert not os.path.exists(os.path.join(run, "backup"))
    # Both workers trained in lock-step: the same final losses.
    losses = [[line for line in out.splitlines() if line.startswith("2/2")][-1].split(" - ")[2]
              for out in outputs]
    assert losses[0] == losses[1]
