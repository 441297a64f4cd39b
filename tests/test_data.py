"""Tests of wa_tf.data: dataset loading and the input pipeline."""
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from wa_tf import data


def _labels(ds):
    return np.array([int(label) for _, label in ds])


def _images(ds):
    return np.stack([image.numpy() for image, _ in ds])


@pytest.fixture(name="cifar10")
def fixture_cifar10():
    with tfds.testing.mock_data(num_examples=50):
        yield data.load("cifar10", seed=3)


def test_cifar10_splits(cifar10):
    splits, info = cifar10
    assert sorted(splits) == ["test", "train", "validation"]
    assert info.num_examples == {"train": 45, "validation": 5, "test": 50}
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    assert info.mean == data.CIFAR_MEAN and info.std == data.CIFAR_STD
    for name, ds in splits.items():
        assert ds.element_spec == (tf.TensorSpec((32, 32, 3), tf.uint8),
                                   tf.TensorSpec((), tf.int64))
        assert int(ds.cardinality()) == info.num_examples[name] == len(_labels(ds))


def test_cifar100():
    with tfds.testing.mock_data(num_examples=20):
        splits, info = data.load("cifar100")
    assert info.num_classes == 100 and info.image_shape == (32, 32, 3)
    assert info.num_examples == {"train": 18, "validation": 2, "test": 20}
    assert sorted(splits) == ["test", "train", "validation"]


def test_cifar10_validation_is_held_out_by_seed(cifar10):
    splits, _ = cifar10
    with tfds.testing.mock_data(num_examples=50):
        all_train = _images(tfds.load("cifar10", split="train", as_supervised=True))
        same, _ = data.load("cifar10", seed=3)
        other, _ = data.load("cifar10", seed=4)
    train, val = _images(splits["train"]), _images(splits["validation"])
    # Train and validation partition the TFDS train split.
    def rows(a):
        return {x.tobytes() for x in a}
    assert rows(train) | rows(val) == rows(all_train) and not rows(train) & rows(val)
    np.testing.assert_array_equal(_images(same["validation"]), val)
    assert rows(_images(other["validation"])) != rows(val)


def test_pipeline_training_batches(cifar10):
    splits, info = cifar10
    ds = data.pipeline(splits["train"], 8, info, training=True)
    batches = list(ds)
    assert len(batches) == 45 // 8  # remainder dropped
    images, labels = batches[0]
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.float32
    assert labels.dtype == tf.int64
    # Reshuffled every epoch.
    assert not np.array_equal(_labels(ds.unbatch()), _labels(ds.unbatch()))


def test_pipeline_evaluation_normalises_without_augmenting(cifar10):
    splits, info = cifar10
    ds = data.pipeline(splits["validation"], 4, info, training=False)
    images = np.concatenate([x.numpy() for x, _ in ds])
    assert images.shape == (5, 32, 32, 3)  # remainder kept
    raw = _images(splits["validation"]) / 255.0
    np.testing.assert_allclose(images, (raw - info.mean) / info.std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_labels(ds.unbatch()), _labels(splits["validation"]))


def _crops(image, padding=4):
    """Every crop and flipped crop of one padded image, computed with numpy."""
    h, w, _ = image.shape
    padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def test_random_crop_flip_is_a_crop_or_flip_per_example():
    image = (np.arange(8 * 8 * 3) % 251 + 1).astype(np.uint8).reshape(8, 8, 3)
    batch = np.repeat(image[None], 64, axis=0)
    out = data.random_crop_flip(tf.constant(batch), tf.constant([1, 2])).numpy()
    assert out.shape == batch.shape and out.dtype == np.uint8
    candidates = list(_crops(image))
    chosen = []
    for example in out:
        matches = [key for key, crop in candidates if np.array_equal(crop, example)]
        assert len(matches) == 1
        chosen.append(matches[0])
    # Per-example randomness: many different crops and both flip states in one batch.
    assert len(set(chosen)) > 20
    assert {flip for _, _, flip in chosen} == {False, True}
    assert {dy for dy, _, _ in chosen} == set(range(9))


def test_training_augmentation_differs_between_epochs():
    images = np.tile((np.arange(32)[:, None, None] * 8).astype(np.uint8), (4, 1, 32, 3))
    images = images.reshape(4, 32, 32, 3)
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(4, np.int64)))
    info = data.DatasetInfo("toy", 1, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, {"train": 4})
    pipe = data.pipeline(ds, 4, info, training=True, seed=5)
    first, second = (np.sort(x.numpy().reshape(4, -1), axis=0) for x, _ in [*pipe, *pipe])
    assert not np.array_equal(first, second)
    again = next(iter(data.pipeline(ds, 4, info, training=True, seed=5)))[0].numpy()
    np.testing.assert_array_equal(np.sort(again.reshape(4, -1), axis=0), first)


def _write_tree(root, splits, classes=("cat", "dog"), per_class=3, size=(8, 8)):
    rng = np.random.default_rng(0)
    for split in splits:
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(per_class):
                pixels = np.full(size + (3,), 40 * label + i, np.uint8)
                pixels[0, 0] = rng.integers(0, 255, 3)
                encode, ext = (tf.io.encode_png, "png") if i % 2 else (tf.io.encode_jpeg, "jpg")
                tf.io.write_file(os.path.join(folder, f"{i}.{ext}"), encode(pixels))
    return root


def test_image_folder_with_all_splits(tmp_path):
    root = _write_tree(str(tmp_path), ["train", "validation", "test"])
    # Another size is resized to the size of the first training image.
    tf.io.write_file(os.path.join(root, "test", "dog", "big.png"),
                     tf.io.encode_png(np.full((16, 12, 3), 200, np.uint8)))
    open(os.path.join(root, "train", "cat", "notes.txt"), "w").close()
    splits, info = data.load("image_folder", data_dir=root)
    assert sorted(splits) == ["test", "train", "validation"]
    assert info.num_examples == {"train": 6, "validation": 6, "test": 7}
    assert info.num_classes == 2 and info.image_shape == (8, 8, 3)
    test_images = _images(splits["test"])
    assert test_images.shape == (7, 8, 8, 3) and test_images.dtype == np.uint8
    np.testing.assert_array_equal(test_images[-1], np.full((8, 8, 3), 200))
    # Labels follow the sorted class folder names.
    np.testing.assert_array_equal(_labels(splits["train"]), [0, 0, 0, 1, 1, 1])
    # Statistics are those of the training pixels.
    train = _images(splits["train"]) / 255.0
    np.testing.assert_allclose(info.mean, train.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(info.std, train.std((0, 1, 2)), rtol=1e-6)
    batch, labels = next(iter(data.pipeline(splits["train"], 4, info, training=True)))
    assert batch.shape == (4, 8, 8, 3) and labels.shape == (4,)


def test_image_folder_without_test_reports_it(tmp_path, caplog):
    root = _write_tree(str(tmp_path), ["train"], per_class=10)
    with caplog.at_level(logging.WARNING):
        splits, info = data.load("image_folder", data_dir=root, val_fraction=0.2)
    assert sorted(splits) == ["train", "validation"]
    assert info.num_examples == {"train": 16, "validation": 4}
    assert "no test" in caplog.text
    train, val = _images(splits["train"]), _images(splits["validation"])
    assert not {x.tobytes() for x in train} & {x.tobytes() for x in val}


@pytest.mark.parametrize("make,message", [
    (lambda root: None, "data_dir is required"),
    (lambda root: os.path.join(root, "missing"), "is not a directory"),
    (lambda root: root, "no train/ folder"),
])
def test_image_folder_bad_data_dir(tmp_path, make, message):
    with pytest.raises(ValueError, match=message) as error:
        data.load("image_folder", data_dir=make(str(tmp_path)))
    assert str(error.value).startswith("data_dir")


def test_image_folder_unknown_test_class(tmp_path):
    root = _write_tree(str(tmp_path), ["train"])
    _write_tree(os.path.join(root, "extra"), ["test"], classes=("bird",))
    os.rename(os.path.join(root, "extra", "test"), os.path.join(root, "test"))
    with pytest.raises(ValueError, match="data_dir.*bird"):
        data.load("image_folder", data_dir=root)


def test_digits():
    splits, info = data.load("digits", seed=1)
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    assert sum(info.num_examples.values()) == 1797
    assert info.num_examples["test"] == 359
    images = _images(splits["train"])
    assert images.shape == (info.num_examples["train"], 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_allclose(info.mean, (images / 255.0).mean((0, 1, 2)), rtol=1e-6)
    # The test split does not depend on the seed; validation does.
    other, _ = data.load("digits", seed=2)
    np.testing.assert_array_equal(_images(other["test"]), _images(splits["test"]))
    assert not np.array_equal(_labels(other["validation"]), _labels(splits["validation"]))


@pytest.mark.parametrize("kwargs,argument", [
    ({"name": "mnist"}, "dataset"),
    ({"name": "digits", "val_fraction": 1.0}, "val_fraction"),
])
def test_load_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        data.load(**kwargs)


def test_distribute_datasets_from_function(distribute_scope):
    splits, info = data.load("digits")
    strategy = distribute_scope or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: data.pipeline(splits["train"], ctx.get_per_replica_batch_size(16), info,
                                  training=True, input_context=ctx))
    images, labels = next(iter(dist))
    shapes = [t.shape for t in strategy.experimental_local_results(images)]
    assert shapes == [(16 // replicas, 32, 32, 3)] * replicas
    label_shapes = [t.shape for t in strategy.experimental_local_results(labels)]
    assert label_shapes == [(16 // replicas,)] * replicas


def test_pipeline_shards_between_input_pipelines():
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((10, 4, 4, 3), np.uint8), np.arange(10)))
    info = data.DatasetInfo("toy", 10, (4, 4, 3), (0.5,) * 3, (0.25,) * 3, {"test": 10})
    shards = [_labels(data.pipeline(ds, 3, info, training=False,
                                    input_context=tf.distribute.InputContext(2, i, 2)).unbatch())
              for i in range(2)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(10))
    assert len(shards[0]) == len(shards[1]) == 5


def test_offline_download_failure_is_one_clear_error(monkeypatch):
    import requests  # pylint: disable=import-outside-toplevel

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(ValueError, match="could not download cifar10 through TFDS"):
        data.load("cifar10")


def _write_text(path, text="not an image, just notes\n"):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def test_image_folder_file_that_is_not_an_image_is_named(tmp_path):
    root = _write_tree(str(tmp_path), ["train", "test"], per_class=4)
    bad = os.path.join(root, "train", "dog", "2.jpg")
    _write_text(bad)
    with pytest.raises(ValueError) as error:
        data.load("image_folder", data_dir=root)
    message = str(error.value)
    assert message.startswith(f"data_dir: {bad} ")
    assert "JPEG, PNG, GIF or BMP" in message and "skip_corrupt" in message
    assert "other file" not in message and "\n" not in message
    # Two more: an empty file in another split, and a text file; both counted and named.
    empty = os.path.join(root, "test", "cat", "0.jpg")
    open(empty, "w").close()
    other = os.path.join(root, "train", "dog", "3.png")
    _write_text(other)
    with pytest.raises(ValueError) as error:
        data.load("image_folder", data_dir=root)
    message = str(error.value)
    assert message.startswith(f"data_dir: {bad} ")
    assert "2 other files" in message and empty in message and other in message


def test_image_folder_checks_content_not_extension(tmp_path):
    root = _write_tree(str(tmp_path), ["train"], per_class=5)
    # The header decides, as for tf.io.decode_image: a PNG named .jpg loads, with its pixels.
    pixels = np.full((8, 8, 3), 77, np.uint8)
    tf.io.write_file(os.path.join(root, "train", "cat", "png_named.jpg"), tf.io.encode_png(pixels))
    splits, info = data.load("image_folder", data_dir=root, val_fraction=0.2)
    assert info.num_examples["train"] + info.num_examples["validation"] == 11
    images = np.concatenate([_images(splits["train"]), _images(splits["validation"])])
    assert any(np.array_equal(image, pixels) for image in images)


def test_image_folder_skip_corrupt_loads_the_rest_with_a_warning(tmp_path, caplog):
    root = _write_tree(str(tmp_path), ["train", "test"], per_class=10)
    bad = [os.path.join(root, "train", "cat", "4.jpg"), os.path.join(root, "test", "dog", "1.png")]
    for path in bad:
        _write_text(path)
    with caplog.at_level(logging.WARNING):
        splits, info = data.load("image_folder", data_dir=root, val_fraction=0.2,
                                 skip_corrupt=True)
    # 20 train files, one bad: 4 held out for validation from the 20, then the bad one dropped.
    assert info.num_examples["train"] + info.num_examples["validation"] == 19
    assert info.num_examples["test"] == 19
    for name, ds in splits.items():
        assert len(_images(ds)) == info.num_examples[name]  # every kept file decodes
    warning = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warning) == 1
    assert "2 file(s)" in warning[0] and bad[0] in warning[0] and bad[1] in warning[0]


def test_image_folder_skipping_keeps_the_validation_images(tmp_path):
    root = _write_tree(str(tmp_path), ["train"], per_class=10)
    def rows(ds):
        return {x.tobytes() for x in _images(ds)}
    clean_splits, _ = data.load("image_folder", data_dir=root, val_fraction=0.3, seed=7)
    clean = {split: rows(ds) for split, ds in clean_splits.items()}  # read before breaking
    path = os.path.join(root, "train", "dog", "4.jpg")
    lost = tf.io.decode_image(tf.io.read_file(path), channels=3).numpy().tobytes()
    _write_text(path)
    skipped, _ = data.load("image_folder", data_dir=root, val_fraction=0.3, seed=7,
                           skip_corrupt=True)
    # Skipping the broken file drops that image only; the other validation images are
    # those of the clean folder.
    assert lost in clean["train"] | clean["validation"]
    for split in ("train", "validation"):
        assert rows(skipped[split]) == clean[split] - {lost}


def test_image_folder_skip_corrupt_leaving_a_split_empty(tmp_path):
    root = _write_tree(str(tmp_path), ["train", "test"], classes=("cat",), per_class=4)
    for i in range(4):
        _write_text(os.path.join(root, "test", "cat", f"{i}.{'png' if i % 2 else 'jpg'}"))
    with pytest.raises(ValueError, match="data_dir: no image of the test split"):
        data.load("image_folder", data_dir=root, val_fraction=0.25, skip_corrupt=True)


def test_skip_corrupt_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_corrupt"):
        data.load("digits", skip_corrupt="yes")
