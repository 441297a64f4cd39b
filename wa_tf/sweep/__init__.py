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

The sweep file is read by :mod:`.config`, rows are run by :mod:`.runner` and
recorded by :mod:`.records`, the results are gathered and written by
:mod:`.results`; this module re-exports their public names.
"""

from wa_tf.sweep.config import BINARIES, Row, Sweep, check_flags, load_sweep, read_flagfile
from wa_tf.sweep.records import (
    BLOCKED,
    FAILED,
    FINISHED,
    PENDING,
    ROW_RECORD,
    RUNS_DIR,
    UNFINISHED,
    find_run,
    git_commit,
    gpu_names,
    machine,
    read_record,
    row_dir,
    run_status,
)
from wa_tf.sweep.results import (
    REFERENCE_ACCURACY,
    REFERENCE_SETTING,
    RESULTS_JSONL,
    RESULTS_MD,
    RESULTS_PNG,
    markdown_table,
    plot,
    reference_accuracy,
    row_result,
    summarize,
)
from wa_tf.sweep.runner import last_error, row_argv, run_sweep

__all__ = [
    "BINARIES",
    "BLOCKED",
    "FAILED",
    "FINISHED",
    "PENDING",
    "REFERENCE_ACCURACY",
    "REFERENCE_SETTING",
    "RESULTS_JSONL",
    "RESULTS_MD",
    "RESULTS_PNG",
    "ROW_RECORD",
    "RUNS_DIR",
    "Row",
    "Sweep",
    "UNFINISHED",
    "check_flags",
    "find_run",
    "git_commit",
    "gpu_names",
    "last_error",
    "load_sweep",
    "machine",
    "markdown_table",
    "plot",
    "read_flagfile",
    "read_record",
    "reference_accuracy",
    "row_argv",
    "row_dir",
    "row_result",
    "run_status",
    "run_sweep",
    "summarize",
]
