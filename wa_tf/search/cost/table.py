"""Measured inference cost: a JSON table of milliseconds per layer and candidate.

:class:`TableCost` reads it; :func:`load_table`, :func:`validate_table` and :func:`write_table`
handle the file.
"""

import json
import math
import re
from typing import Dict, Mapping, Optional

from wa_tf.search.cost.analytic import AnalyticCost
from wa_tf.search.cost.spec import Candidate, CostModel, LayerSpec
from wa_tf.transforms import is_int

TABLE_FORMAT = "wa_tf.latency_table"
TABLE_VERSION = 1
# `get_cost_model("measured")` reads this file (bin/latency_table.py's default --output).
DEFAULT_TABLE = "latency_table.json"


def _table_error(path, message):
    return ValueError(f"latency table {path}: {message}")


def _positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value > 0


def validate_table(table: Mapping, path: str = "<table>") -> None:
    """Checks a latency table's structure; raises ValueError naming the first problem.

    See :class:`TableCost` for the format.
    """
    if not isinstance(table, Mapping):
        raise _table_error(path, "must be a JSON object")
    if table.get("format") != TABLE_FORMAT:
        raise _table_error(path, f'"format" must be "{TABLE_FORMAT}"; got {table.get("format")!r}')
    if table.get("version") != TABLE_VERSION:
        raise _table_error(path, f'"version" must be {TABLE_VERSION}; got {table.get("version")!r}')
    metadata = table.get("metadata")
    if not isinstance(metadata, Mapping):
        raise _table_error(path, '"metadata" must be an object')
    if not isinstance(metadata.get("device"), str) or not metadata["device"].strip():
        raise _table_error(path, '"metadata.device" must be a non-empty string naming the device')
    for key in ("date", "wa_tf_version"):
        if key in metadata and not isinstance(metadata[key], str):
            raise _table_error(path, f'"metadata.{key}" must be a string')
    if metadata.get("derive_bits", "none") not in ("none", "analytic"):
        raise _table_error(path, '"metadata.derive_bits" must be "none" or "analytic"; '
                           f'got {metadata["derive_bits"]!r}')
    latency = table.get("latency_ms")
    if not isinstance(latency, Mapping) or not latency:
        raise _table_error(path, '"latency_ms" must be a non-empty object keyed by batch size')
    for batch, layers in latency.items():
        if not re.fullmatch(r"[1-9]\d*", str(batch)):
            raise _table_error(path, f'"latency_ms" keys must be batch sizes ("1", "8"); '
                               f"got {batch!r}")
        if not isinstance(layers, Mapping) or not layers:
            raise _table_error(path, f'"latency_ms.{batch}" must be a non-empty object of layers')
        for layer, entries in layers.items():
            where = f"latency_ms.{batch}.{layer}"
            if not isinstance(entries, Mapping) or not entries:
                raise _table_error(path, f'"{where}" must be a non-empty object of candidates')
            for key, value in entries.items():
                try:
                    Candidate.parse(key)
                except ValueError as e:
                    raise _table_error(path, f'"{where}": {e}') from None
                if not _positive_number(value):
                    raise _table_error(path, f'"{where}.{key}" must be a positive number of '
                                       f"milliseconds; got {value!r}")
    batch_sizes = metadata.get("batch_sizes")
    if batch_sizes is not None and sorted(str(b) for b in batch_sizes) != sorted(latency):
        raise _table_error(path, f'"metadata.batch_sizes" {batch_sizes} does not match the '
                           f'batch sizes of "latency_ms" ({", ".join(latency)})')


def load_table(path: str) -> Dict:
    """Reads and validates a latency table (:class:`TableCost`'s format)."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"latency table {path} does not exist (bin/latency_table.py "
                         "writes one)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _table_error(path, f"cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise _table_error(path, f"is not valid JSON: {e}") from None
    validate_table(table, path)
    return table


def write_table(table: Mapping, path: str) -> None:
    """Validates `table` and writes it as indented JSON to `path`."""
    validate_table(table, path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
        f.write("\n")


class TableCost(CostModel):
    """Costs looked up in a JSON table of measured milliseconds.

    The format (``bin/latency_table.py`` writes it; a user may write one for
    a device and kernels of their own)::

        {
          "format": "wa_tf.latency_table",
          "version": 1,
          "metadata": {
            "device": "Pixel 7, Arm NN kernels",        # required
            "date": "2026-11-29T19:50:00+00:00",        # optional, ISO 8601
            "wa_tf_version": "0.1.0",                   # optional
            "batch_sizes": [1, 8],                      # optional; must match latency_ms
            "derive_bits": "analytic"                   # optional, default "none"
          },
          "latency_ms": {                               # batch size -> layer -> candidate
            "1": {
              "layer1.0.conv1": {"normal": 0.41, "F2": 0.35, "F4": 0.30, "F6": 0.33,
                                 "F4/int8": 0.12},
              "16x16x64-64-3x3": {"normal": 0.20, "F4": 0.11}
            }
          }
        }

    Layers are keyed by their model name or by :attr:`LayerSpec.shape_key`
    (``HxWxC_in-C_out-rxr``; the name is looked up first).  Candidates are keyed
    by :attr:`Candidate.key`: ``normal``, ``F<m>`` for FP32, with ``/int<bits>``
    for an integer bit-width.  A value is the latency of one call on a batch
    of that size, in milliseconds.  With ``"derive_bits": "analytic"`` (tables
    measured in FP32 only), a missing integer entry is the FP32 entry times
    the analytic ratio ``AnalyticCost(bits) / AnalyticCost(FP32)``; otherwise a
    missing entry is an error that names it and the file.

    Args:
      path: The JSON file (with `table`: only named in messages).
      batch_size: Which batch size's latencies to use.
      table: The table's contents, already read: `path` is not opened.

    Raises:
      ValueError: One line naming the file and what is wrong with it, or a
        batch size it lacks.
    """
    unit = "ms"

    def __init__(self, path: str, batch_size: int = 1, table: Optional[Mapping] = None):
        self.path = str(path)
        if table is None:
            self.table = load_table(self.path)
        else:
            validate_table(table, self.path)
            self.table = table
        metadata = self.table["metadata"]
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        batches = self.table["latency_ms"]
        if str(batch_size) not in batches:
            raise _table_error(self.path, f"has no latencies at batch size {batch_size} "
                               f"(it has {', '.join(sorted(batches, key=int))})")
        self.batch_size = batch_size
        self.metadata = metadata
        self._entries = batches[str(batch_size)]
        self._derive = metadata.get("derive_bits", "none") == "analytic"
        self._analytic = AnalyticCost(batch_size=batch_size)
        self.description = (f"measured: {self.path} ({metadata['device']}, batch {batch_size}"
                            + (f", {metadata['date']}" if "date" in metadata else "") + ")")

    def _lookup(self, layer, key):
        for layer_key in (layer.name, layer.shape_key):
            if layer_key is not None and key in self._entries.get(layer_key, {}):
                return self._entries[layer_key][key]
        return None

    def cost(self, layer: LayerSpec, candidate: Candidate) -> float:
        value = self._lookup(layer, candidate.key)
        if value is not None:
            return float(value)
        if self._derive and candidate.bits is not None:
            fp32 = candidate.with_bits(None)
            base = self._lookup(layer, fp32.key)
            if base is not None:
                ratio = self._analytic.cost(layer, candidate) / self._analytic.cost(layer, fp32)
                return float(base) * ratio
        raise _table_error(self.path, f"no entry for layer {layer.describe()}, candidate "
                           f"{candidate.key!r}, batch size {self.batch_size}: measure it, or "
                           "leave the candidate out of the search")
