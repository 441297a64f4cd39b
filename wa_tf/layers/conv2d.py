"""WinogradConv2D: a Winograd-aware 2-D convolution layer for tf_keras.

The layer owns the kernel, the transforms ``A_t``, ``B_t`` and ``G`` (trainable
in ``flex`` mode) and the stage quantizers, and calls the pipeline of
:mod:`wa_tf.layers.pipeline`, so that quantization error inside the pipeline
can be trained around.  For the backward pass it keeps U and M and recomputes
the tiles and V (and a flex layer's output-transform intermediate), each
several times the size of the input (:mod:`wa_tf.layers.recompute`).
"""

import contextlib
import dataclasses
from typing import Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras

from wa_tf import transforms
from wa_tf.choices import check_bits
from wa_tf.layers.pipeline import (
    lazy_quantizers,
    use_fused_kernels,
    winograd_conv,
    winograd_conv_transformed,
    winograd_weights,
)
from wa_tf.layers.recompute import RecomputedPipeline
from wa_tf.transforms import STAGES, check_tile_size, is_int


def _as_pair(value, name):
    if is_int(value):
        return int(value), int(value)
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


@dataclasses.dataclass(frozen=True)
class WinogradQuantization:
    """How a :class:`WinogradConv2D` fake-quantizes its Winograd domain.

    The layer quantizes the Winograd-domain weights and input, the
    element-wise stage (:data:`STAGES`, each with an
    :class:`~wa_tf.quantization.quantizers.EMAQuantizer`) and static transforms.  Its
    config form is the dict ``{'bits': b, 'per_tap': p, 'warmup': w}``.

    Attributes:
      bits: Bit-width, 2 to 16.
      per_tap: One range per Winograd position (t*t of them) for each stage.
      warmup: The stage quantizers take their range from the incoming batch
        until they have statistics, at inference too.
    """

    bits: int
    per_tap: bool = False
    warmup: bool = False

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits, "quantization bits"))
        object.__setattr__(self, "per_tap", bool(self.per_tap))
        object.__setattr__(self, "warmup", bool(self.warmup))

    @classmethod
    def get(cls, value) -> Optional["WinogradQuantization"]:
        """None, a WinogradQuantization, or its config dict, as a WinogradQuantization or None.

        Raises:
          ValueError: for anything else, or a dict without ``bits`` or with
            other keys.
        """
        if value is None or isinstance(value, cls):
            return value
        fields = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(value, Mapping) or "bits" not in value or set(value) - fields:
            raise ValueError("quantization must be None, a WinogradQuantization or a dict with "
                             f"'bits' and optional 'per_tap', 'warmup'; got {value!r}")
        return cls(**value)

    def get_config(self) -> dict:
        """The config (and SavedModel) form: ``{'bits', 'per_tap', 'warmup'}``."""
        return dataclasses.asdict(self)


@tf_keras.utils.register_keras_serializable(package="wa_tf")
class WinogradConv2D(RecomputedPipeline, tf_keras.layers.Layer):
    """A Winograd-aware 2-D convolution, F(m x m, r x r), stride 1.

    The layer's ``kernel`` has the shape and layout of a
    ``tf_keras.layers.Conv2D`` kernel, ``(r, r, C_in, filters)``, so weights copy
    between the two by name and shape.  The transforms ``A_t`` (m, t), ``B_t``
    (t, t) and ``G`` (t, r) are variables initialised from
    :func:`wa_tf.transforms.winograd_matrices`, trainable iff ``flex``.

    Example:
      >>> inputs = tf_keras.Input((32, 32, 16))
      >>> y = WinogradConv2D(32, tile_size=4, flex=True)(inputs)

    Args:
      filters: Number of output channels.
      kernel_size: Odd filter size r (an int or a square pair).
      tile_size: Output tile size m of F(m x m, r x r).
      flex: Learn the transforms (True) or keep them static (False).
      padding: 'same' or 'valid', as ``Conv2D``.
      use_bias: Add a bias after the convolution.
      kernel_initializer: Initializer of ``kernel``.
      kernel_regularizer: Regularizer of ``kernel``.
      bias_initializer: Initializer of ``bias``.
      points: Interpolation points for the transforms (see
        :func:`wa_tf.transforms.winograd_matrices`); None for the defaults.
      recompute: Recompute the whole Winograd pipeline in the backward pass
        instead of keeping its intermediate tensors: less memory, more compute.
        Works with quantization (the recomputation reuses the step's ranges).
        Without it the backward pass still recomputes the cheap stages (the
        tiles and the input transform, and a flex layer's output-transform
        intermediate) and keeps U and the element-wise stage M.
      strides: Must be 1 (accepted for Conv2D compatibility).
      dilation_rate: Must be 1 (accepted for Conv2D compatibility).
      quantization: None, or a :class:`WinogradQuantization` (or its dict
        form ``{'bits': int, 'per_tap': bool, 'warmup': bool}``) to
        fake-quantize the Winograd-domain weights, the Winograd-domain input
        and the element-wise stage, and static (``flex=False``) transforms.  Set by
        :func:`wa_tf.quantization.quantize_model`; the input, the kernel, flex
        transforms and the output are quantized by its QuantizeConfig.
      **kwargs: Standard layer arguments (name, dtype, trainable).
    """

    def __init__(self, filters: int, kernel_size=3, tile_size: int = 4, flex: bool = True,
                 padding: str = "same", use_bias: bool = False,
                 kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 bias_initializer="zeros", points: Optional[Sequence[float]] = None,
                 recompute: bool = False, strides=1, dilation_rate=1,
                 quantization=None, **kwargs):
        super().__init__(**kwargs)
        if not is_int(filters) or filters < 1:
            raise ValueError(f"filters must be a positive integer, got {filters!r}")
        kh, kw = _as_pair(kernel_size, "kernel_size")
        if kh != kw or kh % 2 == 0 or kh < 1:
            raise ValueError(
                f"kernel_size must be odd and square (e.g. 3 or (3, 3)), got {kernel_size!r}")
        if _as_pair(strides, "strides") != (1, 1):
            raise ValueError(f"strides must be 1 for a Winograd convolution, got {strides!r} "
                             "(use a pooling layer before the convolution instead)")
        if _as_pair(dilation_rate, "dilation_rate") != (1, 1):
            raise ValueError(f"dilation_rate must be 1 for a Winograd convolution, "
                             f"got {dilation_rate!r}")
        check_tile_size(tile_size, "tile_size")
        padding = str(padding).lower()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        quantization = WinogradQuantization.get(quantization)
        self.filters = int(filters)
        self.kernel_size = (kh, kw)
        self.tile_size = int(tile_size)
        self.flex = bool(flex)
        self.padding = padding
        self.use_bias = bool(use_bias)
        self.kernel_initializer = tf_keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
        self.bias_initializer = tf_keras.initializers.get(bias_initializer)
        self.points = None if points is None else [float(p) for p in points]
        self.recompute = bool(recompute)
        self.quantization = quantization
        # Validates points now, so bad input fails at construction.
        self._matrices = transforms.winograd_matrices(self.tile_size, kh, self.points)
        self.input_spec = tf_keras.layers.InputSpec(ndim=4)
        self.stage_quantizers = {}
        self.transform_quantizer = None
        self._frozen_weights = None

    @property
    def tile_input_size(self) -> int:
        """t = m + r - 1, the input tile size."""
        return self.tile_size + self.kernel_size[0] - 1

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("WinogradConv2D needs a known number of input channels")
        r = self.kernel_size[0]
        self.input_spec = tf_keras.layers.InputSpec(ndim=4, axes={-1: channels})
        self.kernel = self.add_weight(
            "kernel", shape=(r, r, channels, self.filters), initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer, trainable=True, dtype=self.dtype)
        a_t, b_t, g = self._matrices
        for name, value in (("A_t", a_t), ("B_t", b_t), ("G", g)):
            setattr(self, name, self.add_weight(
                name, shape=value.shape, initializer=tf_keras.initializers.Constant(value),
                trainable=self.flex, dtype=self.dtype))
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight("bias", shape=(self.filters,),
                                        initializer=self.bias_initializer, trainable=True,
                                        dtype=self.dtype)
        if self.quantization:
            self._build_stage_quantizers(int(channels))
        super().build(input_shape)

    def _build_stage_quantizers(self, channels):
        quantizers = lazy_quantizers()
        q = self.quantization
        # Static transforms are constants: the layer quantizes them from their
        # own range (as the reference's quantize-once-and-freeze).  Not in the
        # QuantizeConfig: TF-MOT's wrapper makes every weight it quantizes trainable.
        if not self.flex:
            self.transform_quantizer = quantizers.MaxAbsQuantizer(q.bits)
        t2 = self.tile_input_size ** 2
        axis = 0 if q.per_tap else None
        shapes = {"weights_winograd": (t2, channels, self.filters),
                  "input_winograd": (t2, None, channels),
                  "hadamard": (t2, None, self.filters)}
        for stage in STAGES:
            quantizer = quantizers.EMAQuantizer(num_bits=q.bits, axis=axis, warmup=q.warmup)
            self.stage_quantizers[stage] = (
                quantizer, quantizer.build(tf.TensorShape(shapes[stage]), stage, self))

    def _stage_ranges(self, training, ranges, codes=None):
        """A stage hook for :func:`winograd_conv` that updates each stage's range and records it.

        For the stages named in `codes` (a dict), it also records the quantized
        tensor's integer codes and scale there, ``codes[stage] = (codes, scale)``.
        """
        quantizers = lazy_quantizers()

        def quantize(stage, x):
            if stage not in self.stage_quantizers:
                return x
            quantizer, variables = self.stage_quantizers[stage]
            ranges[stage] = quantizer.update_range(x, training, variables)
            if codes is not None and stage in codes:
                y, stage_codes, scale = quantizers.fake_quant_codes(x, ranges[stage],
                                                                    quantizer.num_bits)
                codes[stage] = (stage_codes, scale)
                return y
            return quantizers.fake_quant(x, ranges[stage], quantizer.num_bits)
        return quantize

    def _fixed_ranges(self, ranges):
        """A stage hook that quantizes with ranges recorded by `_stage_ranges`."""
        fake_quant = lazy_quantizers().fake_quant

        def quantize(stage, x):
            if stage not in ranges:
                return x
            return fake_quant(x, ranges[stage], self.stage_quantizers[stage][0].num_bits)
        return quantize

    def _winograd(self, x, kernel, a_t, b_t, g, quantize):
        return winograd_conv(x, kernel, a_t, b_t, g, self.tile_size, self.padding, quantize)

    def _pipeline_transform(self, transform, training):
        """A transform as the pipeline takes it: cast, and quantized when static."""
        transform = tf.cast(transform, self.compute_dtype)
        if self.transform_quantizer is None:
            return transform
        return self.transform_quantizer(transform, training, {})

    def winograd_weights(self, kernel=None, g=None):
        """The layer's Winograd-domain weights ``U = G g G^T``, (t*t, C, K).

        Computed as the layer's pipeline computes them (before the
        ``weights_winograd`` stage quantizer), so in a graph they are the very
        values the layer uses.

        Args:
          kernel: The kernel to transform; default the layer's ``kernel``.  For
            a layer inside a TF-MOT QuantizeWrapper pass the wrapper's
            fake-quantized kernel (:func:`wa_tf.quantization.inference_weight`):
            the wrapped layer's attribute holds a tensor of the wrapper's last call.
          g: The transform G; default the layer's (quantized from its own range
            when static and quantized, as the layer does).  Flex transforms of a
            wrapped layer are quantized by the wrapper: pass them likewise.

        Returns:
          U, a (t*t, C, K) tensor.
        """
        kernel = tf.cast(self.kernel if kernel is None else kernel, self.compute_dtype)
        g = self._pipeline_transform(self.G, False) if g is None else tf.cast(g, self.compute_dtype)
        return winograd_weights(kernel, g)

    def inference_winograd_weights(self, kernel=None, g=None):
        """The Winograd-domain weights as the layer's inference pass uses them.

        :meth:`winograd_weights` followed, for a quantized layer, by the
        ``weights_winograd`` stage quantizer in inference mode (its frozen
        range), as a call with ``training=False`` computes them.

        Args:
          kernel: As :meth:`winograd_weights`.
          g: As :meth:`winograd_weights`.

        Returns:
          U, a (t*t, C, K) tensor.
        """
        u = self.winograd_weights(kernel, g)
        return self._stage_ranges(False, {})("weights_winograd", u)

    @contextlib.contextmanager
    def frozen_winograd_weights(self, u):
        """Within the context, inference calls use ``u`` instead of computing ``U = G g G^T``.

        For exporting a model (:func:`wa_tf.deploy.export.export_saved_model`): the
        graphs traced inside the context read ``u`` (typically a variable holding
        :meth:`inference_winograd_weights`) and do only the input transform,
        the element-wise stage and the output transform on each call; the
        kernel and ``G`` are not read.

        Args:
          u: (t*t, C, K) tensor or variable.

        Yields:
          None.

        Raises:
          ValueError: if ``u`` does not have the shape of the layer's U.
        """
        if not self.built:
            raise ValueError(f"layer {self.name!r} must be built before freezing its weights")
        expected = (self.tile_input_size ** 2, self.kernel.shape[2], self.filters)
        if tuple(u.shape) != expected:
            raise ValueError(f"u must have shape {expected} for layer {self.name!r}, "
                             f"got {tuple(u.shape)}")
        # object.__setattr__: a variable set as a Keras attribute would be
        # tracked as one of the layer's weights and change its checkpoints.
        object.__setattr__(self, "_frozen_weights", u)
        try:
            yield
        finally:
            object.__setattr__(self, "_frozen_weights", None)

    def call(self, inputs, training=None):
        # A plain signature: TF-MOT's QuantizeWrapperV2 passes `training` only
        # to a `call` whose argspec names it, and a decorated `call` hides it.
        return self._call(inputs, training)

    # No autograph: the pipeline has no tensor-dependent Python control flow,
    # and converting it made every symbolic call (each model clone in TF-MOT's
    # quantize_apply) several times slower.
    @tf.autograph.experimental.do_not_convert
    def _call(self, inputs, training):
        x = tf.convert_to_tensor(inputs, dtype=self.compute_dtype)
        if self._frozen_weights is not None:
            if training is True:
                raise ValueError(f"layer {self.name!r} has frozen Winograd-domain weights "
                                 "(inference only) and cannot be called with training=True")
            a_t, b_t = (self._pipeline_transform(w, training) for w in (self.A_t, self.B_t))
            y = winograd_conv_transformed(
                x, tf.cast(self._frozen_weights, self.compute_dtype), a_t, b_t, self.tile_size,
                self.padding, self._stage_ranges(training, {}))
        else:
            y = self._pipeline(x, training)
        if self.use_bias:
            y = y + tf.cast(self.bias, y.dtype)
        return y

    def _pipeline(self, x, training):
        """The whole pipeline, U included."""
        # Read the weights through attributes: TF-MOT's QuantizeWrapperV2
        # replaces them with their fake-quantized tensors before each call.
        weights = [tf.cast(self.kernel, self.compute_dtype)] + [
            self._pipeline_transform(w, training) for w in (self.A_t, self.B_t, self.G)]
        if self.recompute:
            return self._recomputed(x, weights, training)
        kernel, a_t, b_t, g = weights
        ranges = {}
        fused = use_fused_kernels(x, self.tile_input_size)
        # The tensors the backward pass keeps, as integer codes where quantized:
        # U always, M only for a flex layer's A_t gradient (the fused pipeline
        # codes M in any case, below).
        codes = dict.fromkeys(("weights_winograd", "hadamard") if self.flex and not fused
                              else ("weights_winograd",))
        quantize = self._stage_ranges(training, ranges, codes)
        u = quantize("weights_winograd", winograd_weights(kernel, g))
        mm = self._input_recomputed(x, b_t, u, quantize, ranges, codes)
        if fused and "hadamard" in self.stage_quantizers:
            quantizer, variables = self.stage_quantizers["hadamard"]
            ranges["hadamard"] = quantizer.update_range(mm, training, variables)
            return self._output_from_codes(mm, ranges["hadamard"], quantizer.num_bits, a_t, x)
        return self._output_recomputed(quantize("hadamard", mm), a_t, x, codes)

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape).as_list()
        n, h, w = input_shape[:3]
        if self.padding == "valid":
            r = self.kernel_size[0]
            h = None if h is None else h - r + 1
            w = None if w is None else w - r + 1
        return tf.TensorShape([n, h, w, self.filters])

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "tile_size": self.tile_size,
            "flex": self.flex,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "kernel_initializer": tf_keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": tf_keras.regularizers.serialize(self.kernel_regularizer),
            "bias_initializer": tf_keras.initializers.serialize(self.bias_initializer),
            "points": self.points,
            "recompute": self.recompute,
            "quantization": None if self.quantization is None else self.quantization.get_config(),
        })
        return config
