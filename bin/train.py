#!/usr/bin/env python
"""Trains a ResNet-18-like model with normal or Winograd-aware convolutions.

Examples (the reference's):
  # standard convolutions, 16 bits, 120 epochs
  bin/train.py --use_normal_conv --Q --bits 16 --epochs 120
  # Winograd-aware, static F(2x2, 3x3) transforms, on the CPU
  bin/train.py --static --F 2 --use_cpu
  # Winograd-aware, learnable F(4x4, 3x3) transforms, 8 bits, width 0.25
  bin/train.py --flex --F 4 --Q --mult 0.25

Re-running an interrupted command resumes it (see docs/training.md).
"""
import wa_tf  # noqa: F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf.training import flags as wa_flags
from wa_tf.training import train_lib

wa_flags.define_flags()

if __name__ == "__main__":
    wa_flags.start(train_lib.run, "train")
