#!/usr/bin/env python
"""wiNAS: searches each 3x3 convolution's algorithm and bit-width against a cost model.

Writes <outDir>/Search/<UTC time>/ with architecture.json (for
bin/train.py --architecture), search.json, report.txt, choices.png and
TensorBoard logs; re-running an interrupted command resumes it.

Examples:
  # INT8, normal or flex F2/F4/F6 per layer, analytic cost, warm start
  bin/search.py --candidates=normal,F2,F4,F6 --bits_candidates=8 --latency_weight=0.5 \
      --modelDir=experiments/ResNet18Like/mult_0.5/bits_8/lr_0.001/<time> --epochs=10
  # also search the bit-width, against a measured table, to 40% of all-normal
  bin/search.py --bits_candidates=8,16 --cost_model=latency_table.json --target_latency=0.4
"""
from absl import flags

import wa_tf  # noqa: F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf.training import flag_errors
from wa_tf.training import flags as wa_flags

flags.DEFINE_string("candidates", "normal,F2,F4,F6", "Algorithms searched per layer: normal "
                    "(direct convolution) and flex Winograd F2, F4, F6 (F6 only where its "
                    "tile fits).")
flags.DEFINE_string("bits_candidates", "8", "Bit-widths searched per layer, comma-separated: "
                    "2..16, or FP for float.")
flags.DEFINE_string("cost_model", "analytic", "analytic, measured (latency_table.json of "
                    "bin/latency_table.py) or the path of a JSON latency table.")
flags.DEFINE_integer("cost_batch_size", 1, "Batch size whose inference cost is searched.")
flags.DEFINE_float("latency_weight", 1.0, "Weight of the expected cost (as a fraction of "
                   "all-normal at the widest bit-width) in the logits' objective.")
flags.DEFINE_float("target_latency", None, "Target expected cost as a fraction of all-normal "
                   "(e.g. 0.376 for 2.66x cheaper): only the excess is penalised.")
flags.DEFINE_integer("epochs", 10, "Search epochs.")
flags.DEFINE_integer("steps_per_epoch", None, "At most this many weight (and logit) steps "
                     "per epoch; default: the weights' part of the training split.")
wa_flags.define_common_flags("batch_size",
                             notes={"batch_size": "of the weight and logit steps"})
flags.DEFINE_float("lr", 0.001, "Learning rate of the weights (Adam).")
flags.DEFINE_float("arch_lr", 0.001, "Learning rate of the architecture logits (Adam, "
                   "beta_1 = 0).")
flags.DEFINE_float("arch_fraction", 0.2, "Fraction of the training split that trains the "
                   "logits; the rest trains the weights.")
flags.DEFINE_float("mult", 0.5, "Width multiplier, in (0, 1].")
flags.DEFINE_boolean("per_tap", False, "Per-tap ranges for the Winograd stages.")
flags.DEFINE_string("dataset", "cifar10", "cifar10, cifar100, image_folder or digits.")
wa_flags.define_common_flags("data_dir", "seed", "use_cpu",
                             notes={"seed": "weights, data order, sampling, splits"})
flags.DEFINE_string("outDir", "experiments/", "Folder that receives Search/<time>/.")
flags.DEFINE_string("modelDir", None, "Warm start: experiment folder of a trained normal run "
                    "(bin/train.py --use_normal_conv); its weights are copied by name.")
flags.DEFINE_string("modelToLoad", "final", "Checkpoint of --modelDir: final or best.")

FLAGS = flags.FLAGS
# The flags that are search.SearchConfig's fields, of the same names.
CONFIG_FLAGS = ("cost_model", "cost_batch_size", "latency_weight", "target_latency", "epochs",
                "steps_per_epoch", "batch_size", "lr", "arch_lr", "arch_fraction", "mult",
                "per_tap", "dataset", "data_dir", "seed", "outDir", "modelDir", "modelToLoad")
# Library argument -> flag (wa_tf.training.flag_errors): SearchConfig's fields (and parse_bits')
# are the flags; the warm start's experiment.load_model names model_dir and checkpoint.
FLAG_NAMES = dict({name: name for name in ("candidates", "bits_candidates") + CONFIG_FLAGS},
                  model_dir="modelDir", checkpoint="modelToLoad")


def main():
    wa_flags.apply_use_cpu()  # first: before TensorFlow initialises its devices
    from wa_tf import search  # pylint: disable=import-outside-toplevel
    bits = search.parse_bits(FLAGS.bits_candidates)
    names = tuple(n.strip() for n in FLAGS.candidates.split(","))
    config = search.SearchConfig(candidates=names, bits_candidates=bits,
                                 **{name: FLAGS[name].value for name in CONFIG_FLAGS})
    search.run(config)


if __name__ == "__main__":
    flag_errors.start(main, FLAG_NAMES)
