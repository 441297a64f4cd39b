"""What is costed: a convolution (:class:`LayerSpec`), how it is computed (:class:`Candidate`),
and the interface every cost source answers (:class:`CostModel`).

:class:`LayerSpec` is defined with the search space it describes, in
:mod:`wa_tf.models.architecture`, and re-exported here.
"""

import dataclasses
import re
from typing import List, Mapping, Optional, Sequence

from wa_tf.choices import CONV_MODES, MAX_BITS, MIN_BITS, valid_bits
from wa_tf.models.architecture import LayerSpec as LayerSpec
from wa_tf.transforms import is_int

NORMAL = "normal"
WINOGRAD = "winograd"
ALGORITHMS = (NORMAL, WINOGRAD)
# The search space's candidate names: the direct convolution and F(m x m, 3 x 3).
CANDIDATE_NAMES = ("normal", "F2", "F4", "F6")
_CANDIDATE_KEY = re.compile(r"^(normal|F(\d+))(?:/int(\d+))?$")


def check_optional_bits(bits):
    """Raises ValueError unless `bits` is None (FP32) or a valid integer bit-width."""
    if bits is not None and not valid_bits(bits):
        raise ValueError(f"bits must be None (FP32) or an integer in {MIN_BITS}..{MAX_BITS}; "
                         f"got {bits!r}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """How a layer is computed: the algorithm, its tile size and the bit-width.

    Attributes:
      algorithm: 'normal' (direct convolution, im2row + GEMM) or 'winograd'.
      tile_size: Output tile size m of F(m x m, r x r); None for 'normal'.
      bits: None for FP32, else the integer bit-width 2..16.
    """
    algorithm: str
    tile_size: Optional[int] = None
    bits: Optional[int] = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"Candidate.algorithm must be one of {', '.join(ALGORITHMS)}; "
                             f"got {self.algorithm!r}")
        if self.algorithm == NORMAL and self.tile_size is not None:
            raise ValueError(f"a normal convolution has no tile size; got {self.tile_size!r}")
        if self.algorithm == WINOGRAD and (not is_int(self.tile_size) or self.tile_size < 1):
            raise ValueError("a Winograd candidate needs a positive integer tile_size; "
                             f"got {self.tile_size!r}")
        check_optional_bits(self.bits)

    @classmethod
    def parse(cls, name: str, bits: Optional[int] = None) -> "Candidate":
        """A candidate from its name, 'normal' or 'F<m>' (``'F4'``), or a table key ``'F4/int8'``.

        Args:
          name: 'normal', 'F2', 'F4', 'F6' (any m), optionally with '/int<bits>'.
          bits: The bit-width when `name` has none (None: FP32).

        Raises:
          ValueError: On an unknown name, or bits given twice.
        """
        match = _CANDIDATE_KEY.match(str(name))
        if not match:
            raise ValueError(f"unknown candidate {name!r}: use normal or F<m> (F2, F4, F6), "
                             "optionally followed by /int<bits>")
        if match.group(3) is not None:
            if bits is not None:
                raise ValueError(f"candidate {name!r} already names its bit-width")
            bits = int(match.group(3))
        if match.group(2) is None:
            return cls(NORMAL, None, bits)
        return cls(WINOGRAD, int(match.group(2)), bits)

    @classmethod
    def from_choice(cls, choice: Mapping) -> "Candidate":
        """A candidate from an architecture entry ``{"conv", "tile_size", "bits"}``.

        'static' and 'flex' are both Winograd: they cost the same at inference.
        """
        if not isinstance(choice, Mapping) or "conv" not in choice:
            raise ValueError('an architecture entry must be {"conv": "normal"|"static"|"flex", '
                             f'"tile_size": 2|4|6, "bits": null|2..16}}; got {choice!r}')
        conv = choice["conv"]
        if conv not in CONV_MODES:
            raise ValueError(f"conv must be one of {', '.join(CONV_MODES)}; got {conv!r}")
        bits = choice.get("bits")
        if conv == "normal":
            return cls(NORMAL, None, bits)
        return cls(WINOGRAD, choice.get("tile_size"), bits)

    @property
    def name(self) -> str:
        """'normal' or 'F<m>'."""
        return NORMAL if self.algorithm == NORMAL else f"F{self.tile_size}"

    @property
    def key(self) -> str:
        """The table key: the name, then '/int<bits>' unless FP32 (``'F4'``, ``'F4/int8'``)."""
        return self.name if self.bits is None else f"{self.name}/int{self.bits}"

    def with_bits(self, bits: Optional[int]) -> "Candidate":
        """The same algorithm at another bit-width."""
        return dataclasses.replace(self, bits=bits)


def candidates(names: Sequence[str] = CANDIDATE_NAMES,
               bits: Sequence[Optional[int]] = (None,)) -> List[Candidate]:
    """Every candidate of `names` ('normal', 'F2'...) at every bit-width of `bits`."""
    return [Candidate.parse(n, b) for n in names for b in bits]


def tile_fits(layer: LayerSpec, tile_size: int) -> bool:
    """Whether F(m x m) has at least one whole output tile: ``H >= m`` and ``W >= m``.

    Equivalently, the 'same'-padded input ``H + r - 1`` holds one ``t x t`` input
    tile.  F6 on a 4x4 map would compute a 6x6 tile for 16 outputs; F4 on it
    computes exactly one tile.  A layer of a model (with ``tile_sizes``) offers
    what the model offers there.
    """
    if layer.tile_sizes is not None:
        return tile_size in layer.tile_sizes
    return layer.height >= tile_size and layer.width >= tile_size


def is_allowed(layer: LayerSpec, candidate: Candidate) -> bool:
    """Whether `candidate` is offered for `layer` (see :func:`tile_fits`)."""
    return candidate.algorithm == NORMAL or tile_fits(layer, candidate.tile_size)


def allowed_candidates(layer: LayerSpec, names: Sequence[str] = CANDIDATE_NAMES,
                       bits: Sequence[Optional[int]] = (None,)) -> List[Candidate]:
    """The candidates of `names` x `bits` offered for `layer`, in that order."""
    return [c for c in candidates(names, bits) if is_allowed(layer, c)]


# ----------------------------------------------------------------------------
# Analytic counts


class CostModel:
    """What a layer costs at inference; subclasses implement :meth:`cost`.

    Attributes:
      unit: The unit of the costs, for reports.
      description: One line saying where the costs come from.
    """
    unit = ""
    description = ""

    def cost(self, layer: LayerSpec, candidate: Candidate) -> float:
        """The inference cost of `layer` computed as `candidate`.

        Raises:
          ValueError: If the model cannot cost this pair (a table lacks it,
            or the candidate is not offered for the layer).
        """
        raise NotImplementedError
