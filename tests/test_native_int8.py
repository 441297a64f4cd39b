"""The native INT8 Winograd kernel: bit-exact with the integer reference on every ISA path."""

import numpy as np
import pytest
from int8_layers import reference_codes

from wa_tf.deploy import integer, native
from wa_tf.kernels import winograd_int8

try:
    winograd_int8.build()
    _UNAVAILABLE = None
except RuntimeError as error:  # no compiler: nothing to test
    _UNAVAILABLE = str(error)
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"{_UNAVAILABLE}")


def _isas():
    isas = ["scalar"]
    try:
        native.winograd_layer(native.synthetic_layer(2, c=1, k=1), isa="avx2")
        isas.append("avx2")
    except ValueError:
        pass
    return isas


ISAS = _isas()


def _codes(rng, shape):
    return rng.integers(-128, 128, shape).astype(np.int8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tile_size", [2, 4, 6])
@pytest.mark.parametrize("flex", [False, True], ids=["static", "flex"])
@pytest.mark.parametrize("per_tap", [False, True], ids=["per_tensor", "per_tap"])
def test_bit_exact_with_the_reference(isa, tile_size, flex, per_tap):
    rng = np.random.default_rng(tile_size * 4 + flex * 2 + per_tap)
    # Odd sizes and channel counts off the vector widths; batch 1 and 7.
    for c, k, batch, hw, padding, bias in ((5, 19, 7, (11, 13), "same", False),
                                           (16, 32, 1, (9, 8), "valid", True)):
        layer = native.synthetic_layer(tile_size, c=c, k=k, flex=flex, per_tap=per_tap,
                                       padding=padding, bias=bias, seed=c)
        x = _codes(rng, (batch, *hw, c))
        expected = reference_codes(layer, x)
        got = native.winograd_layer(layer, isa=isa)(x)
        assert got.dtype == np.int8 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        # The check has teeth: outputs spread over the code range, few clipped.
        assert np.mean(np.abs(expected) >= 127) < 0.3 and np.std(expected) > 5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_threads_give_the_same_codes(isa, threads):
    layer = native.synthetic_layer(4, c=24, k=40, flex=True, per_tap=True, bias=True)
    x = _codes(np.random.default_rng(threads), (3, 17, 15, 24))  # 3 blocks of tiles and more
    np.testing.assert_array_equal(native.winograd_layer(layer, isa=isa)(x, threads=threads),
                                  reference_codes(layer, x))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("relu", [False, True], ids=["affine", "affine_relu"])
def test_a_fused_epilogue_is_bit_exact(isa, relu):
    # A batch norm (and ReLU) on the output codes: y * scale + offset, rounded once more.
    layer = native.synthetic_layer(4, c=12, k=21, flex=True, per_tap=True, bias=True)
    rng = np.random.default_rng(relu)
    # Halves and quarters make exact ties (y * 0.5 + 0.25 ...): they round half to even.
    scale = np.where(np.arange(21) % 3 == 0, 0.5, rng.uniform(-1.5, 1.5, 21))
    offset = np.where(np.arange(21) % 3 == 0, 0.0, rng.uniform(-20, 20, 21))
    layer.update(epilogue_scale=scale, epilogue_offset=offset,
                 epilogue_range=np.array([0 if relu else -128, 127], np.int32),
                 epilogue_output_scale=np.float32(0.05))
    x = _codes(rng, (3, 13, 11, 12))
    kernel = native.winograd_layer(layer, isa=isa)
    expected = reference_codes(layer, x)
    got = kernel(x, threads=2)
    np.testing.assert_array_equal(got, expected)
    assert kernel.output_scale == np.float32(0.05)
    # Not the plain layer's codes, and ReLU's floor is there.
    plain = reference_codes({k: v for k, v in layer.items() if not k.startswith("epilogue")}, x)
    assert np.mean(got != plain) > 0.5
    assert (got.min() == 0) if relu else (got.min() < 0)


def test_a_bad_epilogue_range_is_one_clear_error():
    layer = native.synthetic_layer(2, c=4, k=4)
    layer.update(epilogue_scale=np.ones(4), epilogue_offset=np.zeros(4),
                 epilogue_range=np.array([0, 200], np.int32),
                 epilogue_output_scale=np.float32(1.0))
    with pytest.raises(ValueError, match=r"epilogue range must lie in \[-128, 127\]"):
        native.winograd_layer(layer)
    layer.update(epilogue_range=np.array([0, 127], np.int32), epilogue_scale=np.ones(3))
    with pytest.raises(ValueError, match=r"epilogue scale and offset must have shape \(4,\)"):
        native.winograd_layer(layer)


@pytest.mark.parametrize("kernel_size,tile_size", [(5, 2), (5, 4), (1, 4), (7, 2)])
def test_other_kernel_sizes(kernel_size, tile_size):
    layer = native.synthetic_layer(tile_size, c=9, k=17, per_tap=True, kernel_size=kernel_size)
    x = _codes(np.random.default_rng(kernel_size), (2, 10, 12, 9))
    for isa in ISAS:
        np.testing.assert_array_equal(native.winograd_layer(layer, isa=isa)(x),
                                      reference_codes(layer, x))


@pytest.mark.parametrize("past_edge", [False, True], ids=["int16", "int32"])
def test_b_t_rows_at_the_int16_edge_stay_exact(past_edge):
    # Learned rows sum to ~256 in magnitude. B_t d spans [-(128 P + 127 N), 127 P + 128 N]
    # (P, N: the row's positive and negative mass): rows 0 and 1 reach 32640 and 32767, the
    # int16 path's edge; past_edge moves row 2 past it by 254 (the int32 path), else its
    # rows all fit. Extreme inputs reach these bounds.
    layer = native.synthetic_layer(4, c=8, k=16, flex=True, per_tap=True)
    b_t = layer["B_t_codes"].astype(int) // 2
    b_t[0] = [127, 1, -127, -1, 0, 0]
    b_t[1] = [64, 64, -64, -64, 1, 0]
    b_t[2] = [65, 65, -64, -64, 1, 0] if past_edge else [64, 64, -64, -64, 0, 1]
    layer["B_t_codes"] = b_t.astype(np.int8)
    rng = np.random.default_rng(9)
    x = np.where(rng.random((3, 16, 16, 8)) < 0.5, -128, 127).astype(np.int8)
    v, _ = integer.input_transform(layer, x)  # the reference's V codes: clipped both ways
    assert (v == v.max()).any() and (v == v.min()).any()
    for isa in ISAS:
        np.testing.assert_array_equal(native.winograd_layer(layer, isa=isa)(x),
                                      reference_codes(layer, x))


def test_large_learned_transforms_take_the_wide_path():
    # Rows of B_t summing past 255 in magnitude: |B_t d| no longer fits int16.
    layer = native.synthetic_layer(4, c=8, k=16, flex=True, per_tap=True)
    layer["B_t_codes"] = np.where(layer["B_t_codes"] == 0, 90, layer["B_t_codes"]).astype(np.int8)
    assert np.abs(layer["B_t_codes"].astype(int)).sum(axis=1).max() > 255
    x = _codes(np.random.default_rng(5), (2, 12, 12, 8))
    for isa in ISAS:
        np.testing.assert_array_equal(native.winograd_layer(layer, isa=isa)(x),
                                      reference_codes(layer, x))


def test_runs_an_exported_layer_file(tmp_path):
    layer = native.synthetic_layer(4, c=6, k=6, flex=True, per_tap=True, bias=True)
    path = integer.save(layer, str(tmp_path / "wa"))
    kernel = native.winograd_layer(path)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 6)).astype(np.float32)
    x_q = integer.quantize(x, kernel.input_scale, 8).astype(np.int8)
    expected_codes, scale = integer.run_layer_codes(path, x)
    np.testing.assert_array_equal(kernel(x_q), expected_codes)
    assert kernel.output_scale == scale and kernel.name == "wa"
    assert kernel.isa in ISAS


def test_bad_input_is_one_clear_error():
    layer = native.synthetic_layer(4, c=6, k=6)
    kernel = native.winograd_layer(layer)
    with pytest.raises(ValueError, match="6 channels"):
        kernel(np.zeros((1, 8, 8, 5), np.int8))
    with pytest.raises(ValueError, match="int8 codes"):
        kernel(np.zeros((1, 8, 8, 6), np.float32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        native.winograd_layer(native.synthetic_layer(4, c=6, k=6, padding="valid"))(
            np.zeros((1, 2, 2, 6), np.int8))
    with pytest.raises(ValueError, match="isa must be one of"):
        native.winograd_layer(layer, isa="neon")
    wide = dict(layer, hadamard_bits=np.array(16))
    with pytest.raises(ValueError, match="8-bit layers; hadamard is wider"):
        native.winograd_layer(wide)
    with pytest.raises(ValueError, match="is not a wa_tf.winograd_layer/1"):
        native.winograd_layer({"format": np.array("other")})


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width", [4, 8, 12, 20])  # 1, 2, 3 and 5 tiles of F(4x4, 3x3)
def test_tile_counts_off_the_micro_tile(isa, width):
    layer = native.synthetic_layer(4, c=16, k=16, per_tap=True)
    x = _codes(np.random.default_rng(width), (1, 4, width, 16))
    np.testing.assert_array_equal(native.winograd_layer(layer, isa=isa)(x),
                                  reference_codes(layer, x))


def test_stage_times_count_the_work_of_each_stage():
    layer = native.synthetic_layer(4, c=16, k=24, per_tap=True)
    kernel = native.winograd_layer(layer)
    stages = kernel.stage_times(_codes(np.random.default_rng(0), (2, 9, 10, 16)), reps=2)
    tiles = 2 * 3 * 3  # ceil(9 / 4) x ceil(10 / 4) tiles per image
    assert stages["hadamard"][1] == tiles * 36 * 16 * 24
    assert stages["input_transform"][1] == tiles * 16 * 2 * 6 ** 3
    assert stages["output_transform"][1] == tiles * 24 * (4 * 36 + 16 * 6)
    assert all(seconds > 0 for seconds, _ in stages.values())
    # The GEMM roofline is measured where the AVX2 path runs, else reported as absent.
    assert (winograd_int8.peak_gemm_macs_per_ns() > 0) == ("avx2" in ISAS)
