"""A sweep's results: each row read back from its run, and the table and plot of them.

The results are read back from the runs' files only (``metrics.json``,
``FLAGS.txt``, ``runs/<row>/sweep_row.json``) and written as ``results.jsonl``,
``results.md`` and ``results.png`` (with matplotlib), with the reference's
published accuracies marked where a row matches its setting.
"""

import json
import os
import statistics
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from wa_tf.plotting import pyplot
from wa_tf.sweep.config import Row, Sweep
from wa_tf.sweep.records import (
    BLOCKED,
    FAILED,
    FINISHED,
    PENDING,
    UNFINISHED,
    find_run,
    read_record,
    row_dir,
    run_status,
)
from wa_tf.training import experiment

RESULTS_JSONL = "results.jsonl"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"

# The reference's published CIFAR-10 test accuracies (its README): ResNet-18-like,
# width 0.5, INT8 (weights and activations), 120 epochs.  Keys: (conv mode, F), F None
# for normal convolutions.  They are marked only on rows of that model and quantization
# (see reference_accuracy); the schedule is not compared, so a shorter run's marker
# still shows the 120-epoch number.
REFERENCE_ACCURACY = {("normal", None): 0.92, ("static", 4): 0.78, ("flex", 4): 0.91}
REFERENCE_SETTING = {"mult": 0.5, "Q": True, "bits": 8, "per_tap": False,
                     "num_classes": 10, "image_shape": [32, 32, 3], "epochs": 120}




def _cifar10_like(dataset: Mapping) -> bool:
    return dataset.get("name") == "cifar10" or (
        dataset.get("name") == "image_folder" and dataset.get("num_classes") == 10
        and list(dataset.get("image_shape", [])) == REFERENCE_SETTING["image_shape"])


def reference_accuracy(result: Mapping) -> Optional[float]:
    """The reference's published accuracy for a row's configuration, or None.

    A row matches when it trains the reference's model and quantization
    (:data:`REFERENCE_SETTING`: width 0.5, INT8, per-tensor ranges) on
    CIFAR-10 (``cifar10``, or ``image_folder`` with 10 classes of 32x32x3
    images) with a mode and tile size of :data:`REFERENCE_ACCURACY`.
    """
    dataset = result.get("dataset") or {}
    s = REFERENCE_SETTING
    if not _cifar10_like(dataset) or result.get("mult") != s["mult"] \
            or not result.get("Q") or result.get("bits") != s["bits"] \
            or bool(result.get("per_tap")) != s["per_tap"]:
        return None
    tile = None if result.get("conv") == "normal" else result.get("F")
    return REFERENCE_ACCURACY.get((result.get("conv"), tile))


def row_result(sweep: Sweep, row: Row, results_dir: str) -> Dict:
    """One row's results, read from its files (see the module docstring)."""
    out_dir = row_dir(results_dir, row.name)
    record = read_record(out_dir)
    model_dir = find_run(out_dir)
    metrics = experiment.read_metrics(model_dir) if model_dir else None
    result = {"row": row.name, "binary": row.binary, "adapt_from": row.adapt_from,
              "flags": record.get("flags"), "status": None, "error": None,
              "run_dir": os.path.relpath(model_dir, results_dir) if model_dir else None}
    status = (metrics or {}).get("status")
    if status == experiment.FINISHED:
        result["status"] = FINISHED
    elif record.get("error"):
        result["status"], result["error"] = FAILED, record["error"]
    elif status is not None:
        result["status"] = UNFINISHED
    elif row.adapt_from and run_status(find_run(row_dir(results_dir, row.adapt_from))) \
            != experiment.FINISHED:
        result["status"] = BLOCKED
        result["error"] = f"row {row.adapt_from} has no finished run"
    else:
        result["status"] = PENDING
    try:
        flags = experiment.read_flags(model_dir) if model_dir else None
    except ValueError:  # FLAGS.txt unreadable: the row's other results still count
        flags = None
    if flags:
        result.update(conv="normal" if flags["use_normal_conv"] else
                      ("static" if flags["static"] else "flex"),
                      F=flags["F"], Q=flags["Q"], bits=flags["bits"] if flags["Q"] else None,
                      per_tap=flags["per_tap"], warmup=flags["warmup"], mult=flags["mult"],
                      lr=flags["lr"], seed=flags["seed"], batch_size=flags["batch_size"])
        if flags.get("architecture"):  # each layer's conv, F and bits come from the file
            result.update(conv="architecture", F=None, bits=None,
                          architecture=flags["architecture"])
    if metrics:
        history = metrics.get("history") or []
        best = metrics.get("best") or {}
        test = metrics.get("test")
        dataset = metrics.get("dataset") or {}
        result.update(
            dataset={k: dataset.get(k) for k in ("name", "num_classes", "image_shape",
                                                 "num_examples")},
            epochs=metrics.get("epochs"), epochs_done=len(history),
            steps_per_epoch=metrics.get("steps_per_epoch"),
            val_accuracy={"final": history[-1]["val_accuracy"] if history else None,
                          "best": best.get("val_accuracy"), "best_epoch": best.get("epoch")},
            test_accuracy=None,
            seconds_per_epoch=round(statistics.median(h["seconds"] for h in history), 2)
            if history else None,
            seconds=round(sum(h["seconds"] for h in history), 1))
        if test:
            result["test_accuracy"] = {"final": test["final"]["accuracy"],
                                       "best": test["best"]["accuracy"]}
        elif status == experiment.FINISHED:
            result["test_note"] = f"dataset {dataset.get('name')} has no test split"
    result["reference_accuracy"] = reference_accuracy(result) if model_dir else None
    result["machines"] = record.get("machines")
    result["git_commit"] = record.get("git_commit")
    return result


def summarize(sweep: Sweep, results_dir: str,
              print_fn: Callable[[str], None] = print) -> List[Dict]:
    """Reads every row's results and writes results.jsonl, results.md and results.png.

    Without matplotlib there is no results.png, and `print_fn` gets a line
    saying so.

    Returns:
      The results, one dict per row in the sweep's order.
    """
    results = [row_result(sweep, row, results_dir) for row in sweep.rows]
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, RESULTS_JSONL), "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    with open(os.path.join(results_dir, RESULTS_MD), "w", encoding="utf-8") as f:
        f.write(markdown_table(sweep, results))
    if not plot(results, os.path.join(results_dir, RESULTS_PNG)):
        print_fn(f"matplotlib is not installed: no {RESULTS_PNG} "
                 "(pip install matplotlib, or wa_tf's extra \"plot\")")
    return results


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _device(result: Mapping) -> str:
    names = []
    for m in result.get("machines") or []:
        uses_gpu = m.get("gpus") and "--use_cpu" not in (result.get("flags") or [])
        name = ", ".join(m["gpus"]) if uses_gpu else m.get("cpu", "?")
        if name not in names:
            names.append(name)
    return "; ".join(names) or "—"


def markdown_table(sweep: Sweep, results: Sequence[Mapping]) -> str:
    """The results as a markdown table (accuracies in %; "—": not available)."""
    lines = [f"# Sweep {sweep.name}", ""]
    if sweep.description:
        lines += [sweep.description, ""]
    lines += ["| row | mode | F | bits | per-tap | from | epochs | steps/epoch | val final "
              "| val best (epoch) | test final | test best | reference | s/epoch | device "
              "| status |",
              "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: | ---: | --- | --- |"]
    notes = set()
    for r in results:
        val = r.get("val_accuracy") or {}
        test = r.get("test_accuracy") or {}
        best = _pct(val.get("best"))
        if val.get("best_epoch"):
            best += f" ({val['best_epoch']})"
        if r.get("test_note"):
            notes.add(r["test_note"])
        conv = r.get("conv")
        epochs = "—" if r.get("epochs") is None else \
            f"{r['epochs_done']}/{r['epochs']}" if r["epochs_done"] != r["epochs"] \
            else str(r["epochs"])
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append("| " + " | ".join([
            r["row"], conv or "—", "—" if conv in (None, "normal", "architecture") else str(r["F"]),
            str(r["bits"]) if r.get("bits") else
            ("per layer" if conv == "architecture" else "FP32" if conv else "—"),
            ("yes" if r.get("per_tap") else "no") if conv not in (None, "normal") else "—",
            r.get("adapt_from") or "scratch", epochs, str(r.get("steps_per_epoch") or "—"),
            _pct(val.get("final")), best, _pct(test.get("final")), _pct(test.get("best")),
            _pct(r.get("reference_accuracy")),
            "—" if r.get("seconds_per_epoch") is None else f"{r['seconds_per_epoch']:.1f}",
            _device(r), status.replace("|", "\\|")]) + " |")
    lines += ["", "Accuracies in %. val: the validation split; final: the model after the last "
              "epoch, best: the epoch of best validation accuracy. s/epoch: median seconds of "
              "an epoch (training and validation). reference: the reference's published "
              "CIFAR-10 test accuracy (120 epochs), on rows of its configuration only."]
    lines += [f"No test accuracy: {note}." for note in sorted(notes)]
    commits = sorted({r["git_commit"] for r in results if r.get("git_commit")})
    if commits:
        lines.append(f"wa_tf commit: {', '.join(commits)}.")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Mapping], path: str) -> bool:
    """Writes a dot plot of each row's accuracies, the reference's numbers marked.

    Returns:
      False (and writes nothing) when matplotlib is not installed.
    """
    try:
        plt = pyplot()
    except ImportError:
        return False
    rows = list(results)
    height = 1.2 + 0.45 * len(rows)
    fig, ax = plt.subplots(figsize=(8, height))
    y = list(range(len(rows)))[::-1]
    val_final = [(r.get("val_accuracy") or {}).get("final") for r in rows]
    ax.barh(y, [100 * v if v is not None else 0 for v in val_final], height=0.6,
            color="tab:blue", alpha=0.35, label="validation, final", zorder=2)
    series = (("validation, best", lambda r: (r.get("val_accuracy") or {}).get("best"),
               dict(marker="^", color="tab:blue")),
              ("test, final", lambda r: (r.get("test_accuracy") or {}).get("final"),
               dict(marker="s", color="tab:green")),
              ("test, best", lambda r: (r.get("test_accuracy") or {}).get("best"),
               dict(marker="D", color="tab:olive", s=18)),
              ("reference (120 epochs)", lambda r: r.get("reference_accuracy"),
               dict(marker="x", color="tab:red", s=90)))
    for label, get, style in series:
        points = [(100 * get(r), yy) for r, yy in zip(rows, y) if get(r) is not None]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, label=label, zorder=3, **style)
    ax.set_yticks(y)
    ax.set_yticklabels([r["row"] + ("" if r["status"] == FINISHED else f" ({r['status']})")
                        for r in rows])
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.8 / height),
              ncol=3, fontsize="small", frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
