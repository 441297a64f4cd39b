"""Tests of wa_tf.training: optimizer, schedule, flags, experiment folders, weight copying."""
import datetime
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from absl import flags as absl_flags

from wa_tf import models, quantization
from wa_tf.training import experiment, train_lib
from wa_tf.training import flags as wa_flags
from wa_tf.training.config import RunConfig
from wa_tf.training.errors import ArgumentError
from wa_tf.training.optimizer import AdamL2


def _flags(*argv):
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    values(["test", *argv])
    return values


def _config(**overrides):
    """A flag dict: the training flags' defaults with `overrides`."""
    config = wa_flags.as_dict(_flags())
    config.update(overrides)
    return config


def _torch_adam_l2(params, grads_per_step, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """numpy transcription of torch.optim.Adam(weight_decay=wd)'s update rule."""
    p = params.astype(np.float64).copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads_per_step, start=1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adam_l2_matches_torch_adam_with_weight_decay():
    rng = np.random.default_rng(0)
    init = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) * 1e-3 for _ in range(4)]
    var = tf.Variable(init)
    opt = AdamL2(learning_rate=0.01, l2=0.1)
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
    expected = _torch_adam_l2(init, grads, lr=0.01, wd=0.1)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)
    # The decay matters here: without it the result is measurably different.
    assert np.abs(_torch_adam_l2(init, grads, 0.01, 0.0) - expected).max() > 1e-4

    # Gradients (after the decay term) of the order of epsilon = 1e-8, where
    # its placement decides the update.  PyTorch adds eps to sqrt(v_hat), after
    # the bias correction; Keras's default adds it to sqrt(v), i.e. eps /
    # sqrt(1 - beta2^t) to sqrt(v_hat): 31.6 eps at the first step.
    # First step by hand (m_hat = g, v_hat = g^2): w -= lr * g / (|g| + eps),
    # with g = grad + 0.1 * w = [1, -2, 1, 1] * 1e-8: moves of lr * [1/2, -2/3, 1/2, 1/2].
    lr, l2 = 1e-7, 0.1
    small = np.array([1e-7, -2e-7, 0.0, 5e-8], np.float32)
    small_grad = np.array([0.0, 0.0, 1e-8, 5e-9], np.float32)
    var = tf.Variable(small)
    opt = AdamL2(learning_rate=lr, l2=l2)
    opt.apply_gradients([(tf.constant(small_grad), var)])
    np.testing.assert_allclose(var.numpy(), [5e-8, -2e-7 + 2e-7 / 3, -5e-8, 0.0],
                               rtol=1e-5, atol=1e-5 * lr)
    # Keras's default placement would have moved the first weight by
    # lr * 1e-8 * sqrt(0.001) / (1e-8 * sqrt(0.001) + 1e-8) = 0.0307 lr, not lr / 2.
    assert abs(1e-7 - lr * np.sqrt(0.001) / (np.sqrt(0.001) + 1) - var.numpy()[0]) > 0.4 * lr

    # Four more steps of such gradients against the numpy transcription.
    small_grads = [small_grad] + [(rng.normal(size=4) * 1e-8).astype(np.float32)
                                  for _ in range(4)]
    for g in small_grads[1:]:
        opt.apply_gradients([(tf.constant(g), var)])
    expected = _torch_adam_l2(small, small_grads, lr=lr, wd=l2)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-5 * lr)

    def keras_placement(params, grads_per_step, b1=0.9, b2=0.999, eps=1e-8):
        p = params.astype(np.float64).copy()
        m, v = np.zeros_like(p), np.zeros_like(p)
        for t, g in enumerate(grads_per_step, start=1):
            g = g + l2 * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        return p

    # The placement changes the result by a large part of the weights' movement.
    moved = np.abs(expected - small).max()
    assert moved > lr and np.abs(keras_placement(small, small_grads) - expected).max() > 0.3 * moved


@pytest.fixture
def fresh_collective_keys():
    """Gives the test's MirroredStrategy collective keys no other strategy in the
    process uses (instances otherwise reuse the same keys and can collide)."""
    tf.distribute.MirroredStrategy._collective_key_base += 100_000  # pylint: disable=protected-access
    yield
    tf.distribute.MirroredStrategy._collective_key_base += 100_000  # pylint: disable=protected-access


@pytest.mark.usefixtures("fresh_collective_keys")
def test_adam_l2_decay_counted_once_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    init = np.array([1.0, -2.0, 3.0], np.float32)
    with strategy.scope():
        var = tf.Variable(init)
        opt = AdamL2(learning_rate=0.1, l2=0.5)

    @tf.function
    def step():
        def replica_fn():
            # The same per-replica loss: the summed gradient is 2x, plus 0.5 * w once.
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(var) / strategy.num_replicas_in_sync
            opt.apply_gradients([(tape.gradient(loss, var), var)])
        strategy.run(replica_fn)

    step()
    expected = _torch_adam_l2(init, [np.ones(3, np.float32)], lr=0.1, wd=0.5)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("epochs,expected", [
    (10, [1e-3] * 6 + [1e-4] * 2 + [1e-5] * 2),  # milestones 6 and 8, as MultiStepLR
    (5, [1e-3] * 3 + [1e-4] + [1e-5]),
    # Milestones 7.2 and 9.6: the first epochs after them (the reference never decays).
    (12, [1e-3] * 8 + [1e-4] * 2 + [1e-5] * 2),
])
def test_learning_rate_schedule(epochs, expected):
    got = [train_lib.learning_rate(e, epochs, 1e-3) for e in range(epochs)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_flags_validation_names_the_flag():
    wa_flags.from_flags(_flags("--flex"))
    cases = {
        "--F must be one of 2, 4, 6": ["--flex", "--F=3"],
        "--bits must be an integer from 2 to 16; got 17": ["--flex", "--bits=17"],
        "--mult must be in (0, 1]": ["--flex", "--mult=0.0"],
        "exactly one of --use_normal_conv, --static, --flex is required; got --static --flex":
            ["--flex", "--static"],
        "--data_dir is required with --dataset=image_folder": ["--flex",
                                                               "--dataset=image_folder"],
        "--dataset must be one of": ["--flex", "--dataset=mnist"],
        "--distribution_strategy must be one of": ["--flex", "--distribution_strategy=tpu"],
        "--epochs must be a positive integer; got 0": ["--flex", "--epochs=0"],
        "--outDir must not be empty": ["--flex", "--outDir="],
    }
    for needle, argv in cases.items():
        with pytest.raises(wa_flags.FlagError, match=re.escape(needle)):
            wa_flags.from_flags(_flags(*argv))
    with pytest.raises(wa_flags.FlagError, match="--modelDir is required"):
        wa_flags.from_flags(_flags("--flex"), program="adapt")


def test_run_config_validation_names_the_field():
    """The library's errors name config fields; the flags layer spells them as flags."""
    RunConfig(conv="flex").validate()
    cases = {"tile_size": dict(tile_size=3), "bits": dict(bits=1),
             "width_multiplier": dict(width_multiplier=0.0), "conv": dict(conv="winograd"),
             "lr": dict(lr=0.0), "data_dir": dict(dataset="image_folder"),
             "num_gpus": dict(num_gpus=-1), "steps_per_epoch": dict(steps_per_epoch=0)}
    for field, changes in cases.items():
        with pytest.raises(ArgumentError) as info:
            RunConfig(**dict(dict(conv="flex"), **changes)).validate()
        assert info.value.argument == field and str(info.value).startswith(field), info.value
        assert "--" not in str(info.value)
    with pytest.raises(ArgumentError, match="^model_dir is required"):
        RunConfig(conv="flex").validate("adapt")
    # adapt takes data_dir from the source run.
    RunConfig(conv="flex", dataset="image_folder", model_dir="x").validate("adapt")
    error = ArgumentError("tile_size", lambda n: f"{n('tile_size')} is bad, see {n('model_dir')}")
    assert str(error) == "tile_size is bad, see model_dir"
    assert wa_flags.flag_message(error) == "--F is bad, see --modelDir"
    assert wa_flags.flag_message(error, {"model_dir": "run"}) == "--F is bad, see --run"


def test_run_config_from_and_to_flags():
    values = _flags("--static", "--F=2", "--Q", "--bits=6", "--mult=0.25", "--outDir=out",
                    "--modelToLoad=best")
    config = wa_flags.from_flags(values)
    assert config == RunConfig(conv="static", tile_size=2, quantize=True, bits=6,
                               width_multiplier=0.25, out_dir="out", checkpoint="best")
    assert config.to_flag_dict() == wa_flags.as_dict(values)
    # FLAGS.txt keeps the flags' definition order.
    assert list(config.to_flag_dict()) == wa_flags.flag_names(values)
    assert RunConfig.from_flag_dict(config.to_flag_dict()) == config
    # adapt: width and dataset left off the command line come from the source run.
    adapt = wa_flags.from_flags(_flags("--flex", "--modelDir=run"), program="adapt")
    assert adapt.width_multiplier is None and adapt.dataset is None
    assert wa_flags.from_flags(_flags("--flex", "--modelDir=run", "--mult=0.25"),
                               program="adapt").width_multiplier == 0.25


def test_flagfile_round_trip(tmp_path):
    config = _config(flex=True, F=6, Q=True, bits=6, mult=0.25, lr=0.01, dataset="digits",
                     data_dir="/some where/data", steps_per_epoch=3, resume=False)
    experiment.write_flags(str(tmp_path), RunConfig.from_flag_dict(config))
    assert experiment.read_flags(str(tmp_path)) == config
    text = (tmp_path / "FLAGS.txt").read_text()
    assert "--flex\n" in text and "--nouse_normal_conv\n" in text and "--modelDir" not in text
    assert text.splitlines() == experiment.flags_to_lines(config)
    assert experiment.read_config(str(tmp_path)) == RunConfig.from_flag_dict(config)


def test_old_flags_file_without_newer_flags_still_loads(tmp_path):
    """A FLAGS.txt written before some flags existed reads with their defaults."""
    (tmp_path / "FLAGS.txt").write_text("--nouse_normal_conv\n--nostatic\n--flex\n--F=2\n"
                                        "--mult=0.25\n--dataset=digits\n")
    config = experiment.read_config(str(tmp_path))
    assert config == RunConfig(conv="flex", tile_size=2, width_multiplier=0.25,
                               dataset="digits")


def test_an_invalid_flags_file_is_a_flag_error_naming_the_file(tmp_path):
    (tmp_path / "FLAGS.txt").write_text("--F=2\n--mult=0.25\n")
    with pytest.raises(ArgumentError, match="^model_dir: .*FLAGS.txt: exactly one of "
                                            "use_normal_conv, static, flex") as info:
        experiment.read_config(str(tmp_path))
    # Spelled again as the binaries' flags (composed after the handler that raised it).
    assert re.match(r"--modelDir: .*FLAGS.txt: exactly one of --use_normal_conv, --static, "
                    r"--flex", wa_flags.flag_message(info.value))


def test_read_flags_errors_name_model_dir(tmp_path):
    with pytest.raises(ArgumentError, match="^model_dir: .* is not a directory") as info:
        experiment.read_flags(str(tmp_path / "missing"))
    assert info.value.argument == "model_dir"
    assert wa_flags.flag_message(info.value).startswith("--modelDir: ")
    with pytest.raises(ArgumentError, match="^model_dir: .* has no FLAGS.txt"):
        experiment.read_flags(str(tmp_path))
    (tmp_path / "FLAGS.txt").write_text("--no_such_flag=1\n")
    with pytest.raises(ArgumentError, match="^model_dir: cannot read"):
        experiment.read_flags(str(tmp_path))
    with pytest.raises(ArgumentError, match="^checkpoint: no checkpoint") as info:
        experiment.checkpoint_path(str(tmp_path), "best")
    assert wa_flags.flag_message(info.value).startswith("--modelToLoad: no checkpoint")


def test_experiment_folder_layout_and_no_overwrite(tmp_path):
    now = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    flex = RunConfig(conv="flex", quantize=True, out_dir=str(tmp_path))
    first = experiment.create(flex, "ResNet18LikeF4", now)
    assert os.path.relpath(first, tmp_path) == os.path.join(
        "ResNet18LikeF4", "Flex", "mult_0.5", "bits_8", "lr_0.001", "2024_05_06_07_08_09")
    (tmp_path / first / "keep.txt").write_text("x")
    second = experiment.create(flex, "ResNet18LikeF4", now)  # same second: a new folder
    assert second == first + "_2" and (tmp_path / first / "keep.txt").exists()
    normal = RunConfig(conv="normal", out_dir=str(tmp_path))
    assert os.path.relpath(experiment.parent_dir(normal, "ResNet18Like"), tmp_path) == \
        os.path.join("ResNet18Like", "mult_0.5", "bits_FP", "lr_0.001")


def _fake_run(config, name, stamp, status):
    now = datetime.datetime.strptime(stamp, "%Y%m%d").replace(tzinfo=datetime.timezone.utc)
    path = experiment.create(config, name, now)
    experiment.write_flags(path, config)
    experiment.write_metrics(path, {"status": status})
    return path


def test_find_unfinished_picks_newest_free_folder_of_same_command(tmp_path):
    config = RunConfig(conv="flex", out_dir=str(tmp_path), epochs=3)
    name = "ResNet18LikeF4"
    older = _fake_run(config, name, "20240101", experiment.RUNNING)
    newer = _fake_run(config, name, "20240102", experiment.RUNNING)
    _fake_run(config, name, "20240103", experiment.FINISHED)
    _fake_run(config.replace(epochs=4), name, "20240104", experiment.RUNNING)  # other command
    # Runtime flags do not make another command.
    path, lock = experiment.find_unfinished(config.replace(jit_compile=True), name)
    assert path == newer
    # While that lock is held, the next free one is found; a held folder is never shared.
    path2, lock2 = experiment.find_unfinished(config, name)
    assert path2 == older
    assert experiment.find_unfinished(config, name) == (None, None)
    lock.release()
    lock2.release()
    assert experiment.find_unfinished(config, name)[0] == newer


def test_copy_weights_normal_into_winograd():
    source = models.resnet18_like("normal", width_multiplier=0.125, input_shape=(8, 8, 3))
    target = models.resnet18_like("flex", tile_size=2, width_multiplier=0.125,
                                  input_shape=(8, 8, 3))
    report = quantization.copy_weights(source, target)
    assert "layer1.0.conv1/kernel" in report["copied"]
    assert "layer1.0.conv1/A_t" in report["not_found"] and not report["unused"]
    for name in ("layer1.0.conv1", "layer4.1.conv2", "conv1", "linear", "bn1"):
        for s, t in zip(source.get_layer(name).weights, target.get_layer(name).weights):
            np.testing.assert_array_equal(s.numpy(), t.numpy())
    # The copied Winograd model computes what the normal model computes (F2 in float).
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(target(x, training=False), source(x, training=False),
                               rtol=1e-3, atol=1e-4)


def test_copy_weights_rejects_incompatible_models():
    wide = models.resnet18_like("normal", width_multiplier=0.25, input_shape=(8, 8, 3))
    narrow = models.resnet18_like("normal", width_multiplier=0.125, input_shape=(8, 8, 3))
    with pytest.raises(ValueError, match="incompatible models: .* has shape"):
        quantization.copy_weights(wide, narrow)
    other = tf_keras.Sequential([tf_keras.layers.Dense(3, name="head")])
    other.build((None, 4))
    with pytest.raises(ValueError, match="no weight .* matches"):
        quantization.copy_weights(other, narrow)


def test_out_dir_of_a_run_folder():
    """The folder a run's <ModelName>/.../<time> folder lies in (adapt.py's default outDir)."""
    config = RunConfig(conv="flex", quantize=True, out_dir="somewhere/else")
    tail = os.path.join("ResNet18LikeF4", "Flex", "mult_0.5", "bits_8", "lr_0.001",
                        "2024_01_01_00_00_00")
    assert experiment.out_dir_of(os.path.join("runs", tail), config) == "runs"
    assert experiment.out_dir_of(os.path.join("/abs", "runs", tail), config) == "/abs/runs"
    assert experiment.out_dir_of(tail, config) == "."
    # A folder moved out of that layout: its recorded outDir.
    assert experiment.out_dir_of(os.path.join("moved", "2024_01_01"), config) == "somewhere/else"
    assert experiment.out_dir_of(os.path.join("runs", tail), config.replace(lr=0.01)) == \
        "somewhere/else"
