"""wiNAS: the search run, a latency-aware search of each convolution's algorithm and bits.

The supernet (:mod:`wa_tf.search.supernet`) gives every searchable 3x3
convolution of ``wa_tf.models.resnet18_like`` all its candidates and per-layer
architecture logits ``alpha``.

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
  sum_layers sum_candidates p * cost`` (from a :mod:`wa_tf.search.cost` model) is
  divided by the all-normal cost at the widest bit-width searched, so the
  weight is scale-free: ``penalty = latency_weight * ratio``, or with a
  target ratio ``T``, ``latency_weight * max(0, ratio / T - 1)`` (no pressure
  once the expected cost is under the target).

The result is the per-layer argmax (:func:`derive_architecture`), written as
an architecture JSON file for ``bin/train.py --architecture``.
"""

import json
import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf import data
from wa_tf.quantization import copy_weights
from wa_tf.search import cost as cost_lib
from wa_tf.search.config import SearchConfig
from wa_tf.search.results import architecture_table, plot_probabilities
from wa_tf.search.supernet import (
    build_supernet,
    cost_table,
    derive_architecture,
    expected_cost,
    latency_penalty,
    mixed_layers,
    probabilities,
    sample_paths,
    search_space,
    select,
    two_paths,
)
from wa_tf.training import experiment, run_folder
from wa_tf.training.optimizer import AdamL2
from wa_tf.training.run_folder import REPORT_FILE, Lock

SEARCH_DIR = "Search"
ARCHITECTURE_FILE = "architecture.json"
SEARCH_FILE = "search.json"
PLOT_FILE = "choices.png"
LOG_DIR = "logs"
CHECKPOINT_DIR = "checkpoints"
RUNNING, FINISHED = "running", "finished"


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
    plotted = plot_probabilities(os.path.join(run_dir, PLOT_FILE), state["history"],
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
             architecture_table(architecture, chosen, normal_at, layers,
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
