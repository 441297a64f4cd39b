"""Native int8 kernels for exported Winograd layers (``wa_tf.winograd_layer/1`` files).

:func:`winograd_layer` turns a layer file (:mod:`wa_tf.deploy.integer`) into a
:class:`wa_tf.kernels.winograd_int8.WinogradInt8`, whose output codes equal
:func:`wa_tf.deploy.integer.run_layer_codes`'s bit for bit::

    from wa_tf.deploy import integer, native
    layer = native.winograd_layer("export/layers/conv1.npz")
    x_q = integer.quantize(x, layer.input_scale, 8).astype("int8")
    y_q = layer(x_q, threads=2)        # int8 NHWC codes; y = y_q * layer.output_scale
"""

import os

import numpy as np

from wa_tf.deploy import integer
from wa_tf.kernels.winograd_int8 import WinogradInt8
from wa_tf.transforms import winograd_matrices

# A fused epilogue's arrays (the layer's output codes onto the next tensor's, see
# integer.affine_requantize): (K,) scale and offset, (2,) code range, the new output scale.
EPILOGUE = ("epilogue_scale", "epilogue_offset", "epilogue_range", "epilogue_output_scale")
_STAGE_BITS = ("input", "B_t", "A_t", "weights_winograd", "input_winograd", "hadamard", "output")


def _load(layer):
    if isinstance(layer, (str, os.PathLike)):
        return integer.load_layer_npz(layer)
    return integer.as_layer(layer)


def winograd_layer(layer, isa: str = "auto") -> WinogradInt8:
    """The native kernel of one exported layer.

    Args:
      layer: A layer file's path or its arrays.
      isa: 'auto', 'avx2' or 'scalar'.

    Returns:
      A :class:`WinogradInt8` with ``input_scale`` and ``output_scale`` attributes
      (the epilogue's scale when the arrays carry one: :data:`EPILOGUE`).

    Raises:
      ValueError: if the layer is not a layer file, a tensor of it is wider than
        8 bits, or its tile is larger than the kernel's (t <= 8).
    """
    layer = _load(layer)
    wide = [name for name in _STAGE_BITS if layer[f"{name}_bits"] > 8]
    if wide:
        raise ValueError(f"layer {layer['layer']}: the native kernel runs 8-bit layers; "
                         f"{', '.join(wide)} {'is' if len(wide) == 1 else 'are'} wider")
    consts = integer.multipliers(layer)
    ranges = [bound for name in ("input_winograd", "hadamard", "output")
              for bound in integer.qrange(layer[f"{name}_bits"])]
    epilogue = None
    if EPILOGUE[0] in layer:  # a batch norm / ReLU fused by the LiteRT export
        epilogue = (layer["epilogue_scale"], layer["epilogue_offset"],
                    tuple(int(v) for v in layer["epilogue_range"]))
    kernel = WinogradInt8(
        layer["tile_size"], layer["kernel_size"], layer["padding"], layer["B_t_codes"],
        layer["A_t_codes"], layer["U_codes"], consts["input_winograd"], consts["hadamard"],
        consts["tap_weights"], float(consts["output"]), ranges,
        bias=consts["bias"] if "bias" in layer else None, epilogue=epilogue, isa=isa)
    kernel.input_scale = np.float32(layer["input_scale"])
    kernel.output_scale = np.float32(layer["epilogue_output_scale"] if epilogue is not None
                                     else layer["output_scale"])
    kernel.name = layer["layer"]
    return kernel


def _calibrated_scale(values, per_tap=False, t=None):
    values = np.abs(np.asarray(values, np.float64))
    if per_tap:
        peak = values.reshape(t, t, -1).max(axis=-1)
    else:
        peak = values.max()
    return integer.scale_from_range(np.maximum(peak, 1e-3) * 0.8, 8)


def synthetic_layer(tile_size=4, c=8, k=16, flex=False, per_tap=False, padding="same",
                    bias=False, seed=0, hw=(9, 9), kernel_size=3):
    """A layer file's arrays with random weights, for benchmarks and tests.

    Flex layers perturb Cook-Toom's transforms as training does; every scale
    comes from the range its tensor takes on a random input (as calibration
    would), so no stage clips everywhere.

    Returns:
      The arrays of :func:`wa_tf.deploy.integer.encode_layer`.
    """
    rng = np.random.default_rng(seed)
    m, r = tile_size, kernel_size
    t = m + r - 1
    a_t, b_t, g = (x.astype(np.float32) for x in winograd_matrices(m, r))
    if flex:  # learned transforms move away from Cook-Toom's
        a_t, b_t, g = (x + rng.normal(0, 0.05, x.shape).astype(np.float32) * np.abs(x).max()
                       for x in (a_t, b_t, g))
    kernel = rng.normal(0, 0.2, (r, r, c, k)).astype(np.float32)
    scales = {"input": integer.scale_from_range(2.0, 8)}
    for name, value in (("kernel", kernel), ("G", g), ("B_t", b_t), ("A_t", a_t)):
        scales[name] = _calibrated_scale(value)
    q = {name: integer.quantize(v, scales[name], 8) * np.float64(scales[name])
         for name, v in (("kernel", kernel), ("G", g), ("B_t", b_t), ("A_t", a_t))}
    u = np.einsum("ai,bj,ijck->abck", q["G"], q["G"], q["kernel"]).astype(np.float32)
    # Stage ranges from a random input pushed through the float pipeline.
    x = rng.uniform(-2, 2, (2, hw[0] + r - 1, hw[1] + r - 1, c))
    d = np.lib.stride_tricks.sliding_window_view(x, (t, t), axis=(1, 2))[:, ::m, ::m]
    v = np.einsum("ai,bj,nhwcij->abnhwc", q["B_t"], q["B_t"], d)
    mm = np.einsum("abnhwc,abck->abnhwk", v, u)
    y = np.einsum("ia,jb,abnhwk->ijnhwk", q["A_t"], q["A_t"], mm)
    scales["weights_winograd"] = _calibrated_scale(u, per_tap, t)
    scales["input_winograd"] = _calibrated_scale(v, per_tap, t)
    scales["hadamard"] = _calibrated_scale(mm, per_tap, t)
    scales["output"] = _calibrated_scale(y)
    bits = {name: 8 for name in integer.TENSORS}
    return integer.encode_layer("wa", m, r, padding, flex, per_tap, bits, scales, kernel, g,
                                b_t, a_t, u, rng.normal(0, 0.3, k) if bias else None)
