"""The layer's gradients that recompute the pipeline's large tensors instead of keeping them.

:class:`RecomputedPipeline` is a base of :class:`~wa_tf.layers.WinogradConv2D`:
its methods run parts of the pipeline under custom gradients that keep only
the inputs, U and M (as integer codes where quantized) and the stage ranges,
and recompute the tiles, V and the output transform's intermediate in the
backward pass.
"""

import tensorflow as tf

from wa_tf import kernels
from wa_tf.layers.pipeline import (
    input_tile_geometry,
    kept,
    lazy_quantizers,
    static_dim,
    use_fused_kernels,
    winograd_input,
    winograd_output,
)
from wa_tf.transforms import tile_geometry


class RecomputedPipeline:
    """Recomputing pieces of the pipeline, for the layer that owns its weights and ranges."""

    def _recomputed(self, x, weights, training):
        """The pipeline with a gradient that recomputes it instead of storing it.

        Only the inputs and the (tiny) stage ranges are kept for the backward
        pass.  Unlike ``tf.recompute_grad``, the recomputation reuses the ranges
        of the forward pass, so quantizer state is updated once per step.
        """
        ranges = {}

        @tf.custom_gradient
        def run(x, *weights):
            y = self._winograd(x, *weights, quantize=self._stage_ranges(training, ranges))

            def grad(dy):
                # The dependency on dy keeps the executor from recomputing every
                # layer as soon as the forward pass ends, which would hold all
                # recomputed tensors at once (tf.recompute_grad does the same).
                with tf.control_dependencies([dy]):
                    inputs = [tf.identity(v) for v in (x, *weights)]
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    y2 = self._winograd(*inputs, quantize=self._fixed_ranges(ranges))
                return tape.gradient(y2, inputs, output_gradients=dy)
            return y, grad
        return run(x, *weights)

    def _output_from_codes(self, mm, range_, num_bits, a_t, x):
        """The fused output transform of M quantized with `range_`, read as integer codes.

        M's fake-quantized float values are never written: the kernel decodes
        the codes (int8 up to 8 bits, a quarter of float32) tile by tile, to the
        very values :func:`wa_tf.quantization.quantizers.fake_quant` gives.  The gradient
        with respect to M is the straight-through one (the output transform's
        gradient); a flex layer's A_t gradient reads the same codes.
        """
        quantize_codes = lazy_quantizers().quantize_codes
        m, t = self.tile_size, a_t.shape[1]
        geo = tile_geometry(static_dim(x, 1), static_dim(x, 2), m, t - m + 1, self.padding)
        tiles = (m, 0, 0, geo.n_h, geo.n_w)

        @tf.custom_gradient
        def run(mm, a_t):
            codes, scale = quantize_codes(mm, range_, num_bits)
            at_t = tf.transpose(a_t)
            y = kernels.tile_transform_adjoint_codes(codes, scale, at_t, *tiles, geo.out_h,
                                                     geo.out_w)

            def grad(dy):
                if not self.flex:
                    return kernels.tile_transform(dy, at_t, *tiles), None
                dmm, dmat = kernels.tile_transform_adjoint_backprop(dy, codes, scale, at_t,
                                                                    *tiles)
                return dmm, tf.transpose(dmat)
            return y, grad
        return run(mm, a_t)

    def _output_recomputed(self, mm, a_t, x, codes):
        """:func:`winograd_output` whose A_t gradient recomputes the transform's intermediate.

        Only flex layers need it: the gradient with respect to M alone keeps
        nothing but A_t.  A quantized M is kept as its integer codes (int8 up
        to 8 bits), a quarter of its float32 size, and decoded whole (the fused
        pipeline reads them in its kernels instead, :meth:`_output_from_codes`).
        """
        if not self.flex:
            return winograd_output(mm, a_t, x, self.tile_size, self.padding)
        kept_mm = kept(mm, codes.get("hadamard"))

        @tf.custom_gradient
        def run(mm, a_t):
            def grad(dy):
                with tf.control_dependencies([dy]):
                    mm2 = kept_mm()
                    a_t2 = tf.identity(a_t)
                with tf.GradientTape() as tape:
                    tape.watch([mm2, a_t2])
                    y2 = winograd_output(mm2, a_t2, x, self.tile_size, self.padding)
                return tape.gradient(y2, [mm2, a_t2], output_gradients=dy)
            return winograd_output(mm, a_t, x, self.tile_size, self.padding), grad
        return run(mm, a_t)

    def _input_recomputed(self, x, b_t, u, quantize, ranges, codes):
        """``V U`` with ``V`` (and the tiles) recomputed in the backward pass, not kept.

        The tiles, the input transform's intermediate and V are each t^2/m^2
        times the input (2.25x for F4); recomputing them from ``x`` (which the
        previous layer usually keeps anyway) costs one gather and two small GEMMs.
        The recomputation quantizes V with the forward pass's range.
        """
        def stage(x, b_t, hook):
            return winograd_input(x, b_t, self.tile_size, self.padding, hook)

        kept_u = kept(u, codes.get("weights_winograd"))

        @tf.custom_gradient
        def run(x, b_t, u):
            v = stage(x, b_t, quantize)

            def grad(dm):
                # As in _recomputed: recompute only once dm exists.
                with tf.control_dependencies([dm]):
                    x2, b_t2, u2 = tf.identity(x), tf.identity(b_t), kept_u()
                if use_fused_kernels(x, b_t.shape[0]):
                    # V never in memory: dU from x block by block, dx (and dB_t) from
                    # dV, through the fake quantization's straight-through gradient.
                    dv = tf.matmul(dm, u2, transpose_b=True)
                    geometry = input_tile_geometry(x, self.tile_size, self.kernel_size[0],
                                            self.padding)
                    du = kernels.tile_transform_weight_grad(
                        x2, b_t2, dm, *geometry, **self._input_quantization(ranges, x.dtype))
                    dx, db_t = kernels.tile_transform_backprop(dv, x2, b_t2, *geometry,
                                                               mat_grad=self.flex)
                    return dx, db_t, du
                with tf.GradientTape() as tape:
                    tape.watch([x2, b_t2])
                    v2 = stage(x2, b_t2, self._fixed_ranges(ranges))
                du = tf.matmul(v2, dm, transpose_a=True)
                dv = tf.matmul(dm, u2, transpose_b=True)
                sources = [x2, b_t2] if self.flex else [x2]
                dx, *db_t = tape.gradient(v2, sources, output_gradients=dv)
                return dx, (db_t[0] if db_t else None), du
            return tf.matmul(v, u), grad
        return run(x, b_t, u)

    def _input_quantization(self, ranges, dtype):
        """How the forward pass quantized V: ``{scale, qmin, qmax}``, empty when it did not."""
        if "input_winograd" not in ranges:
            return {}
        code_limits, quant_scale = lazy_quantizers().code_limits, lazy_quantizers().quant_scale
        bits = self.stage_quantizers["input_winograd"][0].num_bits
        qmin, qmax = code_limits(bits)
        return {"scale": quant_scale(ranges["input_winograd"], bits, dtype), "qmin": qmin,
                "qmax": qmax}
