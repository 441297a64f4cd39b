"""A Winograd-aware layer lowered to LiteRT builtins against the integer reference, stage by stage.

Each stage of the lowered layer (V, M, the output codes) is read from the
interpreter and compared with wa_tf.integer's stage fed with the *lowered*
previous stage, so that every stage is held to its own tolerance.
"""
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from test_integer import _layer_io, _quantized_model

from wa_tf.deploy import integer, integer_export, litert_winograd
from wa_tf.deploy.litert_winograd import int8_rows
from wa_tf.deploy.tflite_graph import Graph


def _lowered(layer, x_codes, wide=False):
    """Runs the lowered layer; returns {stage: codes} read from the interpreter."""
    g = Graph()
    x = g.tensor("x", x_codes.shape, "int8", float(layer["input_scale"]), 0)
    y, _ = litert_winograd.lower_int8(g, x, layer, "wa", wide=wide)
    runner = Interpreter(model_content=g.finish([x], [y]), num_threads=2,
                         experimental_preserve_all_tensors=True)
    runner.allocate_tensors()
    runner.set_tensor(runner.get_input_details()[0]["index"], x_codes.astype(np.int8))
    runner.invoke()
    tensors = {d["name"]: d["index"] for d in runner.get_tensor_details()}
    return {name: runner.get_tensor(tensors[f"wa/{name}"]).astype(np.int64)
            for name in ("v", "hadamard")} | {
        "y": runner.get_tensor(runner.get_output_details()[0]["index"]).astype(np.int64)}


def _as_stage(codes, v_shape):
    """A lowered (N, n_h, n_w, t*t*ch) tensor, tap-major, as the reference's (t, t, N, ...)."""
    t, _, n, n_h, n_w, _ = v_shape
    return np.transpose(codes.reshape(n, n_h, n_w, t, t, -1), (3, 4, 0, 1, 2, 5))


def _check_within_one_code(codes, reference, tile_size, wide):
    """Within one code but where a partial sum saturated: with int8 parts measured at most
    1.2% (F2, F4) and 2.1% (static F6, whose output transform cancels most) of the codes;
    1.5% and 3% allowed.  Parts summed in int16 (1/256 of a code) also equal the reference
    but within 1/256 of a code of a rounding tie: at most 5% of the codes differ at all."""
    off = np.abs(codes - reference) > 1
    allowed = 0.03 if tile_size == 6 else 0.015
    assert np.mean(off) <= allowed, f"{np.mean(off):.4f} of the codes are off by more than one"
    if wide:
        assert np.mean(codes != reference) <= 0.05


_CASES = [pytest.param(tile, padding, flex, per_tap, False,
                      id=f"{tile}-{padding}-{'flex' if flex else 'static'}-"
                         f"{'per_tap' if per_tap else 'per_tensor'}-int8")
          for tile in (2, 4, 6) for padding in ("same", "valid") for flex in (False, True)
          for per_tap in (False, True)]
# int16 sums (LiteRT's slower 16x8 operators): every tile size and transform kind, per tap.
_CASES += [pytest.param(tile, "same", flex, True, True,
                        id=f"{tile}-same-{'flex' if flex else 'static'}-per_tap-int16_sums")
           for tile in (2, 4, 6) for flex in (False, True)]


@pytest.mark.parametrize("tile_size,padding,flex,per_tap,wide", _CASES)
def test_each_stage_matches_the_integer_reference(tile_size, padding, flex, per_tap, wide):
    model, wrapper = _quantized_model(tile_size, flex, per_tap, padding)
    layer = integer.as_layer(integer_export.layer_arrays(wrapper))
    rng = np.random.default_rng(tile_size)
    for batch in (1, 7):  # 9x9 inputs, 3 -> 5 -> 6 channels: partial tiles, odd sizes
        x, _ = _layer_io(model, wrapper, rng.normal(size=(batch, 9, 9, 3)).astype(np.float32))
        x_codes = integer.quantize(x, layer["input_scale"], layer["input_bits"])
        lowered = _lowered(layer, x_codes, wide)
        v_ref, out_size = integer.input_transform(layer, x_codes)
        v = _as_stage(lowered["v"], v_ref.shape)
        # Input transform: products of two transform codes do not fit int8, so they are
        # summed in two int8 parts, each requantised once: within one code, except where a
        # part saturates (the reference clips only the exact sum).
        _check_within_one_code(v, v_ref, tile_size, wide)
        # Element-wise stage on the lowered V: the trained U codes exactly, one requantisation
        # (LiteRT rounds ties away from zero, the reference to even).
        m_ref = integer.hadamard(layer, v)
        mm = _as_stage(lowered["hadamard"], m_ref.shape)
        assert np.abs(mm - m_ref).max() <= 1 and np.mean(mm != m_ref) < 1e-3
        # Output transform on the lowered M: parts again.
        y_ref = integer.output_transform(layer, mm, out_size)
        assert lowered["y"].shape == y_ref.shape
        _check_within_one_code(lowered["y"], y_ref, tile_size, wide)
        if tile_size == 2 and not flex and not per_tap:  # every transform weight fits int8
            end_to_end, _ = integer.run_layer_codes(layer, x)
            np.testing.assert_array_equal(lowered["y"], end_to_end)


def test_int8_rows_writes_products_of_two_codes_exactly_in_two_parts():
    rows = np.array([[16129, -16129, 0], [26 * 26, 26 * 51, 102 * 102], [0, 0, 0],
                     [16384, -128 * 127, 1]])
    parts = int8_rows(rows)
    assert all(codes.dtype == np.int8 for codes, _ in parts)
    total = sum(codes.astype(np.int64) * step[:, None] for codes, step in parts)
    np.testing.assert_array_equal(total, rows)
    assert len(parts) == 2
    # The second part is the small remainder of an integer step of ceil(peak / 127).
    codes, step = parts[1]
    assert np.all(np.abs(codes.astype(np.int64) * step[:, None]) <= np.ceil(16384 / 127) / 2)
    assert len(int8_rows(np.array([[3, -6, 9]]))) == 1  # 3 * (1, -2, 3)


def test_int8_rows_approximates_real_rows_greedily():
    rows = np.array([[0.3, 1.7, np.pi], [1e-3, 0.0, -2.0]])
    for max_parts in (1, 2, 3):
        parts = int8_rows(rows, max_parts)
        total = sum(codes * step[:, None] for codes, step in parts)
        # Each part leaves at most half of its step: 1/254 of the previous remainder.
        bound = np.abs(rows).max(axis=1) / 254.0 ** max_parts
        assert np.all(np.abs(total - rows).max(axis=1) <= bound + 1e-15)


def test_a_layer_over_8_bits_is_refused():
    model, wrapper = _quantized_model(4, True, False)
    layer = integer.as_layer(integer_export.layer_arrays(wrapper))
    layer["hadamard_bits"] = 12
    with pytest.raises(ValueError, match="at most 8 bits"):
        litert_winograd.lower_int8(Graph(), 0, layer, "wa")
