"""The datasets :func:`load` reads: CIFAR-10/100 (TFDS), image folders, digits.

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
"""

from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from wa_tf.data.image_folder import load_image_folder
from wa_tf.data.splits import DatasetInfo, channel_stats, split_indices

DATASETS = ("cifar10", "cifar100", "image_folder", "digits")

# The reference's CIFAR normalisation, used for both CIFAR-10 and CIFAR-100.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_DIGITS_TEST_FRACTION = 0.2


def _select(ds, keep_mask):
    """Keeps the examples of `ds` whose position is True in `keep_mask`."""
    mask = tf.constant(keep_mask)

    def keep(index, unused_example):
        return mask[index]

    def drop_index(unused_index, example):
        return example

    ds = ds.enumerate().filter(keep).map(drop_index)
    return ds.apply(tf.data.experimental.assert_cardinality(int(keep_mask.sum())))


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
    train_idx, val_idx = split_indices(n_train, val_fraction, seed)
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
    train_pos, val_pos = split_indices(len(rest), val_fraction, seed)
    index = {"train": rest[train_pos], "validation": rest[val_pos], "test": test_idx}
    splits = {split: tf.data.Dataset.from_tensor_slices((images[idx], labels[idx]))
              for split, idx in index.items()}
    mean, std = channel_stats(images[index["train"]])
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
        return load_image_folder(data_dir, val_fraction, seed, skip_corrupt)
    if name == "digits":
        return _load_digits(val_fraction, seed)
    return _load_tfds(name, data_dir, val_fraction, seed)
