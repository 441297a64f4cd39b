"""Datasets and fast tf.data input pipelines.

:func:`load` returns unbatched ``(uint8 HxWx3 image, int64 label)`` datasets
for the splits 'train', 'validation' and, when the data has one, 'test', from
CIFAR-10/100 (TFDS), an image folder (:mod:`.image_folder`) or scikit-learn's
digits (:mod:`.sources`); :class:`DatasetInfo` and the split helpers live in
:mod:`.splits`.

:func:`pipeline` (:mod:`.pipeline`) batches a split for training or evaluation
in the fast order decode -> cache -> shuffle -> batch -> vectorised augmentation
-> normalise -> prefetch; it works per replica under
``tf.distribute.Strategy.distribute_datasets_from_function``.  This module
re-exports the public names of its modules.
"""

from wa_tf.data.image_folder import IMAGE_EXTENSIONS
from wa_tf.data.pipeline import pipeline, random_crop_flip
from wa_tf.data.sources import CIFAR_MEAN, CIFAR_STD, DATASETS, load
from wa_tf.data.splits import DatasetInfo

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASETS",
    "DatasetInfo",
    "IMAGE_EXTENSIONS",
    "load",
    "pipeline",
    "random_crop_flip",
]
