"""Run folders: the files every run of training, search and sweep keeps, and resuming.

A run (``bin/train.py``, ``bin/adapt.py``, ``bin/search.py``) owns one folder
named after its UTC start time (:func:`create`), holding at least::

    FLAGS.txt    absl flagfile of the run (:func:`write_flags`)
    report.txt   human-readable report (:func:`append_report`)
    .lock        held (flock) by the process working in the folder (:class:`Lock`)

and a JSON state file of its own (``metrics.json``, ``search.json``) written
with :func:`write_json`.  Every file a run may be killed while writing is
written atomically (:func:`write_text`), so that a resumed run, a sweep or a
reader sees the old file or the new one, never half of one.  An unfinished
run is resumed in the newest folder that matches and whose lock is free
(:func:`find_unfinished`); sweeps find the folders of finished runs by their
``FLAGS.txt`` (:func:`find_runs`, :func:`newest_run`).

This module only uses the standard library, so that every layer above it
(training, search, sweep) may import it.
"""

import datetime
import fcntl
import json
import os
from typing import Any, Callable, List, Mapping, Optional, Tuple

FLAGS_FILE = "FLAGS.txt"
REPORT_FILE = "report.txt"
LOCK_FILE = ".lock"
# Name of the folder a run is created in: its UTC start time (sorts chronologically).
TIME_FORMAT = "%Y_%m_%d_%H_%M_%S"


def write_text(path: str, text: str):
    """Writes `text` to `path` atomically.

    The text goes to ``<path>.tmp``, is flushed and fsynced, then renamed over
    `path`: after a crash (SIGKILL, power loss) `path` holds the old content
    or the new one, never a part.  On an error the temporary file is removed
    and `path` is left as it was.

    Args:
      path: The file to write.
      text: Its new content.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            # Without fsync the rename may reach the disk before the data: an empty file.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value: Any):
    """Writes `value` as indented JSON (and a final newline) atomically (:func:`write_text`).

    Raises:
      TypeError: If `value` is not JSON-serialisable (`path` is left as it was).
    """
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str) -> Optional[Any]:
    """The JSON value in `path`, or None when the file is absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def flags_to_lines(flags: Mapping[str, Any]) -> List[str]:
    """absl flagfile lines for a flag dict: ``--name=value``, ``--name`` / ``--noname``
    for booleans; None values are left out."""
    lines = []
    for name, value in flags.items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        else:
            lines.append(f"--{name}={value}")
    return lines


def write_flags(run_dir: str, flags: Mapping[str, Any]):
    """Writes ``<run_dir>/FLAGS.txt`` atomically: the flagfile reproducing the run.

    Args:
      run_dir: The run's folder.
      flags: Flag name -> value (see :func:`flags_to_lines`).
    """
    write_text(os.path.join(run_dir, FLAGS_FILE), "\n".join(flags_to_lines(flags)) + "\n")


def append_report(run_dir: str, text: str):
    """Appends `text` (and a newline) to ``<run_dir>/report.txt``."""
    with open(os.path.join(run_dir, REPORT_FILE), "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def create(parent: str, now: Optional[datetime.datetime] = None) -> str:
    """Creates a new, empty run folder ``<parent>/<UTC time>`` (and `parent`).

    A folder that exists already (two runs started in the same second) is
    never reused: a ``_2``, ``_3``... suffix is added instead.

    Args:
      parent: The folder to create it in.
      now: The start time; default the current UTC time.

    Returns:
      The new folder's path.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    base = os.path.join(parent, now.strftime(TIME_FORMAT))
    os.makedirs(parent, exist_ok=True)
    path, suffix = base, 1
    while True:
        try:
            os.mkdir(path)  # atomic: fails if the folder exists
            return path
        except FileExistsError:
            suffix += 1
            path = f"{base}_{suffix}"


class Lock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, held while working in the folder.

    The kernel releases it when the process dies (SIGKILL included), so a free
    lock on an unfinished folder means nobody is working in it.
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file = None

    def acquire(self) -> bool:
        """Takes the lock without waiting; False if another process holds it."""
        f = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._file = f
        return True

    def release(self, remove: bool = False):
        """Releases the lock; `remove` also deletes the lock file (finished runs)."""
        if self._file is not None:
            if remove:
                os.remove(self.path)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def lock_held(run_dir: str) -> bool:
    """Whether another process holds `run_dir`'s lock (is working in the folder now)."""
    lock = Lock(run_dir)
    if lock.acquire():
        lock.release()
        return False
    return True


def find_unfinished(parent: str,
                    matches: Callable[[str], bool]) -> Tuple[Optional[str], Optional[Lock]]:
    """The newest folder in `parent` that `matches` accepts and whose lock is free.

    Args:
      parent: The folder holding the run folders (named after their start
        time, so the newest has the greatest name).
      matches: Takes a folder's path; True when the folder is an unfinished
        run of the same command.  Called newest first, before the lock is tried.

    Returns:
      (folder, held lock), or (None, None) when there is none.
    """
    if not os.path.isdir(parent):
        return None, None
    for name in sorted(os.listdir(parent), reverse=True):
        path = os.path.join(parent, name)
        if not matches(path):
            continue
        lock = Lock(path)
        if lock.acquire():
            return path, lock
    return None, None


def find_runs(root: str) -> List[str]:
    """The run folders under `root`: the folders holding ``FLAGS.txt``, at any depth.

    A run folder's own subfolders are not searched (its checkpoints and logs
    hold no runs).
    """
    found = []
    for parent, dirs, files in os.walk(root):
        if FLAGS_FILE in files:
            found.append(parent)
            dirs[:] = []
    return found


def newest_run(root: str) -> Optional[str]:
    """The newest run folder under `root` (:func:`find_runs`; the greatest folder
    name, i.e. start time), or None when there is none."""
    found = [(os.path.basename(path), path) for path in find_runs(root)]
    return max(found)[1] if found else None
