"""Datasets and fast tf.data input pipelines.

:func:`load` returns unbatched ``(uint8 HxWx3 image, int64 label)`` datasets
for the splits 'train', 'validation' and, when the data has one, 'test':

* 'cifar10' / 'cifar100': TFDS (downloaded by TFDS on first use).  10% of
  the training set is held out for validation, chosen by ``seed``.
* 'image_folder': the user's images in ``data_dir/<split>/<class>/*``
  (JPEG, PNG, BMP or GIF).  Splits are those found on disk ('train', plus
  'validation' (or 'val') and 'test' when present); validation is carved from
  train when there is no validation folder; a missing test split is reported
  and never invented.  Every file's header is checked before anything is
  decoded: a file that is not an image stops loading with its path, or is
  skipped with a warning (``skip_corrupt``).
* 'digits': scikit-learn's bundled 8x8 digits, upsampled to 32x32x3; offline
  demo data.

:func:`pipeline` batches a split for training or evaluation in the fast order
decode -> cache -> shuffle -> batch -> vectorised augmentation -> normalise ->
prefetch; it works per replica under
``tf.distribute.Strategy.distribute_datasets_from_function``.
"""

import dataclasses
import os
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

DATASETS = ("cifar10", "cifar100", "image_folder", "digits")

# The reference's CIFAR normalisation, used for both CIFAR-10 and CIFAR-100.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# The first bytes of every format an image folder may hold (what tf.io.decode_image
# itself looks at to pick a decoder).
_IMAGE_SIGNATURES = (b"\xff\xd8\xff",            # JPEG (SOI marker + next marker)
                     b"\x89PNG\r\n\x1a\n",         # PNG
                     b"GIF87a", b"GIF89a",         # GIF
                     b"BM")                        # BMP
_IMAGE_FORMATS = "JPEG, PNG, GIF or BMP"
# Bad files named in a warning or an error, besides the first.
_BAD_FILES_SHOWN = 5
# Splits read from an image folder, by folder name.
_FOLDER_SPLITS = {"train": "train", "validation": "validation", "val": "validation",
                  "test": "test"}
# Number of training images whose pixels estimate the normalisation statistics.
_STATS_SAMPLE = 2048
# Shuffle buffers hold at most this many bytes of images (the whole of CIFAR).
_SHUFFLE_BYTES = 256 * 2**20
_DIGITS_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and an input pipeline need to know about a dataset.

    Attributes:
      name: Dataset name as given to :func:`load`.
      num_classes: Number of labels.
      image_shape: (height, width, 3) of every image.
      mean: Per-channel mean of the pixels, scaled to [0, 1].
      std: Per-channel standard deviation, scaled to [0, 1].
      num_examples: Examples per split returned by :func:`load`; a dataset
        without a test split has no 'test' key.
    """
    name: str
    num_classes: int
    image_shape: Tuple[int, int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    num_examples: Dict[str, int]


def _split_indices(n, val_fraction, seed):
    """Sorted (train, validation) indices: floor(val_fraction * n) random examples held out."""
    n_val = int(np.floor(val_fraction * n))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} training examples leaves an "
                         "empty train or validation split")
    permutation = np.random.RandomState(seed).permutation(n)
    return np.sort(permutation[n_val:]), np.sort(permutation[:n_val])


def _select(ds, keep_mask):
    """Keeps the examples of `ds` whose position is True in `keep_mask`."""
    mask = tf.constant(keep_mask)

    def keep(index, unused_example):
        return mask[index]

    def drop_index(unused_index, example):
        return example

    ds = ds.enumerate().filter(keep).map(drop_index)
    return ds.apply(tf.data.experimental.assert_cardinality(int(keep_mask.sum())))


def _channel_stats(images):
    """Per-channel mean and std in [0, 1] of a uint8 (N, H, W, 3) array."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in pixels.mean(0)), tuple(float(v) for v in pixels.std(0))


def _load_tfds(name, data_dir, val_fraction, seed):
    # Imported here: TFDS is slow to import and only these datasets need it.
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
        (train, test), builder_info = tfds.load(
            name, split=["train", "test"], as_supervised=True, with_info=True,
            shuffle_files=False, data_dir=data_dir)
    except (OSError, tfds.download.DownloadError) as e:
        # requests' ConnectionError is an OSError: no network, or the host is down.
        raise ValueError(
            f"could not download {name} through TFDS ({type(e).__name__}); without internet, "
            f"prepare it on another machine and pass its TFDS folder as data_dir, or use "
            f"'image_folder' or 'digits'") from None
    n_train = int(train.cardinality())
    if n_train < 0:  # unknown: only when TFDS has no split metadata
        n_train = int(train.reduce(0, lambda count, _: count + 1))
    train_idx, val_idx = _split_indices(n_train, val_fraction, seed)
    is_val = np.zeros(n_train, bool)
    is_val[val_idx] = True
    splits = {"train": _select(train, ~is_val), "validation": _select(train, is_val),
              "test": test}
    info = DatasetInfo(
        name=name, num_classes=int(builder_info.features["label"].num_classes),
        image_shape=tuple(builder_info.features["image"].shape), mean=CIFAR_MEAN, std=CIFAR_STD,
        num_examples={"train": len(train_idx), "validation": len(val_idx),
                      "test": int(test.cardinality())})
    return splits, info


def _list_split(split_dir, class_index):
    """(paths, labels) of the images of one split folder, in sorted order."""
    paths, labels = [], []
    for class_name in sorted(os.listdir(split_dir)):
        class_dir = os.path.join(split_dir, class_name)
        if not os.path.isdir(class_dir):
            continue
        if class_name not in class_index:
            raise ValueError(f"data_dir: class folder {class_dir} has no counterpart in train/ "
                             f"(train classes: {', '.join(class_index)})")
        for file_name in sorted(os.listdir(class_dir)):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(class_dir, file_name))
                labels.append(class_index[class_name])
    return paths, labels


def _header_problem(path):
    """Why the file at `path` cannot be an image (None if its header is one), from its first bytes.

    Reads 8 bytes with plain os calls (no decode): fast enough for 50,000
    files, and what tells tf.io.decode_image the format.  A file whose header
    is right but whose data is truncated or damaged passes.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.read(fd, 8)
        finally:
            os.close(fd)
    except OSError as e:
        return f"cannot be read ({type(e).__name__}: {e.strerror or e})"
    if not head:
        return "is empty"
    if head.startswith(_IMAGE_SIGNATURES):
        return None
    return f"starts with {head!r}, not the header of a {_IMAGE_FORMATS} image"


def _find_bad_files(files, data_dir, skip_corrupt):
    """Paths of `files` (split -> (paths, labels)) that are not images; raises unless skipping.

    Raises:
      ValueError: Naming the first bad file, why, and how many others there
        are, unless `skip_corrupt`.
    """
    bad = {}
    for paths, _ in files.values():
        for path in paths:
            problem = _header_problem(path)
            if problem is not None:
                bad[path] = problem
    if not bad:
        return set()
    first, *others = bad
    if not skip_corrupt:
        more = ""
        if others:
            shown = ", ".join(others[:_BAD_FILES_SHOWN])
            etc = ", ..." if len(others) > _BAD_FILES_SHOWN else ""
            more = (f"; {len(others)} other file{'s' if len(others) > 1 else ''} in "
                    f"{data_dir} {'are' if len(others) > 1 else 'is'} not images either "
                    f"({shown}{etc})")
        raise ValueError(f"data_dir: {first} {bad[first]}{more}; replace or remove "
                         f"{'them' if others else 'it'}, or skip such files with skip_corrupt")
    shown = ", ".join(list(bad)[:_BAD_FILES_SHOWN])
    logging.warning("image_folder %s: skipping %d file(s) that are not %s images: %s%s",
                    data_dir, len(bad), _IMAGE_FORMATS, shown,
                    ", ..." if len(bad) > _BAD_FILES_SHOWN else "")
    return set(bad)


def _decode_fn(height, width):
    """Reads an image file as uint8 (height, width, 3), resizing only images of another size."""
    def decode(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        same_size = tf.reduce_all(tf.shape(image)[:2] == [height, width])

        def resize():
            resized = tf.image.resize(image, (height, width), antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

        image = tf.cond(same_size, lambda: image, resize)
        return tf.ensure_shape(image, (height, width, 3)), label
    return decode


def _files_dataset(paths, labels, decode):
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.apply(tf.data.experimental.assert_cardinality(len(paths)))


def _load_image_folder(data_dir, val_fraction, seed, skip_corrupt):
    if not data_dir:
        raise ValueError("data_dir is required for dataset 'image_folder' "
                         "(a folder with <split>/<class>/<image> files)")
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} is not a directory")
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        raise ValueError(f"data_dir {data_dir!r} has no train/ folder "
                         "(expected <data_dir>/<split>/<class>/<image>)")
    class_names = sorted(d for d in os.listdir(train_dir)
                         if os.path.isdir(os.path.join(train_dir, d)))
    if not class_names:
        raise ValueError(f"data_dir: {train_dir} has no class folders")
    class_index = {name: i for i, name in enumerate(class_names)}
    files = {}
    for folder, split in _FOLDER_SPLITS.items():
        split_dir = os.path.join(data_dir, folder)
        if os.path.isdir(split_dir) and split not in files:
            files[split] = _list_split(split_dir, class_index)
    for split, (paths, _) in files.items():
        if not paths:
            raise ValueError(f"data_dir: the {split} split of {data_dir!r} has no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    bad = _find_bad_files(files, data_dir, skip_corrupt)
    if "validation" not in files:
        # Split before dropping bad files: the validation images stay the same ones
        # whether a bad file is skipped, fixed or removed.
        paths, labels = files["train"]
        train_idx, val_idx = _split_indices(len(paths), val_fraction, seed)
        files["validation"] = ([paths[i] for i in val_idx], [labels[i] for i in val_idx])
        files["train"] = ([paths[i] for i in train_idx], [labels[i] for i in train_idx])
    if bad:
        for split, (paths, labels) in files.items():
            kept = [(p, y) for p, y in zip(paths, labels) if p not in bad]
            if not kept:
                raise ValueError(f"data_dir: no image of the {split} split of {data_dir!r} "
                                 "is left once the files that are not images are skipped")
            files[split] = ([p for p, _ in kept], [y for _, y in kept])
    if "test" not in files:
        logging.warning("image_folder %s has no test/ folder: there is no test split "
                        "(hold out your own test images in <data_dir>/test/<class>/)", data_dir)

    # The first training image fixes the size; other sizes are resized to it.
    first = tf.io.decode_image(tf.io.read_file(files["train"][0][0]), channels=3,
                               expand_animations=False)
    height, width = int(first.shape[0]), int(first.shape[1])
    decode = _decode_fn(height, width)
    splits = {split: _files_dataset(paths, labels, decode)
              for split, (paths, labels) in files.items()}

    # Normalisation statistics from a fixed sample of the training images.
    paths, labels = files["train"]
    sample = np.random.RandomState(0).permutation(len(paths))[:_STATS_SAMPLE]
    sample_ds = _files_dataset([paths[i] for i in sample], [labels[i] for i in sample], decode)
    images = np.concatenate([batch for batch, _ in sample_ds.batch(256).as_numpy_iterator()])
    mean, std = _channel_stats(images)
    info = DatasetInfo(name="image_folder", num_classes=len(class_names),
                       image_shape=(height, width, 3), mean=mean, std=std,
                       num_examples={split: len(p) for split, (p, _) in files.items()})
    return splits, info


def _load_digits(val_fraction, seed):
    # Imported here: scikit-learn is only needed for the demo data.
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    # 0..16 grey levels -> 8-bit, upsampled bilinearly to 32x32, as RGB.
    images = digits.images[..., None].astype(np.float32) * (255.0 / 16.0)
    images = tf.image.resize(images, (32, 32), method="bilinear").numpy()
    images = np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8), 3, axis=-1)
    labels = digits.target.astype(np.int64)
    # The test split is fixed (independent of seed), so results stay comparable.
    order = np.random.RandomState(0).permutation(len(labels))
    n_test = int(_DIGITS_TEST_FRACTION * len(labels))
    test_idx, rest = np.sort(order[:n_test]), np.sort(order[n_test:])
    train_pos, val_pos = _split_indices(len(rest), val_fraction, seed)
    index = {"train": rest[train_pos], "validation": rest[val_pos], "test": test_idx}
    splits = {split: tf.data.Dataset.from_tensor_slices((images[idx], labels[idx]))
              for split, idx in index.items()}
    mean, std = _channel_stats(images[index["train"]])
    info = DatasetInfo(name="digits", num_classes=10, image_shape=(32, 32, 3), mean=mean,
                       std=std, num_examples={s: len(idx) for s, idx in index.items()})
    return splits, info


def load(name: str, data_dir: Optional[str] = None, val_fraction: float = 0.1,
         seed: int = 1, skip_corrupt: bool = False
         ) -> Tuple[Dict[str, tf.data.Dataset], DatasetInfo]:
    """Loads a dataset as unbatched (uint8 image, int64 label) splits.

    Example:
      >>> splits, info = load("image_folder", data_dir="/data/cifar10_jpeg")
      >>> train = pipeline(splits["train"], 64, info, training=True)

    Args:
      name: 'cifar10', 'cifar100', 'image_folder' or 'digits'.
      data_dir: For 'image_folder', the folder holding ``<split>/<class>/*``;
        for the TFDS datasets, TFDS's data directory (None: its default).
        Unused for 'digits'.
      val_fraction: Fraction of the training examples held out for
        validation when the data has no validation split.
      seed: Chooses the validation examples (deterministically).
      skip_corrupt: For 'image_folder': skip the files whose first bytes are
        not those of a JPEG, PNG, GIF or BMP image, with a warning giving
        their number and the first few paths, instead of raising.  The
        validation split carved from train is chosen before skipping, so it
        holds the same images as with the files fixed.  Ignored by the other
        datasets.

    Returns:
      (splits, info): a dict with 'train', 'validation' and, when the data
      has one, 'test' datasets, and a :class:`DatasetInfo`.

    Raises:
      ValueError: On an unknown name, a bad val_fraction, a missing or
        malformed data_dir for 'image_folder', or (unless `skip_corrupt`) a
        file in it that is not an image: the message names the first such
        file and counts the others.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    if not isinstance(skip_corrupt, bool):
        raise ValueError(f"skip_corrupt must be True or False; got {skip_corrupt!r}")
    if name == "image_folder":
        return _load_image_folder(data_dir, val_fraction, seed, skip_corrupt)
    if name == "digits":
        return _load_digits(val_fraction, seed)
    return _load_tfds(name, data_dir, val_fraction, seed)


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, padding: int = 4) -> tf.Tensor:
    """Random crop with zero padding and random horizontal flip of a batch.

    Each example gets its own crop offset and flip, drawn statelessly from
    `seed`; the crop and the flip are one batched gather per axis (no
    per-example ops).

    Args:
      images: (batch, height, width, channels) images.
      seed: A shape [2] integer seed for ``tf.random.stateless_uniform``.
      padding: Zero padding on each side before cropping back to the input size.

    Returns:
      The augmented batch, with the shape and dtype of `images`.
    """
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    offsets = tf.random.stateless_uniform([batch, 2], seed, 0, 2 * padding + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform(
        [batch, 1], tf.random.experimental.stateless_fold_in(seed, 1), 0, 2, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = tf.range(width)[None, :]
    # A flipped crop reads its window's columns in reverse order.
    cols = offsets[:, 1:] + tf.where(flip == 1, width - 1 - cols, cols)
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def pipeline(ds: tf.data.Dataset, batch_size: int, info: DatasetInfo, training: bool,
             seed: int = 1, input_context: Optional[tf.distribute.InputContext] = None
             ) -> tf.data.Dataset:
    """Batches a split from :func:`load` into normalised float32 images.

    The order is cache -> shuffle -> batch -> vectorised augmentation ->
    normalise -> prefetch.  For training, examples are reshuffled every epoch,
    the last incomplete batch is dropped and each batch is randomly cropped
    (4-pixel zero padding) and flipped.  Decoded images are cached in memory.

    Under ``strategy.distribute_datasets_from_function(fn)`` call it from `fn`
    with ``ctx.get_per_replica_batch_size(global_batch)`` and
    ``input_context=ctx``; with several input pipelines (multi-worker) each
    reads its own shard.

    Args:
      ds: An unbatched split from :func:`load`.
      batch_size: Batch size of this pipeline (per replica when distributed).
      info: The dataset's :class:`DatasetInfo` (normalisation statistics).
      training: Shuffle, augment and drop the remainder.
      seed: Seed of the shuffling and the augmentation.
      input_context: The ``tf.distribute.InputContext`` of a distributed
        input function, or None.

    Returns:
      A dataset of (float32 (batch, H, W, 3) images, int64 (batch,) labels).
    """
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        seed += input_context.input_pipeline_id
    ds = ds.cache()
    if training:
        n = int(ds.cardinality())
        image_bytes = int(np.prod(info.image_shape))
        buffer = max(1, min(n if n > 0 else 10_000, _SHUFFLE_BYTES // image_bytes))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE)

    scale = tf.constant([1.0 / (255.0 * s) for s in info.std], tf.float32)
    offset = tf.constant([-m / s for m, s in zip(info.mean, info.std)], tf.float32)

    def normalise(images):
        return tf.cast(images, tf.float32) * scale + offset

    if training:
        # A new stream of per-batch seeds every epoch, reproducible from `seed`.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda batch, s: (normalise(random_crop_flip(batch[0], s)), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda images, labels: (normalise(images), labels),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
