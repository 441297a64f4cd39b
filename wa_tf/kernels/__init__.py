"""Fused CPU kernels for the Winograd pipeline's memory-bound stages, with a pure-TF fallback.

TensorFlow runs the input transform (gather the overlapping tiles, then
``B_t d B_t^T``) and the output transform (``A_t M A_t^T``, then untile) as
several memory-bound passes.  ``tile_transform.cc`` does each in one pass over
the tiles, vectorized over channels: :func:`tile_transform` and its adjoint
:func:`tile_transform_adjoint`, each the other's gradient, plus the gradient
with respect to the transform (docs/kernels.md).  ``fake_quant.cc`` is
:func:`wa_tf.quantizers.fake_quant` in one pass instead of five
(:func:`fake_quant`), with the same results bit for bit.

The library is compiled on first use with the C++ compiler and TensorFlow's
headers (``tf.sysconfig``) into a cache folder (``$WA_TF_CACHE``, else
``~/.cache/wa_tf``), one build per source, TensorFlow version and CPU
instruction set, since it is compiled for the CPU at hand (``-march=native``;
``WA_TF_KERNELS_MARCH`` names another target, e.g. ``x86-64-v3`` for AVX2 and
FMA only: a library a cluster's older CPUs can run too).  Without a
compiler, or where the build fails, :func:`available` is False (with one
warning) and :mod:`wa_tf.layers` runs its pure-TF pipeline, which computes the
same values.  The kernels run on CPUs only: where TensorFlow sees a GPU they
are not used.  ``WA_TF_KERNELS=0`` turns them off; :func:`disabled` does so
within a context (an exported SavedModel must not need this library).
"""

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import tensorflow as tf

from wa_tf.machine import cpu_flags

try:  # TensorFlow's own test for "inside XLA" (tf.image uses it); no public API has it
    from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError:  # pragma: no cover
    _control_flow_util = None

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = tuple(os.path.join(_HERE, name) for name in ("tile_transform.cc", "fake_quant.cc"))
_HEADERS = (os.path.join(_HERE, "common.h"),)
_DTYPES = (tf.float32, tf.float64)
MAX_TRANSFORM_SIZE = 16  # the kernels' largest transform (p, q): F(m, r) with m + r - 1 <= 16

# -fno-trapping-math / -fno-math-errno let rounding vectorize; they change no value.
_EXTRA_FLAGS = ("-shared", "-fPIC", "-O3", "-fno-trapping-math", "-fno-math-errno", "-w")
_MARCH_ENV = "WA_TF_KERNELS_MARCH"

# Called from code that AutoGraph converts (TF-MOT's quantize wrappers): these are plain
# Python around ops, which AutoGraph must leave as they are.
_plain = tf.autograph.experimental.do_not_convert

_lock = threading.Lock()
_state = {"library": None, "tried": False, "error": None}
_disabled = threading.local()


def cache_dir():
    """Where built libraries are kept: ``$WA_TF_CACHE`` or ``~/.cache/wa_tf``."""
    return os.environ.get("WA_TF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "wa_tf")


def target():
    """The CPU the library is compiled for: ``$WA_TF_KERNELS_MARCH``, else ``native``.

    Raises:
      ValueError: if the variable is set to something that cannot be a ``-march`` value.
    """
    march = os.environ.get(_MARCH_ENV, "").strip() or "native"
    if not all(ch.isalnum() or ch in "-_.+" for ch in march):
        raise ValueError(f"{_MARCH_ENV}={march!r} is not a compiler target: give a -march "
                         "value such as native, x86-64-v3 or skylake-avx512")
    return march


def _build_key(compile_flags, link_flags):
    digest = hashlib.sha256()
    for source in _SOURCES + _HEADERS:
        with open(source, "rb") as f:
            digest.update(f.read())
    # -march=native: a library built on another CPU may use instructions this one lacks.
    for part in (tf.__version__, sys.version, " ".join(compile_flags), " ".join(link_flags),
                 " ".join(cpu_flags()), " ".join(_EXTRA_FLAGS), target()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def library_path():
    """The path of the built library for this machine (it may not exist yet)."""
    compile_flags, link_flags = tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()
    return os.path.join(cache_dir(), f"wa_tf_kernels_{_build_key(compile_flags, link_flags)}.so")


def build(verbose=False):
    """Compiles the kernels for this machine unless already built; returns the library's path.

    Raises:
      RuntimeError: no C++ compiler, or the compilation failed (with its output).
      ValueError: ``$WA_TF_KERNELS_MARCH`` is malformed (:func:`target`).
    """
    path = library_path()
    if os.path.exists(path):
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) found")
    os.makedirs(cache_dir(), exist_ok=True)
    # Build under a temporary name, then rename: concurrent builds never read half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    cmd = [compiler, *_EXTRA_FLAGS, f"-march={target()}",
           *tf.sysconfig.get_compile_flags(), *_SOURCES, "-o", tmp,
           *tf.sysconfig.get_link_flags()]
    if verbose:
        print(" ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.unlink(tmp)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        first = errors[0] if errors else f"{compiler} exited with {result.returncode}"
        raise RuntimeError(f"compiling wa_tf/kernels failed: {first}\n"
                           f"{result.stderr[-4000:]}")
    os.replace(tmp, path)
    return path


def _library():
    """The loaded op library, building it on first use; None where that fails."""
    if _state["tried"]:
        return _state["library"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["library"] = tf.load_op_library(build())
            except (RuntimeError, ValueError, OSError, tf.errors.OpError) as e:
                _state["error"] = str(e)
                logging.getLogger("wa_tf").warning(
                    "wa_tf: fused Winograd kernels unavailable, using the pure-TF pipeline (%s)",
                    str(e).splitlines()[0])
            _state["tried"] = True
    return _state["library"]


def _turned_off():
    return os.environ.get("WA_TF_KERNELS", "1") == "0"


def _ops():
    """The op library for a direct call; RuntimeError (saying why) where it is unavailable."""
    library = _library()
    if library is None:
        raise RuntimeError(f"wa_tf.kernels are unavailable here: {_state['error']}")
    return library


def load_if_built():
    """Loads the library when it is already built for this machine (no compiling).

    A SavedModel whose graphs use the kernels loads only once they are
    registered; :mod:`wa_tf.layers` calls this on import.
    """
    if not _state["tried"] and not _turned_off():
        try:
            if os.path.exists(library_path()):
                _library()
        except (OSError, ValueError):  # a malformed target: the first use warns
            pass


@_plain
def unavailable_reason():
    """Why the fused kernels cannot run here (one line), or None where they can."""
    if _turned_off():
        return "turned off (WA_TF_KERNELS=0)"
    if getattr(_disabled, "on", False):
        return "turned off (within wa_tf.kernels.disabled())"
    if tf.config.list_physical_devices("GPU"):
        return "a GPU is visible (they run on CPUs only)"
    if _library() is None:
        return _state["error"].splitlines()[0]
    return None


@_plain
def available():
    """Whether the fused kernels can run here (built, CPU-only, not turned off)."""
    return unavailable_reason() is None


@_plain
def _in_xla_context():
    """Whether the graph being built is compiled by XLA (which cannot run custom ops)."""
    if _control_flow_util is None:
        return False
    return bool(_control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


@_plain
def usable(dtype):
    """Whether the pipeline should use the fused kernels for tensors of `dtype` here.

    Not inside an XLA-compiled function (``jit_compile=True``), which runs the pure-TF pipeline.
    """
    return tf.as_dtype(dtype) in _DTYPES and not _in_xla_context() and available()


@contextlib.contextmanager
def disabled():
    """Within the context (this thread), :func:`available` is False: graphs traced use pure TF."""
    previous = getattr(_disabled, "on", False)
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = previous


def build_error():
    """Why the library could not be built or loaded (None if it was, or was not tried)."""
    return _state["error"]


@_plain
def fake_quant(x, scale, qmin, qmax, codes_dtype=None):
    """``clip(round(x / scale), qmin, qmax) * scale`` in one pass, as TensorFlow computes it.

    Args:
      x: Float tensor.
      scale: Its step: one value, or one per index of `x`'s first axis (any
        shape with that many elements).
      qmin, qmax: The code limits.
      codes_dtype: None, or tf.int8 / tf.int16 to also return the codes.

    Returns:
      The fake-quantized tensor, or (it, codes) with `codes_dtype`.  No gradient
      is defined: :mod:`wa_tf.quantizers` gives it its straight-through one.
    """
    scale = tf.reshape(scale, [-1])
    if codes_dtype is None:
        return _ops().wa_fake_quant(x, scale, qmin=float(qmin), qmax=float(qmax))
    return _ops().wa_fake_quant_codes(x, scale, qmin=float(qmin), qmax=float(qmax),
                                          Tcodes=codes_dtype)


@_plain
def quantize(x, scale, qmin, qmax, codes_dtype):
    """The codes of :func:`fake_quant` (``clip(round(x / scale), qmin, qmax)``) alone.

    Args:
      x: Float tensor.
      scale: Its step: one value, or one per index of `x`'s first axis.
      qmin, qmax: The code limits.
      codes_dtype: tf.int8 or tf.int16.

    Returns:
      The codes, of `x`'s shape (NaN codes as 0).  No gradient.
    """
    return _ops().wa_quantize(x, tf.reshape(scale, [-1]), qmin=float(qmin), qmax=float(qmax),
                              Tcodes=codes_dtype)


@_plain
def from_codes(codes, scale):
    """``cast(codes) * scale`` in one pass (the values :func:`fake_quant` coded).

    Args:
      codes: int8 or int16 tensor.
      scale: float32/float64 step: one value, or one per index of the codes' first
        axis (any shape with that many elements).

    Returns:
      A tensor of the codes' shape and the scale's dtype.  No gradient.
    """
    return _ops().wa_from_codes(codes, tf.reshape(scale, [-1]))


@_plain
def min_max(x, per_axis=False):
    """``(reduce_min(x), reduce_max(x))`` in one pass, as TensorFlow computes them.

    Args:
      x: Float tensor.
      per_axis: One (min, max) per index of `x`'s first axis rather than one in all.

    Returns:
      (min, max), scalars or vectors of `x`'s first dimension; NaN both where
      a NaN was reduced, (+inf, -inf) for an empty reduction.  No gradient.
    """
    return _ops().wa_min_max(x, per_axis=bool(per_axis))


def _geometry(stride, pad_top, pad_left, n_h, n_w):
    return {"stride": int(stride), "pad_top": int(pad_top), "pad_left": int(pad_left),
            "n_h": int(n_h), "n_w": int(n_w)}


@_plain
def tile_transform(x, mat, stride, pad_top, pad_left, n_h, n_w):
    """``P X P^T`` for every q x q tile ``X`` of `x` at `stride`, in the Winograd layout.

    Args:
      x: (N, H, W, C) tensor.
      mat: (p, q) transform P.
      stride: Distance between tile origins.
      pad_top, pad_left: Tile (th, tw) starts at row ``th*stride - pad_top``,
        column ``tw*stride - pad_left``; pixels outside `x` read 0.
      n_h, n_w: Tiles per column and per row.

    Returns:
      (p*p, N*n_h*n_w, C) tensor, ``z[a*p + b, (n*n_h + th)*n_w + tw, c] = (P X P^T)[a, b]``.
    """
    return _ops().wa_tile_transform(x, mat, **_geometry(stride, pad_top, pad_left, n_h, n_w))


@_plain
def tile_transform_adjoint(z, mat, stride, pad_top, pad_left, n_h, n_w, height, width):
    """The adjoint of :func:`tile_transform`: ``P^T Z P`` per tile, added into an image.

    Args:
      z: (p*p, N*n_h*n_w, C) tensor in the layout :func:`tile_transform` returns.
      mat: (p, q) transform P.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.
      height, width: Size of the result; tile pixels outside it are dropped.

    Returns:
      (N, height, width, C) tensor.
    """
    return _ops().wa_tile_transform_adjoint(
        z, mat, height=int(height), width=int(width),
        **_geometry(stride, pad_top, pad_left, n_h, n_w))


@_plain
def tile_transform_adjoint_codes(codes, scale, mat, stride, pad_top, pad_left, n_h, n_w,
                                 height, width):
    """:func:`tile_transform_adjoint` of ``z = from_codes(codes, scale)``, decoded tile by tile.

    The same values as decoding first (:func:`from_codes`), without the decoded
    z in memory.

    Args:
      codes: int8 or int16 (p*p, N*n_h*n_w, C) codes of z.
      scale: Their step: one value, or one per position (p*p).
      mat: (p, q) transform P.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.
      height, width: Size of the result, as :func:`tile_transform_adjoint`.

    Returns:
      (N, height, width, C) tensor.  No gradient.
    """
    return _ops().wa_tile_transform_adjoint_codes(
        codes, tf.reshape(scale, [-1]), mat, height=int(height), width=int(width),
        **_geometry(stride, pad_top, pad_left, n_h, n_w))


@_plain
def tile_transform_weight_grad(x, mat, dm, stride, pad_top, pad_left, n_h, n_w, scale=None,
                               qmin=0.0, qmax=0.0):
    """``sum over tiles of V^T dM`` per position, V = :func:`tile_transform` of `x`, not kept.

    The gradient of ``V @ U`` (per position, ``tf.matmul``) with respect to U:
    ``tf.matmul(V, dm, transpose_a=True)``, without V in memory.  With `scale`,
    V is first fake-quantized as :func:`wa_tf.quantizers.fake_quant` does it
    (one value or one per position; `qmin`, `qmax` the code limits).

    Args:
      x: (N, H, W, C) tensor.
      mat: (p, q) transform P.
      dm: (p*p, N*n_h*n_w, K) gradient of ``V @ U``.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.
      scale: None, or the quantization step (1 or p*p values).
      qmin, qmax: The code limits (with `scale`).

    Returns:
      (p*p, C, K) tensor.
    """
    scale = tf.zeros([0], x.dtype) if scale is None else tf.reshape(scale, [-1])
    return _ops().wa_tile_transform_weight_grad(
        x, mat, dm, scale, qmin=float(qmin), qmax=float(qmax),
        **_geometry(stride, pad_top, pad_left, n_h, n_w))


@_plain
def tile_transform_backprop(dz, x, mat, stride, pad_top, pad_left, n_h, n_w, mat_grad=True):
    """The gradients of :func:`tile_transform` (x, mat) for the incoming gradient `dz`.

    Returns:
      (dx, dmat), dmat None unless `mat_grad`.
    """
    geo = dict(_geometry(stride, pad_top, pad_left, n_h, n_w), height=int(x.shape[1]),
               width=int(x.shape[2]))
    if mat_grad:
        return tuple(_ops().wa_tile_transform_grad(dz, x, mat, **geo))
    return _ops().wa_tile_transform_adjoint(dz, mat, **geo), None


@_plain
def tile_transform_adjoint_backprop(dx, codes, scale, mat, stride, pad_top, pad_left, n_h,
                                    n_w):
    """The gradients of :func:`tile_transform_adjoint` (z, mat) with z kept as integer codes.

    Equals the registered gradient of :func:`tile_transform_adjoint` at
    ``z = from_codes(codes, scale)`` (:func:`from_codes`), but decodes z tile
    by tile inside the kernel: the decoded z is never in memory.

    Args:
      dx: (N, height, width, C) incoming gradient.
      codes: int8 or int16 (p*p, N*n_h*n_w, C) codes of z.
      scale: Their step: one value, or one per position (p*p).
      mat: (p, q) transform P.
      stride, pad_top, pad_left, n_h, n_w: Tile geometry as :func:`tile_transform`.

    Returns:
      (dz, dmat): dz in z's layout, dmat of `mat`'s shape.
    """
    return tuple(_ops().wa_tile_transform_adjoint_grad_codes(
        dx, codes, tf.reshape(scale, [-1]), mat, **_geometry(stride, pad_top, pad_left, n_h,
                                                              n_w)))


def _geometry_of(op):
    return {name: op.get_attr(name) for name in ("stride", "pad_top", "pad_left", "n_h", "n_w")}


def _wants_mat_grad(op):
    # Tapes say which inputs need no gradient (a static transform's): the
    # plain kernel then does, without the transform's gradient.
    return 1 not in (getattr(op, "skip_input_indices", None) or ())


@tf.RegisterGradient("WaTileTransform")
def _tile_transform_grad(op, dz):
    x, mat = op.inputs
    return tile_transform_backprop(dz, x, mat, **_geometry_of(op),
                                   mat_grad=_wants_mat_grad(op))


@tf.RegisterGradient("WaTileTransformAdjoint")
def _tile_transform_adjoint_grad(op, dx):
    z, mat = op.inputs
    geo = _geometry_of(op)
    if _wants_mat_grad(op):
        return _ops().wa_tile_transform_adjoint_grad(dx, z, mat, **geo)
    return _ops().wa_tile_transform(dx, mat, **geo), None


tf.no_gradient("WaTileTransformGrad")
tf.no_gradient("WaTileTransformWeightGrad")
tf.no_gradient("WaFakeQuant")
tf.no_gradient("WaFakeQuantCodes")
tf.no_gradient("WaMinMax")
tf.no_gradient("WaFromCodes")
tf.no_gradient("WaTileTransformAdjointGrad")
tf.no_gradient("WaTileTransformAdjointGradCodes")
tf.no_gradient("WaTileTransformAdjointCodes")
tf.no_gradient("WaQuantize")
