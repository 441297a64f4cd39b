"""Deployment: SavedModel export, the integer pipeline of quantized Winograd layers, LiteRT.

:mod:`.export` writes a trained model as a SavedModel that runs with TensorFlow
alone (``U = G g Gᵀ`` computed once); :mod:`.integer` is the numpy integer
pipeline of one quantized Winograd layer and its ``.npz`` deployment file;
:mod:`.integer_export` writes those files from a quantized model;
:mod:`.litert` writes and runs LiteRT models (:mod:`.litert_model` lowers a
model, :mod:`.litert_winograd` a Winograd layer, :mod:`.tflite_graph` writes
the flatbuffer).  This module re-exports their entry points.
"""

from wa_tf.deploy.export import (
    DEFAULT_SIGNATURE,
    RAW_SIGNATURE,
    export_saved_model,
    load_serving,
)
from wa_tf.deploy.integer import load_layer_npz, run_layer, run_layer_codes
from wa_tf.deploy.integer_export import export_layer_npz, export_model_npz, layer_arrays

__all__ = [
    "DEFAULT_SIGNATURE",
    "RAW_SIGNATURE",
    "export_layer_npz",
    "export_model_npz",
    "export_saved_model",
    "layer_arrays",
    "load_layer_npz",
    "load_serving",
    "run_layer",
    "run_layer_codes",
]
