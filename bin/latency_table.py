#!/usr/bin/env python
"""Times every candidate layer of the search space on this machine's CPU.

For each searchable 3x3 convolution of the ResNet-18-like model at --mult,
times each candidate of --candidates (normal, F2, F4, F6; F6 only where its
tile fits) in its deployed FP32 form (frozen weights; Winograd with the
weights precomputed), at batch 1 and --batch_size, and keeps the median of
--repeats calls (the candidates of a layer timed in turns).  Prints the
table and writes the JSON that ``--cost_model=measured`` (wa_tf.search.cost.TableCost)
reads:

  bin/latency_table.py --mult=0.5 --batch_size=8 --output=latency_table.json
  bin/latency_table.py --mult=0.5 --threads=1      # one core, as on a phone
  bin/latency_table.py --mult=0.5 --jit_compile    # XLA-fused layers

The format is described in docs/winas.md.  Integer bit-widths are not
measured: the table derives them from its FP32 entries (``derive_bits``).
"""
import os

from absl import flags

import wa_tf  # noqa: F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf.search import cost
from wa_tf.training import flag_errors
from wa_tf.training import flags as wa_flags

flags.DEFINE_float("mult", 0.5, "Width multiplier of the model's residual stages, in (0, 1].")
flags.DEFINE_integer("image_size", 32, "Height and width of the model's input images.")
wa_flags.define_common_flags("batch_size", defaults={"batch_size": 8},
                             notes={"batch_size": "timed besides batch 1"})
flags.DEFINE_integer("repeats", 20, "Timed calls per configuration (the median is kept).")
flags.DEFINE_list("candidates", list(cost.CANDIDATE_NAMES),
                  f"Candidates to time, of {', '.join(cost.CANDIDATE_NAMES)}.")
flags.DEFINE_integer("threads", 0, "TensorFlow intra-op threads (0: TensorFlow's default, "
                     "all cores).")
flags.DEFINE_boolean("jit_compile", False, "Compile each layer with XLA (fused kernels) "
                     "instead of running TensorFlow's graph of ops.")
flags.DEFINE_string("device", None, "Device description stored in the table (default: the "
                    "CPU model and TensorFlow version).")
flags.DEFINE_enum("precision", "fp32", ["fp32", "int8"], "fp32: TensorFlow graphs (normal "
                  "tf.nn.conv2d, Winograd pipelines); int8: as deployed in integer LiteRT "
                  "files (normal: LiteRT's XNNPACK int8 convolution; F2/F4/F6: the native "
                  "int8 Winograd kernel), --threads threads each (0 means 1).")
flags.DEFINE_string("output", cost.DEFAULT_TABLE, "JSON file to write.")
FLAGS = flags.FLAGS
# Library argument -> flag (wa_tf.training.flag_errors); _validate's own messages name the flags.
FLAG_NAMES = {"width_multiplier": "mult", "repeats": "repeats"}


def _validate():
    if not 1 / 64 <= FLAGS.mult <= 1:
        raise ValueError(f"--mult must be in (0, 1] (and at least 1/64, so every stage has a "
                         f"channel); got {FLAGS.mult}")
    if FLAGS.image_size < 8:
        raise ValueError(f"--image_size must be at least 8; got {FLAGS.image_size}")
    for name in ("batch_size", "repeats"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name} must be a positive integer; got {FLAGS[name].value}")
    if FLAGS.threads < 0:
        raise ValueError(f"--threads must be >= 0; got {FLAGS.threads}")
    bad = [c for c in FLAGS.candidates if c not in cost.CANDIDATE_NAMES]
    if bad or not FLAGS.candidates or len(set(FLAGS.candidates)) != len(FLAGS.candidates):
        raise ValueError(f"--candidates must be distinct names of "
                         f"{', '.join(cost.CANDIDATE_NAMES)}; got {','.join(FLAGS.candidates)!r}")
    if not FLAGS.output:
        raise ValueError("--output must not be empty")
    folder = os.path.dirname(os.path.abspath(FLAGS.output))
    if not os.path.isdir(folder):
        raise ValueError(f"--output: folder {folder} does not exist")


def _machine_lines():
    try:  # bench/common.py, when run from a checkout
        from bench.common import machine_lines  # pylint: disable=import-outside-toplevel
        return machine_lines()
    except ImportError:
        from wa_tf.machine import cpu_model  # pylint: disable=import-outside-toplevel
        return [f"cpu: {cpu_model()}, {os.cpu_count()} cores"]


def main():
    _validate()
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from wa_tf.search import latency  # pylint: disable=import-outside-toplevel
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    for line in _machine_lines():
        print(line)
    layers = cost.searchable_layers(FLAGS.mult, (FLAGS.image_size, FLAGS.image_size, 3))
    batch_sizes = sorted({1, FLAGS.batch_size})
    print(f"{len(layers)} searchable layers (mult {FLAGS.mult}, {FLAGS.image_size}x"
          f"{FLAGS.image_size} images), candidates {','.join(FLAGS.candidates)}, batch sizes "
          f"{batch_sizes}, median of {FLAGS.repeats} calls", flush=True)
    progress = lambda line: print("  " + line, flush=True)  # noqa: E731
    if FLAGS.precision == "int8":
        from wa_tf.search import latency_int8  # pylint: disable=import-outside-toplevel
        table = latency_int8.measure_int8_table(layers, FLAGS.candidates, batch_sizes,
                                                FLAGS.repeats, max(1, FLAGS.threads),
                                                device=FLAGS.device, progress=progress)
    else:
        table = latency.measure_table(layers, FLAGS.candidates, batch_sizes, FLAGS.repeats,
                                      device=FLAGS.device, jit_compile=FLAGS.jit_compile,
                                      progress=progress)
    if FLAGS.threads:
        table["metadata"]["intra_op_threads"] = FLAGS.threads
    cost.write_table(table, FLAGS.output)
    print(f"\nlatency (ms per call) on {table['metadata']['device']}:")
    print(latency.format_table(table, layers))
    print(f"written to {FLAGS.output}")


if __name__ == "__main__":
    flag_errors.start(main, FLAG_NAMES)
