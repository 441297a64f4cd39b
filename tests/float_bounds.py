"""Tolerances from floating-point error bounds, for comparing two pipelines that sum alike.

Two evaluations of the same sums in different orders (the fused kernels and
TensorFlow's ops, or a recomputed V against a stored one) differ by at most
``2 γ_n Σ|terms|`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
§3.1): ``γ_n = n u / (1 - n u)``, ``u`` the unit roundoff of the dtype and ``n``
the longest chain of additions.  ``Σ|terms|`` of each output and gradient
element of a Winograd layer is the same pipeline run in float64 on absolute
values (``|x|``, ``|g|``, ``|A_t|``, ``|B_t|``, ``|G|`` and the cotangent's): each
of its path products is the absolute value of one term.  A quantized layer
rounds its Winograd-domain tensors, so its terms are not the float
pipeline's; it takes the tensor's largest ``Σ|terms|`` (a normwise bound).
"""
import numpy as np
import tensorflow as tf

from wa_tf.layers import winograd_conv


def chain_length(layer, x_shape):
    """n for a layer's output and gradients: a tile's two transforms (each of its input
    and output), the kernel's transform, the channel sums and the sums over tiles."""
    t = layer.tile_input_size
    r = layer.kernel_size[0]
    tiles = x_shape[0] * -(-x_shape[1] // layer.tile_size) * -(-x_shape[2] // layer.tile_size)
    return 4 * t + r * r + x_shape[3] + layer.filters + tiles * t * t


def abs_terms(layer, x, cotangent):
    """Σ|terms| of the output ``"y"`` and of each gradient (``"x"``, ``"kernel"``, ``"A_t"``,
    ``"B_t"``, ``"G"``), as a dict."""
    leaves = [tf.abs(tf.cast(v, tf.float64)) for v in (x, layer.kernel, layer.A_t, layer.B_t,
                                                      layer.G)]
    with tf.GradientTape() as tape:
        tape.watch(leaves)
        y = winograd_conv(*leaves, layer.tile_size, layer.padding)
    grads = tape.gradient(y, leaves, output_gradients=tf.abs(tf.cast(cotangent, tf.float64)))
    return dict(zip(["y", "x", "kernel", "A_t", "B_t", "G"],
                    [t.numpy() for t in [y] + grads]))


def short_name(variable):
    """``kernel``, ``A_t``, ... of a layer's variable (its name without scope and index)."""
    return variable.name.split("/")[-1].split(":")[0]


def error_ratio(got, want, terms, n, dtype, normwise=False):
    """The largest ``|got - want|`` over its bound ``2 γ_n Σ|terms|`` (at most 1 passes)."""
    u = np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps / 2
    gamma = n * u / (1 - n * u)
    terms = np.asarray(terms, np.float64)
    if normwise:
        terms = np.full_like(terms, terms.max())
    tol = 2 * gamma * terms + np.finfo(np.float64).tiny
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) / tol))
