"""Image folders: ``data_dir/<split>/<class>/*`` images as tf.data datasets.

Splits are those found on disk; every file's header is checked before anything
is decoded, so a file that is not an image stops loading with its path, or is
skipped with a warning (``skip_corrupt``).
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from wa_tf.data.splits import DatasetInfo, channel_stats, split_indices

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


def load_image_folder(data_dir, val_fraction, seed, skip_corrupt):
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
        train_idx, val_idx = split_indices(len(paths), val_fraction, seed)
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
    mean, std = channel_stats(images)
    info = DatasetInfo(name="image_folder", num_classes=len(class_names),
                       image_shape=(height, width, 3), mean=mean, std=std,
                       num_examples={split: len(p) for split, (p, _) in files.items()})
    return splits, info
