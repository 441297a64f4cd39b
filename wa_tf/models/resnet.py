"""The ResNet-18-like CIFAR model of the paper, float, Winograd-aware or mixed.

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
  a mixed architecture may not ask for it there (:func:`searchable_layers`);
* global average pooling and a linear classifier with bias.

Layers are named after the reference's parameters (``conv1``, ``bn1``,
``layer2.0.conv1``, ``layer2.0.shortcut``, ``linear``...), so weights copy by
name between normal and Winograd-aware models.

Mixed architectures (:mod:`wa_tf.models.architecture`) give each of the 16 block
convolutions (``layer1.0.conv1`` ... ``layer4.1.conv2``, the *searchable*
layers) its own conv mode, tile size and bit-width; a 1x1 shortcut takes the
bit-width of its block's ``conv1``, which reads the same input.
"""

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import tf_keras

from wa_tf.choices import CONV_MODES, TILE_SIZES, check_bits
from wa_tf.layers import WinogradConv2D
from wa_tf.models.architecture import (
    Architecture,
    ArchitectureLike,
    LayerChoice,
    SearchableLayer,
    load_architecture,
)
from wa_tf.transforms import is_int

MODEL_NAME = "ResNet18Like"
# The model name of a non-uniform architecture (see architecture_name).
SEARCHED_MODEL_NAME = "ResNet18LikeSearched"
# A block's 1x1 shortcut convolution is "<block>.shortcut" (layer2.0.shortcut).
SHORTCUT_SUFFIX = ".shortcut"
STEM_CHANNELS = 32
STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)

# PyTorch's defaults, so training matches the reference: BN momentum 0.1
# (0.9 in Keras terms), eps 1e-5; Conv2d/Linear kernels U(+-1/sqrt(fan_in))
# (kaiming_uniform with a=sqrt(5)).  Winograd layers keep glorot_uniform, as
# the reference's Winograd layer initialises with xavier_uniform.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def lazy_quantization():
    """:mod:`wa_tf.quantization`, imported on first use: it imports TF-MOT (seconds), which
    float models never need."""
    from wa_tf import quantization  # pylint: disable=import-outside-toplevel
    return quantization


def torch_kernel_init():
    """PyTorch's default Conv2d/Linear kernel initialiser, U(+-1/sqrt(fan_in))."""
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
        return MODEL_NAME
    _check_tile_size(tile_size)
    return f"{MODEL_NAME}F{tile_size}"


def _check_width_multiplier(width_multiplier):
    if (not isinstance(width_multiplier, (int, float, np.floating))
            or isinstance(width_multiplier, bool) or not 0 < width_multiplier <= 1):
        raise ValueError(f"width_multiplier must be in (0, 1]; got {width_multiplier!r}")
    if int(STAGE_CHANNELS[0] * width_multiplier) < 1:
        raise ValueError(f"width_multiplier must be at least 1/{STAGE_CHANNELS[0]} so every "
                         f"stage has a channel; got {width_multiplier!r}")


def _checked_input_shape(input_shape) -> Tuple[int, int, int]:
    try:
        input_shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"input_shape must be (height, width, channels); got {input_shape!r}") from None
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[:2]) < 8:
        raise ValueError("input_shape must be (height, width, channels) with height and "
                         f"width >= 8 (three 2x2 poolings); got {input_shape!r}")
    return input_shape


def _blocks(width_multiplier):
    """(stage, block, in_channels, channels, pool) of each BasicBlock, in order."""
    in_channels = STEM_CHANNELS
    for stage, (base, blocks) in enumerate(zip(STAGE_CHANNELS, BLOCKS_PER_STAGE), start=1):
        channels = int(base * width_multiplier)
        for block in range(blocks):
            yield stage, block, in_channels, channels, stage > 1 and block == 0
            in_channels = channels


def _stage_tile_sizes(stage: int) -> Tuple[int, ...]:
    # The last stage sees 4x4 maps (at 32x32 inputs): an 8x8 input tile of
    # F(6x6) would be mostly padding, so F6 is not offered there.
    return (2, 4) if stage == len(STAGE_CHANNELS) else TILE_SIZES


def searchable_layers(width_multiplier: float = 0.5,
                      input_shape=(32, 32, 3)) -> List[SearchableLayer]:
    """The searchable 3x3 convolutions of :func:`resnet18_like`, in model order.

    The two 3x3 convolutions of every BasicBlock (``layer1.0.conv1`` ...
    ``layer4.1.conv2``); not the stem, the 1x1 shortcuts or the classifier.
    Computed from the model's layout, without building it.

    Args:
      width_multiplier: As :func:`resnet18_like`.
      input_shape: ``(height, width, channels)`` of the model's input.

    Returns:
      One :class:`~wa_tf.models.architecture.SearchableLayer` per layer, with its
      input shape, filters and offered tile sizes (2, 4, 6; 2, 4 in the last
      stage).

    Raises:
      ValueError: On an invalid argument.
    """
    _check_width_multiplier(width_multiplier)
    height, width, _ = _checked_input_shape(input_shape)
    layers = []
    for stage, block, in_channels, channels, pool in _blocks(width_multiplier):
        if pool:  # a 2x2 'valid' max-pool
            height, width = height // 2, width // 2
        prefix = f"layer{stage}.{block}"
        tiles = _stage_tile_sizes(stage)
        layers.append(SearchableLayer(height, width, in_channels, channels, 3,
                                      name=f"{prefix}.conv1", tile_sizes=tiles, stage=stage))
        layers.append(SearchableLayer(height, width, channels, channels, 3,
                                      name=f"{prefix}.conv2", tile_sizes=tiles, stage=stage))
    return layers


def uniform_architecture(conv: str = "normal", tile_size: int = 4, bits: Optional[int] = None,
                         layers: Optional[Sequence[SearchableLayer]] = None) -> Architecture:
    """The architecture of the uniform model ``resnet18_like(conv, tile_size, bits=bits)``.

    Every searchable layer gets `conv` and `bits`; tile size 6 becomes 4 in
    the last stage, as in the uniform model.

    Args:
      conv: 'normal', 'static' or 'flex'.
      tile_size: 2, 4 or 6 (ignored for 'normal').
      bits: None (float) or 2..16.
      layers: The searchable layers (default :func:`searchable_layers`'s;
        the layer names and tile sizes do not depend on width or input).

    Raises:
      ValueError: On an invalid argument.
    """
    _check_conv(conv)
    if conv != "normal":
        _check_tile_size(tile_size)
    layers = searchable_layers() if layers is None else layers
    choices = {}
    for layer in layers:
        tile = None if conv == "normal" else max(t for t in layer.tile_sizes if t <= tile_size)
        choices[layer.name] = LayerChoice(conv, tile, bits)
    return Architecture(choices)


def uniform_choice(architecture: ArchitectureLike) -> Optional[Tuple[str, Optional[int],
                                                                      Optional[int]]]:
    """``(conv, tile_size, bits)`` if `architecture` is a uniform model's, else None.

    ``tile_size`` is None for 'normal'.  The architecture is checked against
    :func:`searchable_layers` (whose names do not depend on width or input).
    """
    layers = searchable_layers()
    architecture = load_architecture(architecture, layers)
    first = architecture[layers[0].name]
    tile_size = first.tile_size if first.winograd else 4
    if architecture != uniform_architecture(first.conv, tile_size, first.bits, layers):
        return None
    return first.conv, first.tile_size, first.bits


def architecture_name(architecture: ArchitectureLike) -> str:
    """The name of the model an architecture builds.

    :func:`model_name`'s for a uniform architecture (the uniform model's
    name), else ``'ResNet18LikeSearched'``.
    """
    uniform = uniform_choice(architecture)
    if uniform is None:
        return SEARCHED_MODEL_NAME
    return model_name(uniform[0], uniform[1])


def _batch_norm(name):
    # synchronized=True: under MirroredStrategy the batch statistics are taken
    # over the global batch, so results do not depend on the number of devices.
    return tf_keras.layers.BatchNormalization(
        momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, synchronized=True, name=name)


def _conv3x3(filters, name, choice: LayerChoice, recompute):
    if not choice.winograd:
        return tf_keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                      kernel_initializer=torch_kernel_init(), name=name)
    return WinogradConv2D(filters, 3, tile_size=choice.tile_size, flex=choice.conv == "flex",
                          padding="same", use_bias=False, recompute=recompute, name=name)


def _basic_block(x, in_channels, channels, pool, prefix, conv3x3):
    """A BasicBlock; `pool` replaces the stride-2 convolution by a 2x2 max-pool."""
    if pool:
        x = tf_keras.layers.MaxPooling2D(2, name=f"{prefix}.pool")(x)
    y = conv3x3(channels, f"{prefix}.conv1")(x)
    y = _batch_norm(f"{prefix}.bn1")(y)
    y = tf_keras.layers.ReLU(name=f"{prefix}.relu1")(y)
    y = conv3x3(channels, f"{prefix}.conv2")(y)
    y = _batch_norm(f"{prefix}.bn2")(y)
    shortcut = x
    if pool or in_channels != channels:
        # 1x1 convolutions gain nothing from Winograd: always normal convs.
        shortcut = tf_keras.layers.Conv2D(channels, 1, use_bias=False,
                                          kernel_initializer=torch_kernel_init(),
                                          name=f"{prefix}{SHORTCUT_SUFFIX}")(x)
        shortcut = _batch_norm(f"{prefix}.shortcut_bn")(shortcut)
    y = tf_keras.layers.Add(name=f"{prefix}.add")([y, shortcut])
    return tf_keras.layers.ReLU(name=f"{prefix}.relu2")(y)


def build_resnet18_like(conv3x3: Callable[[int, str], tf_keras.layers.Layer],
                        width_multiplier: float = 0.5, num_classes: int = 10,
                        input_shape=(32, 32, 3), name: str = MODEL_NAME) -> tf_keras.Model:
    """The ResNet-18-like structure, float, with the 3x3 convolutions `conv3x3` makes.

    :func:`resnet18_like` builds its models with it; a model with other
    searchable convolutions (``wa_tf.search``'s supernet) uses it to get the
    very same stem, blocks, layer names and initialisation.

    Args:
      conv3x3: ``conv3x3(filters, name)`` returns the layer for the searchable
        convolution `name` (``layer1.0.conv1`` ...): 3x3, stride 1, 'same'
        padding, no bias.
      width_multiplier: Scales the block channels 64/128/256/512, in (0, 1].
      num_classes: Number of output logits.
      input_shape: (height, width, channels) of the input images.
      name: The model's name.

    Raises:
      ValueError: On a bad width, number of classes or input shape.
    """
    _check_width_multiplier(width_multiplier)
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    input_shape = _checked_input_shape(input_shape)
    inputs = tf_keras.Input(input_shape, name="image")
    x = tf_keras.layers.Conv2D(STEM_CHANNELS, 3, padding="same", use_bias=False,
                               kernel_initializer=torch_kernel_init(), name="conv1")(inputs)
    x = _batch_norm("bn1")(x)
    x = tf_keras.layers.ReLU(name="relu1")(x)
    for stage, block, in_channels, channels, pool in _blocks(width_multiplier):
        x = _basic_block(x, in_channels, channels, pool, f"layer{stage}.{block}", conv3x3)
    x = tf_keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    bound = 1.0 / math.sqrt(channels)  # PyTorch's Linear bias init
    outputs = tf_keras.layers.Dense(
        num_classes, kernel_initializer=torch_kernel_init(),
        bias_initializer=tf_keras.initializers.RandomUniform(-bound, bound), name="linear")(x)
    return tf_keras.Model(inputs, outputs, name=name)


def resnet18_like(conv: Optional[str] = None, tile_size: Optional[int] = None,
                  width_multiplier: float = 0.5, num_classes: int = 10, bits=None,
                  input_shape=(32, 32, 3), per_tap: bool = False, warmup: bool = False,
                  recompute: bool = False,
                  architecture: Optional[ArchitectureLike] = None) -> tf_keras.Model:
    """Builds the paper's ResNet-18-like model as a functional tf_keras model.

    Example:
      >>> model = resnet18_like("flex", tile_size=4, bits=8)
      >>> mixed = resnet18_like(architecture="configs/architectures/example_mixed.json")
      >>> print(layer_table(mixed))

    Args:
      conv: 'normal' (Conv2D, the default), 'static' (WinogradConv2D with
        fixed Cook-Toom transforms) or 'flex' (WinogradConv2D with learnt
        transforms) for the 3x3 convolutions of the residual blocks.  The stem
        is always a Conv2D.
      tile_size: Output tile size m of F(m x m, 3 x 3): 2, 4 (the default) or
        6 (6 uses 4 in the last stage).  Ignored for 'normal'.
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
      architecture: A mixed architecture (an
        :class:`~wa_tf.models.architecture.Architecture`, its dict or the path of its
        JSON file) naming every searchable layer's conv, tile size and bits,
        instead of `conv`, `tile_size` and `bits` (which must then be left
        None, or equal the architecture's if it is uniform).  Layers with bits
        are quantized as ``quantize_model(..., layer_bits=...)`` does, each
        1x1 shortcut with its block's ``conv1`` bits; float layers stay float
        (no input quantizer).  `per_tap` and `warmup` apply to every
        quantized Winograd layer.

    Returns:
      A functional ``tf_keras.Model`` named 'ResNet18Like', 'ResNet18LikeF{m}'
      or, for a non-uniform architecture, 'ResNet18LikeSearched'
      (:func:`architecture_name`).

    Raises:
      ValueError: On an invalid argument; the message names it.
    """
    _check_width_multiplier(width_multiplier)
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    input_shape = _checked_input_shape(input_shape)
    layers = searchable_layers(width_multiplier, input_shape)
    if architecture is None:
        conv = "normal" if conv is None else conv
        tile_size = 4 if tile_size is None else tile_size
        _check_conv(conv)
        _check_tile_size(tile_size)
        if bits is not None:
            check_bits(bits, "bits")
        plan = uniform_architecture(conv, tile_size, None, layers)
        name = model_name(conv, tile_size)
    else:
        plan = load_architecture(architecture, layers)
        uniform = uniform_choice(plan)
        given = {"conv": conv, "tile_size": tile_size, "bits": bits}
        for i, (arg, value) in enumerate(given.items()):
            if arg == "tile_size" and uniform is not None and uniform[0] == "normal":
                continue  # ignored for normal convolutions, as without an architecture
            if value is not None and (uniform is None or value != uniform[i]):
                raise ValueError(f"{arg}={value!r} contradicts the architecture: leave conv, "
                                 "tile_size and bits unset when giving an architecture")
        name = architecture_name(plan)

    model = build_resnet18_like(
        lambda filters, layer: _conv3x3(filters, layer, plan[layer], recompute),
        width_multiplier, num_classes, input_shape, name)
    layer_bits = dict(plan.bits)
    for layer in model.layers:
        if layer.name.endswith(SHORTCUT_SUFFIX):
            # It reads the block input, as conv1 does: quantized as conv1.
            layer_bits[layer.name] = plan[layer.name[:-len(SHORTCUT_SUFFIX)] + ".conv1"].bits
    if architecture is None and bits is None:
        return model
    if architecture is not None and all(b is None for b in layer_bits.values()):
        return model
    quantization = lazy_quantization()
    if architecture is None:
        return quantization.quantize_model(model, bits=bits, per_tap=per_tap, warmup=warmup)
    return quantization.quantize_model(model, bits=None, layer_bits=layer_bits,
                                       per_tap=per_tap, warmup=warmup)
