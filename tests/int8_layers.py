"""The integer reference's output codes, for the native kernel's tests."""

from wa_tf.deploy import integer


def reference_codes(layer, x_codes):
    """The integer reference's output codes of int input codes, stage by stage."""
    v, size = integer.input_transform(layer, x_codes)
    return integer.output_transform(layer, integer.hadamard(layer, v), size)
