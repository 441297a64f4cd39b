#!/usr/bin/env python
"""Runs a sweep: a named set of bin/train.py and bin/adapt.py runs, one after another.

The sweep file (JSON) lists the rows; see wa_tf/sweep/ and docs/results.md.
Flags after `--` are given to every row (after the row's own flags).

Examples:
  # the proxy of the reference's CIFAR-10 table, on the CIFAR-10 training JPEGs
  bin/sweep.py --config configs/sweeps/cifar10_proxy.json -- \
      --dataset=image_folder --data_dir=data/cifar10_jpeg
  # the reference's 120-epoch table, through TFDS
  bin/sweep.py --config configs/sweeps/paper_120ep.json
  # what would run, and the table of what has run
  bin/sweep.py --config configs/sweeps/paper_120ep.json --dry_run

Re-running the same command skips the finished rows and resumes the row that was
interrupted. The results folder (--results_dir, default results/<sweep name>) gets
results.jsonl, results.md, results.png, logs/<row>.log and runs/<row>/ (each row's
--outDir). Exit status: 0 when every selected row finished, 1 when one failed or was
blocked, 2 for a bad sweep file or flag.
"""
import os
import sys

from absl import flags

import wa_tf  # noqa: F401  (selects tf_keras before TensorFlow loads Keras)
from wa_tf import sweep as sweep_lib
from wa_tf.training import flag_errors

flags.DEFINE_string("config", None, "Sweep file (JSON): the rows to run.")
flags.DEFINE_string("results_dir", None, "Results folder (default: results/<sweep name>).")
flags.DEFINE_list("rows", None, "Run only these rows (comma-separated names); the table "
                  "still lists every row.")
flags.DEFINE_boolean("echo", False, "Also print the binaries' output (always written to "
                     "<results_dir>/logs/<row>.log).")
flags.DEFINE_boolean("dry_run", False, "Print the commands of the rows that would run, "
                     "run nothing.")
flags.DEFINE_boolean("summarize_only", False, "Only rewrite the results from the runs' "
                     "files.")

FLAGS = flags.FLAGS
BIN_DIR = os.path.dirname(os.path.abspath(__file__))


def main(extra):
    """`extra`: the flags after `--`, given to every row."""
    if not FLAGS.config:
        raise ValueError("--config is required: a sweep file such as "
                         "configs/sweeps/cifar10_proxy.json")
    sweep = sweep_lib.load_sweep(FLAGS.config)
    results_dir = FLAGS.results_dir or os.path.join("results", sweep.name)
    if FLAGS.summarize_only:
        results = sweep_lib.summarize(sweep, results_dir)
    else:
        results = sweep_lib.run_sweep(sweep, results_dir, BIN_DIR, extra_flags=extra,
                                      only=FLAGS.rows, echo=FLAGS.echo, dry_run=FLAGS.dry_run)
    if FLAGS.dry_run:
        return
    print(f"Results: {os.path.join(results_dir, sweep_lib.RESULTS_MD)}")
    selected = set(FLAGS.rows or [r.name for r in sweep.rows])
    bad = [r for r in results if r["row"] in selected and r["status"] != sweep_lib.FINISHED]
    for r in bad:
        print(f"{r['row']}: {r['status']}" + (f": {r['error']}" if r.get("error") else ""),
              file=sys.stderr)
    if bad and not FLAGS.summarize_only:
        sys.exit(1)


if __name__ == "__main__":
    # The sweep's messages name the sweep file or a row; no library argument is a flag.
    flag_errors.start(main, arguments=True)
