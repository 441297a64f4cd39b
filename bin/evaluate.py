#!/usr/bin/env python
"""Accuracy and loss of a training run, and the Winograd error report.

  # test accuracy of the best checkpoint
  bin/evaluate.py --modelDir experiments/ResNet18LikeF4/Flex/mult_0.5/bits_8/lr_0.001/<time>
  # an exported SavedModel on the validation split (dataset from --modelDir)
  bin/evaluate.py --modelDir DIR --savedmodel exported/f4_flex_int8 --split validation
  # a LiteRT file (bin/export.py --litert), and its top-1 agreement with the run's model
  bin/evaluate.py --modelDir DIR --litert exported/f4_flex_int8.tflite
  # per-layer error of every Winograd-aware layer against a float convolution
  bin/evaluate.py --modelDir DIR --error_report [--report_dir DIR/error_report]

The error report (table, PNG plot, JSON) is explained in docs/export_evaluate.md.
"""
import os

from absl import flags

import wa_tf  # noqa: F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf.evaluation import error_report, evaluate
from wa_tf.training import cli, flag_errors
from wa_tf.training import flags as wa_flags

cli.define_run_flags()
flags.adopt_module_key_flags(cli)
wa_flags.define_common_flags("use_cpu")
flags.DEFINE_string("split", "test", "Split to evaluate: test or validation.")
flags.DEFINE_string("savedmodel", None, "Evaluate this SavedModel (bin/export.py) instead of "
                    "the checkpoint; the dataset comes from --modelDir.")
flags.DEFINE_string("litert", None, "Evaluate this LiteRT .tflite file (bin/export.py "
                    "--litert) instead of the checkpoint, and report how often its top-1 "
                    "class agrees with the run's own model on the same images.")
flags.DEFINE_integer("litert_threads", 2, "Interpreter threads for --litert.")
flags.DEFINE_float("agreement_noise", 1e-4, "With --litert, also the run's model's top-1 "
                   "agreement with itself on images plus Gaussian noise of this standard "
                   "deviation (normalised units; far below one input code): the floor the "
                   "file's agreement is read against. 0: skip it (half the Keras time).")
flags.DEFINE_boolean("error_report", False, "Also report each Winograd-aware layer's output "
                     "error against a float convolution (uses the checkpoint).")
flags.DEFINE_integer("error_images", 256, "Images of --split fed to the error report.")
flags.DEFINE_string("report_dir", None, "Where the error report goes (error_report.txt, .png, "
                    ".json); default: <modelDir>/error_report.")
FLAGS = flags.FLAGS
# Library argument -> flag (wa_tf.training.flag_errors): the run's (cli.FLAG_NAMES), and
# wa_tf.evaluation.evaluate's split and wa_tf.deploy.export.load_serving's savedmodel.
FLAG_NAMES = dict(cli.FLAG_NAMES, split="split", savedmodel="savedmodel")


def _evaluate():
    wa_flags.apply_use_cpu()  # first: before TensorFlow initialises its devices
    if FLAGS.split not in evaluate.SPLITS:
        raise ValueError(f"--split must be one of {', '.join(evaluate.SPLITS)}; "
                         f"got {FLAGS.split!r}")
    if FLAGS.error_images < 1:
        raise ValueError(f"--error_images must be a positive integer; got {FLAGS.error_images}")
    if FLAGS.savedmodel and FLAGS.litert:
        raise ValueError("give --savedmodel or --litert, not both")
    if FLAGS.agreement_noise < 0:
        raise ValueError(f"--agreement_noise must be >= 0; got {FLAGS.agreement_noise}")
    if FLAGS.litert_threads < 1:
        raise ValueError(f"--litert_threads must be a positive integer; got "
                         f"{FLAGS.litert_threads}")
    # The Keras model is rebuilt only when it is evaluated, compared with or analysed.
    model = None
    if FLAGS.savedmodel and not FLAGS.error_report:
        config = cli.read_run_flags()
    else:
        model, config = cli.load_run()
    dataset, _ = evaluate.split_dataset(config, FLAGS.split,
                                         split_seed=cli.run_split_seed())
    if FLAGS.litert:
        _evaluate_litert(model, config, dataset)
    elif FLAGS.savedmodel:
        from wa_tf.deploy.export import load_serving  # pylint: disable=import-outside-toplevel
        source, predict = f"SavedModel {FLAGS.savedmodel}", load_serving(FLAGS.savedmodel)
    else:
        source, predict = f"{model.name}, checkpoint {FLAGS.checkpoint}", \
            evaluate.keras_predict(model)
    if not FLAGS.litert:
        result = evaluate.evaluate(predict, dataset)
        print(f"{source} on {FLAGS.split}: accuracy {result['accuracy']:.4f}, "
              f"loss {result['loss']:.4f} ({result['examples']} examples)")
    if FLAGS.error_report:
        _error_report(model, dataset)


def _evaluate_litert(model, config, dataset):
    normalization = cli.run_normalization(FLAGS.modelDir, config)
    result = evaluate.evaluate_litert(FLAGS.litert, dataset, normalization,
                                      reference=evaluate.keras_predict(model),
                                      threads=FLAGS.litert_threads, noise=FLAGS.agreement_noise)
    print(f"LiteRT {FLAGS.litert} on {FLAGS.split}: accuracy {result['accuracy']:.4f}, "
          f"loss {result['loss']:.4f} ({result['examples']} examples); top-1 agreement with "
          f"{model.name} (checkpoint {FLAGS.checkpoint}): {result['agreement']:.4f}")
    if "self_agreement" in result:
        print(f"{model.name}'s own top-1 agreement with itself under input noise "
              f"N(0, {FLAGS.agreement_noise:g}): {result['self_agreement']:.4f}")


def _error_report(model, dataset):
    images = evaluate.take_images(dataset, FLAGS.error_images)
    rows = error_report.error_report(model, images)
    report_dir = FLAGS.report_dir or os.path.join(FLAGS.modelDir, "error_report")
    title = f"{model.name} ({FLAGS.checkpoint}), {len(images)} {FLAGS.split} images"
    table, plot = error_report.write_report(rows, report_dir, title)
    print(f"Winograd error report: {title}\n{table}\nwritten to {report_dir} ({plot})")


if __name__ == "__main__":
    # Bad input, and a missing optional package (matplotlib), is one error line.
    flag_errors.start(_evaluate, FLAG_NAMES, bad_input=(ValueError, ImportError))
