"""Running a sweep: each row's command as a subprocess, in order, resumable.

:func:`run_sweep` runs the rows in order, skips finished ones, resumes
interrupted ones, records each row (:mod:`wa_tf.sweep.records`), blocks the rows
that adapt from a failed one, and writes the results (:mod:`wa_tf.sweep.results`).
"""

import os
import signal
import subprocess
import sys
from collections import deque
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from wa_tf.sweep.config import BINARIES, Row, Sweep, check_flags
from wa_tf.sweep.records import (
    find_run,
    git_commit,
    machine,
    read_record,
    row_dir,
    run_status,
    write_record,
)
from wa_tf.sweep.results import summarize
from wa_tf.training import experiment
from wa_tf.training.run_folder import lock_held

_PR_SET_PDEATHSIG = 1


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
        write_record(out_dir, record)
        code, tail = _launch(cmd, log_path, echo)
        model_dir = find_run(out_dir)
        record["returncode"] = code
        if code != 0 or run_status(model_dir) != experiment.FINISHED:
            record["error"] = last_error(tail) if code != 0 else \
                f"{row.binary}.py exited without finishing its run"
            print_fn(f"{label}: failed (exit status {code}): {record['error']}")
        else:
            print_fn(f"{label}: finished in {model_dir}")
        write_record(out_dir, record)
    return [] if dry_run else summarize(sweep, results_dir, print_fn)


# -- results ----------------------------------------------------------------------------
