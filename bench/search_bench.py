#!/usr/bin/env python
"""wiNAS on a CIFAR-10 proxy: searched architectures against uniform ones, accuracy vs cost.

Runs, one after another (each step skipped when its result is already in
--results_dir, so an interrupted bench resumes where it stopped):

1. the uniform rows of the proxy sweep (``configs/sweeps/cifar10_proxy.json``):
   all-normal INT8 from scratch, then (adapted from it, as the proxy does)
   all-normal INT8 for as many more epochs as the others, all-flex F2/F4/F6 INT8
   and per-tap flex F4/F6 INT8;
2. one wiNAS search per entry of --searches, warm-started from the all-normal
   INT8 run (``bin/search.py``);
3. each searched architecture adapted from the all-normal INT8 run with the
   uniform Winograd rows' schedule (``bin/adapt.py --architecture``);

then writes ``search_bench.md`` (table), ``search_bench.jsonl`` and
``search_bench.png`` (validation accuracy against cost under the cost model,
Pareto front marked) into --results_dir, and prints the table and whether the
goal is met: a searched model at least --goal_speedup times cheaper than
all-normal INT8 within --goal_points of its validation accuracy.

Example (the shared CIFAR-10 training JPEGs; validation carved from them):
  mkdir -p /tmp/cifar10_jpeg
  tar -xzf ../shared/data/cifar10_train_jpeg.tar.gz -C /tmp/cifar10_jpeg
  python bench/search_bench.py --data_dir=/tmp/cifar10_jpeg --results_dir=/tmp/search_bench \
      --reuse=/tmp/sweep   # optional: the proxy sweep's results; its finished rows are reused

--searches lists ``name:latency_weight:bits_candidates[:target_latency]`` entries
(bits joined by ``/``), e.g. ``w0.5_int8:0.5:8,t0.37_int4-8:2:4/8:0.37``: a target
stops the latency pressure once the expected cost is under that fraction of
all-normal (1 / 2.66 = 0.376).
"""
import json
import os
import shutil
import subprocess
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import wa_tf  # noqa: E402,F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf import search as search_lib  # noqa: E402
from wa_tf import sweep as sweep_lib  # noqa: E402
from wa_tf.models import architecture as arch_lib  # noqa: E402
from wa_tf.search import cost as cost_lib  # noqa: E402
from wa_tf.training import experiment  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("data_dir", None, "The CIFAR-10 image folder (train/<class>/*.jpg).")
flags.DEFINE_string("results_dir", "results/search_bench", "Results folder.")
flags.DEFINE_string("sweep", os.path.join(ROOT, "configs", "sweeps", "cifar10_proxy.json"),
                    "Sweep file giving the schedule and the uniform rows.")
flags.DEFINE_list("uniform_rows", ["normal_int8", "normal_int8_adapted", "flex_f2_int8",
                                   "flex_f4_int8", "flex_f6_int8", "flex_f4_int8_pertap",
                                   "flex_f6_int8_pertap"],
                  "Rows of --sweep to compare with (the first is the all-normal run that "
                  "everything adapts from).")
flags.DEFINE_string("baseline_row", "normal_int8_adapted", "The all-normal INT8 row the "
                    "goal compares with: the one of the searched rows' schedule.")
flags.DEFINE_string("reuse", None, "A results folder of --sweep: its finished rows are used "
                    "(linked) instead of trained again.")
flags.DEFINE_list("searches", ["w0.05_int8:0.05:8", "w0.5_int8:0.5:8",
                                "t0.37_int4-8:2:4/8:0.37", "t0.37_int5-8:2:5/6/8:0.37"],
                  "Searches, name:latency_weight:bits[:target_latency] (bits "
                  "'/'-separated; target as a fraction of all-normal at the widest bits).")
flags.DEFINE_string("candidates", "normal,F2,F4,F6", "Algorithms searched per layer.")
flags.DEFINE_string("cost_model", "analytic", "Cost model of the searches and of the table.")
flags.DEFINE_integer("search_epochs", 3, "Search epochs.")
flags.DEFINE_integer("steps_per_epoch", 100, "Search steps per epoch (weights and logits).")
flags.DEFINE_float("arch_lr", 0.02, "Learning rate of the architecture logits: the proxy's "
                   "few hundred steps need more than bin/search.py's default.")
flags.DEFINE_boolean("per_tap", True, "Per-tap ranges for the searched Winograd layers "
                     "(search and retraining).")
flags.DEFINE_integer("adapt_epochs", 5, "Epochs of each searched architecture's adaptation.")
flags.DEFINE_float("goal_speedup", 2.66, "Goal: cost at most 1/this of all-normal INT8 ...")
flags.DEFINE_float("goal_points", 0.5, "... within this many points of its accuracy.")
flags.DEFINE_boolean("dry_run", False, "Print what would run; run nothing.")

FLAGS = flags.FLAGS
BENCH_SWEEP = "search_bench_sweep.json"
TABLE, JSONL, PLOT = "search_bench.md", "search_bench.jsonl", "search_bench.png"


def parse_searches(entries):
    """``['name:weight:8/4[:target]']`` -> ``[(name, weight, (8, 4), target or None)]``.

    Raises:
      ValueError: naming the entry and the expected form.
    """
    parsed, names = [], set()
    for entry in entries:
        parts = entry.split(":")
        try:
            if len(parts) not in (3, 4) or not parts[0] or parts[0] in names:
                raise ValueError
            weight = float(parts[1])
            bits = search_lib.parse_bits(parts[2].replace("/", ","))
            target = float(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise ValueError(f"--searches: {entry!r} is not name:latency_weight:bits[:target] "
                             "with a new name (e.g. w2_int8:2:8 or t0.37:2:4/8:0.37)") from None
        names.add(parts[0])
        parsed.append((parts[0], weight, bits, target))
    return parsed


def run_architecture(model_dir, result, layers):
    """The architecture a finished run trained: its copy of the file, else the uniform one
    of its sweep result (:func:`wa_tf.sweep.row_result`'s conv, F and bits)."""
    copy = os.path.join(model_dir, experiment.ARCHITECTURE_FILE)
    if os.path.isfile(copy):
        return arch_lib.load_architecture(copy).to_dict()
    return cost_lib.uniform_architecture(layers, result["conv"], result["F"], result["bits"])


def _log(line):
    print(line, flush=True)


def _bench_sweep(base, searches, results_dir):
    """The bench's sweep file: --sweep's uniform rows, then one adapted row per search."""
    with open(base.path, encoding="utf-8") as f:
        spec = json.load(f)
    by_name = {r["name"]: r for r in spec["rows"]}
    missing = [n for n in FLAGS.uniform_rows if n not in by_name]
    if missing:
        raise ValueError(f"--uniform_rows: {', '.join(missing)} not in {base.path}")
    rows = []
    for name in FLAGS.uniform_rows:
        row = dict(by_name[name])
        if "flagfile" in row:  # relative to the original sweep file
            row["flagfile"] = os.path.normpath(os.path.join(os.path.dirname(base.path),
                                                            row["flagfile"]))
        if row.get("adapt_from") and row["adapt_from"] not in FLAGS.uniform_rows:
            raise ValueError(f"--uniform_rows: {name} adapts from {row['adapt_from']}, "
                             "which is not listed")
        rows.append(row)
    source = FLAGS.uniform_rows[0]
    for name, weight, _, _ in searches:
        arch_path = os.path.join(os.path.abspath(results_dir), "architectures", f"{name}.json")
        rows.append({"name": f"searched_{name}", "binary": "adapt", "adapt_from": source,
                     "flags": [f"--architecture={arch_path}", f"--epochs={FLAGS.adapt_epochs}",
                               "--warmup"] + (["--per_tap"] if FLAGS.per_tap else []),
                     "description": f"the architecture of search {name} (latency weight "
                                    f"{weight:g}), adapted from {source}"})
    out = {"description": f"bench/search_bench.py: uniform rows of {base.path} and searched "
                          "architectures", "flags": list(spec.get("flags", [])), "rows": rows}
    path = os.path.join(results_dir, BENCH_SWEEP)
    os.makedirs(results_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return sweep_lib.load_sweep(path)


def _link_reused(sweep, results_dir):
    if not FLAGS.reuse:
        return
    for row in sweep.rows:
        src = sweep_lib.row_dir(FLAGS.reuse, row.name)
        dst = sweep_lib.row_dir(results_dir, row.name)
        if os.path.lexists(dst) or not os.path.isdir(src):
            continue
        if sweep_lib.run_status(sweep_lib.find_run(src)) == experiment.FINISHED:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.abspath(src), dst)
            _log(f"{row.name}: reusing the finished run in {src}")


def _finished_search(out_dir):
    """The newest finished search folder under `out_dir`, or None."""
    root = os.path.join(out_dir, "Search")
    if not os.path.isdir(root):
        return None
    for name in sorted(os.listdir(root), reverse=True):
        try:
            with open(os.path.join(root, name, "search.json"), encoding="utf-8") as f:
                if json.load(f).get("status") == "finished":
                    return os.path.join(root, name)
        except (OSError, ValueError):
            continue
    return None


def _run_searches(searches, results_dir, source_dir, extra):
    for name, weight, bits, target in searches:
        out_dir = os.path.join(results_dir, "search", name)
        arch_copy = os.path.join(results_dir, "architectures", f"{name}.json")
        done = _finished_search(out_dir)
        if done is None:
            cmd = [sys.executable, os.path.join(ROOT, "bin", "search.py"),
                   f"--candidates={FLAGS.candidates}",
                   "--bits_candidates=" + ",".join("FP" if b is None else str(b) for b in bits),
                   f"--cost_model={FLAGS.cost_model}", f"--latency_weight={weight}"]
            cmd += [] if target is None else [f"--target_latency={target}"]
            cmd += [f"--epochs={FLAGS.search_epochs}",
                    f"--steps_per_epoch={FLAGS.steps_per_epoch}", f"--arch_lr={FLAGS.arch_lr}",
                    f"--per_tap={FLAGS.per_tap}", f"--modelDir={source_dir}",
                    f"--outDir={out_dir}"] + list(extra)
            if FLAGS.dry_run:
                _log(f"search {name}: {' '.join(cmd)}")
                continue
            log_path = os.path.join(results_dir, "logs", f"search_{name}.log")
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            _log(f"search {name}: {' '.join(cmd[1:])}\nsearch {name}: output in {log_path}")
            with open(log_path, "a", encoding="utf-8") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            done = _finished_search(out_dir)
            if code != 0 or done is None:
                _log(f"search {name}: failed (exit status {code}); see {log_path}")
                continue
        os.makedirs(os.path.dirname(arch_copy), exist_ok=True)
        shutil.copyfile(os.path.join(done, "architecture.json"), arch_copy)
        _log(f"search {name}: finished in {done}")


def _results(sweep, results_dir, searches):
    model = cost_lib.get_cost_model(FLAGS.cost_model)
    weights = {f"searched_{n}": (w, b, t) for n, w, b, t in searches}
    out = []
    for r in sweep_lib.summarize(sweep, results_dir, print_fn=_log):
        entry = {"row": r["row"], "status": r["status"],
                 "val_final": (r.get("val_accuracy") or {}).get("final"),
                 "val_best": (r.get("val_accuracy") or {}).get("best"),
                 "epochs": r.get("epochs"), "per_tap": r.get("per_tap"),
                 "git_commit": r.get("git_commit")}
        if r["row"] in weights:
            (entry["latency_weight"], entry["bits_candidates"],
             entry["target_latency"]) = weights[r["row"]]
        model_dir = sweep_lib.find_run(sweep_lib.row_dir(results_dir, r["row"]))
        if r["status"] == sweep_lib.FINISHED and model_dir:
            # Costs at the row's own width, against all-normal INT8 at that width.
            layers = cost_lib.searchable_layers(r["mult"])
            normal = cost_lib.model_cost(
                cost_lib.uniform_architecture(layers, "normal", bits=8), layers, model)
            arch = run_architecture(model_dir, r, layers)
            entry["cost"] = cost_lib.model_cost(arch, layers, model)
            entry["speedup"] = normal / entry["cost"]
            entry["choices"] = _summary(arch)
        out.append(entry)
    return out, model.description


def _summary(arch):
    """'F4 x10, F2 x4 (INT8), normal x2 (INT4)'-style count of an architecture's choices."""
    counts = {}
    for choice in arch.values():
        algo = "normal" if choice["conv"] == "normal" else \
            f"{choice['conv']} F{choice['tile_size']}"
        key = f"{algo} {'FP32' if choice['bits'] is None else 'INT%d' % choice['bits']}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _pct(v):
    return "—" if v is None else f"{100 * v:.2f}"


def _table(entries, description, goal_line):
    lines = [f"Cost model: {description}; speedup = all-normal INT8 cost / the row's cost.", "",
             "| row | latency weight | target | bits searched | per-tap | speedup | val final | "
             "val best | choices | status |", "| --- | ---: | ---: | --- | --- | ---: | ---: | "
             "---: | --- | --- |"]
    for e in entries:
        bits = "/".join("FP" if b is None else str(b) for b in e.get("bits_candidates", ()))
        lines.append(
            f"| {e['row']} | {e.get('latency_weight', '—')} | "
            f"{e.get('target_latency') or '—'} | {bits or '—'} | "
            f"{'yes' if e.get('per_tap') else 'no'} | "
            f"{'%.2fx' % e['speedup'] if 'speedup' in e else '—'} | {_pct(e['val_final'])} | "
            f"{_pct(e['val_best'])} | {e.get('choices', '—')} | {e['status']} |")
    return "\n".join(lines + ["", goal_line, ""])


def _goal(entries):
    by = {e["row"]: e for e in entries}
    base = by.get(FLAGS.baseline_row) or by.get(FLAGS.uniform_rows[0])
    if not base or base.get("val_final") is None:
        return "Goal: not evaluated (no finished all-normal INT8 row)."
    hits = [e for e in entries if e["row"].startswith("searched_") and "speedup" in e
            and e["speedup"] >= FLAGS.goal_speedup
            and e["val_final"] >= base["val_final"] - FLAGS.goal_points / 100]
    head = (f"Goal (>= {FLAGS.goal_speedup:g}x cheaper than all-normal INT8, within "
            f"{FLAGS.goal_points:g} point of {base['row']}'s {_pct(base['val_final'])}%): ")
    if hits:
        return head + "met by " + ", ".join(
            f"{e['row']} ({e['speedup']:.2f}x, {_pct(e['val_final'])}%)" for e in hits) + "."
    return head + "not met."


def _plot(entries, path):
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    done = [e for e in entries if "speedup" in e and e["val_final"] is not None]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    pts = [(1 / e["speedup"], e["val_final"]) for e in done]
    front = search_lib.pareto_front(pts)
    ax.plot([done[i]["speedup"] for i in front], [100 * done[i]["val_final"] for i in front],
            color="0.6", lw=1, ls="--", zorder=1, label="Pareto front")
    # Labels cycle through three heights, in order of speedup, so neighbours do not overlap.
    order = sorted(range(len(done)), key=lambda i: (done[i]["speedup"], done[i]["val_final"]))
    for rank, i in enumerate(order):
        e = done[i]
        searched = e["row"].startswith("searched_")
        x, y = e["speedup"], 100 * e["val_final"]
        ax.scatter(x, y, zorder=3, marker="*" if searched else "o", s=140 if searched else 45,
                   color="tab:red" if searched else "tab:blue")
        ax.annotate(e["row"], (x, y), fontsize=7, xytext=(5, (6, -11, 17)[rank % 3]),
                    textcoords="offset points")
    ax.axvline(FLAGS.goal_speedup, color="tab:red", lw=0.8, alpha=0.5)
    ax.set_xlabel("speedup over all-normal INT8 (cost model)")
    ax.set_ylabel("validation accuracy, final (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv):
    extra = argv[1:]
    if not FLAGS.data_dir and not FLAGS.dry_run:
        sys.exit("error: --data_dir is required: the CIFAR-10 image folder "
                 "(train/<class>/*.jpg)")
    try:
        searches = parse_searches(FLAGS.searches)
        base = sweep_lib.load_sweep(FLAGS.sweep)
        results_dir = os.path.abspath(FLAGS.results_dir)
        sweep = _bench_sweep(base, searches, results_dir)
    except ValueError as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    from wa_tf.machine import cpu_model  # pylint: disable=import-outside-toplevel
    _log(f"search_bench on {cpu_model()}; results in {results_dir}")
    _link_reused(sweep, results_dir)
    data = [f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else []
    row_flags = data + list(extra)
    bin_dir = os.path.join(ROOT, "bin")
    uniform = [r.name for r in sweep.rows if not r.name.startswith("searched_")]
    sweep_lib.run_sweep(sweep, results_dir, bin_dir, extra_flags=row_flags,
                        only=uniform[:1], dry_run=FLAGS.dry_run, print_fn=_log)
    source_dir = sweep_lib.find_run(sweep_lib.row_dir(results_dir, uniform[0]))
    if sweep_lib.run_status(source_dir) != experiment.FINISHED and not FLAGS.dry_run:
        sys.exit(f"error: row {uniform[0]} did not finish; see {results_dir}/logs")
    # The searches take the dataset and width of the run they warm-start from.
    source = experiment.read_flags(source_dir) if source_dir else {}
    search_flags = [f"--dataset={source.get('dataset', 'image_folder')}",
                    f"--mult={source.get('mult', 0.5)}"] + data + [
                        f for f in extra if f.split("=")[0] in ("--seed",)]
    _run_searches(searches, results_dir, source_dir or f"<{uniform[0]}'s run>", search_flags)
    _link_reused(sweep, results_dir)  # rows --reuse finished in the meantime
    sweep_lib.run_sweep(sweep, results_dir, bin_dir, extra_flags=row_flags,
                        only=[r.name for r in sweep.rows if r.name != uniform[0]],
                        dry_run=FLAGS.dry_run, print_fn=_log)
    if FLAGS.dry_run:
        return
    entries, description = _results(sweep, results_dir, searches)
    goal = _goal(entries)
    table = _table(entries, description, goal)
    with open(os.path.join(results_dir, TABLE), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(results_dir, JSONL), "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, sort_keys=True) + "\n")
    plotted = _plot(entries, os.path.join(results_dir, PLOT))
    print(table)
    if not plotted:
        _log(f"no {PLOT}: matplotlib is not installed, or no row finished")


if __name__ == "__main__":
    app.run(main)
