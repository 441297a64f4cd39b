"""Tests of wa_tf.models: the ResNet-18-like architecture and the layer table."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from wa_tf import models
from wa_tf.layers import WinogradConv2D, WinogradQuantization

# Conv and linear kernels of the width-0.5 model in the reference's table.
REFERENCE_TABLE_SIZE = 2_792_800
BLOCK_CONVS = [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]
SHORTCUTS = ["layer2.0.shortcut", "layer3.0.shortcut", "layer4.0.shortcut"]


def _expected_conv_names():
    """Reference module order: the shortcut follows conv2 of the first block of stages 2-4."""
    names = ["conv1"]
    for name in BLOCK_CONVS:
        names.append(name)
        if name.endswith(".0.conv2") and not name.startswith("layer1"):
            names.append(name.replace("conv2", "shortcut"))
    return names


def _layers_of(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]  # pylint: disable=unidiomatic-typecheck


def _kernel_total(model):
    return sum(int(np.prod(layer.kernel.shape)) for layer in model.layers
               if hasattr(layer, "kernel"))


def test_normal_architecture():
    model = models.resnet18_like("normal")
    assert model.name == "ResNet18Like"
    assert model.output_shape == (None, 10)
    convs = _layers_of(model, tf_keras.layers.Conv2D)
    assert [c.name for c in convs] == _expected_conv_names()
    assert all(not c.use_bias and c.strides == (1, 1) for c in convs)
    assert model.get_layer("conv1").filters == 32
    assert [model.get_layer(f"layer{s}.1.conv2").filters for s in range(1, 5)] == [32, 64, 128, 256]
    assert [layer.name for layer in _layers_of(model, tf_keras.layers.MaxPooling2D)] == [
        "layer2.0.pool", "layer3.0.pool", "layer4.0.pool"]
    bns = _layers_of(model, tf_keras.layers.BatchNormalization)
    assert len(bns) == 20
    assert all(bn.synchronized and bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    dense = model.get_layer("linear")
    assert dense.use_bias and dense.kernel.shape == (256, 10)
    assert not _layers_of(model, WinogradConv2D)


@pytest.mark.parametrize("conv,tile_size", [("static", 2), ("flex", 4), ("flex", 6)])
def test_winograd_architecture(conv, tile_size):
    model = models.resnet18_like(conv, tile_size, num_classes=7)
    assert model.name == f"ResNet18LikeF{tile_size}"
    assert model.output_shape == (None, 7)
    winograd = _layers_of(model, WinogradConv2D)
    assert [layer.name for layer in winograd] == BLOCK_CONVS
    assert all(layer.flex == (conv == "flex") for layer in winograd)
    # F6 falls back to F4 in the last stage, whose maps are 4x4.
    expected = [4 if name.startswith("layer4") and tile_size == 6 else tile_size
                for name in BLOCK_CONVS]
    assert [layer.tile_size for layer in winograd] == expected
    assert [layer.name for layer in _layers_of(model, tf_keras.layers.Conv2D)] == [
        "conv1"] + SHORTCUTS
    assert model.get_layer("layer4.1.conv2").input_shape == (None, 4, 4, 256)


@pytest.mark.parametrize("conv,tile_size", [("normal", 4), ("static", 4), ("flex", 2),
                                            ("flex", 4), ("flex", 6)])
def test_kernel_total_matches_reference(conv, tile_size):
    assert _kernel_total(models.resnet18_like(conv, tile_size)) == REFERENCE_TABLE_SIZE


def test_width_multiplier_one_adds_first_stage_shortcut():
    model = models.resnet18_like("normal", width_multiplier=1.0)
    assert model.get_layer("layer1.0.shortcut").kernel.shape == (1, 1, 32, 64)
    assert model.get_layer("linear").kernel.shape == (512, 10)


@pytest.mark.parametrize("kwargs,argument", [
    ({"conv": "winograd"}, "conv"),
    ({"conv": "flex", "tile_size": 3}, "tile_size"),
    ({"width_multiplier": 0}, "width_multiplier"),
    ({"width_multiplier": 1.5}, "width_multiplier"),
    ({"width_multiplier": 0.01}, "width_multiplier"),
    ({"bits": 1}, "bits"),
    ({"bits": 17}, "bits"),
    ({"bits": 8.0}, "bits"),
    ({"num_classes": 0}, "num_classes"),
    ({"input_shape": (4, 4, 3)}, "input_shape"),
])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        models.resnet18_like(**kwargs)


def test_model_name():
    assert models.model_name("normal", 6) == "ResNet18Like"
    assert models.model_name("static", 2) == "ResNet18LikeF2"
    with pytest.raises(ValueError, match="tile_size"):
        models.model_name("flex", 5)


def _copy_by_name(source, target):
    for layer in target.layers:
        if layer.weights:
            src = source.get_layer(layer.name)
            for w in layer.weights:
                match = [s for s in src.weights if s.name.split("/")[-1] == w.name.split("/")[-1]]
                if match:
                    w.assign(match[0])


@pytest.mark.parametrize("tile_size", [2, 4, 6])
def test_normal_weights_in_flex_model_give_same_output(tile_size):
    normal = models.resnet18_like("normal", width_multiplier=0.125)
    rng = np.random.default_rng(0)
    for bn in _layers_of(normal, tf_keras.layers.BatchNormalization):
        c = bn.moving_mean.shape[0]
        bn.moving_mean.assign(rng.normal(0, 0.1, c))
        bn.moving_variance.assign(rng.uniform(0.5, 2, c))
    flex = models.resnet18_like("flex", tile_size, width_multiplier=0.125)
    _copy_by_name(normal, flex)
    x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    # Compare the last feature map too: global pooling would average errors away.
    def outputs(m):
        return tf_keras.Model(m.inputs, [m.get_layer("layer4.1.relu2").output, m.output])
    expected = outputs(normal)(x, training=False)
    for got, want in zip(outputs(flex)(x, training=False), expected):
        np.testing.assert_allclose(got.numpy(), want.numpy(),
                                   atol=1e-4 * np.abs(want.numpy()).max())


def test_mirrored_forward_matches_single_device(distribute_scope):
    """Synchronized BN: training-mode outputs do not depend on the number of replicas."""
    if distribute_scope is None:
        pytest.skip("compares MirroredStrategy with one device")
    strategy = distribute_scope
    model = models.resnet18_like("flex", 2, width_multiplier=1 / 16)
    x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    # Outside strategy.run (cross-replica context) BN uses the statistics of the whole batch
    # on one device: the single-device result with the same weights.
    single = model(x, training=True).numpy()
    dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
    per_replica = strategy.run(lambda batch: model(batch, training=True),
                               args=(next(iter(dist)),))
    outputs = np.concatenate([t.numpy() for t in strategy.experimental_local_results(per_replica)])
    assert outputs.shape == single.shape
    np.testing.assert_allclose(outputs, single, rtol=1e-4, atol=1e-4)


def _direct_multiplies(multiplier):
    """Multiplies per image of the direct model, from the architecture alone."""
    total, size, channels = 32 * 32 * 9 * 3 * 32, 32, 32
    for stage, base in enumerate((64, 128, 256, 512)):
        width = int(base * multiplier)
        if stage:
            size //= 2
        if stage or channels != width:
            total += size * size * channels * width  # shortcut
        total += size * size * 9 * (channels * width + 3 * width * width)
        channels = width
    return total + channels * 10


def test_layer_table_float():
    model = models.resnet18_like("flex", 4)
    table = models.layer_table(model)
    header = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert header == ["VarName", "Type", "Param Shape", "Input Shape", "Winograd", "Flex",
                      "bits", "Size(k)", "Size(%)", "Mults(M)"]
    rows = [line for line in table.splitlines() if line.startswith("|")][1:]
    assert len(rows) == 21
    assert rows[1].split("|")[1].strip() == "layer1.0.conv1"
    assert table.count("F(4x4,3x3)") == 16
    assert "Params shown in table size: 2792.800 K params" in table
    # The reference's total for ResNet18LikeF4 (flex transforms are trainable).
    assert "Total (trainable) size: 2798.858 K params" in table
    # Winograd F(4x4, 3x3) on maps divisible by 4: 36 / (16 * 9) of the direct multiplies.
    direct = _direct_multiplies(0.5)
    winograd_convs = direct - 32 * 32 * 27 * 32 - 256 * 10 - (16 * 16 * 32 * 64 + 8 * 8 * 64 * 128
                                                             + 4 * 4 * 128 * 256)
    expected = direct - winograd_convs + winograd_convs * 36 // (16 * 9)
    assert (f"Multiplies per image: {expected / 1e6:.2f} M "
            f"(direct convolution: {direct / 1e6:.2f} M") in table


def test_layer_table_normal_multiplies():
    table = models.layer_table(models.resnet18_like("normal", width_multiplier=0.25))
    direct = _direct_multiplies(0.25)
    assert f"Multiplies per image: {direct / 1e6:.2f} M (direct convolution: {direct / 1e6:.2f} M" \
        in table


def test_quantized_model_and_its_table():
    model = models.resnet18_like("static", 2, width_multiplier=1 / 16, bits=6, per_tap=True,
                                 warmup=True)
    assert model.name == "ResNet18LikeF2"
    winograd = [layer.layer for layer in model.layers
                if isinstance(getattr(layer, "layer", None), WinogradConv2D)]
    assert len(winograd) == 16
    assert all(layer.quantization == WinogradQuantization(bits=6, per_tap=True, warmup=True)
               for layer in winograd)
    table = models.layer_table(model)
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|")][1:]
    bits = {row[0]: row[6] for row in rows}
    # The stem and the classifier stay float, as the reference.
    assert bits.pop("conv1") == "FP" and bits.pop("linear") == "FP"
    assert len(bits) == 20 and set(bits.values()) == {"6"}  # 16 Winograd convs, 4 shortcuts
    shown = _kernel_total(models.resnet18_like("normal", width_multiplier=1 / 16))
    assert f"Params shown in table size: {shown / 1e3:.3f} K" in table
