"""The fast tf.data input pipeline: decode, cache, shuffle, batch, augment, normalise.

:func:`pipeline` batches a split of :func:`wa_tf.data.load` for training or
evaluation; :func:`random_crop_flip` is its vectorised augmentation.
"""

from typing import Optional

import numpy as np
import tensorflow as tf

from wa_tf.data.splits import DatasetInfo

# Shuffle buffers hold at most this many bytes of images (the whole of CIFAR).
_SHUFFLE_BYTES = 256 * 2**20
_DIGITS_TEST_FRACTION = 0.2


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
