"""The sweep file: its rows, their flags and flagfiles, read and checked.

A sweep is a JSON file of shared ``flags`` and ``rows`` (see :mod:`wa_tf.sweep`);
:func:`load_sweep` reads and checks it into a :class:`Sweep` of rows (:class:`Row`),
naming the file and the row of every mistake.
"""

import dataclasses
import json
import os
import re
from typing import List, Optional, Sequence, Tuple

BINARIES = ("train", "adapt")

_ROW_KEYS = {"name", "binary", "flagfile", "flags", "adapt_from", "description"}
_SWEEP_KEYS = {"description", "flags", "rows"}
_ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Flags the sweep sets itself: each row's output folder and an adapted row's source.
_SWEEP_OWNED = ("outDir", "modelDir")


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
