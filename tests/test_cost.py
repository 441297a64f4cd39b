"""Tests of wa_tf.search.cost (analytic and table cost models), wa_tf.search.latency and
bin/latency_table.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from wa_tf import models
from wa_tf.deploy import litert
from wa_tf.search import cost, latency, latency_int8
from wa_tf.search.cost import AnalyticCost, Candidate, LayerSpec, TableCost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMAL, F2, F4, F6 = (Candidate.parse(n) for n in ("normal", "F2", "F4", "F6"))

# Lavin & Gray's F(4x4, 3x3) input and output transforms, as published.
LAVIN_F4_B_T = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])
LAVIN_F2_B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
LAVIN_F2_A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])


@pytest.fixture(scope="module")
def layers():
    return cost.searchable_layers(0.5)


def test_multiplies_hand_worked():
    layer = LayerSpec(16, 16, 64, 64)
    assert cost.operation_counts(layer, NORMAL).macs == 16 * 16 * 64 * 64 * 9
    # F2: 8 x 8 tiles of 4 x 4; F4: 4 x 4 tiles of 6 x 6; F6: 3 x 3 tiles of 8 x 8.
    assert cost.operation_counts(layer, F2).macs == 64 * 16 * 64 * 64
    assert cost.operation_counts(layer, F4).macs == 16 * 36 * 64 * 64
    assert cost.operation_counts(layer, F6).macs == 9 * 64 * 64 * 64
    macs = [cost.operation_counts(layer, c).macs for c in (F4, F2, NORMAL)]
    assert macs == sorted(macs) and len(set(macs)) == 3


def test_transform_ops_of_published_matrices():
    # F2: every row of B_t and A_t has 2 or 3 entries, all +-1: additions only.
    assert cost.transform_ops(LAVIN_F2_B_T) == {"adds": 4, "mults": 0}
    assert cost.transform_ops(LAVIN_F2_A_T) == {"adds": 4, "mults": 0}
    # F4: rows with 3, 4, 4, 4, 4, 3 nonzeros; 12 entries that are not +-1.
    assert cost.transform_ops(LAVIN_F4_B_T) == {"adds": 16, "mults": 12}


def test_f2_transform_counts_hand_worked():
    # 4 x 4 input, 3 channels in, 5 out: 2 x 2 tiles.  Per tile and channel the
    # input transform is 8 vectors x 4 additions = 32, the output one 6 x 4 = 24.
    counts = cost.operation_counts(LayerSpec(4, 4, 3, 5), F2)
    assert counts.tiles == 4
    assert counts.input_transform_ops == 4 * 3 * 32
    assert counts.output_transform_ops == 4 * 5 * 24
    assert counts.transform_ops == 4 * 3 * 32 + 4 * 5 * 24


def test_analytic_cost_hand_worked():
    layer = LayerSpec(2, 2, 1, 1)
    # F2, one tile: 16 MACs, 32 + 24 transform ops, elements: input 4, tiles 16,
    # V 16, U 16, product 16, output tile 4 = 72, x 4 bytes.
    assert AnalyticCost().cost(layer, F2) == 16 + 56 + 72 * 4
    # Normal: 2*2*9 MACs; input 4, patches 36, weights 9, output 4 = 53 elements.
    assert AnalyticCost().cost(layer, NORMAL) == 36 + 53 * 4
    # Batch 4: the weights' bytes are shared by 4 images.
    assert AnalyticCost(batch_size=4).cost(layer, F2) == 16 + 56 + (56 + 16 / 4) * 4
    # The weights' transform (G g G^T) is counted apart, never charged.
    assert cost.operation_counts(layer, F2).weight_transform_ops > 0
    assert AnalyticCost(op_weight=0, byte_weight=0).cost(layer, F2) == 16
    assert AnalyticCost(op_weight=2, byte_weight=0.5).cost(layer, F2) == 16 + 112 + 144


def test_analytic_ordering_and_transform_overhead():
    layer, model = LayerSpec(16, 16, 64, 64), AnalyticCost()
    costs = {c.name: model.cost(layer, c) for c in (NORMAL, F2, F4, F6)}
    assert costs["F4"] < costs["F2"] < costs["normal"]
    f4, f6 = model.breakdown(layer, F4), model.breakdown(layer, F6)
    # Same multiplies here (F6's tiles overhang 16 x 16), dearer transforms.
    assert f6["macs"] == f4["macs"] and f6["transforms"] > 1.5 * f4["transforms"]
    assert costs["F6"] > costs["F4"]
    # Tiles: F4 reads (6/4)^2 as many input elements as there are inputs; U is
    # 36/9 times the kernel.
    counts = cost.operation_counts(layer, F4)
    assert counts.activation_elements == (16 * 16 * 64 + 2 * 16 * 36 * 64 + 16 * 36 * 64
                                          + 16 * 16 * 64)
    assert counts.weight_elements == 4 * cost.operation_counts(layer, NORMAL).weight_elements


def test_weights_read_once_per_batch():
    layer = LayerSpec(4, 4, 256, 256)
    # U (36 x 256 x 256 FP32) dominates F4 at batch 1: it loses to the direct
    # convolution on the last stage; at batch 8 it is read once for 8 images.
    batch1, batch8 = AnalyticCost(batch_size=1), AnalyticCost(batch_size=8)
    assert batch1.cost(layer, F4) > batch1.cost(layer, NORMAL)
    assert batch8.cost(layer, F4) < batch8.cost(layer, NORMAL)
    saved = batch1.cost(layer, F4) - batch8.cost(layer, F4)
    assert saved == pytest.approx(36 * 256 * 256 * 4 * (1 - 1 / 8))


@pytest.mark.parametrize("candidate", [NORMAL, F2, F4, F6])
def test_bits_scaling(candidate):
    layer, model = LayerSpec(12, 12, 16, 32), AnalyticCost()
    fp32 = model.cost(layer, candidate)
    assert model.cost(layer, candidate.with_bits(8)) == pytest.approx(fp32 / 4)
    assert model.cost(layer, candidate.with_bits(16)) == pytest.approx(fp32 / 2)
    assert model.cost(layer, candidate.with_bits(4)) == pytest.approx(fp32 / 8)
    assert model.breakdown(layer, candidate.with_bits(8))["bytes"] == \
        cost.operation_counts(layer, candidate).elements


def test_candidates_parse_and_keys():
    assert Candidate.parse("F4", 8) == Candidate("winograd", 4, 8)
    assert Candidate.parse("F4/int8") == Candidate("winograd", 4, 8)
    assert Candidate.parse("normal").key == "normal"
    assert Candidate("winograd", 6, 16).key == "F6/int16"
    static = Candidate.from_choice({"conv": "static", "tile_size": 4, "bits": 8})
    flex = Candidate.from_choice({"conv": "flex", "tile_size": 4, "bits": 8})
    assert static == flex == Candidate("winograd", 4, 8)
    assert Candidate.from_choice({"conv": "normal", "tile_size": 6, "bits": None}) == NORMAL
    for bad in ("F", "winograd", "F4/int", "F4/fp16"):
        with pytest.raises(ValueError, match="unknown candidate"):
            Candidate.parse(bad)
    with pytest.raises(ValueError, match="bits"):
        Candidate.parse("F4", 17)
    with pytest.raises(ValueError, match="conv must be"):
        Candidate.from_choice({"conv": "winograd", "tile_size": 4})


def test_searchable_layers_and_allowed_candidates(layers):
    names = [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]
    assert [layer.name for layer in layers] == names
    by_name = {layer.name: layer for layer in layers}
    # The stem has 32 channels; stages 32/64/128/256 at width 0.5, pooled before stages 2-4.
    assert by_name["layer1.0.conv1"] == LayerSpec(32, 32, 32, 32, 3, "layer1.0.conv1")
    assert by_name["layer2.0.conv1"] == LayerSpec(16, 16, 32, 64, 3, "layer2.0.conv1")
    assert by_name["layer3.1.conv2"] == LayerSpec(8, 8, 128, 128, 3, "layer3.1.conv2")
    assert by_name["layer4.1.conv2"] == LayerSpec(4, 4, 256, 256, 3, "layer4.1.conv2")
    # F6 is offered exactly where the uniform F6 model keeps tile size 6.
    uniform_f6 = models.resnet18_like("flex", tile_size=6, width_multiplier=0.5)
    for layer in layers:
        names_allowed = [c.name for c in cost.allowed_candidates(layer)]
        keeps_f6 = uniform_f6.get_layer(layer.name).tile_size == 6
        assert names_allowed == (["normal", "F2", "F4", "F6"] if keeps_f6
                                 else ["normal", "F2", "F4"]), layer.name
        assert keeps_f6 == (not layer.name.startswith("layer4"))
    tiny = LayerSpec(3, 3, 8, 8)
    assert [c.key for c in cost.allowed_candidates(tiny, bits=(8,))] == ["normal/int8", "F2/int8"]


def test_model_cost(layers, tmp_path):
    model = AnalyticCost()
    normal = cost.uniform_architecture(layers, "normal")
    assert cost.model_cost(normal, layers, model) == pytest.approx(
        sum(model.cost(layer, NORMAL) for layer in layers))
    f6 = cost.uniform_architecture(layers, "flex", 6, bits=8)
    assert {v["tile_size"] for k, v in f6.items() if k.startswith("layer4")} == {4}
    assert {v["tile_size"] for k, v in f6.items() if not k.startswith("layer4")} == {6}
    static = cost.uniform_architecture(layers, "static", 4)
    flex = cost.uniform_architecture(layers, "flex", 4)
    assert cost.model_cost(static, layers) == cost.model_cost(flex, layers)
    assert cost.model_cost(flex, layers) < cost.model_cost(normal, layers)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(flex))
    assert cost.model_cost(str(path), layers) == cost.model_cost(flex, layers)
    bad = dict(flex, **{"layer4.0.conv1": {"conv": "flex", "tile_size": 6, "bits": None}})
    with pytest.raises(ValueError, match="layer4.0.conv1: F6 does not fit its 4x4 input"):
        cost.model_cost(bad, layers)
    missing = {k: v for k, v in flex.items() if k != "layer2.1.conv2"}
    with pytest.raises(ValueError, match="missing layer2.1.conv2"):
        cost.model_cost(missing, layers)


def _table(entries, **metadata):
    return {"format": "wa_tf.latency_table", "version": 1,
            "metadata": {"device": "test phone", "date": "2026-11-29", **metadata},
            "latency_ms": entries}


def test_table_round_trip_and_missing_entry(tmp_path):
    path = str(tmp_path / "phone.json")
    cost.write_table(_table({"1": {"layer1.0.conv1": {"normal": 2.5, "F4/int8": 0.75},
                                   "16x16x64-64-3x3": {"F2": 1.25}},
                             "4": {"layer1.0.conv1": {"normal": 8.0}}}), path)
    layer = LayerSpec(32, 32, 32, 32, name="layer1.0.conv1")
    table = TableCost(path)
    assert table.cost(layer, NORMAL) == 2.5
    assert table.cost(layer, Candidate.parse("F4", 8)) == 0.75
    # Looked up by shape when the name has no entry.
    assert table.cost(LayerSpec(16, 16, 64, 64, name="layer2.1.conv2"), F2) == 1.25
    assert TableCost(path, batch_size=4).cost(layer, NORMAL) == 8.0
    assert isinstance(cost.get_cost_model(path), TableCost)
    with pytest.raises(ValueError) as info:
        table.cost(layer, F6)
    message = str(info.value)
    assert path in message and "layer1.0.conv1" in message and "'F6'" in message
    assert "\n" not in message
    # No derivation of integer entries unless the table says so.
    with pytest.raises(ValueError, match="'F2/int8'"):
        table.cost(LayerSpec(16, 16, 64, 64), F2.with_bits(8))
    with pytest.raises(ValueError, match="batch size 2"):
        TableCost(path, batch_size=2)


def test_table_derives_bits_when_told(tmp_path):
    path = str(tmp_path / "measured.json")
    cost.write_table(_table({"1": {"layer1.0.conv1": {"F4": 2.0}}}, derive_bits="analytic"),
                     path)
    table, layer = TableCost(path), LayerSpec(32, 32, 32, 32, name="layer1.0.conv1")
    # The analytic model scales every term by bits/32.
    assert table.cost(layer, F4.with_bits(8)) == pytest.approx(0.5)
    assert table.cost(layer, F4.with_bits(16)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'F2/int8'"):
        table.cost(layer, F2.with_bits(8))


@pytest.mark.parametrize("mutate, problem", [
    (lambda t: t.pop("format"), '"format" must be'),
    (lambda t: t["metadata"].pop("device"), '"metadata.device"'),
    (lambda t: t["latency_ms"].update({"one": {}}), "batch sizes"),
    (lambda t: t["latency_ms"]["1"]["layer1.0.conv1"].update({"F3x": 1.0}), "unknown candidate"),
    (lambda t: t["latency_ms"]["1"]["layer1.0.conv1"].update({"F2": -1}), "positive number"),
    (lambda t: t["metadata"].update({"batch_sizes": [1, 8]}), "does not match"),
])
def test_table_validation(tmp_path, mutate, problem):
    table = _table({"1": {"layer1.0.conv1": {"normal": 1.0}}})
    mutate(table)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError) as info:
        TableCost(str(path))
    assert problem in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_get_cost_model(tmp_path, monkeypatch):
    assert isinstance(cost.get_cost_model("analytic"), AnalyticCost)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="latency_table.json does not exist"):
        cost.get_cost_model("measured")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        cost.get_cost_model("bad.json")
    with pytest.raises(ValueError, match="analytic, measured or"):
        cost.get_cost_model("fastest")


@pytest.mark.parametrize("layer, candidate", [
    (LayerSpec(8, 8, 4, 5), NORMAL), (LayerSpec(8, 8, 4, 5), F2),
    (LayerSpec(7, 9, 3, 6), F4), (LayerSpec(7, 7, 3, 2), F6), (LayerSpec(4, 4, 8, 8), F4)])
def test_deployed_layer_computes_the_convolution(layer, candidate):
    fn, x, kernel = latency.deployed_layer(layer, candidate, batch_size=2)
    expected = tf.nn.conv2d(x, kernel, 1, "SAME")
    np.testing.assert_allclose(fn(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    if candidate == F4:  # the same graph compiled by XLA
        fn, _, _ = latency.deployed_layer(layer, candidate, batch_size=2, jit_compile=True)
        np.testing.assert_allclose(fn(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
        times = latency.median_ms([fn, fn], x, repeats=2)
        assert len(times) == 2 and all(t > 0 for t in times)
    with pytest.raises(ValueError, match="FP32 only"):
        latency.deployed_layer(layer, candidate.with_bits(8), 1)


def _latency_table(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "latency_table.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_latency_table_binary(tmp_path):
    out = str(tmp_path / "table.json")
    proc = _latency_table("--mult=0.0625", "--repeats=1", "--batch_size=2",
                          "--candidates=normal,F6", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu: " in proc.stdout and f"written to {out}" in proc.stdout
    layers = cost.searchable_layers(0.0625)
    for batch in (1, 2):
        table = TableCost(out, batch_size=batch)
        for layer in layers:
            assert table.cost(layer, NORMAL) > 0
            if layer.name.startswith("layer4"):
                with pytest.raises(ValueError, match="no entry"):
                    table.cost(layer, F6)
            else:
                assert table.cost(layer, F6) > 0
        with pytest.raises(ValueError, match="'F2'"):
            table.cost(layers[0], F2)
    metadata = json.load(open(out, encoding="utf-8"))["metadata"]
    assert metadata["batch_sizes"] == [1, 2] and metadata["derive_bits"] == "analytic"
    assert "all normal batch 1:" in proc.stdout and "all F6" in proc.stdout


@pytest.mark.parametrize("flag, message", [
    ("--repeats=0", "--repeats must be a positive integer"),
    ("--candidates=normal,F3", "--candidates must be distinct names"),
    ("--mult=2", "--mult must be in (0, 1]"),
    ("--output=/nonexistent/t.json", "--output: folder /nonexistent does not exist"),
    ("--batch_size=x", "batch_size"),
])
def test_latency_table_bad_flags(flag, message):
    proc = _latency_table(flag)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert not any(line.startswith("error") for line in lines[:-1])


def test_int8_latency_table_binary(tmp_path):
    pytest.importorskip("ai_edge_litert")
    out = str(tmp_path / "int8.json")
    proc = _latency_table("--precision=int8", "--mult=0.0625", "--repeats=2", "--batch_size=1",
                          "--candidates=normal,F4", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = TableCost(out, batch_size=1)
    for layer in cost.searchable_layers(0.0625):
        assert table.cost(layer, NORMAL) > 0 and table.cost(layer, F4) > 0
    metadata = json.load(open(out, encoding="utf-8"))["metadata"]
    assert metadata["precision"] == "int8" and "native Winograd" in metadata["device"]


def test_litert_int8_convolution_computes_the_convolution():
    pytest.importorskip("ai_edge_litert")
    blob = latency_int8.litert_conv_int8(6, 5, 4, 3, batch_size=2)
    runner = litert.interpreter(blob)
    x = np.random.default_rng(1).integers(-128, 128, (2, 6, 5, 4)).astype(np.int8)
    runner.set_tensor(runner.get_input_details()[0]["index"], x)
    runner.invoke()
    got = runner.get_tensor(runner.get_output_details()[0]["index"]).astype(np.int64)
    details = runner.get_tensor_details()
    w = next(d for d in details if d["name"] == "w")
    codes = runner.get_tensor(w["index"]).astype(np.float64)  # (K, r, r, C)
    scales = w["quantization_parameters"]["scales"]
    x_f = x * (2.0 / 255)
    expected = tf.nn.conv2d(x_f, np.transpose(codes * scales[:, None, None, None],
                                              (1, 2, 3, 0)), 1, "SAME").numpy()
    assert np.abs(got - np.clip(np.rint(expected / (4.0 / 255)), -128, 127)).max() <= 1
