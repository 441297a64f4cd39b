"""Top-1 accuracy and loss of a model over a dataset: what training validates with and
evaluation reports (:mod:`wa_tf.evaluation.evaluate` re-exports both functions)."""

from typing import Callable

import tensorflow as tf
import tf_keras


def evaluate(predict: Callable[[tf.Tensor], tf.Tensor], dataset: tf.data.Dataset) -> dict:
    """Mean cross-entropy loss and top-1 accuracy of ``predict`` over a dataset.

    Args:
      predict: Maps a float32 image batch to logits (a Keras model in inference
        mode, or a SavedModel signature from :func:`wa_tf.deploy.export.load_serving`).
      dataset: Batched ``(images, labels)`` with integer labels.

    Returns:
      ``{'loss': float, 'accuracy': float, 'examples': int}``.

    Raises:
      ValueError: if the dataset is empty.
    """
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in dataset:
        logits = tf.cast(predict(images), tf.float32)
        labels = tf.cast(labels, tf.int64)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        loss_sum += float(tf.reduce_sum(loss))
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == labels, tf.int64)))
        count += int(tf.shape(labels)[0])
    if count == 0:
        raise ValueError("dataset is empty: nothing to evaluate")
    return {"loss": loss_sum / count, "accuracy": correct / count, "examples": count}


def keras_predict(model: tf_keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """Inference-mode ``predict`` for :func:`evaluate`, compiled once per shape."""
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)
