"""wiNAS: a latency-aware search of each convolution's algorithm and bit-width.

The supernet (:func:`build_supernet`) is ``wa_tf.models.resnet18_like`` in
which every searchable 3x3 convolution (``layer1.0.conv1`` ...
``layer4.1.conv2``) is a :class:`MixedConv2D`: one kernel ``(r, r, C_in,
C_out)`` shared by all its candidates (the direct convolution ``normal`` and
Winograd-aware flex F2 / F4 / F6, at each bit-width searched), each candidate
with its own transforms and quantizer state, and per-layer architecture
logits ``alpha``.  The stem, BatchNorms, 1x1 shortcuts and the classifier are
those of ``resnet18_like`` (float), under the same names, so a trained normal
model's weights copy in by name (:func:`wa_tf.quantization.copy_weights`).

The search (:func:`run`), in the manner of ProxylessNAS (Cai et al., 2019):

* the training split is cut in two disjoint parts (``arch_fraction`` of it for
  the logits, the rest for the weights); the validation split only reports;
* weights and logits are updated in alternation, one step each;
* a weight step samples ONE candidate per layer from ``p = softmax(alpha)``
  and runs only that one;
* a logit step samples TWO distinct candidates per layer (from ``p``, without
  replacement), makes one of them active with the probabilities of the pair,
  and runs both: the output is ``g_a y_a + g_b y_b`` with binary gates whose
  value is the one-hot active choice and whose gradient is that of the pair's
  softmax (straight-through).  The inactive path's output is what makes the
  gradient informative: every searched convolution is followed by a
  BatchNorm, which cancels any rescaling of the active path's own output;
* the logits minimise ``CE + penalty(E[cost])`` where ``E[cost] =
  sum_layers sum_candidates p * cost`` (from a :mod:`wa_tf.cost` model) is
  divided by the all-normal cost at the widest bit-width searched, so the
  weight is scale-free: ``penalty = latency_weight * ratio``, or with a
  target ratio ``T``, ``latency_weight * max(0, ratio / T - 1)`` (no pressure
  once the expected cost is under the target).

The result is the per-layer argmax (:func:`derive_architecture`), written as
an architecture JSON file for ``bin/train.py --architecture``.
"""

import contextlib
import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf import cost as cost_lib
from wa_tf import data, models
from wa_tf.choices import MAX_BITS, MIN_BITS, valid_bits
from wa_tf.data import DATASETS
from wa_tf.layers import winograd_conv
from wa_tf.plotting import pyplot
from wa_tf.quantization import copy_weights
from wa_tf.quantization.quantizers import EMAQuantizer, fake_quant
from wa_tf.training import experiment, run_folder
from wa_tf.training.optimizer import AdamL2
from wa_tf.training.run_folder import REPORT_FILE, Lock
from wa_tf.transforms import STAGES, winograd_matrices

SEARCH_DIR = "Search"
ARCHITECTURE_FILE = "architecture.json"
SEARCH_FILE = "search.json"
PLOT_FILE = "choices.png"
LOG_DIR = "logs"
CHECKPOINT_DIR = "checkpoints"
RUNNING, FINISHED = "running", "finished"
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
      candidates: The :class:`wa_tf.cost.Candidate` s, normal or Winograd,
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


# ----------------------------------------------------------------------------
# The search run


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """A search's settings; the fields are ``bin/search.py``'s flags.

    Raises (on construction):
      ValueError: The message starts with the bad field's name.
    """
    candidates: Tuple[str, ...] = ("normal", "F2", "F4", "F6")
    bits_candidates: Tuple[Optional[int], ...] = (8,)
    cost_model: str = "analytic"
    cost_batch_size: int = 1
    latency_weight: float = 1.0
    target_latency: Optional[float] = None
    epochs: int = 10
    steps_per_epoch: Optional[int] = None
    batch_size: int = 64
    lr: float = 0.001
    arch_lr: float = 0.001
    arch_fraction: float = 0.2
    mult: float = 0.5
    per_tap: bool = False
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    seed: int = 1
    outDir: str = "experiments/"
    modelDir: Optional[str] = None
    modelToLoad: str = "final"

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "bits_candidates", tuple(self.bits_candidates))
        search_space([], self.candidates, self.bits_candidates)
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates has duplicates: {','.join(self.candidates)}")
        if len(set(self.bits_candidates)) != len(self.bits_candidates):
            raise ValueError("bits_candidates has duplicates")
        for bits in self.bits_candidates:
            if bits is not None and not (isinstance(bits, int) and valid_bits(bits)):
                raise ValueError(f"bits_candidates must be integers from {MIN_BITS} to "
                                 f"{MAX_BITS} or FP; got {bits!r}")
        for name in ("epochs", "batch_size", "cost_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer; "
                             f"got {self.steps_per_epoch}")
        for name in ("lr", "arch_lr"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number; got {getattr(self, name)}")
        if not np.isfinite(self.latency_weight) or self.latency_weight < 0:
            raise ValueError(f"latency_weight must be a number >= 0; got {self.latency_weight}")
        if self.target_latency is not None and not (np.isfinite(self.target_latency)
                                                    and self.target_latency > 0):
            raise ValueError("target_latency must be a positive fraction of the all-normal "
                             f"cost (e.g. 0.4); got {self.target_latency}")
        if not 0 < self.arch_fraction < 1:
            raise ValueError(f"arch_fraction must be in (0, 1); got {self.arch_fraction}")
        if not 1 / 64 <= self.mult <= 1:
            raise ValueError(f"mult must be in (0, 1] (and at least 1/64); got {self.mult}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; "
                             f"got {self.dataset!r}")
        try:
            cost_lib.get_cost_model(self.cost_model, batch_size=self.cost_batch_size)
        except ValueError as e:
            raise ValueError(f"cost_model: {e}") from None
        if not self.outDir:
            raise ValueError("outDir must not be empty")

    def to_flags(self) -> Dict:
        """The flag values of ``bin/search.py`` (lists as comma-separated strings)."""
        values = dataclasses.asdict(self)
        values["candidates"] = ",".join(self.candidates)
        values["bits_candidates"] = ",".join("FP" if b is None else str(b)
                                             for b in self.bits_candidates)
        return values


def parse_bits(text: str) -> Tuple[Optional[int], ...]:
    """``'8,16'`` -> ``(8, 16)``; ``FP`` (or ``32``) is None, FP32.

    Raises:
      ValueError: On anything else.
    """
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if item.upper() in ("FP", "FP32", "32"):
            values.append(None)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"bits_candidates must be comma-separated bit-widths (2..16) or "
                             f"FP; got {text!r}") from None
    return tuple(values)


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the (cost, accuracy) points that no other point beats, by increasing cost.

    A point is beaten when another costs no more and is no less accurate, and
    is cheaper or more accurate.  Equal points are all kept.
    """
    front = [i for i, (c, a) in enumerate(points)
             if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def find_unfinished(config: SearchConfig) -> Tuple[Optional[str], Optional[Lock]]:
    """The newest unfinished search folder of the same settings whose lock is free.

    Returns:
      (folder, held :class:`wa_tf.training.run_folder.Lock`) or (None, None).
    """
    # search.json holds the flags as JSON gives them back (tuples as lists).
    flags = json.loads(json.dumps(config.to_flags()))

    def matches(path):
        state = run_folder.read_json(os.path.join(path, SEARCH_FILE))
        return bool(state) and state.get("status") == RUNNING and state.get("flags") == flags

    return run_folder.find_unfinished(os.path.join(config.outDir, SEARCH_DIR), matches)


def _split_train(train, n, fraction, seed):
    """(weight part, logit part) of the training split: disjoint, chosen by `seed`."""
    n_arch = int(round(fraction * n))
    if not 0 < n_arch < n:
        raise ValueError(f"arch_fraction={fraction} of {n} training examples leaves an empty "
                         "part for the weights or the logits")
    is_arch = np.zeros(n, bool)
    is_arch[np.random.RandomState(seed + 7).permutation(n)[:n_arch]] = True
    mask = tf.constant(is_arch)

    def part(keep_arch, count):
        ds = train.enumerate().filter(lambda i, ex: tf.equal(mask[i], keep_arch))
        ds = ds.map(lambda i, ex: ex)
        return ds.apply(tf.data.experimental.assert_cardinality(count))

    return part(False, n - n_arch), part(True, n_arch)


def _architecture_table(architecture, costs_by_layer, normal_by_layer, layers, probs):
    header = ["layer", "input", "choice", "p", "cost", "normal cost", "x"]
    rows = []
    for layer in layers:
        choice = architecture[layer.name]
        key = cost_lib.Candidate.from_choice(choice).key
        c, n = costs_by_layer[layer.name], normal_by_layer[layer.name]
        rows.append([layer.name, f"{layer.height}x{layer.width}x{layer.in_channels}",
                     ("flex " if choice["conv"] == "flex" else "") + key,
                     f"{probs[layer.name][key]:.3f}", f"{c:.4g}", f"{n:.4g}", f"{n / c:.2f}"])
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    lines = ["  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)


def _plot(path, history, layer_names, candidate_keys):
    """A grid of per-layer probability curves; returns False without matplotlib."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    cols = 4
    rows = -(-len(layer_names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True,
                             sharey=True, squeeze=False)
    epochs = [entry["epoch"] for entry in history]
    for ax, name in zip(axes.flat, layer_names):
        for key in candidate_keys[name]:
            ax.plot(epochs, [entry["probabilities"][name][key] for entry in history],
                    marker=".", label=key)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(layer_names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("epoch")
    fig.supylabel("probability")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


class _Searcher:
    """The state of one search: supernet, optimizers, data, costs and steps."""

    def __init__(self, config: SearchConfig):
        self.config = config
        tf.random.set_seed(config.seed)
        self.splits, self.info = data.load(config.dataset, data_dir=config.data_dir,
                                           seed=config.seed)
        self.data = data
        self.layers = cost_lib.searchable_layers(config.mult, self.info.image_shape)
        self.space = search_space(self.layers, config.candidates, config.bits_candidates)
        cost_model = cost_lib.get_cost_model(config.cost_model,
                                             batch_size=config.cost_batch_size)
        self.costs = cost_table(self.space, self.layers, cost_model, config.bits_candidates)
        self.cost_model = cost_model
        self.model = build_supernet(self.space, config.mult, self.info.num_classes,
                                    self.info.image_shape, config.per_tap)
        self.mixed = mixed_layers(self.model)
        self.arch_vars = [layer.alpha for layer in self.mixed]
        arch_ids = {id(v) for v in self.arch_vars}
        self.weight_vars = [v for v in self.model.trainable_variables if id(v) not in arch_ids]
        # No weight decay: through Adam's normalisation, coupled L2 on the transforms of a
        # candidate that is not sampled would shrink them by about lr every step.
        self.weight_opt = AdamL2(config.lr, l2=0.0)
        # ProxylessNAS's architecture optimizer: Adam without momentum.
        self.arch_opt = tf_keras.optimizers.Adam(config.arch_lr, beta_1=0.0, epsilon=1e-8)
        self.weight_opt.build(self.weight_vars)
        self.arch_opt.build(self.arch_vars)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(model=self.model, weight_optimizer=self.weight_opt,
                                              arch_optimizer=self.arch_opt, epoch=self.epoch)
        n = self.info.num_examples["train"]
        self.weight_split, self.arch_split = _split_train(
            self.splits["train"], n, config.arch_fraction, config.seed)
        self.steps = (n - int(round(config.arch_fraction * n))) // config.batch_size
        if self.steps < 1:
            raise ValueError(f"batch_size {config.batch_size} is larger than the "
                             f"{n - int(round(config.arch_fraction * n))} examples of the "
                             "weights' part of the training split")
        if config.steps_per_epoch:
            self.steps = min(self.steps, config.steps_per_epoch)
        self.loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.weight_step = tf.function(self._weight_step, autograph=False)
        self.arch_step = tf.function(self._arch_step, autograph=False)
        self.eval_step = tf.function(self._eval_step, autograph=False)

    def _seed(self, step, offset):
        return tf.stack([tf.constant(self.config.seed, tf.int64),
                         tf.cast(step, tf.int64) * 1000 + offset])

    def _weight_step(self, images, labels, step):
        sample_paths(self.mixed, self._seed(step, 0), pair=False)
        with tf.GradientTape() as tape:
            loss = self.loss_fn(labels, self.model(images, training=True))
        grads = tape.gradient(loss, self.weight_vars)
        self.weight_opt.apply_gradients(zip(grads, self.weight_vars))
        return loss

    def objective(self, ce):
        """``(loss, expected cost, ratio)`` of the logit step."""
        expected = expected_cost(self.mixed, self.costs.costs)
        ratio = expected / self.costs.reference
        return ce + latency_penalty(ratio, self.config.latency_weight,
                                    self.config.target_latency), expected, ratio

    def _arch_step(self, images, labels, step):
        sample_paths(self.mixed, self._seed(step, 500), pair=True)
        with tf.GradientTape() as tape, two_paths(self.mixed):
            ce = self.loss_fn(labels, self.model(images, training=True))
            loss, expected, _ = self.objective(ce)
        grads = tape.gradient(loss, self.arch_vars)
        self.arch_opt.apply_gradients(zip(grads, self.arch_vars))
        return ce, expected

    def _eval_step(self, images, labels):
        logits = self.model(images, training=False)
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32))

    def train_epoch(self, epoch):
        config = self.config
        weights = self.data.pipeline(self.weight_split, config.batch_size, self.info, True,
                                     seed=config.seed + 1000 * epoch)
        arch = self.data.pipeline(self.arch_split, config.batch_size, self.info, True,
                                  seed=config.seed + 1000 * epoch + 1).repeat()
        losses, ces = [], []
        for i, ((x, y), (xa, ya)) in enumerate(zip(weights.take(self.steps), arch)):
            step = tf.constant(epoch * self.steps + i, tf.int64)
            losses.append(float(self.weight_step(x, y, step)))
            ce, _ = self.arch_step(xa, ya, step)
            ces.append(float(ce))
        return float(np.mean(losses)), float(np.mean(ces))

    def validate(self):
        select(self.model)
        correct, total = 0.0, 0
        for x, y in self.data.pipeline(self.splits["validation"], self.config.batch_size,
                                       self.info, False):
            correct += float(self.eval_step(x, y))
            total += int(y.shape[0])
        return correct / max(total, 1)

    def expected(self):
        expected = float(expected_cost(self.mixed, self.costs.costs))
        return expected, expected / self.costs.reference


def _epoch_entry(searcher, epoch, **values):
    expected, ratio = searcher.expected()
    entry = {"epoch": epoch, "probabilities": probabilities(searcher.model),
             "expected_cost": expected, "expected_cost_ratio": ratio,
             "architecture_cost": cost_lib.model_cost(derive_architecture(searcher.model),
                                                      searcher.layers, searcher.cost_model)}
    entry.update(values)
    return entry


def _summaries(writer, entry):
    with writer.as_default(step=entry["epoch"]):
        tf.summary.scalar("expected_cost", entry["expected_cost"])
        tf.summary.scalar("expected_cost_ratio", entry["expected_cost_ratio"])
        tf.summary.scalar("architecture_cost", entry["architecture_cost"])
        for key in ("weight_loss", "arch_ce", "val_accuracy"):
            if key in entry:
                tf.summary.scalar(key, entry[key])
        for layer, probs in entry["probabilities"].items():
            for key, p in probs.items():
                tf.summary.scalar(f"probability/{layer}/{key}", p)
    writer.flush()


def _warm_start(searcher, config):
    source, _ = experiment.load_model(config.modelDir, config.modelToLoad)
    result = copy_weights(source, searcher.model)
    shared = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")
    return {"modelDir": config.modelDir, "modelToLoad": config.modelToLoad,
            "copied": len(result["copied"]),
            # The candidates' transforms, quantizer states and logits start afresh.
            "not_found": [k for k in result["not_found"] if k.split("/")[-1] in shared]}


def run(config: SearchConfig, log=print) -> str:
    """Runs (or resumes) a search; returns its folder ``<outDir>/Search/<UTC time>``.

    Writes there ``FLAGS.txt``, ``search.json`` (status, settings, per-epoch
    probabilities, expected cost, the argmax architecture's cost and the
    validation accuracy of the argmax subnet), ``logs/`` (TensorBoard),
    ``checkpoints/`` (weights, logits, optimizers and epoch, after every epoch)
    and, when it finishes, ``architecture.json``, ``report.txt`` and
    ``choices.png`` (without matplotlib: none, and ``report.txt`` says so).
    An unfinished folder of the same settings is resumed from its last epoch.

    Raises:
      ValueError: On bad data, cost-model or warm-start settings (one line).
    """
    searcher = _Searcher(config)
    run_dir, lock = find_unfinished(config)
    state = run_folder.read_json(os.path.join(run_dir, SEARCH_FILE)) if run_dir else None
    manager = None
    if run_dir:
        manager = tf.train.CheckpointManager(searcher.checkpoint,
                                             os.path.join(run_dir, CHECKPOINT_DIR), 1)
        if manager.latest_checkpoint:
            searcher.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        elif config.modelDir:
            _warm_start(searcher, config)
        start = int(searcher.epoch.numpy())
        state["history"] = state["history"][:start + 1]
        log(f"Resuming {run_dir} at epoch {start}")
    else:
        run_dir = run_folder.create(os.path.join(config.outDir, SEARCH_DIR))
        lock = Lock(run_dir)
        lock.acquire()
        run_folder.write_flags(run_dir, config.to_flags())
        manager = tf.train.CheckpointManager(searcher.checkpoint,
                                             os.path.join(run_dir, CHECKPOINT_DIR), 1)
        warm = _warm_start(searcher, config) if config.modelDir else None
        state = {"status": RUNNING, "flags": config.to_flags(),
                 "cost_model": searcher.costs.description, "cost_unit": searcher.costs.unit,
                 "reference_bits": searcher.costs.reference_bits,
                 "all_normal_cost": {("FP" if b is None else str(b)): c
                                     for b, c in searcher.costs.normal.items()},
                 "candidates": {name: [c.key for c in cands]
                                for name, cands in searcher.space.items()},
                 "costs": searcher.costs.costs, "warm_start": warm,
                 "steps_per_epoch": searcher.steps,
                 "history": [_epoch_entry(searcher, 0)]}
        run_folder.write_json(os.path.join(run_dir, SEARCH_FILE), state)
        start = 0
        log(f"Searching in {run_dir}")
    writer = tf.summary.create_file_writer(os.path.join(run_dir, LOG_DIR))
    if start == 0:
        _summaries(writer, state["history"][0])
    try:
        for epoch in range(start, config.epochs):
            weight_loss, arch_ce = searcher.train_epoch(epoch)
            accuracy = searcher.validate()
            entry = _epoch_entry(searcher, epoch + 1, weight_loss=weight_loss, arch_ce=arch_ce,
                                 val_accuracy=accuracy)
            state["history"].append(entry)
            _summaries(writer, entry)
            # search.json first: a run killed before the checkpoint redoes this epoch.
            run_folder.write_json(os.path.join(run_dir, SEARCH_FILE), state)
            searcher.epoch.assign(epoch + 1)
            manager.save()
            log(f"epoch {epoch + 1}/{config.epochs}: weight loss {weight_loss:.4f}, "
                f"logit CE {arch_ce:.4f}, expected cost {entry['expected_cost_ratio']:.3f} x "
                f"all-normal, argmax val accuracy {accuracy:.4f}")
        _finish(searcher, run_dir, state)
    finally:
        writer.close()
    lock.release(remove=True)
    return run_dir


def _finish(searcher, run_dir, state):
    architecture = derive_architecture(searcher.model)
    run_folder.write_json(os.path.join(run_dir, ARCHITECTURE_FILE), architecture)
    layers, costs = searcher.layers, searcher.costs
    chosen = cost_lib.layer_costs(architecture, layers, searcher.cost_model)
    bits = costs.reference_bits
    normal_at = {}
    for layer in layers:
        choice_bits = architecture[layer.name]["bits"]
        normal_at[layer.name] = searcher.cost_model.cost(
            layer, cost_lib.Candidate(cost_lib.NORMAL, None, choice_bits))
    total = sum(chosen.values())
    final = state["history"][-1]
    state.update({"status": FINISHED, "architecture": architecture,
                  "architecture_cost": total, "layer_costs": chosen,
                  "speedup_vs_all_normal": {k: v / total
                                            for k, v in state["all_normal_cost"].items()}})
    plotted = _plot(os.path.join(run_dir, PLOT_FILE), state["history"],
                    [layer.name for layer in layers], state["candidates"])
    lines = [f"wiNAS search: {searcher.model.name}, mult {searcher.config.mult}, dataset "
             f"{searcher.config.dataset}",
             f"Candidates: {', '.join(searcher.config.candidates)} at bits "
             f"{state['flags']['bits_candidates']}",
             f"Cost model: {costs.description} ({costs.unit})",
             f"Objective: CE + latency_weight {searcher.config.latency_weight:g} x "
             + ("E[cost] / all-normal" if searcher.config.target_latency is None else
                f"max(0, E[cost] / all-normal / {searcher.config.target_latency:g} - 1)")
             + f" (all-normal at {'FP32' if bits is None else f'{bits} bits'})",
             f"Epochs {searcher.config.epochs} x {searcher.steps} steps; argmax validation "
             f"accuracy {final.get('val_accuracy', float('nan')):.4f}",
             "",
             "Chosen architecture (normal cost: the direct convolution at the chosen bits):",
             _architecture_table(architecture, chosen, normal_at, layers,
                                 final["probabilities"]),
             "",
             f"Chosen: {total:.6g}; all-normal at the chosen bits: "
             f"{sum(normal_at.values()):.6g} ({sum(normal_at.values()) / total:.2f}x)"]
    for key, value in state["all_normal_cost"].items():
        lines.append(f"All-normal at {'FP32' if key == 'FP' else key + ' bits'}: {value:.6g} "
                     f"({value / total:.2f}x the chosen)")
    if not plotted:
        lines.append(f"No {PLOT_FILE}: matplotlib is not installed (pip install matplotlib).")
    run_folder.write_text(os.path.join(run_dir, REPORT_FILE), "\n".join(lines) + "\n")
    run_folder.write_json(os.path.join(run_dir, SEARCH_FILE), state)
