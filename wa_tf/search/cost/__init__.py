"""What a 3x3 convolution costs at inference: analytic counts or a measured table.

One interface, :class:`CostModel` with ``cost(layer, candidate)``, answers "how
long does this layer take at inference" for a :class:`LayerSpec` (input
``H x W x C_in``, ``C_out`` filters, kernel ``r``, stride 1) and a
:class:`Candidate` (the direct convolution, ``normal``, or Winograd
F(m x m, r x r), at FP32 or an integer bit-width).  Two sources sit behind it
(:func:`get_cost_model` picks one):

* :class:`AnalyticCost` (``"analytic"``, the default): counts, no measurement.
* :class:`TableCost` (``"measured"`` or a JSON path): a lookup table of
  milliseconds, written by ``bin/latency_table.py`` on the machine it runs on,
  or by users for a device of their own (a phone with its own kernels).

The sources live in :mod:`~wa_tf.search.cost.analytic` and :mod:`~wa_tf.search.cost.table`; the
types in :mod:`~wa_tf.search.cost.spec`.

Layers, candidates and architectures
------------------------------------
:func:`searchable_layers` lists the 3x3 convolutions of the residual blocks
of ``wa_tf.models.resnet18_like`` (``layer1.0.conv1`` ... ``layer4.1.conv2``;
not the stem, the 1x1 shortcuts or the classifier) with their input shapes;
:func:`allowed_candidates` offers Winograd F(m) only where the output has at
least one whole ``m x m`` tile (so the padded input holds a ``t x t`` tile):
no F6 on the 4x4 maps of the last stage, as the uniform model does.
:func:`model_cost` totals an architecture, ``{layer name: {"conv":
"normal"|"static"|"flex", "tile_size": 2|4|6, "bits": None|2..16}}``; static
and flex cost the same at inference (their transforms are both constants then).

The table format is described in :class:`TableCost`.
"""

import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

from wa_tf import models
from wa_tf.choices import CONV_MODES
from wa_tf.models.architecture import load_architecture
from wa_tf.search.cost.analytic import (
    FP32_BYTES,
    AnalyticCost,
    OperationCounts,
    bytes_per_element,
    op_scale,
    operation_counts,
    transform_ops,
)
from wa_tf.search.cost.spec import (
    ALGORITHMS,
    CANDIDATE_NAMES,
    NORMAL,
    WINOGRAD,
    Candidate,
    CostModel,
    LayerSpec,
    allowed_candidates,
    candidates,
    check_optional_bits,
    is_allowed,
    tile_fits,
)
from wa_tf.search.cost.table import (
    DEFAULT_TABLE,
    TABLE_FORMAT,
    TABLE_VERSION,
    TableCost,
    load_table,
    validate_table,
    write_table,
)


def get_cost_model(source: str = "analytic", table: Optional[str] = None,
                   batch_size: int = 1) -> CostModel:
    """The cost model named by `source`, as the ``--cost_model`` flag takes it.

    Args:
      source: 'analytic'; 'measured' (the table ``bin/latency_table.py``
        wrote: `table`, default ``latency_table.json``); or the path of a
        JSON table in :class:`TableCost`'s format.
      table: The table 'measured' reads.
      batch_size: The batch size: of a table's latencies, or the analytic
        model's (the weights are read once per batch).

    Raises:
      ValueError: On an unknown source, or a table that is missing or invalid.
    """
    if source == "analytic":
        return AnalyticCost(batch_size=batch_size)
    if source == "measured":
        path = table or DEFAULT_TABLE
        if not os.path.exists(path):
            raise ValueError(f"cost model 'measured' reads the table of bin/latency_table.py; "
                             f"{path} does not exist (run bin/latency_table.py "
                             f"--output={path} first)")
        return TableCost(path, batch_size)
    if isinstance(source, str) and (source.endswith(".json") or os.path.isfile(source)):
        return TableCost(source, batch_size)
    raise ValueError(f"cost model must be analytic, measured or the path of a .json latency "
                     f"table; got {source!r}")


# ----------------------------------------------------------------------------
# The model's search space


def searchable_layers(width_multiplier: float = 0.5,
                      input_shape: Sequence[int] = (32, 32, 3)) -> List[LayerSpec]:
    """The searchable 3x3 convolutions of ``resnet18_like``, in model order.

    The 3x3 convolutions of the residual blocks (``layer<s>.<b>.conv1/2``) as
    :func:`wa_tf.models.searchable_layers` describes them: not the stem
    (``conv1``), the 1x1 shortcuts or the classifier.

    Args:
      width_multiplier: The model's width multiplier (``--mult``).
      input_shape: The model's input (height, width, channels).

    Returns:
      One :class:`LayerSpec` per layer, named, with its input shape.
    """
    return models.searchable_layers(width_multiplier, tuple(input_shape))


def uniform_architecture(layers: Sequence[LayerSpec], conv: str = "normal",
                         tile_size: int = 4, bits: Optional[int] = None) -> Dict[str, Dict]:
    """Every layer of `layers` with the same choice, as an architecture dict.

    Where `tile_size` does not fit a layer (:func:`tile_fits`), the largest
    tile size of 2, 4, 6 that fits and is no larger is used (F6 -> F4 on the
    last stage, as the uniform model does).
    """
    if conv not in CONV_MODES:
        raise ValueError(f"conv must be one of {', '.join(CONV_MODES)}; got {conv!r}")
    check_optional_bits(bits)
    architecture = {}
    for layer in layers:
        m = tile_size
        if conv != "normal":
            fitting = [s for s in (2, 4, 6) if s <= tile_size and tile_fits(layer, s)]
            if not fitting:
                raise ValueError(f"no Winograd tile size up to {tile_size} fits "
                                 f"{layer.describe()}")
            m = fitting[-1]
        architecture[layer.name] = {"conv": conv, "tile_size": m, "bits": bits}
    return architecture


def _read_architecture(architecture):
    return load_architecture(architecture).to_dict()


def layer_costs(architecture: Union[Mapping, str], layers: Sequence[LayerSpec],
                cost_model: Optional[CostModel] = None) -> Dict[str, float]:
    """Each layer's cost under `architecture` (a dict or the path of its JSON file).

    Args:
      architecture: ``{layer name: {"conv", "tile_size", "bits"}}`` covering
        exactly the names of `layers`.
      layers: The searchable layers (:func:`searchable_layers`).
      cost_model: Default :class:`AnalyticCost`.

    Raises:
      ValueError: On a missing or unknown layer name, a bad entry, a candidate
        not offered for its layer, or a cost the model lacks.
    """
    architecture = _read_architecture(architecture)
    cost_model = cost_model or AnalyticCost()
    names = [layer.name for layer in layers]
    missing = [n for n in names if n not in architecture]
    unknown = [n for n in architecture if n not in names]
    if missing or unknown:
        raise ValueError("the architecture must name every searchable layer once: "
                         + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                     + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    costs = {}
    for layer in layers:
        try:
            candidate = Candidate.from_choice(architecture[layer.name])
        except ValueError as e:
            raise ValueError(f"architecture entry {layer.name}: {e}") from None
        if not is_allowed(layer, candidate):
            raise ValueError(f"architecture entry {layer.name}: {candidate.name} does not fit "
                             f"its {layer.height}x{layer.width} input")
        costs[layer.name] = cost_model.cost(layer, candidate)
    return costs


def model_cost(architecture: Union[Mapping, str], layers: Sequence[LayerSpec],
               cost_model: Optional[CostModel] = None) -> float:
    """The total cost of the searchable layers under `architecture` (:func:`layer_costs`)."""
    return sum(layer_costs(architecture, layers, cost_model).values())


__all__ = [
    "ALGORITHMS", "AnalyticCost", "CANDIDATE_NAMES", "Candidate", "CostModel", "DEFAULT_TABLE",
    "FP32_BYTES", "LayerSpec", "NORMAL", "OperationCounts", "TABLE_FORMAT", "TABLE_VERSION",
    "TableCost", "WINOGRAD", "allowed_candidates", "bytes_per_element", "candidates",
    "check_optional_bits", "get_cost_model", "is_allowed", "layer_costs", "load_table",
    "model_cost", "op_scale", "operation_counts", "searchable_layers", "tile_fits",
    "transform_ops", "uniform_architecture", "validate_table", "write_table",
]
