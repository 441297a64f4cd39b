"""The settings of a wiNAS search: :class:`SearchConfig` and ``--bits_candidates``.

The fields of :class:`SearchConfig` are ``bin/search.py``'s flags; a bad
value raises ``ValueError`` naming its field.
"""

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from wa_tf.choices import MAX_BITS, MIN_BITS, valid_bits
from wa_tf.data import DATASETS
from wa_tf.search import cost as cost_lib
from wa_tf.search.supernet import search_space


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """A search's settings; the fields are ``bin/search.py``'s flags.

    Raises (on construction):
      ValueError: The message starts with the bad field's name.
    """
    candidates: Tuple[str, ...] = ("normal", "F2", "F4", "F6")
    bits_candidates: Tuple[Optional[int], ...] = (8,)
    cost_model: str = "analytic"
    cost_batch_size: int = 1
    latency_weight: float = 1.0
    target_latency: Optional[float] = None
    epochs: int = 10
    steps_per_epoch: Optional[int] = None
    batch_size: int = 64
    lr: float = 0.001
    arch_lr: float = 0.001
    arch_fraction: float = 0.2
    mult: float = 0.5
    per_tap: bool = False
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    seed: int = 1
    outDir: str = "experiments/"
    modelDir: Optional[str] = None
    modelToLoad: str = "final"

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "bits_candidates", tuple(self.bits_candidates))
        search_space([], self.candidates, self.bits_candidates)
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates has duplicates: {','.join(self.candidates)}")
        if len(set(self.bits_candidates)) != len(self.bits_candidates):
            raise ValueError("bits_candidates has duplicates")
        for bits in self.bits_candidates:
            if bits is not None and not (isinstance(bits, int) and valid_bits(bits)):
                raise ValueError(f"bits_candidates must be integers from {MIN_BITS} to "
                                 f"{MAX_BITS} or FP; got {bits!r}")
        for name in ("epochs", "batch_size", "cost_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer; "
                             f"got {self.steps_per_epoch}")
        for name in ("lr", "arch_lr"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number; got {getattr(self, name)}")
        if not np.isfinite(self.latency_weight) or self.latency_weight < 0:
            raise ValueError(f"latency_weight must be a number >= 0; got {self.latency_weight}")
        if self.target_latency is not None and not (np.isfinite(self.target_latency)
                                                    and self.target_latency > 0):
            raise ValueError("target_latency must be a positive fraction of the all-normal "
                             f"cost (e.g. 0.4); got {self.target_latency}")
        if not 0 < self.arch_fraction < 1:
            raise ValueError(f"arch_fraction must be in (0, 1); got {self.arch_fraction}")
        if not 1 / 64 <= self.mult <= 1:
            raise ValueError(f"mult must be in (0, 1] (and at least 1/64); got {self.mult}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; "
                             f"got {self.dataset!r}")
        try:
            cost_lib.get_cost_model(self.cost_model, batch_size=self.cost_batch_size)
        except ValueError as e:
            raise ValueError(f"cost_model: {e}") from None
        if not self.outDir:
            raise ValueError("outDir must not be empty")

    def to_flags(self) -> Dict:
        """The flag values of ``bin/search.py`` (lists as comma-separated strings)."""
        values = dataclasses.asdict(self)
        values["candidates"] = ",".join(self.candidates)
        values["bits_candidates"] = ",".join("FP" if b is None else str(b)
                                             for b in self.bits_candidates)
        return values


def parse_bits(text: str) -> Tuple[Optional[int], ...]:
    """``'8,16'`` -> ``(8, 16)``; ``FP`` (or ``32``) is None, FP32.

    Raises:
      ValueError: On anything else.
    """
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if item.upper() in ("FP", "FP32", "32"):
            values.append(None)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"bits_candidates must be comma-separated bit-widths (2..16) or "
                             f"FP; got {text!r}") from None
    return tuple(values)
