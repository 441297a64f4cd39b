"""Mixed architectures: wa_tf.models.architecture, resnet18_like(architecture=...), per-layer bits,
and export, the integer files and the error report on a mixed model."""
import json
import os

import numpy as np
import pytest
import tf_keras

from wa_tf import models, quantization
from wa_tf.deploy import export, integer, integer_export
from wa_tf.evaluation import error_report
from wa_tf.layers import WinogradConv2D
from wa_tf.models import architecture as arch_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, INPUT = 0.125, (16, 16, 3)
NAMES = [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]


def _entry(conv, tile_size=None, bits=None):
    return {"conv": conv, "tile_size": tile_size, "bits": bits}


# Every mode and tile size, with 8, 16 and float layers, including a float
# block conv1 (layer4.0), whose shortcut then stays float too.
MIXED = dict(zip(NAMES, [
    _entry("normal", None, 8), _entry("static", 2, 8), _entry("flex", 4, 16), _entry("flex", 6),
    _entry("flex", 6, 8), _entry("normal"), _entry("static", 2, 16), _entry("flex", 4, 8),
    _entry("normal", None, 16), _entry("flex", 2), _entry("flex", 6, 16), _entry("static", 4, 8),
    _entry("flex", 4), _entry("normal", None, 8), _entry("static", 2, 8), _entry("flex", 4, 16),
]))
SHORTCUT_BITS = {"layer1.0.shortcut": 8, "layer2.0.shortcut": 8, "layer3.0.shortcut": 16,
                 "layer4.0.shortcut": None}
FLOAT_MIXED = {name: dict(entry, bits=None) for name, entry in MIXED.items()}
WINOGRAD_NAMES = [name for name in NAMES if MIXED[name]["conv"] != "normal"]


def _images(n=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *INPUT)).astype(np.float32)


def _mixed(architecture=MIXED, **kwargs):
    tf_keras.utils.set_random_seed(0)
    return models.resnet18_like(architecture=architecture, width_multiplier=WIDTH,
                                input_shape=INPUT, **kwargs)


@pytest.fixture(scope="module")
def qmodel():
    """The quantized mixed model with calibrated quantizer ranges."""
    model = _mixed()
    for seed in range(2):
        model(_images(8, seed), training=True)
    return model


def _layer_bits(model, name):
    """(kind, bits) of a layer read off the model: the quantizer config's bits, or None."""
    layer = model.get_layer(name) if name in [ly.name for ly in model.layers] else \
        model.get_layer("quant_" + name)
    inner = quantization.unwrap(layer)
    config = getattr(layer, "quantize_config", None)
    return inner, (None if config is None else config.num_bits)


# ----------------------------------------------------------------------------
# The file format


def test_searchable_layers_match_the_built_model():
    layers = models.searchable_layers(WIDTH, INPUT)
    assert [layer.name for layer in layers] == NAMES
    built = models.resnet18_like("normal", width_multiplier=WIDTH, input_shape=INPUT)
    for layer in layers:
        conv = built.get_layer(layer.name)
        assert (None, *layer.input_shape) == conv.input_shape
        assert layer.filters == conv.filters
        assert layer.stage == int(layer.name[5])
        assert layer.tile_sizes == ((2, 4) if layer.stage == 4 else (2, 4, 6))
    # Width 0.5 on CIFAR: 32 / 16 / 8 / 4 pixel maps, 32 -> 32 ... 256 channels.
    cifar = {layer.name: layer for layer in models.searchable_layers()}
    assert cifar["layer1.0.conv1"].input_shape == (32, 32, 32)
    assert cifar["layer3.0.conv1"].input_shape == (8, 8, 64)
    assert cifar["layer4.1.conv2"].input_shape == (4, 4, 256)
    assert cifar["layer4.1.conv2"].filters == 256


def test_uniform_architecture():
    f6 = models.uniform_architecture("flex", 6, 8)
    assert [f6[n].tile_size for n in NAMES] == [6] * 12 + [4] * 4
    assert all(f6[n].conv == "flex" and f6[n].bits == 8 for n in NAMES)
    normal = models.uniform_architecture("normal", 4)
    assert all(normal[n] == arch_lib.LayerChoice("normal", None, None) for n in NAMES)
    assert models.uniform_choice(f6) == ("flex", 6, 8)
    assert models.uniform_choice(MIXED) is None
    assert models.architecture_name(f6) == "ResNet18LikeF6"
    assert models.architecture_name(normal) == "ResNet18Like"
    assert models.architecture_name(models.uniform_architecture("static", 2)) == \
        "ResNet18LikeF2"
    assert models.architecture_name(MIXED) == "ResNet18LikeSearched"
    # Uniform conv and tile size but mixed bits is searched too.
    mixed_bits = dict(models.uniform_architecture("flex", 4, 8).to_dict())
    mixed_bits["layer2.0.conv1"] = _entry("flex", 4, 16)
    assert models.architecture_name(mixed_bits) == "ResNet18LikeSearched"


def test_json_round_trip(tmp_path):
    path = arch_lib.save_architecture(MIXED, str(tmp_path / "sub" / "arch.json"))
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == MIXED
    loaded = arch_lib.load_architecture(path, models.searchable_layers(WIDTH, INPUT))
    assert loaded.to_dict() == MIXED
    assert list(loaded) == NAMES
    assert loaded == arch_lib.load_architecture(MIXED) == arch_lib.load_architecture(loaded)
    assert loaded["layer1.1.conv1"] == arch_lib.LayerChoice("flex", 4, 16)
    # A normal layer's tile size may be omitted or given (ignored), bits omitted = float.
    short = dict(MIXED, **{"layer1.0.conv1": {"conv": "normal", "tile_size": 4},
                           "layer2.0.conv2": {"conv": "normal"}})
    assert arch_lib.load_architecture(short)["layer1.0.conv1"] == \
        arch_lib.LayerChoice("normal", None, None)


@pytest.mark.parametrize("name", ["example_mixed", "fastest_int8_avx2", "searched_int8_avx2"])
def test_shipped_architecture_files_are_valid(name):
    path = os.path.join(REPO, "configs", "architectures", f"{name}.json")
    example = arch_lib.load_architecture(path, models.searchable_layers())
    assert list(example) == NAMES
    assert models.architecture_name(example) == "ResNet18LikeSearched"


def _replace(name, entry):
    return dict(MIXED, **{name: entry})


@pytest.mark.parametrize("architecture,match", [
    (_replace("layer1.0.conv1", _entry("winograd", 4, 8)),
     r"layer1.0.conv1 conv must be one of normal, static, flex; got 'winograd'"),
    (_replace("layer1.0.conv1", _entry("flex", 3, 8)),
     r"layer1.0.conv1 tile_size must be one of 2, 4, 6; got 3"),
    (_replace("layer1.0.conv1", _entry("static", None, 8)),
     r"layer1.0.conv1 tile_size must be one of 2, 4, 6; got None"),
    (_replace("layer2.0.conv1", _entry("normal", 5)), r"layer2.0.conv1 tile_size .* got 5"),
    (_replace("layer1.0.conv1", _entry("flex", 4, 1)),
     r"layer1.0.conv1 bits must be null \(float\) or an integer from 2 to 16; got 1"),
    (_replace("layer1.0.conv1", _entry("flex", 4, 17)), r"layer1.0.conv1 bits .* got 17"),
    (_replace("layer1.0.conv1", _entry("flex", 4, "8")), r"layer1.0.conv1 bits .* got '8'"),
    (_replace("layer1.0.conv1", _entry("flex", 4, True)), r"layer1.0.conv1 bits .* got True"),
    (_replace("layer1.0.conv1", {"conv": "flex", "tile_size": 4, "bit": 8}),
     r"layer1.0.conv1 has unknown key 'bit'; allowed keys are conv, tile_size, bits"),
    (_replace("layer1.0.conv1", {"tile_size": 4}), r"layer1.0.conv1 has no 'conv'"),
    (_replace("layer1.0.conv1", "F4"), r"layer1.0.conv1 must be \{"),
    (_replace("layer4.1.conv2", _entry("flex", 6, 8)),
     r"layer4.1.conv2 tile_size 6 is not offered there \(its input is 2x2, stage 4\); "
     r"allowed: 2, 4"),
    (dict(MIXED, **{"layer5.0.conv1": _entry("normal")}), r"unknown layer 'layer5.0.conv1'"),
    ({n: e for n, e in MIXED.items() if n != "layer3.1.conv2"},
     r"no entry for layer 'layer3.1.conv2'"),
    ({}, "non-empty JSON object"),
    ([1, 2], "non-empty JSON object"),
])
def test_bad_architectures(architecture, match):
    with pytest.raises(ValueError, match=match) as info:
        _mixed(architecture)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    for path in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(ValueError, match=f"cannot read '{path}' as JSON"):
            arch_lib.load_architecture(str(path))


def test_architecture_excludes_uniform_arguments():
    with pytest.raises(ValueError, match="conv='flex' contradicts the architecture"):
        _mixed(conv="flex")
    with pytest.raises(ValueError, match="bits=8 contradicts the architecture"):
        _mixed(FLOAT_MIXED, bits=8)
    with pytest.raises(ValueError, match="tile_size=4 contradicts"):
        _mixed(models.uniform_architecture("flex", 6), tile_size=4)
    # The same values as a uniform architecture are accepted.
    model = _mixed(models.uniform_architecture("flex", 6), conv="flex", tile_size=6)
    assert model.name == "ResNet18LikeF6"


# ----------------------------------------------------------------------------
# Building


def test_float_mixed_model_equals_normal_model():
    """Winograd is exact in float: with the same kernels the outputs agree."""
    mixed = _mixed(FLOAT_MIXED)
    assert mixed.name == "ResNet18LikeSearched"
    assert not any(hasattr(layer, "quantize_config") for layer in mixed.layers)
    normal = models.resnet18_like("normal", width_multiplier=WIDTH, input_shape=INPUT)
    report = quantization.copy_weights(mixed, normal)
    assert not report["not_found"]
    x = _images()
    ref = normal(x, training=False).numpy()
    y = mixed(x, training=False).numpy()
    # Float32 round-off only (tests/test_layers.py allows F4 1e-4 of the maximum per layer).
    assert np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref))
    # And the mixed model really differs from a normal one when a kernel changes.
    layer = mixed.get_layer("layer2.0.conv1")
    layer.kernel.assign(layer.kernel * 2)
    assert np.max(np.abs(mixed(x, training=False).numpy() - ref)) > 1e-2 * np.max(np.abs(ref))


def test_mixed_model_layers_follow_the_file(qmodel):
    assert qmodel.name == "ResNet18LikeSearched"
    for name, entry in MIXED.items():
        inner, bits = _layer_bits(qmodel, name)
        assert bits == entry["bits"], name
        if entry["conv"] == "normal":
            assert isinstance(inner, tf_keras.layers.Conv2D), name
            assert not isinstance(inner, WinogradConv2D), name
        else:
            assert isinstance(inner, WinogradConv2D), name
            assert inner.tile_size == entry["tile_size"], name
            assert inner.flex == (entry["conv"] == "flex"), name
            quant = inner.quantization
            assert (quant.bits if quant else None) == entry["bits"], name
        # The input quantizer has the layer's own bits; a float layer has none.
        names = [layer.name for layer in qmodel.layers]
        if entry["bits"] is None:
            assert "quant_" + name + quantization.INPUT_QUANT_SUFFIX not in names
        else:
            wrapper = qmodel.get_layer("quant_" + name)
            assert quantization.input_quant_layer(wrapper).quantize_config.num_bits == \
                entry["bits"]
    for name, bits in SHORTCUT_BITS.items():
        assert _layer_bits(qmodel, name)[1] == bits, name
    for name in ("conv1", "linear"):  # stem and classifier stay float, as uniform models
        assert _layer_bits(qmodel, name)[1] is None


def test_layer_table_shows_each_layer(qmodel):
    rows = {}
    for line in models.layer_table(qmodel).splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 10 and cells[0] != "VarName":
            rows[cells[0]] = cells
    assert "arch: ResNet18LikeSearched" in models.layer_table(qmodel)
    for name, entry in MIXED.items():
        _, kind, _, _, winograd, flex, bits = rows[name][:7]
        assert bits == ("FP" if entry["bits"] is None else str(entry["bits"])), name
        if entry["conv"] == "normal":
            assert (kind, winograd, flex) == ("Conv2D", "-", "-"), name
        else:
            m = entry["tile_size"]
            assert (kind, winograd, flex) == ("WinogradConv2D", f"F({m}x{m},3x3)",
                                              str(entry["conv"] == "flex")), name
    assert rows["layer4.0.shortcut"][6] == "FP" and rows["layer3.0.shortcut"][6] == "16"


def test_uniform_architecture_builds_the_uniform_model():
    # Float: quantized layers follow the file as test_mixed_model_layers_follow_the_file checks.
    uniform = models.resnet18_like("flex", 6, width_multiplier=WIDTH, input_shape=INPUT)
    from_file = _mixed(models.uniform_architecture("flex", 6))
    assert from_file.name == uniform.name == "ResNet18LikeF6"
    assert models.layer_table(from_file) == models.layer_table(uniform)
    assert [layer.name for layer in from_file.layers] == [layer.name for layer in uniform.layers]


# ----------------------------------------------------------------------------
# Per-layer bits in quantize_model


def _small_model():
    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = WinogradConv2D(4, tile_size=2, name="wa")(x)
    x = tf_keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="fc")(x))


def test_quantize_model_layer_bits():
    qmodel = quantization.quantize_model(_small_model(), bits=8,
                                         layer_bits={"wa": 4, "conv": None, "fc": 16})
    bits = {quantization.unwrap(ly).name: ly.quantize_config.num_bits
            for ly in qmodel.layers if hasattr(ly, "quantize_config")}
    assert bits == {"wa_input_quant": 4, "wa": 4, "fc_input_quant": 16, "fc": 16}
    assert quantization.unwrap(qmodel.get_layer("quant_wa")).quantization.bits == 4
    # bits=None: only the named layers.
    qmodel = quantization.quantize_model(_small_model(), bits=None, layer_bits={"conv": 6})
    assert [ly.name for ly in qmodel.layers if hasattr(ly, "quantize_config")] == [
        "quant_conv_input_quant", "quant_conv"]
    assert quantization.unwrap(qmodel.get_layer("wa")).quantization is None


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 8, "layer_bits": {"nope": 8}}, "layer_bits names 'nope', which is not"),
    ({"bits": 8, "layer_bits": {"wa": 1}}, r"layer_bits\['wa'\] must be an integer from 2"),
    ({"bits": 8, "layer_bits": [("wa", 8)]}, "layer_bits must map layer names"),
    ({"bits": None, "layer_bits": {"wa": None}}, "nothing to quantize: bits is None"),
    ({"bits": None}, "nothing to quantize"),
])
def test_quantize_model_bad_layer_bits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantization.quantize_model(_small_model(), **kwargs)


# ----------------------------------------------------------------------------
# Export, integer files and the error report on the mixed model


def test_saved_model_round_trip(qmodel, tmp_path):
    path = export.export_saved_model(qmodel, str(tmp_path / "exported"))
    x = _images(3, seed=5)
    expected = qmodel.predict(x, verbose=0)
    np.testing.assert_allclose(export.load_serving(path)(x).numpy(), expected, atol=1e-5, rtol=0)


def test_integer_export_writes_the_quantized_winograd_layers(qmodel, tmp_path):
    paths = integer_export.export_model_npz(qmodel, str(tmp_path / "layers"))
    expected = [n for n in WINOGRAD_NAMES if MIXED[n]["bits"] is not None]
    assert sorted(paths) == sorted(expected)
    assert sorted(os.listdir(tmp_path / "layers")) == sorted(n + ".npz" for n in expected)
    x = _images(2, seed=7)
    for name in expected:
        layer = integer.load_layer_npz(paths[name])
        assert int(layer["tile_size"]) == MIXED[name]["tile_size"]
        assert int(layer["input_bits"]) == int(layer["output_bits"]) == MIXED[name]["bits"]
        if name not in ("layer1.1.conv1", "layer2.0.conv1"):  # F4 16 bits, F6 8 bits
            continue
        # The integer pipeline reproduces the layer as the model runs it.
        wrapper = qmodel.get_layer("quant_" + name)
        probe = tf_keras.Model(qmodel.inputs, [quantization.input_quant_layer(wrapper).input,
                                               wrapper.output])
        inputs, outputs = probe.predict(x, verbose=0)
        off = np.abs(integer.run_layer(layer, inputs) - outputs) > \
            float(layer["output_scale"]) * (1 + 1e-5)
        assert off.mean() < 1e-3, name


def test_error_report_rows(qmodel):
    rows = error_report.error_report(qmodel, _images(4, seed=3), batch_size=4)
    assert [row["layer"] for row in rows] == WINOGRAD_NAMES
    for row in rows:
        entry = MIXED[row["layer"]]
        assert row["bits"] == entry["bits"]
        assert row["tile_size"] == entry["tile_size"]
        assert row["flex"] == (entry["conv"] == "flex")
        if entry["bits"] is None:  # float Winograd layers are exact up to round-off
            assert row["rel_error"] < 1e-3, row
        else:
            assert row["rel_error"] > 1e-6, row
