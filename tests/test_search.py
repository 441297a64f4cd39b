"""Tests of wiNAS (wa_tf.search, bin/search.py) on tiny data.

The candidates of a MixedConv2D are checked against independent references
(tf.nn.conv2d, a WinogradConv2D with the same kernel and transforms, the
Winograd pipeline with max-abs fake quantization), the supernet against
resnet18_like with the same weights, and the binary end to end on digits.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from wa_tf import models, search
from wa_tf.layers import WinogradConv2D, winograd_conv
from wa_tf.quantization import copy_weights
from wa_tf.quantization.quantizers import fake_quant
from wa_tf.search import cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=digits", "--mult=0.125", "--batch_size=16", "--steps_per_epoch=3"]


def _mixed(candidates, channels=4, filters=5, size=8):
    layer = search.MixedConv2D(filters, [cost.Candidate.parse(c) for c in candidates],
                               name="mixed")
    layer.build((None, size, size, channels))
    rng = np.random.RandomState(0)
    x = tf.constant(rng.randn(2, size, size, channels), tf.float32)
    return layer, x, rng


def _max_abs_quant(x, bits=8):
    return fake_quant(x, tf.reduce_max(tf.abs(x)), bits)


def test_fp_candidates_equal_standalone_layers():
    layer, x, rng = _mixed(["normal", "F2", "F4"])
    # Transforms away from Cook-Toom, so that a candidate using another's would show.
    for transforms in layer.transforms[1:]:
        for var in transforms.values():
            var.assign(var + 0.05 * rng.randn(*var.shape))
    expected_normal = tf.nn.conv2d(x, layer.kernel, 1, "SAME")
    for index, m in ((1, 2), (2, 4)):
        ref = WinogradConv2D(5, 3, tile_size=m, flex=True)
        ref.build(x.shape)
        ref.kernel.assign(layer.kernel)
        for name in ("A_t", "B_t", "G"):
            getattr(ref, name).assign(layer.transforms[index][name])
        layer.path.assign([index, -1])
        np.testing.assert_allclose(layer(x), ref(x), rtol=1e-5, atol=1e-5)
        assert not np.allclose(layer(x), expected_normal, atol=1e-3)
    layer.path.assign([0, -1])
    np.testing.assert_allclose(layer(x), expected_normal, rtol=1e-5, atol=1e-5)


def test_quantized_candidates_equal_max_abs_reference():
    # On the first training batch an EMA quantizer's range is the batch's max |x|.
    layer, x, _ = _mixed(["normal/int8", "F4/int8"])
    kernel = tf.convert_to_tensor(layer.kernel)
    xq, kq = _max_abs_quant(x), _max_abs_quant(kernel)
    layer.path.assign([0, -1])
    np.testing.assert_allclose(layer(x, training=True),
                               _max_abs_quant(tf.nn.conv2d(xq, kq, 1, "SAME")), atol=1e-6)
    a_t, b_t, g = (_max_abs_quant(tf.convert_to_tensor(layer.transforms[1][n]))
                   for n in ("A_t", "B_t", "G"))
    expected = _max_abs_quant(winograd_conv(xq, kq, a_t, b_t, g, 4, "same",
                                            lambda stage, t: _max_abs_quant(t)))
    layer.path.assign([1, -1])
    np.testing.assert_allclose(layer(x, training=True), expected, atol=1e-6)
    # Not the float result: 8-bit rounding is visible.
    assert not np.allclose(expected, tf.nn.conv2d(x, kernel, 1, "SAME"), atol=1e-4)


def test_two_paths_value_and_logit_gradient():
    layer, x, rng = _mixed(["normal", "F2", "F4"])
    layer.alpha.assign([0.3, -0.2, 0.7])
    y = [layer.candidate_output(i, x) for i in range(3)]
    w = tf.constant(rng.randn(*y[0].shape), tf.float32)
    a, b = 2, 0
    layer.path.assign([a, b])
    with tf.GradientTape() as tape, search.two_paths([layer]):
        out = layer(x)
        loss = tf.reduce_sum(out * w)
    grad = tape.gradient(loss, layer.alpha).numpy()
    np.testing.assert_allclose(out, y[a], rtol=1e-6, atol=1e-6)
    # Binary gates g = onehot(a) + q - stop(q), q = softmax(alpha_a, alpha_b):
    # dL/dalpha_a = q_a q_b (<w, y_a> - <w, y_b>) = -dL/dalpha_b; 0 elsewhere.
    q_a = 1 / (1 + np.exp(0.3 - 0.7))
    g_a, g_b = float(tf.reduce_sum(w * y[a])), float(tf.reduce_sum(w * y[b]))
    expected = q_a * (1 - q_a) * (g_a - g_b)
    np.testing.assert_allclose(grad, [-expected, 0.0, expected], rtol=1e-4, atol=1e-5)
    # Outside two_paths the same path runs path[0] alone: no logit gradient.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) * w)
    assert tape.gradient(loss, layer.alpha) is None


def test_supernet_equals_resnet18_like_with_its_choice():
    layers = cost.searchable_layers(0.125)
    space = search.search_space(layers, ["normal", "F2", "F4", "F6"], [None])
    supernet = search.build_supernet(space, 0.125)
    # F6 is offered where its tile fits: not on the last stage's 4x4 maps.
    assert [c.key for c in space["layer4.1.conv2"]] == ["normal", "F2", "F4"]
    assert [c.key for c in space["layer1.0.conv1"]] == ["normal", "F2", "F4", "F6"]
    x = tf.constant(np.random.RandomState(1).randn(2, 32, 32, 3), tf.float32)
    for conv, tile in (("normal", 4), ("flex", 2)):
        reference = models.resnet18_like(conv, tile, width_multiplier=0.125)
        copied = copy_weights(supernet, reference)
        assert "layer1.0.conv1/kernel" in copied["copied"]
        wanted = "normal" if conv == "normal" else f"F{tile}"
        choice = {layer.name: [c.name for c in layer.candidates].index(wanted)
                  for layer in search.mixed_layers(supernet)}
        search.select(supernet, choice)
        np.testing.assert_allclose(supernet(x), reference(x), rtol=1e-4, atol=1e-4)
    # The derived architecture is the argmax, in the architecture file format.
    supernet.get_layer("layer2.0.conv1").alpha.assign([0.0, 0.0, 1.0, 0.0])
    architecture = search.derive_architecture(supernet)
    assert architecture["layer2.0.conv1"] == {"conv": "flex", "tile_size": 4, "bits": None}
    assert architecture["layer1.0.conv1"] == {"conv": "normal", "tile_size": None, "bits": None}
    assert sorted(architecture) == sorted(layer.name for layer in layers)


def test_expected_cost_and_penalty():
    layer, _, _ = _mixed(["normal", "F2"])
    layer.alpha.assign([np.log(3.0), 0.0])  # p = (0.75, 0.25)
    value = search.expected_cost([layer], {"mixed": [8.0, 4.0]})
    np.testing.assert_allclose(value, 7.0, rtol=1e-6)
    np.testing.assert_allclose(search.latency_penalty(0.5, 2.0), 1.0)
    np.testing.assert_allclose(search.latency_penalty(0.5, 2.0, target=0.4), 0.5)
    np.testing.assert_allclose(search.latency_penalty(0.3, 2.0, target=0.4), 0.0)


def _search(*args, check=True, wait=True):
    command = [sys.executable, os.path.join(ROOT, "bin", "search.py"), *args]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _runs(out_dir):
    parent = os.path.join(out_dir, search.SEARCH_DIR)
    return sorted(os.path.join(parent, d) for d in os.listdir(parent))


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _cheapest_everywhere(architecture, names, bits):
    """Whether every layer's choice is its cheapest allowed candidate (analytic, batch 1)."""
    model = cost.AnalyticCost()
    for layer in cost.searchable_layers(0.125):
        chosen = model.cost(layer, cost.Candidate.from_choice(architecture[layer.name]))
        cheapest = min(model.cost(layer, c) for c in cost.allowed_candidates(layer, names, bits))
        if chosen != cheapest:
            return False
    return True


@pytest.mark.slow  # end to end, over a minute on 2 cores
def test_cli_search_end_to_end_huge_latency_weight(tmp_path):
    # At width 0.125 and FP32, F4 is cheaper than normal except on the last stage.
    names = ["normal", "F4"]
    _search(*TINY, "--epochs=2", f"--outDir={tmp_path}", f"--candidates={','.join(names)}",
            "--bits_candidates=FP", "--latency_weight=1000", "--arch_lr=0.1")
    (run_dir,) = _runs(tmp_path)
    for name in ("architecture.json", "search.json", "report.txt", "FLAGS.txt"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "logs"))
    state = _read(os.path.join(run_dir, "search.json"))
    assert state["status"] == "finished"
    assert [e["epoch"] for e in state["history"]] == [0, 1, 2]
    architecture = _read(os.path.join(run_dir, "architecture.json"))
    assert _cheapest_everywhere(architecture, names, [None])
    assert {c["conv"] for c in architecture.values()} == {"normal", "flex"}
    # The expected cost fell from the uniform mixture's.
    assert state["history"][-1]["expected_cost"] < state["history"][0]["expected_cost"]
    assert abs(state["architecture_cost"] - cost.model_cost(
        architecture, cost.searchable_layers(0.125))) < 1e-6 * state["architecture_cost"]
    report = open(os.path.join(run_dir, "report.txt"), encoding="utf-8").read()
    assert "layer4.1.conv2" in report and "All-normal at FP32" in report
    for layer, probs in state["history"][0]["probabilities"].items():
        assert abs(sum(probs.values()) - 1) < 1e-5 and len(set(probs.values())) == 1, layer
    # The searched architecture is what bin/train.py --architecture builds and trains.
    train = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "train.py"),
         f"--architecture={os.path.join(run_dir, 'architecture.json')}", "--dataset=digits",
         "--mult=0.125", "--epochs=1", "--steps_per_epoch=1", f"--outDir={tmp_path / 'train'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "arch: ResNet18LikeSearched" in train.stdout
    for name, choice in architecture.items():
        if choice["conv"] != "normal":
            assert re.search(rf"\|\s*{re.escape(name)}\s*\|\s*WinogradConv2D\s*\|",
                             train.stdout), name


@pytest.mark.slow
def test_cli_latency_weight_orders_costs(tmp_path):
    names = "normal,F2,F4"
    common = [*TINY, "--epochs=3", f"--candidates={names}", "--bits_candidates=8",
              "--arch_lr=0.1"]
    _search(*common, "--latency_weight=0", f"--outDir={tmp_path / 'free'}")
    _search(*common, "--latency_weight=1000", f"--outDir={tmp_path / 'heavy'}")
    (free,) = _runs(tmp_path / "free")
    (heavy,) = _runs(tmp_path / "heavy")
    free_cost = _read(os.path.join(free, "search.json"))["architecture_cost"]
    heavy_cost = _read(os.path.join(heavy, "search.json"))["architecture_cost"]
    assert heavy_cost <= free_cost
    assert _cheapest_everywhere(_read(os.path.join(heavy, "architecture.json")),
                                names.split(","), [8])


@pytest.mark.slow
def test_cli_resumes_after_a_kill(tmp_path):
    common = [*TINY, "--epochs=3", "--candidates=normal,F2,F4", "--bits_candidates=8"]
    # Killed after its first epoch, the run resumes in its folder from the last checkpoint.
    out = tmp_path / "killed"
    proc = _search(*common, "--latency_weight=0", f"--outDir={out}", wait=False)
    deadline = time.time() + 1200
    while time.time() < deadline:
        runs = _runs(out) if os.path.isdir(out / search.SEARCH_DIR) else []
        if runs and os.path.isfile(os.path.join(runs[0], "checkpoints", "checkpoint")):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _read(os.path.join(runs[0], "search.json"))
    assert before["status"] == "running"
    done = int(open(os.path.join(runs[0], "checkpoints", "checkpoint")).read().split('"')[1]
               .rsplit("-", 1)[1])  # the CheckpointManager's save counter: epochs done
    resumed = _search(*common, "--latency_weight=0", f"--outDir={out}")
    assert f"Resuming {runs[0]} at epoch {done}" in resumed.stdout
    assert _runs(out) == runs
    final = _read(os.path.join(runs[0], "search.json"))
    assert final["status"] == "finished"
    assert [e["epoch"] for e in final["history"]] == [0, 1, 2, 3]
    # The epochs finished before the kill are kept as they were.
    assert final["history"][:done + 1] == before["history"][:done + 1]
    assert os.path.isfile(os.path.join(runs[0], "architecture.json"))


@pytest.mark.parametrize("args, message", [
    (["--candidates=normal,F3"], "--candidates"),
    (["--bits_candidates=8,x"], "--bits_candidates"),
    (["--latency_weight=-1"], "--latency_weight"),
    (["--cost_model=nothere"], "--cost_model"),
])
def test_cli_bad_flags_one_line(tmp_path, args, message):
    proc = _search("--dataset=digits", "--mult=0.125", f"--outDir={tmp_path}", *args,
                   check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_warm_start_from_a_normal_run(tmp_path):
    train = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "train.py"), "--use_normal_conv",
         "--dataset=digits", "--mult=0.125", "--steps_per_epoch=2", "--epochs=1",
         "--batch_size=16", f"--outDir={tmp_path / 'normal'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    (model_dir,) = [root for root, _, files in os.walk(tmp_path / "normal")
                    if "FLAGS.txt" in files]
    _search(*TINY, "--epochs=1", "--candidates=normal,F2", "--bits_candidates=FP",
            f"--modelDir={model_dir}", f"--outDir={tmp_path / 'search'}")
    (run_dir,) = _runs(tmp_path / "search")
    warm = _read(os.path.join(run_dir, "search.json"))["warm_start"]
    # Every shared weight (kernels, BatchNorms, stem, shortcuts, classifier) came from it.
    assert warm["copied"] >= 16 + 1 + 1 and warm["not_found"] == []


@pytest.mark.parametrize("kwargs, field", [
    ({"bits_candidates": (1,)}, "bits_candidates"),
    ({"bits_candidates": ()}, "bits_candidates"),
    ({"candidates": ("normal", "normal")}, "candidates"),
    ({"target_latency": 0.0}, "target_latency"),
    ({"epochs": 0}, "epochs"),
    ({"arch_lr": 0.0}, "arch_lr"),
    ({"arch_fraction": 1.0}, "arch_fraction"),
    ({"mult": 0.0}, "mult"),
    ({"dataset": "mnist"}, "dataset"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        search.SearchConfig(**kwargs)
    assert search.parse_bits("8, FP,16") == (8, None, 16)
    with pytest.raises(ValueError, match="^bits_candidates"):
        search.parse_bits("8,x")


def test_pareto_front_hand_example():
    # (cost, accuracy): b beats a (cheaper, as accurate); d beats c; e is the cheapest.
    points = [(1.0, 0.70), (0.8, 0.70), (0.6, 0.60), (0.5, 0.65), (0.3, 0.40), (0.9, 0.72)]
    assert search.pareto_front(points) == [4, 3, 1, 5]
    assert search.pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]
    assert search.pareto_front([]) == []


def _search_bench(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "search_bench.py"),
                           f"--results_dir={tmp_path}", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_search_bench_dry_run_lists_the_plan(tmp_path):
    proc = _search_bench(tmp_path, "--dry_run", "--uniform_rows=normal_int8,flex_f4_int8",
                         "--searches=a:0.5:8,b:2:4/8:0.4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "normal_int8: " in out and "train.py" in out
    assert "--latency_weight=0.5" in out and "--bits_candidates=8 " in out
    assert "--bits_candidates=4,8" in out and "--target_latency=0.4" in out
    # The searched rows adapt from the normal row with the architecture the search writes.
    assert f"--architecture={tmp_path}/architectures/b.json" in out
    with open(tmp_path / "search_bench_sweep.json", encoding="utf-8") as f:
        rows = [r["name"] for r in json.load(f)["rows"]]
    assert rows == ["normal_int8", "flex_f4_int8", "searched_a", "searched_b"]


@pytest.mark.parametrize("flag, message", [
    ("--searches=a:0.5", "is not name:latency_weight:bits"),
    ("--searches=a:0.5:8,a:1:8", "is not name:latency_weight:bits"),
    ("--uniform_rows=nope", "nope not in"),
])
def test_search_bench_bad_flags(tmp_path, flag, message):
    proc = _search_bench(tmp_path, "--dry_run", flag)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("error:"), proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
