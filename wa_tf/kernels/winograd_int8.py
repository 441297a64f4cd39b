"""The native INT8 Winograd inference kernel: build, load and call (C++ in ``int8/``).

The kernel runs a quantized Winograd layer from int8 input codes to int8
output codes: integer input transform with the quantized B_t, int8 V
(requantised per tap), int8 x int8 -> int32 GEMMs per tap against the
pre-transformed int8 U, integer output transform with A_t, bias and the output
requantisation.  Every requantisation is ``clip(round_half_even(acc * M))`` in
IEEE double, the arithmetic of :mod:`wa_tf.deploy.integer`, so the result is
bit-exact with that reference on every ISA path.

It is a plain shared library (no TensorFlow), compiled once into the cache
folder of :mod:`wa_tf.kernels.library` with the C++ compiler.  One file per
ISA: ``winograd_int8_scalar.cc`` (portable) and ``winograd_int8_avx2.cc``
(``-mavx2 -mfma``, x86-64 only); the choice is made when a kernel is created,
from what this CPU supports (``isa='auto'``), or named.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from wa_tf.kernels import library

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# (source, its ISA flags): the AVX2 file compiles to a stub that reports itself absent elsewhere.
SOURCES = (("winograd_int8.cc", ()), ("litert_op.cc", ()), ("winograd_int8_scalar.cc", ()),
           ("winograd_int8_avx2.cc", ("-mavx2", "-mfma") if _X86 else ()))
HEADERS = ("winograd_int8.h", "stages.h")
# -ffp-contract=off: no fused multiply-add may round differently from the reference.
_FLAGS = ("-std=c++17", "-fPIC", "-O3", "-fno-trapping-math", "-fno-math-errno",
          "-ffp-contract=off", "-w")
ISAS = ("auto", "avx2", "scalar")
_lib = {}


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path():
    """Where this source's library is (or will be) cached."""
    digest = hashlib.sha256()
    for name in [s for s, _ in SOURCES] + list(HEADERS):
        with open(os.path.join(_HERE, name), "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(_FLAGS + (platform.machine(), str(_compiler()))).encode())
    return os.path.join(library.cache_dir(), f"wa_tf_int8_{digest.hexdigest()[:16]}.so")


def build(verbose=False):
    """Compiles the library unless cached; returns its path.

    Raises:
      RuntimeError: no C++ compiler, or the compilation failed.
    """
    path = library_path()
    if os.path.exists(path):
        return path
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) found")
    os.makedirs(library.cache_dir(), exist_ok=True)
    deadline = time.monotonic() + library.build_timeout()
    with library.locked(path, deadline):
        if os.path.exists(path):
            return path
        with tempfile.TemporaryDirectory(dir=library.cache_dir()) as work:
            objects = [os.path.join(work, f"{i}.o") for i in range(len(SOURCES))]
            cmds = [[compiler, "-c", *_FLAGS, *isa, os.path.join(_HERE, source), "-o", obj]
                    for (source, isa), obj in zip(SOURCES, objects)]
            message = library.run_commands(cmds, deadline, verbose)
            tmp = os.path.join(work, "library.so")
            if message is None:
                message = library.run_commands(
                    [[compiler, "-shared", *objects, "-o", tmp, "-lpthread"]], deadline, verbose)
            if message is not None:
                raise RuntimeError(f"compiling wa_tf/kernels/int8 failed: {message}")
            os.replace(tmp, path)
    return path


def load():
    """The loaded library (built on first use)."""
    if "lib" not in _lib:
        lib = ctypes.CDLL(build())
        p = ctypes.c_void_p
        i8 = np.ctypeslib.ndpointer(np.int8, flags="C_CONTIGUOUS")
        f64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
        i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
        c_int = ctypes.c_int
        lib.wa_int8_create.restype = p
        lib.wa_int8_create.argtypes = [c_int, c_int, c_int, c_int, c_int, i8, i8, i8, f64, f64,
                                       f64, ctypes.c_void_p, ctypes.c_double, i32,
                                       ctypes.c_char_p]
        lib.wa_int8_set_epilogue.argtypes = [p, f64, f64, c_int, c_int]
        lib.wa_int8_destroy.argtypes = [p]
        lib.wa_int8_isa.restype = ctypes.c_char_p
        lib.wa_int8_isa.argtypes = [p]
        lib.wa_int8_output_size.argtypes = [p, c_int, c_int, i32]
        lib.wa_int8_run.argtypes = [p, i8, c_int, c_int, c_int, i8, c_int]
        # The same function without argument checks, for bound calls.
        lib.wa_int8_run_raw = ctypes.CFUNCTYPE(None, p, p, c_int, c_int, c_int, p, c_int)(
            ("wa_int8_run", lib))
        lib.wa_int8_filters.argtypes = [p]
        lib.wa_int8_madd_per_ns.restype = ctypes.c_double
        lib.wa_int8_litert_bind.argtypes = [p, p, p]
        lib.wa_int8_litert_kernel.restype = p
        lib.wa_int8_litert_state.restype = p
        lib.wa_int8_litert_state.argtypes = [p, c_int]
        lib.wa_int8_litert_errors.argtypes = [p, c_int]
        lib.wa_int8_litert_free_state.argtypes = [p]
        lib.wa_int8_stage_times.argtypes = [p, i8, c_int, c_int, c_int, i8, c_int, f64, f64]
        _lib["lib"] = lib
    return _lib["lib"]


def peak_gemm_macs_per_ns() -> float:
    """The element-wise stage's roofline: int8 MACs per ns of ``vpmaddwd`` alone, or 0.

    Measured (a few ms, the best of 5 runs) in a register-only loop of independent ``vpmaddwd``
    (16 MACs each); 0 where the AVX2 path is absent.
    """
    return 16.0 * load().wa_int8_madd_per_ns()


def _int8(name, value, shape):
    value = np.asarray(value)
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {value.shape}")
    if value.size and (value.min() < -128 or value.max() > 127):
        raise ValueError(f"{name} must hold int8 codes, got values in "
                         f"[{value.min()}, {value.max()}]")
    return np.ascontiguousarray(value, np.int8)


class WinogradInt8:
    """One quantized Winograd layer as a native int8 kernel.

    Args:
      tile_size, kernel_size: m and r of F(m x m, r x r); t = m + r - 1 <= 8.
      padding: 'same' or 'valid' (stride 1).
      b_t, a_t, u: int8 codes of B_t (t, t), A_t (m, t) and U (t, t, C, K).
      input_winograd, hadamard: float64 requantisation multipliers per tap (t, t).
      tap_weights: Integer weights of the taps in the output transform (t, t).
      output: The output requantisation multiplier.
      ranges: (min, max) codes of V, M and the output.
      bias: Optional (K,) bias in units of the output transform's scale.
      epilogue: Optional ``(scale, offset, (lo, hi))``: the output codes y become
        ``clip(rint(y * scale + offset), lo, hi)`` per filter (``scale`` and
        ``offset`` (K,) float64): a batch norm and ReLU fused into the layer
        (:func:`wa_tf.deploy.integer.affine_requantize`).
      isa: 'auto' (the best this CPU runs), 'avx2' or 'scalar'.

    Raises:
      ValueError: on malformed arguments or an ISA this CPU (or build) lacks.
    """

    def __init__(self, tile_size, kernel_size, padding, b_t, a_t, u, input_winograd, hadamard,
                 tap_weights, output, ranges, bias=None, epilogue=None, isa="auto"):
        m, r = int(tile_size), int(kernel_size)
        t = m + r - 1
        if m < 1 or r < 1 or t > 8:
            raise ValueError(f"F({m}, {r}): the kernel runs tiles of t = m + r - 1 <= 8 inputs")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if isa not in ISAS:
            raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
        u = np.asarray(u)
        if u.ndim != 4 or u.shape[:2] != (t, t):
            raise ValueError(f"u must have shape ({t}, {t}, C, K), got {u.shape}")
        self.in_channels, self.filters = int(u.shape[2]), int(u.shape[3])
        self._keep = {
            "b_t": _int8("b_t", b_t, (t, t)), "a_t": _int8("a_t", a_t, (m, t)),
            "u": _int8("u", u, u.shape),
            "mv": np.ascontiguousarray(np.broadcast_to(input_winograd, (t, t)), np.float64),
            "mm": np.ascontiguousarray(np.broadcast_to(hadamard, (t, t)), np.float64),
            "w": np.ascontiguousarray(np.broadcast_to(tap_weights, (t, t)), np.float64),
            "ranges": np.ascontiguousarray(np.asarray(ranges, np.int32).reshape(6)),
            "bias": None if bias is None else np.ascontiguousarray(bias, np.float64)}
        if self._keep["bias"] is not None and self._keep["bias"].shape != (self.filters,):
            raise ValueError(f"bias must have shape ({self.filters},)")
        if epilogue is not None:  # checked before the kernel exists
            scale, offset, (lo, hi) = epilogue
            epi = [np.asarray(v, np.float64) for v in (scale, offset)]
            if any(v.shape not in ((), (self.filters,)) for v in epi):
                raise ValueError(f"epilogue scale and offset must have shape ({self.filters},)")
            if not -128 <= int(lo) <= int(hi) <= 127:
                raise ValueError(f"epilogue range must lie in [-128, 127], got ({lo}, {hi})")
            self._keep["epi"] = [np.ascontiguousarray(np.broadcast_to(v, (self.filters,)))
                                 for v in epi]
            self._keep["epi_range"] = (int(lo), int(hi))
        lib = load()
        k = self._keep
        self._handle = lib.wa_int8_create(
            m, r, self.in_channels, self.filters, int(padding == "same"), k["b_t"], k["a_t"],
            k["u"], k["mv"], k["mm"], k["w"],
            None if k["bias"] is None else k["bias"].ctypes.data, float(output), k["ranges"],
            isa.encode())
        if not self._handle:
            raise ValueError(f"isa={isa!r} is not available on this CPU")
        self._lib = lib
        if epilogue is not None:
            lib.wa_int8_set_epilogue(self._handle, *k["epi"], *k["epi_range"])

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.wa_int8_destroy(self._handle)
            self._handle = None

    @property
    def handle(self):
        """The kernel's address in the library (for the LiteRT custom operator)."""
        return self._handle

    @property
    def isa(self) -> str:
        """The ISA path this kernel runs."""
        return self._lib.wa_int8_isa(self._handle).decode()

    def output_shape(self, shape):
        """(N, H', W', K) of an NHWC input shape."""
        n, h, w, _ = shape
        out = np.zeros(2, np.int32)
        self._lib.wa_int8_output_size(self._handle, h, w, out)
        return int(n), int(out[0]), int(out[1]), self.filters

    def _checked(self, x):
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be NHWC codes with {self.in_channels} channels, got shape "
                             f"{x.shape}")
        if x.dtype != np.int8:
            raise ValueError(f"x must hold int8 codes, got {x.dtype}")
        shape = self.output_shape(x.shape)
        if shape[1] < 1 or shape[2] < 1:
            raise ValueError(f"x: spatial size {x.shape[1]}x{x.shape[2]} is smaller than the "
                             "kernel")
        return np.ascontiguousarray(x), np.empty(shape, np.int8)

    def __call__(self, x, threads: int = 1) -> np.ndarray:
        """Output codes (N, H', W', K) int8 of input codes ``x`` (N, H, W, C) int8."""
        x, y = self._checked(x)
        self._lib.wa_int8_run(self._handle, x, *x.shape[:3], y, max(1, int(threads)))
        return y

    def bind(self, x, threads: int = 1):
        """A call without arguments that runs ``x`` into one output array and returns it.

        For timing and serving loops: the checks and allocation happen here, once.
        """
        x, y = self._checked(x)
        run, handle, shape, n = self._lib.wa_int8_run_raw, self._handle, x.shape[:3], int(threads)
        x_ptr, y_ptr = x.ctypes.data, y.ctypes.data

        def call():
            run(handle, x_ptr, *shape, y_ptr, n)
            return y
        call.keep = (self, x, y)  # the kernel and buffers live as long as the call
        return call

    def stage_times(self, x, reps: int = 50):
        """One thread's seconds per stage and their multiply counts (minimum over ``reps``).

        Returns:
          ``{stage: (seconds, macs)}`` for 'input_transform', 'hadamard' (the
          int8 x int8 -> int32 GEMMs) and 'output_transform'.
        """
        x, y = self._checked(x)
        seconds, ops = np.zeros(3), np.zeros(3)
        self._lib.wa_int8_stage_times(self._handle, x, *x.shape[:3], y, int(reps), seconds, ops)
        return {name: (float(s), float(o)) for name, s, o in
                zip(("input_transform", "hadamard", "output_transform"), seconds, ops)}
