"""Winograd-aware layers: the pipeline as functions and the WinogradConv2D layer.

- :mod:`~wa_tf.layers.pipeline`: tiles, transforms, U, the element-wise stage and
  untiling (:func:`winograd_conv`), on the fused kernels where they run;
- :mod:`~wa_tf.layers.recompute`: the layer's gradients that recompute large tensors;
- :mod:`~wa_tf.layers.conv2d`: :class:`WinogradConv2D` and
  :class:`WinogradQuantization`.
"""
from wa_tf.layers.conv2d import WinogradConv2D, WinogradQuantization
from wa_tf.layers.pipeline import (
    apply_transform,
    extract_tiles,
    untile,
    winograd_conv,
    winograd_conv_transformed,
    winograd_input,
    winograd_output,
    winograd_weights,
)

__all__ = ["WinogradConv2D", "WinogradQuantization", "apply_transform", "extract_tiles",
           "untile", "winograd_conv", "winograd_conv_transformed", "winograd_input",
           "winograd_output", "winograd_weights"]
