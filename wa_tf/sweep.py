"""Sweeps: a named set of training runs, run one after another, and their results table.

A sweep is a JSON file::

    {
      "description": "What the sweep measures (optional).",
      "flags": ["--mult=0.5", "--Q", "--bits=8"],
      "rows": [
        {"name": "normal_int8", "flagfile": "../normal_int8_120ep.flags"},
        {"name": "flex_f4_int8", "adapt_from": "normal_int8",
         "flagfile": "../adapt_flex_f4_int8.flags", "flags": ["--warmup"]}
      ]
    }

Each row runs ``bin/<binary>.py`` (``binary``: ``train``, or ``adapt`` when
the row has ``adapt_from``) as a subprocess with, in this order (a later value
of a flag wins): the sweep's ``flags``, the row's ``flagfile`` (a path
relative to the sweep file), the row's ``flags``, the flags given to every row
on the command line (``bin/sweep.py ... -- --data_dir=...``), and last
``--outDir=<results_dir>/runs/<row>`` and, for ``adapt_from``,
``--modelDir=<the experiment folder of that row>``.  Rows run in the order
listed; ``adapt_from`` must name an earlier row.

Each row owns its ``--outDir``, so its experiment folder is the (newest) one
under ``runs/<row>/``.  A row whose run finished (``metrics.json`` says
``finished``) is skipped when the sweep runs again; an interrupted row resumes
in its unfinished folder, because the binaries resume the same command.  A
failing row is recorded with its last error line, the rows that adapt from it
are blocked, the others still run.  The results are read back from the runs'
files only (``metrics.json``, ``FLAGS.txt``) and from ``runs/<row>/sweep_row.json``
(the command, the machine, the wa_tf commit, the last error), and written as
``results.jsonl``, ``results.md`` and ``results.png`` (with matplotlib).
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from collections import deque
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from wa_tf.machine import cpu_model
from wa_tf.plotting import pyplot
from wa_tf.training import experiment, run_folder
from wa_tf.training.run_folder import lock_held

BINARIES = ("train", "adapt")
RESULTS_JSONL = "results.jsonl"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
RUNS_DIR = "runs"
ROW_RECORD = "sweep_row.json"

# Row statuses in the results.
FINISHED, FAILED, BLOCKED, UNFINISHED, PENDING = (
    "finished", "failed", "blocked", "unfinished", "pending")

# The reference's published CIFAR-10 test accuracies (its README): ResNet-18-like,
# width 0.5, INT8 (weights and activations), 120 epochs.  Keys: (conv mode, F), F None
# for normal convolutions.  They are marked only on rows of that model and quantization
# (see reference_accuracy); the schedule is not compared, so a shorter run's marker
# still shows the 120-epoch number.
REFERENCE_ACCURACY = {("normal", None): 0.92, ("static", 4): 0.78, ("flex", 4): 0.91}
REFERENCE_SETTING = {"mult": 0.5, "Q": True, "bits": 8, "per_tap": False,
                     "num_classes": 10, "image_shape": [32, 32, 3], "epochs": 120}

_ROW_KEYS = {"name", "binary", "flagfile", "flags", "adapt_from", "description"}
_SWEEP_KEYS = {"description", "flags", "rows"}
_ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Flags the sweep sets itself: each row's output folder and an adapted row's source.
_SWEEP_OWNED = ("outDir", "modelDir")
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class Row:
    """One experiment of a sweep.

    Attributes:
      name: Unique name; also the row's folder under ``runs/``.
      binary: 'train' or 'adapt'.
      flags: The row's flags: its flagfile's lines, then its own flags.
      adapt_from: Name of the earlier row whose run this row adapts, or None.
      flagfile: Absolute path of the row's flagfile, or None.
      description: Free text.
    """
    name: str
    binary: str
    flags: Tuple[str, ...]
    adapt_from: Optional[str] = None
    flagfile: Optional[str] = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep file, checked (:func:`load_sweep`).

    Attributes:
      name: The file's name without ``.json``.
      path: Absolute path of the file.
      description: Free text.
      flags: Flags given to every row, before the row's own.
      rows: The rows, in running order.
    """
    name: str
    path: str
    description: str
    flags: Tuple[str, ...]
    rows: Tuple[Row, ...]

    def row(self, name: str) -> Row:
        """The row called `name`."""
        for r in self.rows:
            if r.name == name:
                return r
        raise ValueError(f"sweep {self.path} has no row {name!r}")


# -- the sweep file -------------------------------------------------------------------


def read_flagfile(path: str) -> List[str]:
    """The flags of an absl flagfile, as absl reads them.

    Blank lines and comments (``#``, ``//``) are dropped; a nested
    ``--flagfile=`` is expanded, relative paths being relative to the file
    that names them.

    Raises:
      ValueError: if a file is missing or holds a line that is not a flag.
    """
    return _read_flagfile(path, ())


def _read_flagfile(path, seen):
    path = os.path.abspath(path)
    if path in seen:
        raise ValueError(f"flagfile {path} includes itself")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read flagfile {path}: {e.strerror}") from None
    flags = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", "//")):
            continue
        if not line.startswith("-"):
            raise ValueError(f"flagfile {path}, line {number}: {line!r} is not a flag")
        name, sep, value = line.lstrip("-").partition("=")
        if name == "flagfile" and sep:
            nested = os.path.join(os.path.dirname(path), os.path.expanduser(value))
            flags += _read_flagfile(nested, seen + (path,))
        else:
            flags.append(line)
    return flags


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").partition("=")[0]


def check_flags(flags: Sequence[str], where: str):
    """Checks a list of command-line flags for a sweep row.

    Raises:
      ValueError: naming `where` if an entry is not a ``--flag`` string or
        sets a flag the sweep sets itself (--outDir, --modelDir).
    """
    if isinstance(flags, str) or not isinstance(flags, (list, tuple)):
        raise ValueError(f"{where}: flags must be a list of strings such as \"--epochs=5\"")
    for flag in flags:
        if not isinstance(flag, str) or not flag.startswith("-") or not _flag_name(flag):
            raise ValueError(f"{where}: {flag!r} is not a flag (expected \"--name=value\" "
                             "or \"--name\")")
        if _flag_name(flag) in _SWEEP_OWNED:
            raise ValueError(f"{where}: {flag} is set by the sweep (each row writes into "
                             "<results_dir>/runs/<row>; adapt_from sets --modelDir)")


def load_sweep(path: str) -> Sweep:
    """Reads and checks a sweep file.

    Raises:
      ValueError: one line naming the file and the first problem: unreadable
        JSON, unknown keys, a row without a name or with a duplicate name, an
        unknown binary, a missing flagfile, or an ``adapt_from`` that names no
        earlier row.
    """
    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read sweep file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"sweep file {path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {path}: expected a JSON object with \"rows\"")
    unknown = sorted(set(spec) - _SWEEP_KEYS)
    if unknown:
        raise ValueError(f"sweep file {path}: unknown key(s) {', '.join(unknown)} "
                         f"(expected {', '.join(sorted(_SWEEP_KEYS))})")
    common = spec.get("flags", [])
    check_flags(common, f"sweep file {path}")
    rows_spec = spec.get("rows")
    if not isinstance(rows_spec, list) or not rows_spec:
        raise ValueError(f"sweep file {path}: \"rows\" must be a non-empty list")
    base = os.path.dirname(path)
    rows, names = [], set()
    for index, r in enumerate(rows_spec):
        rows.append(_load_row(r, index, path, base, names))
        names.add(rows[-1].name)
    return Sweep(name=os.path.splitext(os.path.basename(path))[0], path=path,
                 description=str(spec.get("description", "")), flags=tuple(common),
                 rows=tuple(rows))


def _load_row(r, index, path, base, earlier):
    where = f"sweep file {path}, row {index + 1}"
    if not isinstance(r, dict):
        raise ValueError(f"{where}: expected an object with \"name\"")
    name = r.get("name")
    if not isinstance(name, str) or not _ROW_NAME.match(name):
        raise ValueError(f"{where}: \"name\" must be a string of letters, digits, '_', '.' "
                         f"and '-' (it names the row's folder); got {name!r}")
    where = f"sweep file {path}, row {name!r}"
    if name in earlier:
        raise ValueError(f"{where}: the name is used by an earlier row")
    unknown = sorted(set(r) - _ROW_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} "
                         f"(expected {', '.join(sorted(_ROW_KEYS))})")
    adapt_from = r.get("adapt_from")
    binary = r.get("binary", "adapt" if adapt_from else "train")
    if binary not in BINARIES:
        raise ValueError(f"{where}: unknown binary {binary!r} (expected train or adapt)")
    if adapt_from is not None:
        if binary != "adapt":
            raise ValueError(f"{where}: adapt_from needs binary adapt, not {binary}")
        if adapt_from not in earlier:
            raise ValueError(f"{where}: adapt_from {adapt_from!r} is not an earlier row of "
                             "the sweep")
    flagfile = r.get("flagfile")
    flags = []
    if flagfile is not None:
        if not isinstance(flagfile, str):
            raise ValueError(f"{where}: \"flagfile\" must be a path")
        flagfile = os.path.normpath(os.path.join(base, os.path.expanduser(flagfile)))
        if not os.path.isfile(flagfile):
            raise ValueError(f"{where}: flagfile {flagfile} does not exist (paths are "
                             "relative to the sweep file)")
        try:
            flags = read_flagfile(flagfile)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    own = r.get("flags", [])
    check_flags(own, where)
    return Row(name=name, binary=binary, flags=tuple(flags) + tuple(own), adapt_from=adapt_from,
               flagfile=flagfile, description=str(r.get("description", "")))


# -- run folders and records ----------------------------------------------------------


def row_dir(results_dir: str, row: str) -> str:
    """The ``--outDir`` of a row: ``<results_dir>/runs/<row>``."""
    return os.path.join(results_dir, RUNS_DIR, row)


# The newest experiment folder under a row's --outDir, or None (the row's run).
find_run = run_folder.newest_run


def run_status(model_dir: Optional[str]) -> Optional[str]:
    """metrics.json's status of an experiment folder (None when there is none)."""
    metrics = experiment.read_metrics(model_dir) if model_dir else None
    return metrics.get("status") if metrics else None


def read_record(out_dir: str) -> Dict:
    """The sweep's record of a row (``runs/<row>/sweep_row.json``), {} when absent."""
    return run_folder.read_json(os.path.join(out_dir, ROW_RECORD)) or {}


def _write_record(out_dir: str, record: Mapping):
    os.makedirs(out_dir, exist_ok=True)
    run_folder.write_json(os.path.join(out_dir, ROW_RECORD), record)


def gpu_names() -> List[str]:
    """Names of the NVIDIA GPUs nvidia-smi lists (without loading TensorFlow); [] if none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> Dict:
    """The machine a row runs on: CPU model, CPU count, GPU names."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpus": gpu_names()}


def git_commit(path: Optional[str] = None) -> Optional[str]:
    """The git commit of the checkout holding `path` (wa_tf's), ``+dirty`` when it has
    uncommitted changes to tracked files; None outside a git checkout."""
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


# -- running ----------------------------------------------------------------------------


def row_argv(sweep: Sweep, row: Row, results_dir: str, extra_flags: Sequence[str] = (),
             source_dir: Optional[str] = None) -> List[str]:
    """The flags a row's binary is given (see the module docstring for the order)."""
    argv = list(sweep.flags) + list(row.flags) + list(extra_flags)
    argv.append(f"--outDir={os.path.abspath(row_dir(results_dir, row.name))}")
    if row.adapt_from is not None:
        argv.append(f"--modelDir={source_dir}")
    return argv


# Ends the binary with the sweep: a sweep killed even by SIGKILL must not leave its
# row training (and holding the run's lock, which would make the re-run start anew).
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    f"    ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n")


def _launch(cmd: Sequence[str], log_path: str, echo: bool) -> Tuple[int, List[str]]:
    """Runs `cmd`, appending its output to `log_path`; (exit status, last lines)."""
    tail = deque(maxlen=200)
    full = [sys.executable, "-c", _LAUNCHER, str(os.getpid())] + list(cmd[1:]) \
        if sys.platform.startswith("linux") and cmd[0] == sys.executable else list(cmd)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        with subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", bufsize=1) as proc:
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    tail.append(line.rstrip("\n"))
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                proc.wait()
            except BaseException:
                # Ctrl-C or an error here: stop the row; its run resumes next time.
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                raise
    return proc.returncode, list(tail)


def last_error(lines: Sequence[str]) -> str:
    """The line that says why a binary failed: its last ``error:`` line, else its last
    non-empty line (an exception's message)."""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "(no output)"


def run_sweep(sweep: Sweep, results_dir: str, bin_dir: str, extra_flags: Sequence[str] = (),
              only: Optional[Iterable[str]] = None, echo: bool = False, dry_run: bool = False,
              print_fn: Callable[[str], None] = print) -> List[Dict]:
    """Runs the rows of `sweep` one after another, then writes the results.

    Args:
      sweep: From :func:`load_sweep`.
      results_dir: The results folder (created).
      bin_dir: Folder holding ``train.py`` and ``adapt.py``.
      extra_flags: Flags given to every row, after the row's own.
      only: Names of the rows to run (default: all); the others are only
        summarized, and a selected row adapting from one uses its finished run.
      echo: Also print the binaries' output (it always goes to
        ``<results_dir>/logs/<row>.log``).
      dry_run: Print the commands of the rows that would run; run nothing.
      print_fn: Where progress lines go.

    Returns:
      The results, one dict per row (:func:`summarize`).

    Raises:
      ValueError: for an unknown row in `only` or bad `extra_flags`.
    """
    check_flags(list(extra_flags), "flags given to every row")
    selected = set(only) if only else {r.name for r in sweep.rows}
    unknown = sorted(selected - {r.name for r in sweep.rows})
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; the rows of {sweep.path}: "
                         f"{', '.join(r.name for r in sweep.rows)}")
    for binary in BINARIES:
        if not os.path.isfile(os.path.join(bin_dir, f"{binary}.py")):
            raise ValueError(f"bin_dir {bin_dir} has no {binary}.py")
    if not dry_run:
        os.makedirs(os.path.join(results_dir, "logs"), exist_ok=True)
    commit, host = git_commit(), machine()
    runnable = [r for r in sweep.rows if r.name in selected]
    for number, row in enumerate(runnable, 1):
        label = f"[{number}/{len(runnable)}] {row.name}"
        out_dir = row_dir(results_dir, row.name)
        source_dir = None
        if row.adapt_from is not None:
            source_dir = find_run(row_dir(results_dir, row.adapt_from))
            if run_status(source_dir) != experiment.FINISHED:
                if not dry_run:
                    print_fn(f"{label}: blocked: row {row.adapt_from} has no finished run")
                    continue
                source_dir = f"<the run folder of row {row.adapt_from}>"
        argv = row_argv(sweep, row, results_dir, extra_flags, source_dir)
        cmd = [sys.executable, os.path.join(bin_dir, f"{row.binary}.py")] + argv
        model_dir = find_run(out_dir)
        record = read_record(out_dir)
        if run_status(model_dir) == experiment.FINISHED:
            note = ""
            if record.get("flags") not in (None, argv):
                note = (" (its flags differ from the sweep's now; remove "
                        f"{out_dir} to train it again)")
            print_fn(f"{label}: finished in {model_dir}, skipped{note}")
            continue
        if dry_run:
            print_fn(f"{label}: {' '.join(cmd)}")
            continue
        if model_dir and run_status(model_dir) == experiment.RUNNING and lock_held(model_dir):
            # Starting now would train the row twice, in a new folder.
            print_fn(f"{label}: failed: another process is training in {model_dir}")
            continue
        log_path = os.path.join(results_dir, "logs", f"{row.name}.log")
        print_fn(f"{label}: {row.binary}.py {' '.join(argv)}")
        print_fn(f"{label}: output in {log_path}")
        machines = record.get("machines", []) if record.get("flags") == argv else []
        if host not in machines:
            machines.append(host)
        record = {"row": row.name, "binary": row.binary, "flags": argv, "git_commit": commit,
                  "machines": machines, "returncode": None, "error": None}
        _write_record(out_dir, record)
        code, tail = _launch(cmd, log_path, echo)
        model_dir = find_run(out_dir)
        record["returncode"] = code
        if code != 0 or run_status(model_dir) != experiment.FINISHED:
            record["error"] = last_error(tail) if code != 0 else \
                f"{row.binary}.py exited without finishing its run"
            print_fn(f"{label}: failed (exit status {code}): {record['error']}")
        else:
            print_fn(f"{label}: finished in {model_dir}")
        _write_record(out_dir, record)
    return [] if dry_run else summarize(sweep, results_dir, print_fn)


# -- results ----------------------------------------------------------------------------


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
            r["row"], conv or "—", "—" if conv in (None, "normal") else str(r["F"]),
            str(r["bits"]) if r.get("bits") else ("FP32" if conv else "—"),
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
