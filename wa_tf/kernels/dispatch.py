"""Whether the fused kernels run: loading their library, and the switches that turn them off.

The library is loaded (built first where needed, :mod:`wa_tf.kernels.library`)
on first use.  A cached library that cannot be loaded (a truncated file, a
TensorFlow built differently) is rebuilt once.  Without a compiler, or where
the build fails, :func:`available` is False (with one warning) and the layers
run their pure-TF pipeline, which computes the same values.

The kernels are not used:

- where ``WA_TF_KERNELS=0``;
- within :func:`disabled` (in every thread of the process, so that the replicas
  of a ``tf.distribute`` strategy, each traced in a thread of its own, agree);
- where TensorFlow sees a GPU (they run on CPUs only);
- inside an XLA-compiled function (``jit_compile=True``), which cannot run custom ops;
- while a SavedModel is being written (``model.save()``, ``tf.saved_model.save``):
  the saved graphs then hold TensorFlow's own ops only and load where this
  library is absent (unless within :func:`saved_with_kernels`).
"""

import contextlib
import logging
import os
import threading

import tensorflow as tf

from wa_tf.kernels import library

try:  # TensorFlow's own tests for "inside XLA" and "saving"; no public API has them
    from tensorflow.python.ops import control_flow_util as _control_flow_util
    from tensorflow.python.saved_model import save_context as _save_context
except ImportError:  # pragma: no cover
    _control_flow_util = _save_context = None

_DTYPES = (tf.float32, tf.float64)

# Called from code that AutoGraph converts (TF-MOT's quantize wrappers): these are plain
# Python around ops, which AutoGraph must leave as they are.
plain = tf.autograph.experimental.do_not_convert

_lock = threading.Lock()  # the library's loading
_switch_lock = threading.Lock()  # the counts of disabled() and saved_with_kernels()
_state = {"library": None, "tried": False, "error": None, "disabled": 0, "saved_with": 0}


def _load():
    """Loads the library, rebuilding once a cached one that does not load."""
    path = library.build()
    try:
        return tf.load_op_library(path)
    except (OSError, tf.errors.OpError) as e:
        logging.getLogger("wa_tf").warning(
            "wa_tf: the cached kernel library %s does not load (%s); building it again",
            path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        library.discard(path)
        return tf.load_op_library(library.build())


def _loaded():
    """The loaded op library, building it on first use; None where that fails."""
    if _state["tried"]:
        return _state["library"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["library"] = _load()
            except (RuntimeError, ValueError, OSError, tf.errors.OpError) as e:
                _state["error"] = str(e) or type(e).__name__
                logging.getLogger("wa_tf").warning(
                    "wa_tf: fused Winograd kernels unavailable, using the pure-TF pipeline (%s)",
                    _state["error"].splitlines()[0])
            _state["tried"] = True
    return _state["library"]


def turned_off():
    """Whether ``WA_TF_KERNELS=0`` turns the kernels off in this process."""
    return os.environ.get("WA_TF_KERNELS", "1") == "0"


def ops():
    """The op library for a direct call; RuntimeError (saying why) where it is unavailable."""
    loaded = _loaded()
    if loaded is None:
        raise RuntimeError(f"wa_tf.kernels are unavailable here: {_state['error']}")
    return loaded


def load_if_built():
    """Loads the library when it is already built for this machine (no compiling).

    A SavedModel whose graphs use the kernels loads only once they are
    registered; :mod:`wa_tf.layers` calls this on import.
    """
    if not _state["tried"] and not turned_off():
        try:
            if os.path.exists(library.library_path()):
                _loaded()
        except (OSError, ValueError):  # a malformed target: the first use warns
            pass


@plain
def unavailable_reason():
    """Why the fused kernels cannot run here (one line), or None where they can."""
    if turned_off():
        return "turned off (WA_TF_KERNELS=0)"
    if _state["disabled"]:
        return "turned off (within wa_tf.kernels.disabled())"
    if tf.config.list_physical_devices("GPU"):
        return "a GPU is visible (they run on CPUs only)"
    if _loaded() is None:
        return _state["error"].splitlines()[0]
    return None


@plain
def available():
    """Whether the fused kernels can run here (built, CPU-only, not turned off)."""
    return unavailable_reason() is None


@plain
def _in_xla_context():
    """Whether the graph being built is compiled by XLA (which cannot run custom ops)."""
    if _control_flow_util is None:
        return False
    return bool(_control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


@plain
def _saving():
    """Whether a SavedModel is being written that must load without this library."""
    return (_save_context is not None and _save_context.in_save_context()
            and not _state["saved_with"])


@plain
def usable(dtype):
    """Whether the pipeline should use the fused kernels for tensors of `dtype` here.

    Not inside an XLA-compiled function (``jit_compile=True``), nor while a SavedModel
    is written: those graphs run the pure-TF pipeline.
    """
    return (tf.as_dtype(dtype) in _DTYPES and not _in_xla_context() and not _saving()
            and available())


@contextlib.contextmanager
def _counted(key):
    """Raises ``_state[key]`` for the context (nesting and threads add up)."""
    with _switch_lock:
        _state[key] += 1
    try:
        yield
    finally:
        with _switch_lock:
            _state[key] -= 1


def disabled():
    """Within the context :func:`available` is False: graphs traced meanwhile use pure TF.

    It holds for every thread of the process (the replicas of a ``tf.distribute``
    strategy trace their steps in threads of their own), until the outermost
    context exits.  A graph traced within it keeps its pure-TF ops afterwards.
    """
    return _counted("disabled")


def saved_with_kernels():
    """Within the context, SavedModels written keep the kernels' ops (:func:`usable` holds).

    Such a SavedModel loads only where this library is loaded first
    (``tf.load_op_library``, or ``import wa_tf``): ``wa_tf.deploy.export``'s
    ``fused_kernels=True``.
    """
    return _counted("saved_with")


def build_error():
    """Why the library could not be built or loaded (None if it was, or was not tried)."""
    return _state["error"]
