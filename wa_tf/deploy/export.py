"""SavedModel export of a (quantized) Winograd-aware tf_keras model.

The exported SavedModel is self-contained: it holds the model's variables and
traced inference graph only (no Keras metadata), so ``tf.saved_model.load``
runs it in a process where neither wa_tf, tf_keras nor TF-MOT is installed.
Quantizer ranges are exported as they are and frozen (inference mode,
``training=False``), so an INT8 model serves exactly its fake-quantized
inference computation.

The Winograd-domain weights ``U = G g G^T`` of every
:class:`~wa_tf.layers.WinogradConv2D` (plain or quantized, each with its own
tile size and bit-width) are computed once at export, quantized as the layer
quantizes them at inference, and stored as variables of the SavedModel: the
serving graph does only the input transform, the element-wise stage and the
output transform (:func:`wa_tf.layers.winograd_conv_transformed`).

Signatures:

``serving_default``
  ``images``: float32 ``(batch, H, W, C)`` as the model itself takes them
  (already normalised) -> ``{'logits': float32 (batch, classes)}``.

``serving_raw`` (only when ``raw_normalization`` is given, as ``bin/export.py``
does with the dataset's statistics)
  ``images``: uint8 ``(batch, H, W, C)`` with values 0-255 -> ``{'logits': ...}``;
  normalises ``(images / 255 - mean) / std`` (computed as
  ``images * (1 / (255 std)) - mean / std``, exactly as :func:`wa_tf.data.pipeline`)
  and then runs the model.

With ``fused_kernels=True`` the serving graph runs the tile stages with
:mod:`wa_tf.kernels`' fused CPU kernels instead of TensorFlow's own ops
(faster on CPUs); loading it then needs those ops registered first:
``tf.load_op_library(path)`` of the library :func:`wa_tf.kernels.build`
returns (or ``import wa_tf``, which loads it when built).

Example:
  >>> export_saved_model(model, "/tmp/exported")
  >>> served = tf.saved_model.load("/tmp/exported")  # no wa_tf needed
  >>> logits = served.signatures["serving_default"](images=x)["logits"]
"""

import contextlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from wa_tf import kernels
from wa_tf.layers import WinogradConv2D
from wa_tf.quantization import inference_weight, unwrap
from wa_tf.quantization.tfmot_adapter import is_quantize_wrapper

DEFAULT_SIGNATURE = "serving_default"
RAW_SIGNATURE = "serving_raw"


def _input_spec(model: tf_keras.Model) -> tf.TensorShape:
    shape = model.input_shape
    if isinstance(shape, list):
        raise ValueError(f"model must have a single image input, got input shapes {shape}")
    if len(shape) != 4:
        raise ValueError(f"model must take NHWC images (rank 4), got input shape {shape}")
    return tf.TensorShape([None] + list(shape[1:]))


def _logits(model, images):
    outputs = model(images, training=False)
    if isinstance(outputs, (list, tuple, dict)):
        raise ValueError("model must have a single (logits) output")
    return {"logits": tf.cast(outputs, tf.float32)}


def _winograd_layers(model) -> List[tf_keras.layers.Layer]:
    """Every WinogradConv2D of ``model`` (nested models included), by its wrapper if quantized."""
    found, wrapped = [], set()
    for module in model.submodules:
        if is_quantize_wrapper(module) and isinstance(unwrap(module), WinogradConv2D):
            found.append(module)
            wrapped.add(id(unwrap(module)))
    found += [module for module in model.submodules
              if isinstance(module, WinogradConv2D) and id(module) not in wrapped]
    return found


def _frozen_winograd_weights(layers) -> List[tf.Variable]:
    """U of each layer as its inference pass computes it, as a variable.

    A wrapped layer takes the wrapper's fake-quantized kernel (and flex G).
    Computed in one graph, as the model runs at inference, so that U and its
    quantization agree with the model's own to the last bit.  (A kernel
    quantizer in warm-up mode that has no statistics yet, i.e. a model adapted
    but never trained, is read as :func:`~wa_tf.quantization.inference_weight`
    reads it, with scale 1, as :mod:`wa_tf.deploy.integer_export` does.)
    """
    @tf.function
    def compute():
        weights = []
        for layer in layers:
            if is_quantize_wrapper(layer):
                base = unwrap(layer)
                weights.append(base.inference_winograd_weights(
                    kernel=inference_weight(layer, "kernel"),
                    g=inference_weight(layer, "G") if base.flex else None))
            else:
                weights.append(layer.inference_winograd_weights())
        return weights

    return [tf.Variable(u, trainable=False, name=f"{unwrap(layer).name}/winograd_weights")
            for layer, u in zip(layers, compute() if layers else [])]


def export_saved_model(model: tf_keras.Model, path: str,
                       raw_normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                       fused_kernels: bool = False) -> str:
    """Writes ``model``'s inference computation as a self-contained SavedModel.

    Args:
      model: A built tf_keras model with one NHWC image input and one logits
        output (float or quantized through :mod:`wa_tf.quantization`).
      path: Output directory (created; an existing SavedModel is replaced).
      raw_normalization: Optional ``(mean, std)`` per channel, on the [0, 1]
        scale; adds the ``serving_raw`` signature taking uint8 0-255 images.
      fused_kernels: Serve the Winograd tile stages with :mod:`wa_tf.kernels`
        (CPU only; loading then needs their library, see the module docstring).

    Returns:
      ``path``.

    Raises:
      ValueError: if the model's input or output is not a single NHWC image
        tensor / logits tensor, ``raw_normalization`` does not match the
        number of channels, or ``fused_kernels`` is set where the kernels
        cannot run.
    """
    if fused_kernels and not kernels.available():
        raise ValueError("fused_kernels=True needs wa_tf.kernels, not available here: "
                         f"{kernels.unavailable_reason()}")
    shape = _input_spec(model)
    module = tf.Module()
    # Track the variables only, not the Keras model: the SavedModel then holds
    # no Keras objects, so loading it needs neither tf_keras nor wa_tf.
    module.model_variables = list(model.variables)

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    def serve(images):
        return _logits(model, images)

    signatures = {DEFAULT_SIGNATURE: serve}
    module.serve = serve
    if raw_normalization is not None:
        mean, std = (np.asarray(v, np.float64) for v in raw_normalization)
        channels = shape[-1]
        if mean.shape != (channels,) or std.shape != (channels,) or not np.all(std > 0):
            raise ValueError(f"raw_normalization must be (mean, std) with {channels} values each "
                             f"and std > 0, got {raw_normalization!r}")
        scale = tf.constant(1.0 / (255.0 * std), tf.float32)
        offset = tf.constant(-mean / std, tf.float32)

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")])
        def serve_raw(images):
            # Calls the traced `serve`, so the model is traced once.
            return serve(tf.cast(images, tf.float32) * scale + offset)

        signatures[RAW_SIGNATURE] = serve_raw
        module.serve_raw = serve_raw
    winograd_layers = _winograd_layers(model)
    module.winograd_weights = _frozen_winograd_weights(winograd_layers)
    # Traced and saved while every Winograd layer reads its precomputed U, with
    # TensorFlow's own ops only (no wa_tf.kernels) unless asked: it then loads anywhere.
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernels.saved_with_kernels() if fused_kernels
                            else kernels.disabled())
        for layer, u in zip(winograd_layers, module.winograd_weights):
            stack.enter_context(unwrap(layer).frozen_winograd_weights(u))
        tf.saved_model.save(module, path, signatures=signatures)
    return path


def load_serving(path: str, signature: str = DEFAULT_SIGNATURE):
    """Loads a SavedModel written by :func:`export_saved_model`.

    Args:
      path: SavedModel directory.
      signature: Signature name.

    Returns:
      A function ``images -> logits`` (a float32 tensor).

    Raises:
      ValueError: if ``path`` is not a SavedModel or lacks ``signature``.
    """
    if not tf.saved_model.contains_saved_model(path):
        raise ValueError(f"savedmodel: no SavedModel found in {path!r}")
    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        raise ValueError(f"signature must be one of {sorted(loaded.signatures)}, got {signature!r}")

    def predict(images):
        # Reads the signature through `loaded`, whose lifetime owns the variables.
        return loaded.signatures[signature](images=images)["logits"]

    return predict
