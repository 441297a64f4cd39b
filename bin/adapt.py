#!/usr/bin/env python
"""Starts a model from another run's checkpoint, then trains it.

Copies every weight of --modelDir's checkpoint whose layer name, weight name
and shape match (a normal Conv2D kernel goes into the WinogradConv2D kernel of
the same layer), reports what did not match, and trains as bin/train.py.  The
width (--mult) and --dataset come from --modelDir/FLAGS.txt, and so do --outDir,
--lr, --seed and --use_cpu unless given; validation is always on --modelDir's
validation split.  --warmup sets the Winograd-domain quantizer ranges from an
inference pass before the first step.

Example (the reference's):
  bin/train.py --use_normal_conv --mult 0.5 --Q --bits 8 --epochs 120
  bin/adapt.py --modelDir experiments/ResNet18Like/mult_0.5/bits_8/lr_0.001/<time> \
      --flex --F 4 --epochs 20 --Q --bits 8
"""
import wa_tf  # noqa: F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf.training import flags as wa_flags
from wa_tf.training import train_lib

wa_flags.define_flags()

if __name__ == "__main__":
    wa_flags.start(train_lib.adapt, "adapt")
