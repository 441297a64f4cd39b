// The kernel as a LiteRT custom operator (the CompiledModel C API of libLiteRt.so).
//
// LiteRT passes each registration's user_data back to its callbacks and nothing that tells the
// nodes apart, so every Winograd layer of a model is its own registration: user_data is an
// OpState holding that layer's kernel (created from the layer file the node carries in its
// custom options, by wa_tf.deploy.litert_native).  The LiteRT types below are the ABI of
// litert/c/litert_layout.h, litert_model_types.h and litert_custom_op_kernel.h (LiteRT 2.x);
// the three runtime functions used are handed over at load time, so that this library does
// not link against LiteRT.
#include <cstddef>
#include <cstdint>

extern "C" {
int wa_int8_filters(void* kernel);
void wa_int8_output_size(void* kernel, int h, int w, int* out);
void wa_int8_run(void* kernel, const int8_t* x, int n, int h, int w, int8_t* y, int threads);
}

namespace {

typedef int LiteRtStatus;  // kLiteRtStatusOk = 0
constexpr LiteRtStatus kOk = 0, kInvalidArgument = 1;
constexpr int kElementTypeInt8 = 9;
constexpr int kLockRead = 0, kLockWrite = 1;

struct LiteRtLayout {
  unsigned rank : 7;
  unsigned has_strides : 1;
  int32_t dimensions[8];
  uint32_t strides[8];
};
static_assert(sizeof(LiteRtLayout) == 68, "LiteRtLayout ABI");

struct LiteRtRankedTensorType {
  int element_type;
  LiteRtLayout layout;
};
static_assert(sizeof(LiteRtRankedTensorType) == 72, "LiteRtRankedTensorType ABI");

typedef void* LiteRtTensorBuffer;
typedef LiteRtStatus (*TypeFn)(LiteRtTensorBuffer, LiteRtRankedTensorType*);
typedef LiteRtStatus (*LockFn)(LiteRtTensorBuffer, void**, int);
typedef LiteRtStatus (*UnlockFn)(LiteRtTensorBuffer);

struct LiteRtCustomOpKernel {
  LiteRtStatus (*Init)(void* user_data, const void* init_data, size_t init_data_size);
  LiteRtStatus (*GetOutputLayouts)(void* user_data, size_t num_inputs,
                                   const LiteRtLayout* input_layouts, size_t num_outputs,
                                   LiteRtLayout* output_layouts);
  LiteRtStatus (*Run)(void* user_data, size_t num_inputs, const LiteRtTensorBuffer* inputs,
                      size_t num_outputs, LiteRtTensorBuffer* outputs);
  LiteRtStatus (*Destroy)(void* user_data);
};

TypeFn g_type = nullptr;
LockFn g_lock = nullptr;
UnlockFn g_unlock = nullptr;

struct OpState {
  void* kernel;
  int threads;
  int error;  // LiteRT ignores Run's status: the loader reads this after each run
};

LiteRtStatus Init(void*, const void*, size_t) { return kOk; }

LiteRtStatus OutputLayouts(void* user_data, size_t num_inputs, const LiteRtLayout* in,
                           size_t num_outputs, LiteRtLayout* out) {
  auto* state = static_cast<OpState*>(user_data);
  if (num_inputs != 1 || num_outputs != 1 || in[0].rank != 4) return kInvalidArgument;
  int size[2];
  wa_int8_output_size(state->kernel, in[0].dimensions[1], in[0].dimensions[2], size);
  out[0] = in[0];
  out[0].has_strides = 0;
  out[0].dimensions[1] = size[0];
  out[0].dimensions[2] = size[1];
  out[0].dimensions[3] = wa_int8_filters(state->kernel);
  return kOk;
}

LiteRtStatus RunOp(OpState* state, const LiteRtTensorBuffer* inputs, LiteRtTensorBuffer* outputs) {
  LiteRtRankedTensorType type;
  if (g_type(inputs[0], &type) != kOk || type.element_type != kElementTypeInt8 ||
      type.layout.rank != 4) {
    return kInvalidArgument;
  }
  void* x = nullptr;
  void* y = nullptr;
  if (g_lock(inputs[0], &x, kLockRead) != kOk) return kInvalidArgument;
  if (g_lock(outputs[0], &y, kLockWrite) != kOk) {
    g_unlock(inputs[0]);
    return kInvalidArgument;
  }
  wa_int8_run(state->kernel, static_cast<const int8_t*>(x), type.layout.dimensions[0],
              type.layout.dimensions[1], type.layout.dimensions[2], static_cast<int8_t*>(y),
              state->threads);
  g_unlock(outputs[0]);
  g_unlock(inputs[0]);
  return kOk;
}

LiteRtStatus Run(void* user_data, size_t num_inputs, const LiteRtTensorBuffer* inputs,
                 size_t num_outputs, LiteRtTensorBuffer* outputs) {
  auto* state = static_cast<OpState*>(user_data);
  const LiteRtStatus status = (num_inputs == 1 && num_outputs == 1 && g_type && g_lock && g_unlock)
                                  ? RunOp(state, inputs, outputs)
                                  : kInvalidArgument;
  if (status != kOk) state->error = status;
  return status;
}

LiteRtStatus Destroy(void*) { return kOk; }

const LiteRtCustomOpKernel kKernel = {Init, OutputLayouts, Run, Destroy};

}  // namespace

extern "C" {

// Hands over LiteRtGetTensorBufferTensorType, LiteRtLockTensorBuffer, LiteRtUnlockTensorBuffer.
void wa_int8_litert_bind(void* type_fn, void* lock_fn, void* unlock_fn) {
  g_type = reinterpret_cast<TypeFn>(type_fn);
  g_lock = reinterpret_cast<LockFn>(lock_fn);
  g_unlock = reinterpret_cast<UnlockFn>(unlock_fn);
}

// The callbacks, for LiteRtAddCustomOpKernelOption (which copies the struct).
const void* wa_int8_litert_kernel() { return &kKernel; }

// One layer's user_data: its kernel (owned by the caller) and threads.
void* wa_int8_litert_state(void* kernel, int threads) {
  return new OpState{kernel, threads < 1 ? 1 : threads, 0};
}

// The first nonzero error of n layers' states (0 when none failed): one call per run.
int wa_int8_litert_errors(void* const* states, int n) {
  for (int i = 0; i < n; ++i) {
    if (static_cast<OpState*>(states[i])->error != 0) return static_cast<OpState*>(states[i])->error;
  }
  return 0;
}

void wa_int8_litert_free_state(void* state) { delete static_cast<OpState*>(state); }

}  // extern "C"
