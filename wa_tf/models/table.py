"""The reference's printed layer table of a model (float or quantized).

One row per convolution and linear layer, with the reference's columns plus the
multiplies per image; :func:`layer_table` formats it as the reference prints it.
"""

import numpy as np
import tf_keras

from wa_tf.layers import WinogradConv2D
from wa_tf.models.resnet import lazy_quantization
from wa_tf.transforms import is_int, tile_geometry


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
    unwrap = lazy_quantization().unwrap
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
