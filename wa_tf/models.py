"""The ResNet-18-like CIFAR model of the paper and its layer table.

The architecture follows the reference implementation (jafermarq/WinogradAwareNets):

* a 3x3 stem convolution with 32 channels (not scaled by the width
  multiplier), BatchNorm and ReLU;
* four stages of two BasicBlocks with ``int(64/128/256/512 * multiplier)``
  channels;
* every stride-2 convolution is replaced by a 2x2 max-pool of the block input
  (feeding both branches) followed by stride-1 convolutions, in every mode, as
  there is no stride-2 Winograd convolution;
* 1x1 shortcut convolutions (always normal convolutions) plus BatchNorm where
  the block pools or changes the number of channels;
* tile size 6 falls back to 4 in the last stage, whose maps are only 4x4;
* global average pooling and a linear classifier with bias.

Layers are named after the reference's parameters (``conv1``, ``bn1``,
``layer2.0.conv1``, ``layer2.0.shortcut``, ``linear``...), so weights copy by
name between normal and Winograd-aware models.
"""

import math

import numpy as np
import tf_keras

from wa_tf.layers import WinogradConv2D
from wa_tf.transforms import is_int, tile_geometry

CONV_MODES = ("normal", "static", "flex")
TILE_SIZES = (2, 4, 6)
STEM_CHANNELS = 32
STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)

# PyTorch's defaults, so training matches the reference: BN momentum 0.1
# (0.9 in Keras terms), eps 1e-5; Conv2d/Linear kernels U(+-1/sqrt(fan_in))
# (kaiming_uniform with a=sqrt(5)).  Winograd layers keep glorot_uniform, as
# the reference's Winograd layer initialises with xavier_uniform.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _torch_kernel_init():
    return tf_keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def _check_conv(conv):
    if conv not in CONV_MODES:
        raise ValueError(f"conv must be one of {', '.join(CONV_MODES)}; got {conv!r}")


def _check_tile_size(tile_size):
    if not is_int(tile_size) or tile_size not in TILE_SIZES:
        raise ValueError(f"tile_size must be one of {TILE_SIZES}; got {tile_size!r}")


def model_name(conv: str, tile_size: int) -> str:
    """The reference's model name: 'ResNet18Like' or 'ResNet18LikeF{m}' for Winograd models."""
    _check_conv(conv)
    if conv == "normal":
        return "ResNet18Like"
    _check_tile_size(tile_size)
    return f"ResNet18LikeF{tile_size}"


def _batch_norm(name):
    # synchronized=True: under MirroredStrategy the batch statistics are taken
    # over the global batch, so results do not depend on the number of devices.
    return tf_keras.layers.BatchNormalization(
        momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, synchronized=True, name=name)


def _conv3x3(filters, name, conv, tile_size, recompute):
    if conv == "normal":
        return tf_keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                      kernel_initializer=_torch_kernel_init(), name=name)
    return WinogradConv2D(filters, 3, tile_size=tile_size, flex=conv == "flex",
                          padding="same", use_bias=False, recompute=recompute, name=name)


def _basic_block(x, in_channels, channels, pool, prefix, conv, tile_size, recompute):
    """A BasicBlock; `pool` replaces the stride-2 convolution by a 2x2 max-pool."""
    if pool:
        x = tf_keras.layers.MaxPooling2D(2, name=f"{prefix}.pool")(x)
    y = _conv3x3(channels, f"{prefix}.conv1", conv, tile_size, recompute)(x)
    y = _batch_norm(f"{prefix}.bn1")(y)
    y = tf_keras.layers.ReLU(name=f"{prefix}.relu1")(y)
    y = _conv3x3(channels, f"{prefix}.conv2", conv, tile_size, recompute)(y)
    y = _batch_norm(f"{prefix}.bn2")(y)
    shortcut = x
    if pool or in_channels != channels:
        # 1x1 convolutions gain nothing from Winograd: always normal convs.
        shortcut = tf_keras.layers.Conv2D(channels, 1, use_bias=False,
                                          kernel_initializer=_torch_kernel_init(),
                                          name=f"{prefix}.shortcut")(x)
        shortcut = _batch_norm(f"{prefix}.shortcut_bn")(shortcut)
    y = tf_keras.layers.Add(name=f"{prefix}.add")([y, shortcut])
    return tf_keras.layers.ReLU(name=f"{prefix}.relu2")(y)


def resnet18_like(conv: str = "normal", tile_size: int = 4, width_multiplier: float = 0.5,
                  num_classes: int = 10, bits=None, input_shape=(32, 32, 3),
                  per_tap: bool = False, warmup: bool = False,
                  recompute: bool = False) -> tf_keras.Model:
    """Builds the paper's ResNet-18-like model as a functional tf_keras model.

    Example:
      >>> model = resnet18_like("flex", tile_size=4, bits=8)
      >>> print(layer_table(model))

    Args:
      conv: 'normal' (Conv2D), 'static' (WinogradConv2D with fixed Cook-Toom
        transforms) or 'flex' (WinogradConv2D with learnt transforms) for the
        3x3 convolutions of the residual blocks.  The stem is always a Conv2D.
      tile_size: Output tile size m of F(m x m, 3 x 3): 2, 4 or 6 (6 uses 4 in
        the last stage).  Ignored for 'normal'.
      width_multiplier: Scales the block channels 64/128/256/512, in (0, 1].
      num_classes: Number of output logits.
      bits: None for float, or 2..16 to return
        ``wa_tf.quantization.quantize_model(model, bits, per_tap, warmup)``.
      input_shape: (height, width, channels) of the input images.
      per_tap: Quantize the Winograd domain per tap (per t x t position).
      warmup: Start the Winograd-domain quantizers in warm-up mode (for
        adapting a pretrained model).
      recompute: Recompute Winograd layers in the backward pass to save
        memory (also with quantization).

    Returns:
      A functional ``tf_keras.Model`` named 'ResNet18Like' or 'ResNet18LikeF{m}'.

    Raises:
      ValueError: On an invalid argument; the message names it.
    """
    _check_conv(conv)
    _check_tile_size(tile_size)
    if (not isinstance(width_multiplier, (int, float, np.floating)) or isinstance(width_multiplier, bool)
            or not 0 < width_multiplier <= 1):
        raise ValueError(f"width_multiplier must be in (0, 1]; got {width_multiplier!r}")
    if int(STAGE_CHANNELS[0] * width_multiplier) < 1:
        raise ValueError(f"width_multiplier must be at least 1/{STAGE_CHANNELS[0]} so every "
                         f"stage has a channel; got {width_multiplier!r}")
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if bits is not None:
        # Imported here: the float model does not need the quantizers (nor TF-MOT).
        from wa_tf.quantizers import check_bits  # pylint: disable=import-outside-toplevel
        check_bits(bits, "bits")
    try:
        input_shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be (height, width, channels); got {input_shape!r}") from None
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[:2]) < 8:
        raise ValueError("input_shape must be (height, width, channels) with height and "
                         f"width >= 8 (three 2x2 poolings); got {input_shape!r}")

    inputs = tf_keras.Input(input_shape, name="image")
    x = tf_keras.layers.Conv2D(STEM_CHANNELS, 3, padding="same", use_bias=False,
                               kernel_initializer=_torch_kernel_init(), name="conv1")(inputs)
    x = _batch_norm("bn1")(x)
    x = tf_keras.layers.ReLU(name="relu1")(x)
    in_channels = STEM_CHANNELS
    for stage, (base, blocks) in enumerate(zip(STAGE_CHANNELS, BLOCKS_PER_STAGE), start=1):
        channels = int(base * width_multiplier)
        # The last stage sees 4x4 maps: an 8x8 input tile of F(6x6) would be mostly padding.
        stage_tile = 4 if (stage == len(STAGE_CHANNELS) and tile_size == 6) else tile_size
        for block in range(blocks):
            x = _basic_block(x, in_channels, channels, pool=stage > 1 and block == 0,
                             prefix=f"layer{stage}.{block}", conv=conv, tile_size=stage_tile,
                             recompute=recompute)
            in_channels = channels
    x = tf_keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    bound = 1.0 / math.sqrt(in_channels)  # PyTorch's Linear bias init
    outputs = tf_keras.layers.Dense(
        num_classes, kernel_initializer=_torch_kernel_init(),
        bias_initializer=tf_keras.initializers.RandomUniform(-bound, bound), name="linear")(x)
    model = tf_keras.Model(inputs, outputs, name=model_name(conv, tile_size))
    if bits is None:
        return model
    # Imported here: the float model does not need TF-MOT.
    from wa_tf import quantization  # pylint: disable=import-outside-toplevel
    return quantization.quantize_model(model, bits=bits, per_tap=per_tap, warmup=warmup)


# ----------------------------------------------------------------------------
# Layer table


def _layer_bits(layer, inner):
    """Bit-width of a table layer: 'FP' when neither wrapped nor quantized."""
    if isinstance(inner, WinogradConv2D) and inner.quantization:
        return inner.quantization.bits
    config = getattr(layer, "quantize_config", None)
    for attr in ("bits", "num_bits"):
        value = getattr(config, attr, None)
        if is_int(value):
            return int(value)
    return "FP"


def _multiplies(inner, input_shape, output_shape):
    """(multiplies per image, multiplies of the direct convolution) of one layer."""
    kernel = inner.kernel.shape
    if isinstance(inner, tf_keras.layers.Dense):
        n = int(np.prod(kernel))
        return n, n
    _, out_h, out_w, _ = output_shape
    direct = out_h * out_w * int(np.prod(kernel))
    if not isinstance(inner, WinogradConv2D):
        return direct, direct
    m, r = inner.tile_size, inner.kernel_size[0]
    geo = tile_geometry(input_shape[1], input_shape[2], m, r, inner.padding)
    t = m + r - 1
    return t * t * geo.n_h * geo.n_w * kernel[2] * kernel[3], direct


def _format_table(header, rows):
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(values):
        return "|" + "|".join(f" {str(v):^{w}} " for v, w in zip(values, widths)) + "|"

    return "\n".join([rule, line(header), rule] + [line(r) for r in rows] + [rule])


def layer_table(model: tf_keras.Model) -> str:
    """The reference's table of the model's convolutions and linear layers.

    One row per Conv2D, WinogradConv2D and Dense layer (TF-MOT-wrapped layers
    are unwrapped) with the reference's columns (layer name, kernel shape in
    Keras layout (kh, kw, C_in, C_out), input shape, Winograd F(m x m, r x r),
    flex, bits, kernel size in thousands and share of the table's total) plus
    the multiplies per image: r^2 H W C_in C_out for direct convolutions and
    t^2 * tiles * C_in * C_out (the element-wise stage; transforms excluded)
    for Winograd layers.

    Args:
      model: A model built by :func:`resnet18_like` (float or quantized), or
        another built functional model whose Conv2D, WinogradConv2D and Dense
        layers are each called once.

    Returns:
      The table and its totals as a multi-line string.
    """
    # Imported here: TF-MOT is slow to import and float models never need it.
    from wa_tf.quantization import unwrap  # pylint: disable=import-outside-toplevel
    header = ["VarName", "Type", "Param Shape", "Input Shape", "Winograd", "Flex", "bits",
              "Size(k)", "Size(%)", "Mults(M)"]
    rows, table_size, total_mults, total_direct = [], 0, 0, 0
    for layer in model.layers:
        inner = unwrap(layer)
        if not isinstance(inner, (tf_keras.layers.Conv2D, WinogradConv2D, tf_keras.layers.Dense)):
            continue
        size = int(np.prod(inner.kernel.shape))
        input_shape, output_shape = tuple(layer.input_shape), tuple(layer.output_shape)
        mults, direct = _multiplies(inner, input_shape, output_shape)
        winograd, flex = "-", "-"
        if isinstance(inner, WinogradConv2D):
            m, r = inner.tile_size, inner.kernel_size[0]
            winograd, flex = f"F({m}x{m},{r}x{r})", inner.flex
        rows.append(([inner.name, type(inner).__name__, list(inner.kernel.shape),
                      ["n"] + list(input_shape[1:]), winograd, flex, _layer_bits(layer, inner)],
                     size, mults))
        table_size += size
        total_mults += mults
        total_direct += direct
    body = [cells + [f"{size / 1e3:.2f}", f"{100 * size / table_size:.1f}", f"{mults / 1e6:.3f}"]
            for cells, size, mults in rows]
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return "\n".join([
        f"TRAINABLE VARIABLES INFORMATION - arch: {model.name}",
        _format_table(header, body),
        f"Params shown in table size: {table_size / 1e3:.3f} K params",
        f"Total size: {total / 1e3:.3f} K params (all weights, BN statistics included)",
        f"Total (trainable) size: {trainable / 1e3:.3f} K params",
        f"Multiplies per image: {total_mults / 1e6:.2f} M "
        f"(direct convolution: {total_direct / 1e6:.2f} M, "
        f"{total_direct / max(total_mults, 1):.2f}x)",
    ])
