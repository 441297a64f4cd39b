"""LiteRT (``.tflite``) export of a trained wa_tf model, and running it.

:func:`export_litert` writes a model that LiteRT's stock interpreter runs with
builtin operators only (no custom or TensorFlow ops):

* a quantized run becomes an **integer** model: int8 weights and activations
  from the images to the logits, from the run's own learned ranges and (flex)
  transforms, with no calibration set (:mod:`wa_tf.deploy.litert_model` says
  how each layer is lowered; docs/deploy.md draws a Winograd layer);
* a float run becomes a float32 model computing what the Keras model computes.

Inputs are uint8 0-255 NHWC images when ``normalization`` is given (as
``bin/export.py`` does with the run's dataset statistics), else float32 images
as the model takes them; the output is float32 logits.  The batch size is free
(:func:`interpreter` resizes it).

Example::

    info = export_litert(model, "model.tflite", normalization=(mean, std))
    runner = interpreter("model.tflite", threads=2)
    logits = predict(runner, images_uint8)
"""

import os
import warnings
from typing import Dict, Optional, Sequence

import numpy as np

from wa_tf.deploy import litert_model, litert_native

try:  # LiteRT's own interpreter (pip install ai-edge-litert) is preferred when present
    from ai_edge_litert.interpreter import Interpreter as _LiteRTInterpreter
    from ai_edge_litert.interpreter import OpResolverType as _OpResolverType
except ImportError:  # pragma: no cover - depends on the environment
    _LiteRTInterpreter = _OpResolverType = None


def export_litert(model, path: str, normalization: Optional[Sequence] = None,
                  batch_size: int = 1, transforms: str = "int8") -> Dict:
    """Writes ``model`` as a LiteRT flatbuffer at ``path``.

    Args:
      model: A functional tf_keras model of wa_tf's layers: float, or quantized
        by :func:`wa_tf.quantization.quantize_model` with every quantizer's
        range set (a trained or calibrated model).
      path: The ``.tflite`` file to write (its folder is created).
      normalization: Optional ``(mean, std)`` per channel of [0, 1] images; the
        file then takes uint8 0-255 images and normalises them itself.
      batch_size: The batch size of the file's shapes (resizable).
      transforms: 'int8', or 'int16' to sum the Winograd transforms' parts in
        int16 (closer to the integer reference, off XNNPACK; docs/deploy.md).

    Returns:
      ``{'path', 'bytes', 'integer', 'operators', 'winograd'}`` (see
      :func:`wa_tf.deploy.litert_model.build`).

    Raises:
      ValueError: For a model LiteRT's integer operators cannot express (more
        than 8 bits, a float layer in a quantized model); nothing is written.
    """
    if not path:
        raise ValueError("path must name the .tflite file to write")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    flatbuffer, info = litert_model.build(model, normalization, int(batch_size), transforms)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(flatbuffer)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return dict(info, path=path, bytes=len(flatbuffer))


def runtime_name() -> str:
    """The interpreter :func:`interpreter` uses: 'ai-edge-litert' or 'tf.lite'."""
    return "ai-edge-litert" if _LiteRTInterpreter is not None else "tf.lite"


def interpreter(model, threads: int = 1):
    """A LiteRT interpreter (XNNPACK on) for a ``.tflite`` path or its bytes.

    ai-edge-litert's ``Interpreter`` when installed, else TensorFlow's
    ``tf.lite.Interpreter``; for a file with native Winograd operators
    (``transforms='native'``), a :class:`wa_tf.deploy.litert_native.NativeModel`.
    A file XNNPACK refuses (see :func:`export_litert`'s ``xnnpack_refused``)
    runs on LiteRT's builtin kernels, with a warning.

    Raises:
      ValueError: if the file is missing or not a model the runtime accepts.
    """
    if isinstance(model, (bytes, bytearray)) or os.path.isfile(os.fspath(model)):
        if litert_native.is_native(model):  # Winograd layers as the native kernel's operators
            return litert_native.NativeModel(model, threads)
    if _LiteRTInterpreter is not None:
        cls, resolvers = _LiteRTInterpreter, _OpResolverType
    else:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel  # the fallback only
        cls, resolvers = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    kwargs = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) \
        else {"model_path": os.fspath(model)}
    if "model_path" in kwargs and not os.path.isfile(kwargs["model_path"]):
        raise ValueError(f"{kwargs['model_path']}: no such .tflite file")
    try:
        runner = cls(num_threads=int(threads), **kwargs)
        runner.allocate_tensors()
    except (RuntimeError, ValueError) as e:
        if "XNNPACK" not in str(e):
            raise ValueError(f"the LiteRT runtime cannot load the model: "
                             f"{str(e).splitlines()[0]}") from None
        warnings.warn("XNNPACK cannot run this model (a requantisation ratio outside "
                      "[2^-32, 256)); LiteRT's builtin kernels run it instead")
        runner = cls(num_threads=int(threads), **kwargs,
                     experimental_op_resolver_type=resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        runner.allocate_tensors()
    return runner


def input_details(runner) -> Dict:
    """The model's single input: ``{'index', 'shape', 'dtype'}``."""
    detail = runner.get_input_details()[0]
    return {"index": detail["index"], "shape": tuple(detail["shape"]), "dtype": detail["dtype"]}


def predict(runner, images: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """Logits of ``images`` (uint8 or float32 NHWC, as the file takes them).

    Args:
      runner: From :func:`interpreter`.
      images: A batch of images.
      batch_size: Images per invocation (default all at once).

    Raises:
      ValueError: if the images' shape or type does not match the file.
    """
    detail = input_details(runner)
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != detail["shape"][1:]:
        raise ValueError(f"images must be (batch, {', '.join(map(str, detail['shape'][1:]))}); "
                         f"got {images.shape}")
    if images.dtype != detail["dtype"]:
        if detail["dtype"] == np.uint8 and images.dtype.kind == "f":
            raise ValueError("the file takes uint8 0-255 images; got floats")
        images = images.astype(detail["dtype"])
    batch_size = int(batch_size or len(images))
    output = runner.get_output_details()[0]["index"]
    logits, current = [], None
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if current != len(chunk):
            runner.resize_tensor_input(detail["index"], (len(chunk),) + detail["shape"][1:])
            runner.allocate_tensors()
            current = len(chunk)
        runner.set_tensor(detail["index"], chunk)
        runner.invoke()
        logits.append(np.array(runner.get_tensor(output)))
    return np.concatenate(logits) if logits else np.zeros((0,), np.float32)


def operators(runner) -> Dict[str, int]:
    """How many operators of each kind the model runs (delegated ones counted too)."""
    counts: Dict[str, int] = {}
    for op in runner._get_ops_details():  # pylint: disable=protected-access
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return counts


def raw_images(images, normalization) -> np.ndarray:
    """The uint8 0-255 images behind normalised ones (the inverse of the data pipeline)."""
    mean, std = (np.asarray(v, np.float64) for v in normalization)
    raw = (np.asarray(images, np.float64) * std + mean) * 255.0
    return np.clip(np.rint(raw), 0, 255).astype(np.uint8)
