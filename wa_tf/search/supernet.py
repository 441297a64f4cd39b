"""The wiNAS supernet: mixed convolutions, their sampled paths and expected cost.

The supernet (:func:`build_supernet`) is ``wa_tf.models.resnet18_like`` in
which every searchable 3x3 convolution (``layer1.0.conv1`` ...
``layer4.1.conv2``) is a :class:`MixedConv2D`: one kernel ``(r, r, C_in,
C_out)`` shared by all its candidates (the direct convolution ``normal`` and
Winograd-aware flex F2 / F4 / F6, at each bit-width searched), each candidate
with its own transforms and quantizer state, and per-layer architecture
logits ``alpha``.  The stem, BatchNorms, 1x1 shortcuts and the classifier are
those of ``resnet18_like`` (float), under the same names, so a trained normal
model's weights copy in by name (:func:`wa_tf.quantization.copy_weights`).
This module also holds the expected cost of the sampled paths and the latency
penalty the search (:mod:`wa_tf.search.search_lib`) minimises.
"""

import contextlib
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf import models
from wa_tf.layers import winograd_conv
from wa_tf.quantization.quantizers import EMAQuantizer, fake_quant
from wa_tf.search import cost as cost_lib
from wa_tf.transforms import STAGES, winograd_matrices

SUPERNET_NAME = "ResNet18LikeSupernet"


def candidate_slug(candidate: cost_lib.Candidate) -> str:
    """A candidate's name in variable names: ``'normal'``, ``'F4_int8'``."""
    return candidate.key.replace("/", "_")


def candidate_choice(candidate: cost_lib.Candidate) -> Dict:
    """The architecture-file entry of a candidate: ``{"conv", "tile_size", "bits"}``.

    Winograd candidates are flex (learnt transforms), as searched.
    """
    if candidate.algorithm == cost_lib.NORMAL:
        return {"conv": "normal", "tile_size": None, "bits": candidate.bits}
    return {"conv": "flex", "tile_size": candidate.tile_size, "bits": candidate.bits}


class MixedConv2D(tf_keras.layers.Layer):
    """A searchable 3x3 convolution: candidates sharing one kernel, and their logits.

    Weights: ``kernel`` (r, r, C_in, filters), in Conv2D layout and under
    Conv2D's name so that a normal model's kernel copies into it; ``alpha``
    (one logit per candidate); per Winograd candidate ``<slug>_A_t``,
    ``<slug>_B_t``, ``<slug>_G`` (trainable, initialised to the Cook-Toom
    transforms); per quantized candidate the state of its
    :class:`~wa_tf.quantization.quantizers.EMAQuantizer` s, ``<slug>_<tensor>_min`` ...,
    for its input, kernel, transforms, Winograd stages and output (as
    ``wa_tf.quantization.quantize_model`` quantizes a layer); and ``path``.

    ``path`` (int32, 2) says which candidates a call runs: ``path[0]`` alone;
    or, inside :func:`two_paths` with ``path[1] >= 0``, both, returning ``g_a
    y_a + g_b y_b`` whose value is ``y_a`` and whose gradient with respect to
    ``alpha`` is that of the pair's softmax (the search's logit step).  The
    search loop assigns it before each step (:func:`sample_paths`).

    Quantizers are in warm-up mode: a candidate that was never sampled takes
    its ranges from the first batch it sees, at inference too.

    Args:
      filters: Output channels.
      candidates: The :class:`wa_tf.search.cost.Candidate` s, normal or Winograd,
        at FP32 or 2..16 bits.
      kernel_size: Odd r.
      per_tap: One range per Winograd position for the Winograd stages.
      **kwargs: Layer arguments (name).
    """

    def __init__(self, filters: int, candidates: Sequence[cost_lib.Candidate],
                 kernel_size: int = 3, per_tap: bool = False, **kwargs):
        super().__init__(**kwargs)
        candidates = [c if isinstance(c, cost_lib.Candidate) else cost_lib.Candidate.parse(c)
                      for c in candidates]
        if not candidates:
            raise ValueError("MixedConv2D needs at least one candidate")
        if len({c.key for c in candidates}) != len(candidates):
            raise ValueError(f"duplicate candidates: {[c.key for c in candidates]}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.candidates = candidates
        self.per_tap = bool(per_tap)
        self.transforms = []
        self.quantizers = []
        # Read when a call is traced (see two_paths()): whether it runs path[1] too.
        self.two_paths = False

    def build(self, input_shape):
        channels = int(input_shape[-1])
        r, k = self.kernel_size, self.filters
        self.kernel = self.add_weight("kernel", shape=(r, r, channels, k),
                                      initializer=models.torch_kernel_init(), trainable=True)
        self.alpha = self.add_weight("alpha", shape=(len(self.candidates),),
                                     initializer="zeros", trainable=True)
        self.path = self.add_weight(
            "path", shape=(2,), dtype=tf.int32, trainable=False,
            initializer=tf_keras.initializers.Constant([0, -1]))
        for candidate in self.candidates:
            slug = candidate_slug(candidate)
            transforms = None
            if candidate.algorithm == cost_lib.WINOGRAD:
                transforms = {}
                for name, value in zip(("A_t", "B_t", "G"),
                                       winograd_matrices(candidate.tile_size, r)):
                    transforms[name] = self.add_weight(
                        f"{slug}_{name}", shape=value.shape, trainable=True,
                        initializer=tf_keras.initializers.Constant(value))
            self.transforms.append(transforms)
            quantizers = None
            if candidate.bits is not None:
                shapes = {"input": (None, None, None, channels), "kernel": (r, r, channels, k),
                          "output": (None, None, None, k)}
                if transforms is not None:
                    t2 = (candidate.tile_size + r - 1) ** 2
                    shapes.update({name: v.shape for name, v in transforms.items()})
                    shapes.update({"weights_winograd": (t2, channels, k),
                                   "input_winograd": (t2, None, channels),
                                   "hadamard": (t2, None, k)})
                quantizers = {}
                for name, shape in shapes.items():
                    axis = 0 if self.per_tap and name in STAGES else None
                    quantizer = EMAQuantizer(candidate.bits, axis=axis, warmup=True)
                    quantizers[name] = (quantizer, quantizer.build(
                        tf.TensorShape(shape), f"{slug}_{name}", self))
            self.quantizers.append(quantizers)
        super().build(input_shape)

    def probabilities(self) -> tf.Tensor:
        """``softmax(alpha)``, one probability per candidate."""
        return tf.nn.softmax(self.alpha)

    def candidate_output(self, index: int, x, training: bool = False) -> tf.Tensor:
        """The output of candidate `index` alone (its quantizers updated when training)."""
        candidate = self.candidates[index]
        quantizers = self.quantizers[index]

        def quantize(name, tensor):
            if quantizers is None or name not in quantizers:
                return tensor
            quantizer, state = quantizers[name]
            return fake_quant(tensor, quantizer.update_range(tensor, training, state),
                              quantizer.num_bits)

        x = quantize("input", tf.convert_to_tensor(x, self.compute_dtype))
        kernel = quantize("kernel", tf.convert_to_tensor(self.kernel))
        if candidate.algorithm == cost_lib.NORMAL:
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
        else:
            a_t, b_t, g = (quantize(name, tf.convert_to_tensor(self.transforms[index][name]))
                           for name in ("A_t", "B_t", "G"))
            y = winograd_conv(x, kernel, a_t, b_t, g, candidate.tile_size, "same", quantize)
        return quantize("output", y)

    # No autograph: there is no tensor-dependent Python control flow, and
    # converting the candidates' pipelines made tracing several times slower.
    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None):
        training = bool(training)
        n = len(self.candidates)

        def branches():
            return [lambda i=i: self.candidate_output(i, inputs, training) for i in range(n)]

        if n == 1:
            return self.candidate_output(0, inputs, training)
        active, other = self.path[0], self.path[1]
        y_active = tf.switch_case(active, branches())
        if not self.two_paths:
            return y_active
        y_other = tf.switch_case(tf.maximum(other, 0), branches())
        # One-hot products rather than tf.gather: a dense gradient for alpha.
        pick = tf.one_hot(tf.stack([active, tf.maximum(other, 0)]), n)
        q = tf.nn.softmax(tf.reduce_sum(pick * self.alpha[None], axis=1))
        gates = tf.constant([1.0, 0.0]) + q - tf.stop_gradient(q)
        # other = -1 (one path): y_active alone.
        pair = gates[0] * y_active + gates[1] * y_other
        return tf.where(other >= 0, pair, y_active)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.filters])

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "kernel_size": self.kernel_size,
                       "candidates": [c.key for c in self.candidates],
                       "per_tap": self.per_tap})
        return config


# ----------------------------------------------------------------------------
# The supernet


def search_space(layers: Sequence[cost_lib.LayerSpec], names: Sequence[str],
                 bits: Sequence[Optional[int]]) -> Dict[str, List[cost_lib.Candidate]]:
    """The candidates offered to each layer: `names` x `bits` where they fit.

    Raises:
      ValueError: On an unknown name or bit-width, or none given.
    """
    if not names:
        raise ValueError("candidates must name at least one of "
                         f"{', '.join(cost_lib.CANDIDATE_NAMES)}")
    if not bits:
        raise ValueError("bits_candidates must name at least one bit-width")
    for name in names:
        if name not in cost_lib.CANDIDATE_NAMES:
            raise ValueError(f"candidates must be among {', '.join(cost_lib.CANDIDATE_NAMES)}; "
                             f"got {name!r}")
    return {layer.name: cost_lib.allowed_candidates(layer, names, bits) for layer in layers}


def build_supernet(space: Mapping[str, Sequence[cost_lib.Candidate]],
                   width_multiplier: float = 0.5, num_classes: int = 10,
                   input_shape=(32, 32, 3), per_tap: bool = False) -> tf_keras.Model:
    """``resnet18_like``'s structure with a :class:`MixedConv2D` per searchable conv.

    Args:
      space: Layer name -> candidates (:func:`search_space`), for every
        searchable layer of the model.
      width_multiplier: As ``resnet18_like``.
      num_classes: Output logits.
      input_shape: (height, width, channels).
      per_tap: Per-tap ranges for the Winograd stages of quantized candidates.

    Returns:
      A functional model named 'ResNet18LikeSupernet'.

    Raises:
      ValueError: On a bad width or input shape, or a space that does not
        name exactly the model's searchable layers.
    """
    names = [layer.name for layer in models.searchable_layers(width_multiplier,
                                                              tuple(input_shape))]
    if sorted(space) != sorted(names):
        raise ValueError("the search space must name the searchable layers "
                         f"{', '.join(names)}; got {', '.join(space)}")
    return models.build_resnet18_like(
        lambda filters, name: MixedConv2D(filters, space[name], per_tap=per_tap, name=name),
        width_multiplier, num_classes, input_shape, name=SUPERNET_NAME)


@contextlib.contextmanager
def two_paths(layers: Sequence[MixedConv2D]):
    """Calls of `layers` in this context (traced or eager) run ``path[0]`` and ``path[1]``.

    A Python switch rather than a tensor one, so that a weight step's graph
    holds one candidate choice per layer, not two.
    """
    for layer in layers:
        layer.two_paths = True
    try:
        yield
    finally:
        for layer in layers:
            layer.two_paths = False


def mixed_layers(model: tf_keras.Model) -> List[MixedConv2D]:
    """The model's :class:`MixedConv2D` layers, in model order."""
    return [layer for layer in model.layers if isinstance(layer, MixedConv2D)]


def probabilities(model: tf_keras.Model) -> Dict[str, Dict[str, float]]:
    """Each searched layer's candidate probabilities: ``{layer: {candidate key: p}}``."""
    return {layer.name: dict(zip((c.key for c in layer.candidates),
                                 layer.probabilities().numpy().tolist()))
            for layer in mixed_layers(model)}


def derive_architecture(model: tf_keras.Model) -> Dict[str, Dict]:
    """The most probable candidate of each layer, as an architecture dict.

    Ties go to the first candidate in the search order.
    """
    return {layer.name: candidate_choice(layer.candidates[int(np.argmax(layer.alpha.numpy()))])
            for layer in mixed_layers(model)}


def select(model: tf_keras.Model, choices: Optional[Mapping[str, int]] = None):
    """Makes every layer run one candidate: `choices` (layer -> index), default the argmax."""
    for layer in mixed_layers(model):
        index = int(np.argmax(layer.alpha.numpy())) if choices is None else choices[layer.name]
        layer.path.assign([index, -1])


def sample_paths(layers: Sequence[MixedConv2D], seed, pair: bool):
    """Samples each layer's path (graph-compatible, stateless): assigns ``layer.path``.

    Args:
      layers: The supernet's mixed layers.
      seed: An int64 (2,) seed; the sampling is a function of it.
      pair: False: one candidate ~ softmax(alpha).  True: two distinct
        candidates ~ softmax(alpha) without replacement (Gumbel top-2), the
        active one of the two drawn with the pair's softmax.
    """
    seed = tf.cast(seed, tf.int64)
    updates = []
    for i, layer in enumerate(layers):
        n = len(layer.candidates)
        layer_seed = seed + tf.constant([0, 1], tf.int64) * (3 * i)
        if n == 1:
            updates.append(layer.path.assign([0, -1]))
            continue
        alpha = tf.convert_to_tensor(layer.alpha)
        if not pair:
            index = tf.random.stateless_categorical(alpha[None], 1, layer_seed)[0, 0]
            updates.append(layer.path.assign(tf.stack([tf.cast(index, tf.int32), -1])))
            continue
        u = tf.random.stateless_uniform([n], layer_seed + [0, 1], minval=1e-12, maxval=1.0)
        top2 = tf.math.top_k(alpha - tf.math.log(-tf.math.log(u)), 2).indices
        q = tf.nn.softmax(tf.gather(alpha, top2))
        coin = tf.random.stateless_uniform([], layer_seed + [0, 2])
        first = tf.cast(coin < q[0], tf.int32)
        updates.append(layer.path.assign(tf.stack([top2[1 - first], top2[first]])))
    return updates


@dataclasses.dataclass
class CostTable:
    """The costs the objective and reports need.

    Attributes:
      layers: The searchable layers.
      costs: layer name -> cost of each of its candidates, in the layer's order.
      normal: bits -> the all-normal cost at those bits.
      reference_bits: The widest bit-width searched (None: FP32).
      unit: The cost model's unit.
      description: The cost model's description.
    """
    layers: List[cost_lib.LayerSpec]
    costs: Dict[str, List[float]]
    normal: Dict[Optional[int], float]
    reference_bits: Optional[int]
    unit: str
    description: str

    @property
    def reference(self) -> float:
        """The normaliser: all-normal at the widest bit-width searched."""
        return self.normal[self.reference_bits]


def widest_bits(bits: Sequence[Optional[int]]) -> Optional[int]:
    """None (FP32) if searched, else the largest bit-width."""
    return None if None in bits else max(bits)


def cost_table(space: Mapping[str, Sequence[cost_lib.Candidate]],
               layers: Sequence[cost_lib.LayerSpec], cost_model: cost_lib.CostModel,
               bits: Sequence[Optional[int]]) -> CostTable:
    """Costs every candidate of `space` and the all-normal model at each of `bits`.

    Raises:
      ValueError: If the cost model lacks an entry (a table: names it).
    """
    costs = {layer.name: [cost_model.cost(layer, c) for c in space[layer.name]]
             for layer in layers}
    normal = {b: sum(cost_model.cost(layer, cost_lib.Candidate(cost_lib.NORMAL, None, b))
                     for layer in layers) for b in bits}
    return CostTable(list(layers), costs, normal, widest_bits(bits),
                     getattr(cost_model, "unit", ""), getattr(cost_model, "description", ""))


def expected_cost(layers: Sequence[MixedConv2D], costs: Mapping[str, Sequence[float]]):
    """``sum_layers sum_candidates softmax(alpha) * cost``, differentiable in the logits."""
    total = tf.constant(0.0)
    for layer in layers:
        total += tf.reduce_sum(layer.probabilities() * tf.constant(costs[layer.name],
                                                                   tf.float32))
    return total


def latency_penalty(ratio, latency_weight: float, target: Optional[float] = None):
    """The objective's cost term for an expected-cost `ratio` to all-normal.

    ``latency_weight * ratio``, or with a target ``latency_weight *
    max(0, ratio / target - 1)``.
    """
    if target is None:
        return latency_weight * ratio
    return latency_weight * tf.maximum(ratio / target - 1.0, 0.0)
