"""Mixed architectures: each searchable convolution's own algorithm, tile size and bit-width.

An architecture maps every searchable 3x3 convolution of a model, by layer
name, to a :class:`LayerChoice`.  Its JSON form (what wiNAS writes and
``wa_tf.models.resnet18_like(architecture=...)`` builds) is one object::

    {
      "layer1.0.conv1": {"conv": "flex",   "tile_size": 4,    "bits": 8},
      "layer1.0.conv2": {"conv": "normal", "tile_size": null, "bits": 16},
      "layer4.1.conv2": {"conv": "static", "tile_size": 2,    "bits": null},
      ...
    }

* ``conv``: ``"normal"`` (direct convolution), ``"static"`` (Winograd with
  fixed Cook-Toom transforms) or ``"flex"`` (Winograd with learnt transforms).
* ``tile_size``: the output tile m of F(m x m, 3 x 3), 2, 4 or 6; required for
  static and flex; for normal it may be omitted or null (any allowed value is
  accepted and ignored; files are written with null).
* ``bits``: 2..16 to quantize the layer (its kernel, input, output and, for
  Winograd layers, the Winograd domain) at that bit-width, or null (or
  omitted) to keep it float.

No other keys are allowed.  Checked against a model's searchable layers
(:class:`SearchableLayer`, e.g. ``wa_tf.models.searchable_layers()``), the
file must name every searchable layer exactly once (no default for a missing
one, so a file never silently means something else), and a tile size must be
one its layer offers (F6 is not offered in the last stage).

This module holds the format only; the model it describes is built by
:func:`wa_tf.models.resnet18_like`.
"""

import dataclasses
import json
import os
import types
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from wa_tf.choices import CONV_MODES, MAX_BITS, MIN_BITS, TILE_SIZES, valid_bits
from wa_tf.transforms import is_int

_KEYS = ("conv", "tile_size", "bits")


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """How one searchable convolution is computed.

    Attributes:
      conv: 'normal', 'static' or 'flex'.
      tile_size: m of F(m x m, 3 x 3) for static and flex; None for normal.
      bits: Bit-width 2..16, or None for a float layer.
    """
    conv: str
    tile_size: Optional[int] = None
    bits: Optional[int] = None

    def __post_init__(self):
        _, tile_size, bits = _checked(self.conv, self.tile_size, self.bits, "LayerChoice")
        object.__setattr__(self, "tile_size", tile_size)
        object.__setattr__(self, "bits", bits)

    @property
    def winograd(self) -> bool:
        """Whether the layer is a WinogradConv2D (static or flex)."""
        return self.conv != "normal"

    def to_dict(self) -> Dict:
        """The JSON entry ``{"conv", "tile_size", "bits"}``."""
        return {"conv": self.conv, "tile_size": self.tile_size, "bits": self.bits}


_ALLOWED = '{"conv": "normal"|"static"|"flex", "tile_size": 2|4|6, "bits": null|2..16}'


def _checked(conv, tile_size, bits, where):
    """``(conv, tile_size, bits)`` validated and normalised (no tile size for normal)."""
    if conv not in CONV_MODES:
        raise ValueError(f"architecture: {where} conv must be one of "
                         f"{', '.join(CONV_MODES)}; got {conv!r}")
    if tile_size is not None or conv != "normal":
        if not is_int(tile_size) or tile_size not in TILE_SIZES:
            raise ValueError(f"architecture: {where} tile_size must be one of "
                             f"{', '.join(map(str, TILE_SIZES))}"
                             f"{' (or null for normal)' if conv == 'normal' else ''}; "
                             f"got {tile_size!r}")
    if bits is not None and not valid_bits(bits):
        raise ValueError(f"architecture: {where} bits must be null (float) or an integer "
                         f"from {MIN_BITS} to {MAX_BITS}; got {bits!r}")
    return (conv, None if conv == "normal" else int(tile_size),
            None if bits is None else int(bits))


def _parse_choice(entry, where) -> LayerChoice:
    """A LayerChoice from a JSON entry; errors name `where` (the layer) and the key."""
    if isinstance(entry, LayerChoice):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(f"architecture: {where} must be {_ALLOWED}; got {entry!r}")
    unknown = [key for key in entry if key not in _KEYS]
    if unknown:
        raise ValueError(f"architecture: {where} has unknown key {unknown[0]!r}; "
                         f"allowed keys are {', '.join(_KEYS)}")
    if "conv" not in entry:
        raise ValueError(f"architecture: {where} has no 'conv'; it must be {_ALLOWED}")
    return LayerChoice(*_checked(entry["conv"], entry.get("tile_size"), entry.get("bits"), where))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A stride-1 convolution of the search space: input ``height x width x in_channels``.

    What a model says of its searchable layers (:func:`wa_tf.models.searchable_layers`:
    named, with their stage and the tile sizes they offer) and what the cost models
    cost (any shape, named or not).

    Attributes:
      height: Input (and, with 'same' padding, output) height.
      width: Input width.
      in_channels: C_in.
      out_channels: C_out (filters).
      kernel_size: Odd square kernel size r.
      name: The layer's name in the model (``layer1.0.conv1``), or None;
        tables are looked up by name first, then by :attr:`shape_key`.
      tile_sizes: The Winograd tile sizes the model offers at this layer
        (:func:`wa_tf.models.searchable_layers`), or None to decide by
        shape (:func:`wa_tf.search.cost.tile_fits`).
      stage: The model stage the layer belongs to, from 1, or None.
    """
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel_size: int = 3
    name: Optional[str] = None
    tile_sizes: Optional[Tuple[int, ...]] = dataclasses.field(default=None, compare=False)
    stage: Optional[int] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        for field in ("height", "width", "in_channels", "out_channels", "kernel_size"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ValueError(f"LayerSpec.{field} must be a positive integer; got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"LayerSpec.kernel_size must be odd; got {self.kernel_size}")

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """``(height, width, in_channels)`` of the layer's input."""
        return (self.height, self.width, self.in_channels)

    @property
    def filters(self) -> int:
        """The layer's number of output channels (``out_channels``)."""
        return self.out_channels

    @property
    def shape_key(self) -> str:
        """The table key of this shape: ``'HxWxC_in-C_out-rxr'``, e.g. ``'16x16x64-64-3x3'``."""
        r = self.kernel_size
        return f"{self.height}x{self.width}x{self.in_channels}-{self.out_channels}-{r}x{r}"

    def describe(self) -> str:
        """The name and shape, for messages."""
        return f"{self.name} ({self.shape_key})" if self.name else self.shape_key


# A model's searchable convolution is a LayerSpec with its name, stage and tile sizes.
SearchableLayer = LayerSpec


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A per-layer choice for every searchable convolution, in model order.

    Build one with :func:`load_architecture`; ``architecture[name]`` is a
    layer's :class:`LayerChoice`.

    Attributes:
      choices: Layer name -> LayerChoice (read-only).
    """
    choices: Mapping[str, LayerChoice]

    def __post_init__(self):
        object.__setattr__(self, "choices", types.MappingProxyType(dict(self.choices)))

    def __getitem__(self, name: str) -> LayerChoice:
        return self.choices[name]

    def __iter__(self):
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def __eq__(self, other) -> bool:
        return isinstance(other, Architecture) and dict(self.choices) == dict(other.choices)

    def __hash__(self):
        return hash(tuple(self.choices.items()))

    def to_dict(self) -> Dict[str, Dict]:
        """The JSON form: layer name -> ``{"conv", "tile_size", "bits"}``."""
        return {name: choice.to_dict() for name, choice in self.choices.items()}

    @property
    def bits(self) -> Dict[str, Optional[int]]:
        """Layer name -> bit-width (None: float)."""
        return {name: choice.bits for name, choice in self.choices.items()}


ArchitectureLike = Union[Architecture, Mapping, str, os.PathLike]


def _read(source):
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"architecture: cannot read {os.fspath(source)!r} as JSON: "
                             f"{e}") from None
    return source


def load_architecture(source: ArchitectureLike,
                      layers: Optional[Sequence[SearchableLayer]] = None) -> Architecture:
    """Reads and validates an architecture.

    Args:
      source: An :class:`Architecture`, its dict form (layer name ->
        ``{"conv", "tile_size", "bits"}`` or :class:`LayerChoice`) or the path
        of its JSON file.
      layers: The model's searchable layers (``wa_tf.models.searchable_layers``);
        when given, the architecture must name each of them once and nothing
        else, and every tile size must be one its layer offers; the result is
        in the order of ``layers``.  Without it only the entries are checked.

    Returns:
      The :class:`Architecture`.

    Raises:
      ValueError: one line naming the file or layer, the key, the value and
        what is allowed.
    """
    data = _read(source)
    if isinstance(data, Architecture):
        data = data.choices
    if not isinstance(data, Mapping) or not data:
        raise ValueError("architecture must be a non-empty JSON object mapping layer names "
                         f"to {{\"conv\", \"tile_size\", \"bits\"}}; got {data!r:.200}")
    choices = {}
    for name, entry in data.items():
        if not isinstance(name, str):
            raise ValueError(f"architecture: layer names must be strings; got {name!r}")
        choices[name] = _parse_choice(entry, name)
    if layers is None:
        return Architecture(choices)
    names = [layer.name for layer in layers]
    unknown = [name for name in choices if name not in names]
    if unknown:
        raise ValueError(f"architecture: unknown layer {unknown[0]!r}; the searchable layers "
                         f"are {', '.join(names)}")
    missing = [name for name in names if name not in choices]
    if missing:
        raise ValueError(f"architecture: no entry for layer {missing[0]!r} (missing: "
                         f"{', '.join(missing)}); every searchable layer needs one")
    for layer in layers:
        choice = choices[layer.name]
        if choice.winograd and choice.tile_size not in layer.tile_sizes:
            h, w, _ = layer.input_shape
            raise ValueError(f"architecture: {layer.name} tile_size {choice.tile_size} is not "
                             f"offered there (its input is {h}x{w}, stage {layer.stage}); "
                             f"allowed: {', '.join(map(str, layer.tile_sizes))}")
    return Architecture({name: choices[name] for name in names})


def save_architecture(architecture: ArchitectureLike, path: str) -> str:
    """Writes an architecture as JSON (validated first, one entry per line).

    Returns:
      ``path``.
    """
    architecture = load_architecture(architecture)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    lines = [f"  {json.dumps(name)}: {json.dumps(choice)}"
             for name, choice in architecture.to_dict().items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    return path
