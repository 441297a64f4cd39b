"""The integer reference's output codes, for the native kernel's tests."""

from wa_tf.deploy import integer


def reference_codes(layer, x_codes):
    """The integer reference's output codes of int input codes, stage by stage."""
    v, size = integer.input_transform(layer, x_codes)
    codes = integer.output_transform(layer, integer.hadamard(layer, v), size)
    if "epilogue_scale" in layer:  # a fused batch norm / ReLU
        codes = integer.affine_requantize(codes, layer["epilogue_scale"],
                                          layer["epilogue_offset"], *layer["epilogue_range"])
    return codes
