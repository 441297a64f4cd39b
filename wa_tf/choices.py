"""What a convolution layer may be: its conv modes, tile sizes and bit-widths, defined once.

Plain Python (no TensorFlow), at the bottom of the package: the layers, the
quantizers, the model builder, the run configuration, mixed architectures and
the cost models all check their arguments against these.
"""
from wa_tf.transforms import is_int

# Direct convolution, Winograd with fixed (Cook-Toom) transforms, Winograd with learned ones.
CONV_MODES = ("normal", "static", "flex")
# The output tile sizes m of F(m x m, 3 x 3) that models and architectures offer.
TILE_SIZES = (2, 4, 6)
# Bit-widths the fake quantizers support (TensorFlow's fake_quant ops take 2..16).
MIN_BITS, MAX_BITS = 2, 16


def valid_bits(bits) -> bool:
    """Whether `bits` is an integer bit-width from :data:`MIN_BITS` to :data:`MAX_BITS`."""
    return is_int(bits) and MIN_BITS <= bits <= MAX_BITS


def check_bits(num_bits, name="num_bits"):
    """Returns `num_bits` as an int, or raises ValueError naming `name` unless it is valid."""
    if not valid_bits(num_bits):
        raise ValueError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, "
                         f"got {num_bits!r}")
    return int(num_bits)
