"""Is the input pipeline fast enough? Input images/s against training-step images/s.

Measures, in one process:

1. the training input pipeline of :func:`wa_tf.data.pipeline` (shuffle, batch,
   random crop + flip, normalise, prefetch): images/s of the first epoch
   (decoding and filling the cache) and of a second, cached epoch;
2. a training step (forward, backward, Adam update) of the default model,
   flex F(4x4, 3x3) at width 0.5, on one fixed batch already in memory;

and prints their ratio: input must be much faster than the step, or the
pipeline starves training.

Usage:
  python bench/input_bench.py                                # digits (offline)
  python bench/input_bench.py --data=synthetic               # PNG image folder in /tmp
  python bench/input_bench.py --data=/tmp/cifar10_jpeg       # an image folder (train/<class>/*)
"""
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from absl import app, flags  # noqa: E402

import wa_tf  # noqa: E402,F401
from wa_tf import data, models  # noqa: E402

import common  # noqa: E402  (bench/common.py, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_string("data", "digits",
                    "'digits', 'synthetic' (a generated folder of PNGs) or an image folder path.")
flags.DEFINE_integer("batch_size", 64, "Batch size of the pipeline and of the training step.")
flags.DEFINE_integer("synthetic_images", 5000, "Images written for --data=synthetic.")
flags.DEFINE_enum("conv", "flex", ["normal", "static", "flex"], "Convolutions of the model.")
flags.DEFINE_integer("F", 4, "Tile size of the Winograd convolutions.")
flags.DEFINE_float("mult", 0.5, "Width multiplier.")
flags.DEFINE_integer("steps", 10, "Timed training steps (after 2 warm-up steps).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the training step.")


def _write_synthetic(root, count, classes=10):
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        tf.io.write_file(os.path.join(folder, f"{i:05d}.png"), tf.io.encode_png(image))
    return root


def _epoch_rate(ds, batch_size):
    start, batches = time.perf_counter(), 0
    for _ in ds:
        batches += 1
    return batches * batch_size / (time.perf_counter() - start), batches


def _step_rate(info, batch_size):
    model = models.resnet18_like(FLAGS.conv, FLAGS.F, width_multiplier=FLAGS.mult,
                                 num_classes=info.num_classes, input_shape=info.image_shape)
    optimizer = tf_keras.optimizers.Adam(1e-3)
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch_size,) + tuple(info.image_shape)), tf.float32)
    y = tf.constant(rng.integers(0, info.num_classes, batch_size), tf.int64)

    @tf.function(jit_compile=FLAGS.jit_compile)
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
        return loss

    for _ in range(2):
        step().numpy()
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        loss = step()
    loss.numpy()
    return FLAGS.steps * batch_size / (time.perf_counter() - start), model.name


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        if FLAGS.data == "digits":
            splits, info = data.load("digits")
        else:
            root = FLAGS.data
            if FLAGS.data == "synthetic":
                root = _write_synthetic(tmp, FLAGS.synthetic_images)
            splits, info = data.load("image_folder", data_dir=root)
        ds = data.pipeline(splits["train"], FLAGS.batch_size, info, training=True)
        first, batches = _epoch_rate(ds, FLAGS.batch_size)
        cached, _ = _epoch_rate(ds, FLAGS.batch_size)
    step, name = _step_rate(info, FLAGS.batch_size)
    common.print_machine()
    print(f"data: {FLAGS.data} ({info.num_examples['train']} training images "
          f"{'x'.join(map(str, info.image_shape))}), batch {FLAGS.batch_size}, "
          f"{batches} batches per epoch, {os.cpu_count()} CPUs")
    print(f"input pipeline, first epoch (decode + cache): {first:10.0f} images/s")
    print(f"input pipeline, cached epoch:                 {cached:10.0f} images/s")
    print(f"training step of {name} ({FLAGS.conv}, width {FLAGS.mult}): "
          f"{step:10.1f} images/s")
    print(f"input / step: {cached / step:.0f}x (cached), {first / step:.0f}x (first epoch)")


if __name__ == "__main__":
    app.run(main)
