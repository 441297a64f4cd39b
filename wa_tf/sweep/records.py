"""Where a sweep's rows run and what is recorded of them.

Each row owns ``<results_dir>/runs/<row>`` as its ``--outDir``; its run is the
newest experiment folder there, its status that run's ``metrics.json`` status,
and ``runs/<row>/sweep_row.json`` records its command, the machine, the wa_tf
commit and the last error.
"""

import os
import shutil
import subprocess
from typing import Dict, List, Mapping, Optional

from wa_tf.machine import cpu_model
from wa_tf.training import experiment, run_folder

RUNS_DIR = "runs"
ROW_RECORD = "sweep_row.json"

# Row statuses in the results.
FINISHED, FAILED, BLOCKED, UNFINISHED, PENDING = (
    "finished", "failed", "blocked", "unfinished", "pending")


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


def write_record(out_dir: str, record: Mapping):
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
