"""A small writer of LiteRT (``.tflite``) flatbuffers.

:class:`Graph` collects tensors (with their quantization) and builtin
operators and serialises them with the schema bindings TensorFlow ships
(``tensorflow.lite.python.schema_py_generated``).  Writing the flatbuffer
directly, instead of converting a TensorFlow graph, fixes every integer the
file holds: weight codes, scales and zero points are the ones the caller
gives, so a lowering can reproduce a trained model's own quantization without
a calibration set.

Example::

    g = Graph()
    x = g.input("x", (1, 8), "int8", scale=0.1)
    y = g.tensor("y", (1, 8), "int8", scale=0.1)
    g.op("RELU", [x], [y])
    open("relu.tflite", "wb").write(g.finish([x], [y]))
"""

from typing import Dict, List, Optional, Sequence

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

_TYPES = {"float32": schema.TensorType.FLOAT32, "int32": schema.TensorType.INT32,
          "uint8": schema.TensorType.UINT8, "int64": schema.TensorType.INT64,
          "int16": schema.TensorType.INT16, "int8": schema.TensorType.INT8}
_FUSED = {None: schema.ActivationFunctionType.NONE, "relu": schema.ActivationFunctionType.RELU}
_PADDING = {"same": schema.Padding.SAME, "valid": schema.Padding.VALID}
# The builtin codes that fit the deprecated int8 field; larger ones are stored in builtin_code.
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127
# Operator versions as LiteRT's converter writes them for int8 operands (the runtime accepts
# any registered version; delegates read some of them).
_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2,
             "MEAN": 2, "QUANTIZE": 2, "DEQUANTIZE": 2, "TRANSPOSE": 2, "PAD": 2,
             "MAX_POOL_2D": 2, "AVERAGE_POOL_2D": 2, "DEPTH_TO_SPACE": 2, "BATCH_MATMUL": 2,
             "SLICE": 2, "CONCATENATION": 2, "RESHAPE": 1, "RELU": 2, "MUL": 2}


def options(kind: str, **fields):
    """A builtin options object, e.g. ``options('Conv2D', padding='same', stride=2)``.

    Args:
      kind: The options table without its suffix: 'Conv2D' for Conv2DOptions.
      **fields: Its fields, by schema name (``strideH``), or the shorthands
        ``stride`` (both strides), ``padding`` ('same' / 'valid') and
        ``activation`` (None / 'relu').
    """
    opts = getattr(schema, f"{kind}OptionsT")()
    for name, value in fields.items():
        if name == "stride":
            opts.strideH = opts.strideW = int(value)
        elif name == "padding":
            opts.padding = _PADDING[value]
        elif name == "activation":
            opts.fusedActivationFunction = _FUSED[value]
        else:
            if not hasattr(opts, name):
                raise ValueError(f"{kind}Options has no field {name!r}")
            setattr(opts, name, value)
    return kind, opts


class Graph:
    """One subgraph of a LiteRT model, built tensor by tensor."""

    def __init__(self):
        self._tensors: List[schema.TensorT] = []
        self._buffers: List[schema.BufferT] = [schema.BufferT()]  # buffer 0: empty
        self._operators: List[schema.OperatorT] = []
        self._opcodes: Dict[str, int] = {}
        self._codes: List[schema.OperatorCodeT] = []
        # Outputs of operators XNNPACK refuses (see _check_xnnpack); the interpreter's
        # builtin kernels run them.
        self.xnnpack_refused: List[str] = []

    def tensor(self, name: str, shape: Sequence[int], dtype: str, scale=None, zero_point=None,
               data: Optional[np.ndarray] = None, axis: int = 0) -> int:
        """Adds a tensor and returns its index.

        Args:
          name: Tensor name (made unique when taken).
          shape: Static shape.
          dtype: 'float32', 'int32', 'int8', 'uint8', 'int16' or 'int64'.
          scale, zero_point: Quantization: a scalar (per tensor) or one value
            per slice of ``axis`` (per channel); zero points default to 0.
          data: Constant contents (cast to ``dtype``).
          axis: The quantized dimension of per-channel parameters.
        """
        tensor = schema.TensorT()
        tensor.name = name
        tensor.shape = np.asarray(shape, np.int32)
        tensor.type = _TYPES[dtype]
        tensor.buffer = 0
        if data is not None:
            data = np.ascontiguousarray(np.asarray(data, dtype))
            if tuple(data.shape) != tuple(int(d) for d in shape):
                raise ValueError(f"tensor {name}: data of shape {data.shape}, expected "
                                 f"{tuple(shape)}")
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(data.tobytes(), np.uint8)
            self._buffers.append(buffer)
            tensor.buffer = len(self._buffers) - 1
        if scale is not None:
            scales = np.atleast_1d(np.asarray(scale, np.float32))
            zeros = (np.zeros(scales.shape, np.int64) if zero_point is None
                     else np.broadcast_to(np.asarray(zero_point, np.int64), scales.shape))
            quant = schema.QuantizationParametersT()
            quant.scale = scales.astype(np.float32)
            quant.zeroPoint = np.asarray(zeros, np.int64)
            quant.quantizedDimension = int(axis)
            tensor.quantization = quant
        self._tensors.append(tensor)
        return len(self._tensors) - 1

    def constant(self, name: str, data, dtype: str, scale=None, zero_point=None,
                 axis: int = 0) -> int:
        """A constant tensor holding ``data``."""
        data = np.asarray(data)
        return self.tensor(name, data.shape, dtype, scale, zero_point, data, axis)

    def shape_of(self, index: int) -> tuple:
        return tuple(int(d) for d in self._tensors[index].shape)

    def quantization_of(self, index: int):
        """(scale, zero point) arrays of a tensor, or None when it is float."""
        quant = self._tensors[index].quantization
        if quant is None:
            return None
        return np.asarray(quant.scale), np.asarray(quant.zeroPoint)

    def op(self, kind: str, inputs: Sequence[int], outputs: Sequence[int], opts=None) -> None:
        """Adds builtin operator ``kind`` ('CONV_2D', ...); -1 marks an omitted input."""
        if kind not in self._opcodes:
            code = getattr(schema.BuiltinOperator, kind)
            opcode = schema.OperatorCodeT()
            opcode.builtinCode = code
            opcode.deprecatedBuiltinCode = min(code, _PLACEHOLDER_FOR_GREATER_OP_CODES)
            opcode.version = _VERSIONS.get(kind, 1)
            self._opcodes[kind] = len(self._codes)
            self._codes.append(opcode)
        self._check_xnnpack(kind, inputs, outputs)
        operator = schema.OperatorT()
        operator.opcodeIndex = self._opcodes[kind]
        operator.inputs = np.asarray(inputs, np.int32)
        operator.outputs = np.asarray(outputs, np.int32)
        if opts is not None:
            name, table = opts
            operator.builtinOptionsType = getattr(schema.BuiltinOptions, f"{name}Options")
            operator.builtinOptions = table
        self._operators.append(operator)

    def custom_op(self, code: str, inputs: Sequence[int], outputs: Sequence[int],
                  custom_options: bytes) -> None:
        """Adds a CUSTOM operator ``code`` (version 1) whose options are ``custom_options``."""
        key = "CUSTOM:" + code
        if key not in self._opcodes:
            opcode = schema.OperatorCodeT()
            opcode.builtinCode = schema.BuiltinOperator.CUSTOM
            opcode.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
            opcode.customCode = code
            opcode.version = 1
            self._opcodes[key] = len(self._codes)
            self._codes.append(opcode)
        operator = schema.OperatorT()
        operator.opcodeIndex = self._opcodes[key]
        operator.inputs = np.asarray(inputs, np.int32)
        operator.outputs = np.asarray(outputs, np.int32)
        operator.customOptions = np.frombuffer(bytes(custom_options), np.uint8)
        self._operators.append(operator)

    def _check_xnnpack(self, kind, inputs, outputs) -> None:
        """Notes an int8 product whose requantisation ratio XNNPACK does not accept.

        XNNPACK takes ``input scale * weight scale / output scale`` in
        [2^-32, 256) only; a larger ratio (an output range far finer than one
        accumulator step, as an untrained low-bit layer can have) is left to
        LiteRT's builtin kernels, which accept any.
        """
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            return
        x, w, y = (self.quantization_of(i) for i in (inputs[0], inputs[1], outputs[0]))
        if x is None or w is None or y is None:
            return
        ratio = float(x[0][0]) * np.asarray(w[0], np.float64) / float(y[0][0])
        if ratio.max() >= 256 or ratio.min() < 2.0 ** -32:
            self.xnnpack_refused.append(self._tensors[outputs[0]].name)

    def operator_kinds(self) -> List[str]:
        """The operators used, in first-use order (a custom one by its code up to ':')."""
        kinds = [key[len("CUSTOM:"):].split(":")[0] if key.startswith("CUSTOM:") else key
                 for key in self._opcodes]
        return list(dict.fromkeys(kinds))

    def finish(self, inputs: Sequence[int], outputs: Sequence[int],
               description: str = "wa_tf") -> bytes:
        """The serialised model with ``inputs`` and ``outputs`` as its signature."""
        subgraph = schema.SubGraphT()
        subgraph.tensors = self._tensors
        subgraph.inputs = np.asarray(inputs, np.int32)
        subgraph.outputs = np.asarray(outputs, np.int32)
        subgraph.operators = self._operators
        subgraph.name = "main"
        model = schema.ModelT()
        model.version = 3
        model.operatorCodes = self._codes
        model.subgraphs = [subgraph]
        model.description = description
        model.buffers = self._buffers
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())
