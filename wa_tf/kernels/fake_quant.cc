// Fused symmetric fake quantization (CPU): y = clip(round(x / s), qmin, qmax) * s in one
// pass, optionally with the integer codes, where TensorFlow runs five elementwise passes
// (divide, round, maximum, minimum, multiply) and a cast.
//
// The arithmetic is TensorFlow's, operation for operation: a true division, rounding half
// to even (tf.round), clipping that keeps NaN, one multiplication; the results are
// bit-identical.  The scale is a scalar or one value per index of the first axis (the
// Winograd layer's per-tap ranges).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace wa_tf {
namespace {

constexpr int64_t kChunk = 512;

// codes[k] = q[k] (integers within the code type's range after clipping; NaN, from a NaN
// range, codes as 0), converted 16 at a time: written as a plain loop, the narrowing
// conversion ran at a third of the speed of the quantization itself.
template <typename T, typename C>
void StoreCodes(const T* __restrict__ q, int64_t n, C* __restrict__ codes) {
  typedef T VT __attribute__((vector_size(16 * sizeof(T))));
  typedef int32_t VI __attribute__((vector_size(64)));
  typedef C VC __attribute__((vector_size(16 * sizeof(C))));
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    VT v;
    std::memcpy(&v, q + k, sizeof(v));
    const VI i = __builtin_convertvector(v == v ? v : VT{}, VI);
    const VC c = __builtin_convertvector(i, VC);
    std::memcpy(codes + k, &c, sizeof(c));
  }
  for (; k < n; ++k) codes[k] = static_cast<C>(static_cast<int32_t>(q[k] == q[k] ? q[k] : T(0)));
}

template <typename T, typename C, bool kCodes>
class FakeQuantOp : public OpKernel {
 public:
  explicit FakeQuantOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmin", &qmin_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmax", &qmax_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& scale = ctx->input(1);
    const int64_t size = x.NumElements();
    const int64_t scales = scale.NumElements();
    OP_REQUIRES(ctx, scales == 1 || (x.dims() >= 1 && scales == x.dim_size(0)),
                InvalidArgument("scale must have 1 value or one per index of x's first axis (",
                                x.dims() >= 1 ? x.dim_size(0) : 0, "), got ", scales));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    Tensor* codes = nullptr;
    if (kCodes) OP_REQUIRES_OK(ctx, ctx->allocate_output(1, x.shape(), &codes));
    if (size == 0) return;
    const T* xp = x.flat<T>().data();
    const T* sp = scale.flat<T>().data();
    T* yp = y->flat<T>().data();
    C* cp = kCodes ? codes->flat<C>().data() : nullptr;
    const int64_t inner = scales == 1 ? size : size / scales;
    const T lo = static_cast<T>(qmin_), hi = static_cast<T>(qmax_);
    // Work is split in whole chunks of kChunk values.
    auto work = [&](int64_t chunk_begin, int64_t chunk_end) {
      const int64_t begin = chunk_begin * kChunk, end = std::min(size, chunk_end * kChunk);
      for (int64_t e = begin; e < end;) {
        const T s = sp[scales == 1 ? 0 : e / inner];
        const int64_t stop = std::min(end, (e / inner + 1) * inner);
        // Loops over chunks, so that they vectorize; the codes from a second loop over
        // the chunk's q.
        while (e < stop) {
          const int64_t n = std::min<int64_t>(kChunk, stop - e);
          T q[kChunk];
          for (int64_t k = 0; k < n; ++k) {
            const T v = QuantCode(xp[e + k], s, lo, hi);
            q[k] = v;
            yp[e + k] = v * s;
          }
          if (kCodes) StoreCodes(q, n, cp + e);
          e += n;
        }
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers->num_threads, workers->workers, (size + kChunk - 1) / kChunk,
                      8 * kChunk, work);
  }

 private:
  float qmin_, qmax_;
};

Status SameShape(InferenceContext* c) {
  c->set_output(0, c->input(0));
  return Status();
}

}  // namespace

REGISTER_OP("WaFakeQuant")
    .Input("x: T")
    .Input("scale: T")
    .Output("y: T")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Attr("T: {float, double}")
    .SetShapeFn(SameShape);

REGISTER_OP("WaFakeQuantCodes")
    .Input("x: T")
    .Input("scale: T")
    .Output("y: T")
    .Output("codes: Tcodes")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Attr("T: {float, double}")
    .Attr("Tcodes: {int8, int16}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      return Status();
    });

#define WA_REGISTER_FAKE_QUANT(type)                                                      \
  REGISTER_KERNEL_BUILDER(                                                                \
      Name("WaFakeQuant").Device(::tensorflow::DEVICE_CPU).TypeConstraint<type>("T"),     \
      FakeQuantOp<type, int8_t, false>);                                                  \
  REGISTER_KERNEL_BUILDER(Name("WaFakeQuantCodes")                                        \
                              .Device(::tensorflow::DEVICE_CPU)                           \
                              .TypeConstraint<type>("T")                                  \
                              .TypeConstraint<int8_t>("Tcodes"),                          \
                          FakeQuantOp<type, int8_t, true>);                               \
  REGISTER_KERNEL_BUILDER(Name("WaFakeQuantCodes")                                        \
                              .Device(::tensorflow::DEVICE_CPU)                           \
                              .TypeConstraint<type>("T")                                  \
                              .TypeConstraint<int16_t>("Tcodes"),                         \
                          FakeQuantOp<type, int16_t, true>);

WA_REGISTER_FAKE_QUANT(float)
WA_REGISTER_FAKE_QUANT(double)

}  // namespace wa_tf
