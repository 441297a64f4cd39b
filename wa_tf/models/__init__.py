"""Models: the paper's ResNet-18-like model, its layer table and mixed architectures.

:mod:`.architecture` holds the JSON format of mixed architectures (a conv mode,
tile size and bit-width per searchable layer), :mod:`.resnet` builds the model,
:mod:`.table` prints the reference's layer table; this module re-exports their
public names.  The model imports :mod:`wa_tf.quantization` (and with it TF-MOT)
only when it builds a quantized model.
"""

from wa_tf.models.architecture import (
    Architecture,
    ArchitectureLike,
    LayerChoice,
    SearchableLayer,
    load_architecture,
    save_architecture,
)
from wa_tf.models.resnet import (
    BLOCKS_PER_STAGE,
    MODEL_NAME,
    SEARCHED_MODEL_NAME,
    SHORTCUT_SUFFIX,
    STAGE_CHANNELS,
    STEM_CHANNELS,
    architecture_name,
    build_resnet18_like,
    model_name,
    resnet18_like,
    searchable_layers,
    torch_kernel_init,
    uniform_architecture,
    uniform_choice,
)
from wa_tf.models.table import layer_table

__all__ = [
    "Architecture",
    "ArchitectureLike",
    "BLOCKS_PER_STAGE",
    "LayerChoice",
    "MODEL_NAME",
    "SEARCHED_MODEL_NAME",
    "SHORTCUT_SUFFIX",
    "STAGE_CHANNELS",
    "STEM_CHANNELS",
    "SearchableLayer",
    "architecture_name",
    "build_resnet18_like",
    "layer_table",
    "load_architecture",
    "model_name",
    "resnet18_like",
    "save_architecture",
    "searchable_layers",
    "torch_kernel_init",
    "uniform_architecture",
    "uniform_choice",
]
