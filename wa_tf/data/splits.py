"""What a dataset is to the rest of wa_tf, and how its splits are carved.

:class:`DatasetInfo` describes a loaded dataset; :func:`split_indices` holds a
validation split out of a training set; :func:`channel_stats` estimates the
normalisation statistics.  Every source of :mod:`wa_tf.data` uses them.
"""

import dataclasses
from typing import Dict, Tuple

import numpy as np


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


def split_indices(n, val_fraction, seed):
    """Sorted (train, validation) indices: floor(val_fraction * n) random examples held out."""
    n_val = int(np.floor(val_fraction * n))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} training examples leaves an "
                         "empty train or validation split")
    permutation = np.random.RandomState(seed).permutation(n)
    return np.sort(permutation[n_val:]), np.sort(permutation[:n_val])


def channel_stats(images):
    """Per-channel mean and std in [0, 1] of a uint8 (N, H, W, 3) array."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in pixels.mean(0)), tuple(float(v) for v in pixels.std(0))
