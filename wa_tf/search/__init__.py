"""wiNAS: a latency-aware search of each convolution's algorithm and bit-width.

:mod:`.cost` models a layer's inference cost (analytic, or a measured table from
:mod:`.latency`); :mod:`.supernet` is the supernet of mixed convolutions and the
expected cost of its sampled paths; :mod:`.config` holds a search's settings;
:mod:`.search_lib` runs the search and :mod:`.results` formats what it reports.
This module re-exports the public names of the search (supernet, settings, run).
"""

from wa_tf.search.config import SearchConfig, parse_bits
from wa_tf.search.results import pareto_front
from wa_tf.search.search_lib import (
    ARCHITECTURE_FILE,
    CHECKPOINT_DIR,
    FINISHED,
    LOG_DIR,
    PLOT_FILE,
    RUNNING,
    SEARCH_DIR,
    SEARCH_FILE,
    find_unfinished,
    run,
)
from wa_tf.search.supernet import (
    SUPERNET_NAME,
    CostTable,
    MixedConv2D,
    build_supernet,
    candidate_choice,
    candidate_slug,
    cost_table,
    derive_architecture,
    expected_cost,
    latency_penalty,
    mixed_layers,
    probabilities,
    sample_paths,
    search_space,
    select,
    two_paths,
    widest_bits,
)

__all__ = [
    "ARCHITECTURE_FILE",
    "CHECKPOINT_DIR",
    "CostTable",
    "FINISHED",
    "LOG_DIR",
    "MixedConv2D",
    "PLOT_FILE",
    "RUNNING",
    "SEARCH_DIR",
    "SEARCH_FILE",
    "SUPERNET_NAME",
    "SearchConfig",
    "build_supernet",
    "candidate_choice",
    "candidate_slug",
    "cost_table",
    "derive_architecture",
    "expected_cost",
    "find_unfinished",
    "latency_penalty",
    "mixed_layers",
    "parse_bits",
    "pareto_front",
    "probabilities",
    "run",
    "sample_paths",
    "search_space",
    "select",
    "two_paths",
    "widest_bits",
]
