"""Runs a LiteRT file whose Winograd layers are the native int8 kernel's custom operators.

``bin/export.py --litert=F --litert_transforms=native`` writes such a file: the
model's other operators are LiteRT builtins (XNNPACK runs them) and each
Winograd layer is a ``WA_WINOGRAD_INT8:<layer>`` custom operator carrying its
layer file.  LiteRT's Python interpreter cannot register custom kernels, so
:class:`NativeModel` drives the LiteRT 2.x CompiledModel C API of
ai-edge-litert's ``libLiteRt.so`` directly (ctypes) and registers
:mod:`wa_tf.kernels.winograd_int8` for every such layer.  It answers the
interpreter calls :func:`wa_tf.deploy.litert.predict` makes, so
:func:`wa_tf.deploy.litert.interpreter` returns one for these files.
"""

import ctypes as C
import io
import os
from typing import Dict, List

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from wa_tf.deploy import native
from wa_tf.deploy.litert_winograd import NATIVE_OP
from wa_tf.kernels import winograd_int8

_ALIGN = 64  # LiteRT wraps host memory aligned to 64 bytes without copying
_TYPES = {schema.TensorType.FLOAT32: (1, np.float32), schema.TensorType.UINT8: (3, np.uint8),
          schema.TensorType.INT8: (9, np.int8)}
_CPU = 1  # kLiteRtHwAcceleratorCpu
_lib = {}


class _Layout(C.Structure):
    _fields_ = [("rank", C.c_uint, 7), ("has_strides", C.c_uint, 1),
                ("dimensions", C.c_int32 * 8), ("strides", C.c_uint32 * 8)]


class _TensorType(C.Structure):
    _fields_ = [("element_type", C.c_int), ("layout", _Layout)]


def is_native(model) -> bool:
    """Whether a ``.tflite`` path or its bytes holds native Winograd operators."""
    if not isinstance(model, (bytes, bytearray)):
        with open(model, "rb") as f:
            model = f.read()
    return NATIVE_OP.encode() in model


def _litert():
    """ai-edge-litert's libLiteRt.so with the functions used here."""
    if "lrt" not in _lib:
        try:
            import ai_edge_litert  # pylint: disable=import-outside-toplevel  # optional extra
        except ImportError:
            raise ValueError("running native Winograd operators needs ai-edge-litert "
                             "(pip install 'wa_tf[deploy]')") from None
        path = os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so")
        if not os.path.exists(path):
            raise ValueError(f"ai-edge-litert has no {path}: the native runtime needs "
                             "LiteRT 2.x's CompiledModel library")
        lrt = C.CDLL(path, mode=C.RTLD_GLOBAL)
        vp, st, ptr = C.c_void_p, C.c_int, C.POINTER
        for name, args in (
                ("LiteRtCreateEnvironment", [C.c_int, vp, ptr(vp)]),
                ("LiteRtCreateModelFromBuffer", [vp, vp, C.c_size_t, ptr(vp)]),
                ("LiteRtCreateOptions", [ptr(vp)]),
                ("LiteRtSetOptionsHardwareAccelerators", [vp, C.c_int]),
                ("LiteRtCreateOpaqueOptions", [C.c_char_p, vp, vp, ptr(vp)]),
                ("LiteRtAddOpaqueOptions", [vp, vp]),
                ("LiteRtAddCustomOpKernelOption", [vp, C.c_char_p, C.c_int, vp, vp]),
                ("LiteRtCreateCompiledModel", [vp, vp, vp, ptr(vp)]),
                ("LiteRtRunCompiledModel", [vp, C.c_size_t, C.c_size_t, ptr(vp), C.c_size_t,
                                            ptr(vp)]),
                ("LiteRtCreateTensorBufferFromHostMemory", [ptr(_TensorType), vp, C.c_size_t,
                                                           vp, ptr(vp)])):
            getattr(lrt, name).restype, getattr(lrt, name).argtypes = st, args
        for name in ("LiteRtDestroyEnvironment", "LiteRtDestroyModel", "LiteRtDestroyOptions",
                     "LiteRtDestroyCompiledModel", "LiteRtDestroyTensorBuffer"):
            getattr(lrt, name).restype, getattr(lrt, name).argtypes = None, [vp]
        kernels = winograd_int8.load()
        kernels.wa_int8_litert_bind(*(C.cast(getattr(lrt, name), vp) for name in (
            "LiteRtGetTensorBufferTensorType", "LiteRtLockTensorBuffer",
            "LiteRtUnlockTensorBuffer")))
        libc = C.CDLL(None)
        libc.strdup.restype, libc.strdup.argtypes = vp, [C.c_char_p]
        _lib.update(lrt=lrt, kernels=kernels, strdup=libc.strdup, free=C.cast(libc.free, vp))
    return _lib


def _check(status, what):
    if status != 0:
        raise ValueError(f"the LiteRT runtime failed to {what} (status {status})")


def _aligned(shape, dtype):
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + size].view(dtype).reshape(shape)


class NativeModel:
    """A native-Winograd LiteRT file, ready to run (the interpreter calls of ``predict``).

    Args:
      model: The ``.tflite`` path or its bytes.
      threads: Threads of the Winograd kernels.
      isa: The native kernels' path: 'auto', 'avx2' or 'scalar'.
      cpu_threads: Threads of LiteRT's (XNNPACK's) operators.  One by default:
        in these models they are the small part, and two thread pools waiting
        for work on the same few cores slow each other (a 2-core EPYC ran the
        width-0.5 F4 model 15% slower with both at 2 than with XNNPACK at 1).

    Raises:
      ValueError: if the file or the runtime cannot be loaded.
    """

    def __init__(self, model, threads: int = 1, isa: str = "auto", cpu_threads: int = 1):
        if not isinstance(model, (bytes, bytearray)):
            if not os.path.isfile(model):
                raise ValueError(f"{model}: no such .tflite file")
            with open(model, "rb") as f:
                model = f.read()
        self._bytes = bytes(model)
        lib = _litert()
        lrt, kernels = lib["lrt"], lib["kernels"]
        flat = schema.ModelT.InitFromObj(schema.Model.GetRootAs(self._bytes, 0))
        graph = flat.subgraphs[0]
        self.layers: List = []
        self._states: List[int] = []
        codes = {i: code.customCode.decode() if isinstance(code.customCode, bytes)
                 else code.customCode for i, code in enumerate(flat.operatorCodes)}
        ops = [(codes[op.opcodeIndex], op) for op in graph.operators
               if (codes[op.opcodeIndex] or "").startswith(NATIVE_OP + ":")]
        self.env, self.model, self.options, self.compiled = (C.c_void_p() for _ in range(4))
        _check(lrt.LiteRtCreateEnvironment(0, None, C.byref(self.env)), "create an environment")
        self._buffer = C.create_string_buffer(self._bytes, len(self._bytes))
        _check(lrt.LiteRtCreateModelFromBuffer(self.env, self._buffer, len(self._bytes),
                                               C.byref(self.model)), "read the model")
        _check(lrt.LiteRtCreateOptions(C.byref(self.options)), "create options")
        _check(lrt.LiteRtSetOptionsHardwareAccelerators(self.options, _CPU), "select the CPU")
        opaque = C.c_void_p()
        _check(lrt.LiteRtCreateOpaqueOptions(b"xnnpack", lib["strdup"](
            f"num_threads = {int(cpu_threads)}\n".encode()), lib["free"], C.byref(opaque)),
            "set the CPU threads")
        _check(lrt.LiteRtAddOpaqueOptions(self.options, opaque), "set the CPU threads")
        for code, op in ops:
            with np.load(io.BytesIO(bytes(op.customOptions)), allow_pickle=False) as data:
                kernel = native.winograd_layer({key: data[key] for key in data.files}, isa=isa)
            state = kernels.wa_int8_litert_state(kernel.handle, int(threads))
            self.layers.append(kernel)
            self._states.append(state)
            _check(lrt.LiteRtAddCustomOpKernelOption(self.options, code.encode(), 1,
                                                     kernels.wa_int8_litert_kernel(), state),
                   f"register {code}")
        _check(lrt.LiteRtCreateCompiledModel(self.env, self.model, self.options,
                                             C.byref(self.compiled)), "compile the model")
        self._io = {}
        for role, index in (("input", graph.inputs[0]), ("output", graph.outputs[0])):
            tensor = graph.tensors[index]
            element, dtype = _TYPES[tensor.type]
            array = _aligned(tuple(tensor.shape), dtype)
            kind = _TensorType(element_type=element)
            kind.layout.rank = array.ndim
            for i, d in enumerate(array.shape):
                kind.layout.dimensions[i] = d
            handle = C.c_void_p()
            _check(lrt.LiteRtCreateTensorBufferFromHostMemory(
                C.byref(kind), array.ctypes.data, array.nbytes, None, C.byref(handle)),
                f"wrap the {role}")
            self._io[role] = (array, handle)
        self._state_array = (C.c_void_p * max(1, len(self._states)))(*self._states)
        self._ins = (C.c_void_p * 1)(self._io["input"][1])
        self._outs = (C.c_void_p * 1)(self._io["output"][1])
        self._batch = self._io["input"][0].shape[0]
        self._pending = None
        self._result = None

    # The interpreter calls of wa_tf.deploy.litert.predict: batches of any size run as
    # invocations of the file's static batch.
    def get_input_details(self) -> List[Dict]:
        array = self._io["input"][0]
        return [{"index": 0, "shape": np.array(array.shape), "dtype": array.dtype}]

    def get_output_details(self) -> List[Dict]:
        array = self._io["output"][0]
        return [{"index": 1, "shape": np.array(array.shape), "dtype": array.dtype}]

    def resize_tensor_input(self, index, shape):
        del index, shape  # any batch runs in chunks of the file's batch

    def allocate_tensors(self):
        pass

    def set_tensor(self, index, value):
        del index
        self._pending = np.asarray(value, self._io["input"][0].dtype)

    def run_once(self):
        """One invocation on the input array as it stands (for timing loops)."""
        status = _lib["lrt"].LiteRtRunCompiledModel(self.compiled, 0, 1, self._ins, 1,
                                                    self._outs)
        if status != 0:
            raise ValueError(f"the LiteRT runtime failed to run the model (status {status})")

    def invoke(self):
        x, y = self._io["input"][0], self._io["output"][0]
        if len(self._pending) == self._batch:  # one invocation, and no Python temporaries
            np.copyto(x, self._pending)
            self.run_once()
            self._check()
            self._result = y.copy()
            return
        outputs = []
        for start in range(0, len(self._pending), self._batch):
            chunk = self._pending[start:start + self._batch]
            x[:len(chunk)] = chunk
            x[len(chunk):] = 0
            self.run_once()
            outputs.append(y[:len(chunk)].copy())
        self._check()
        self._result = np.concatenate(outputs)

    def _check(self):
        if self._states and _lib["kernels"].wa_int8_litert_errors(self._state_array,
                                                                  len(self._states)):
            raise ValueError("a native Winograd operator failed (its input was not int8 NHWC)")

    def get_tensor(self, index):
        del index
        return self._result

    def __del__(self):
        lrt = _lib.get("lrt")
        if lrt is None:
            return
        for _, handle in getattr(self, "_io", {}).values():
            lrt.LiteRtDestroyTensorBuffer(handle)
        for name, attr in (("LiteRtDestroyCompiledModel", "compiled"),
                           ("LiteRtDestroyOptions", "options"), ("LiteRtDestroyModel", "model"),
                           ("LiteRtDestroyEnvironment", "env")):
            if getattr(self, attr, None):
                getattr(lrt, name)(getattr(self, attr))
        for state in getattr(self, "_states", []):
            _lib["kernels"].wa_int8_litert_free_state(state)
