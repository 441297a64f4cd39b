#!/usr/bin/env python
"""Exports a training run's checkpoint as a self-contained SavedModel.

The SavedModel runs with TensorFlow alone (no wa_tf, tf_keras or TF-MOT):

  bin/export.py --modelDir experiments/ResNet18LikeF4/Flex/mult_0.5/bits_8/lr_0.001/<time>
      --export_dir exported/f4_flex_int8 [--checkpoint best|final] [--npz_dir exported/layers]

Signatures: ``serving_default`` takes float32 images normalised as in training;
``serving_raw`` (unless --noraw_signature) takes uint8 0-255 images and applies
the dataset's normalisation first.  --npz_dir also writes the integer deployment
file of every quantized Winograd-aware layer (see docs/export_evaluate.md).

--litert writes a LiteRT model (alone, or with --export_dir): an integer model
of a quantized run, from its own learned ranges and transforms (int8 from the
uint8 images to the logits, builtin operators only), a float32 model of a float
run (see docs/deploy.md):

  bin/export.py --modelDir DIR --litert exported/f4_flex_int8.tflite
"""
import os

from absl import flags

import wa_tf  # noqa: F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf.training import cli, flag_errors

cli.define_run_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_string("export_dir", None, "Output folder of the SavedModel (must not exist, or "
                    "be empty).")
flags.DEFINE_boolean("raw_signature", True, "Add the 'serving_raw' signature (uint8 0-255 "
                     "images, dataset normalisation folded in).")
flags.DEFINE_boolean("fused_kernels", False, "Serve the Winograd tile stages with wa_tf's fused "
                     "CPU kernels (faster on CPUs); loading the SavedModel then needs their "
                     "library first: import wa_tf, or tf.load_op_library(<path printed>).")
flags.DEFINE_string("litert", None, "Also (or only) write this LiteRT .tflite file: integer "
                    "for a quantized run, float32 otherwise; it takes uint8 0-255 images.")
flags.DEFINE_enum("litert_transforms", "int8", ["int8", "int16", "native"], "Integer "
                  "LiteRT: 'int8' keeps every tensor int8 (XNNPACK runs it all); 'int16' sums "
                  "the Winograd transforms in int16 before requantising, closer to the trained "
                  "model but on LiteRT's builtin kernels; 'native' makes each Winograd layer "
                  "one custom operator running wa_tf's int8 kernel (bit-exact with the integer "
                  "reference, fastest; run it with bin/evaluate.py --litert or "
                  "wa_tf.deploy.litert.interpreter).")
flags.DEFINE_string("npz_dir", None, "Also write <npz_dir>/<layer>.npz, the integer deployment "
                    "file of every quantized WinogradConv2D.")
FLAGS = flags.FLAGS
FLAG_NAMES = cli.FLAG_NAMES  # library argument -> flag (wa_tf.training.flag_errors)


def _check_outputs():
    if not FLAGS.export_dir and not FLAGS.litert:
        raise ValueError("--export_dir (the SavedModel's output folder) or --litert (a .tflite "
                         "file) is required")
    if FLAGS.export_dir and os.path.exists(FLAGS.export_dir) and (
            not os.path.isdir(FLAGS.export_dir) or os.listdir(FLAGS.export_dir)):
        raise ValueError(f"--export_dir: {FLAGS.export_dir} exists and is not an empty folder")
    if FLAGS.litert and (os.path.isdir(FLAGS.litert) or not FLAGS.litert.endswith(".tflite")):
        raise ValueError(f"--litert must name a .tflite file; got {FLAGS.litert!r}")
    if FLAGS.litert and os.path.exists(FLAGS.litert):
        raise ValueError(f"--litert: {FLAGS.litert} exists; remove it or name another file")


def _export():
    from wa_tf.deploy import export, integer_export, litert  # pylint: disable=import-outside-toplevel
    _check_outputs()
    if FLAGS.fused_kernels:
        from wa_tf import kernels  # pylint: disable=import-outside-toplevel
        reason = kernels.unavailable_reason()
        if reason:
            raise ValueError(f"--fused_kernels: the fused kernels cannot run here: {reason}")
    model, config = cli.load_run()
    if FLAGS.litert:  # first: a model LiteRT cannot express stops before anything is written
        info = litert.export_litert(model, FLAGS.litert,
                                    cli.run_normalization(FLAGS.modelDir, config),
                                    transforms=FLAGS.litert_transforms)
        kind = "integer (int8)" if info["integer"] else "float32"
        print(f"LiteRT model: {FLAGS.litert} ({kind}, {info['bytes'] / 2**20:.2f} MiB; uint8 "
              f"images in, float32 logits out; operators: {', '.join(info['operators'])})")
        if info["xnnpack_refused"]:
            print(f"note: XNNPACK refuses {len(info['xnnpack_refused'])} operators (a "
                  "requantisation ratio outside [2^-32, 256), e.g. "
                  f"{info['xnnpack_refused'][0]}): LiteRT's builtin kernels run the file")
    if not FLAGS.export_dir:
        return
    normalization = cli.run_normalization(FLAGS.modelDir, config) if FLAGS.raw_signature \
        else None
    export.export_saved_model(model, FLAGS.export_dir, raw_normalization=normalization,
                              fused_kernels=FLAGS.fused_kernels)
    signatures = [export.DEFAULT_SIGNATURE] + ([export.RAW_SIGNATURE] if normalization else [])
    print(f"SavedModel: {FLAGS.export_dir} (signatures: {', '.join(signatures)}; "
          f"input {list(model.input_shape)}, output 'logits')")
    if FLAGS.fused_kernels:
        print(f"uses the fused kernels: load {kernels.library_path()} first "
              "(tf.load_op_library), or import wa_tf")
    if FLAGS.npz_dir:
        for name, path in integer_export.export_model_npz(model, FLAGS.npz_dir).items():
            print(f"layer {name}: {path}")


if __name__ == "__main__":
    # Bad input, and a missing optional package (matplotlib), is one error line.
    flag_errors.start(_export, FLAG_NAMES, bad_input=(ValueError, ImportError))
