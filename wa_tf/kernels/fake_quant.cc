// Fused symmetric fake quantization (CPU): y = clip(round(x / s), qmin, qmax) * s in one
// pass, optionally with the integer codes, or the codes alone, where TensorFlow runs five
// elementwise passes (divide, round, maximum, minimum, multiply) and a cast; the min and max a
// quantizer's range comes from, in one pass rather than two; the codes decoded.
//
// The arithmetic is TensorFlow's, operation for operation: a true division, rounding half
// to even (tf.round), clipping that keeps NaN, one multiplication; the results are
// bit-identical.  The scale is a scalar or one value per index of the first axis (the
// Winograd layer's per-tap ranges).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace wa_tf {
namespace {

constexpr int64_t kChunk = 512;

// Calls piece(first, n, s) over the `size` values of a tensor whose step is one value of
// `steps` (`scales` of them: one in all, or one per size / scales consecutive values), in
// pieces of at most kChunk values that share one step, split across the CPU's threads in
// whole chunks of kChunk values (`cost`: per value).
template <typename T, typename F>
void ForEachStepPiece(OpKernelContext* ctx, int64_t size, const T* steps, int64_t scales,
                      int64_t cost, F piece) {
  const int64_t inner = scales == 1 ? size : size / scales;
  auto work = [&](int64_t chunk_begin, int64_t chunk_end) {
    const int64_t end = std::min(size, chunk_end * kChunk);
    for (int64_t e = chunk_begin * kChunk; e < end;) {
      const int64_t index = e / inner;
      const int64_t n = std::min({kChunk, end - e, (index + 1) * inner - e});
      piece(e, n, steps[scales == 1 ? 0 : index]);
      e += n;
    }
  };
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, (size + kChunk - 1) / kChunk,
                    cost * kChunk, work);
}

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

// Outputs y (kValues) and the codes (kCodes), in that order.
template <typename T, typename C, bool kValues, bool kCodes>
class FakeQuantOp : public OpKernel {
 public:
  explicit FakeQuantOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmin", &qmin_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmax", &qmax_));
    // The codes are stored as C: limits outside its range would not convert.
    const double lo = kCodes ? std::numeric_limits<C>::min() : -HUGE_VAL;
    const double hi = kCodes ? std::numeric_limits<C>::max() : HUGE_VAL;
    OP_REQUIRES(ctx, lo <= qmin_ && qmin_ <= qmax_ && qmax_ <= hi,
                InvalidArgument("need qmin <= qmax", kCodes ? " within the codes' type" : "",
                                ", got qmin ", qmin_, ", qmax ", qmax_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& scale = ctx->input(1);
    const int64_t size = x.NumElements();
    const int64_t scales = scale.NumElements();
    OP_REQUIRES_OK(ctx, CheckScale(x, scales, "x"));
    Tensor* y = nullptr;
    if (kValues) OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    Tensor* codes = nullptr;
    if (kCodes) OP_REQUIRES_OK(ctx, ctx->allocate_output(kValues ? 1 : 0, x.shape(), &codes));
    if (size == 0) return;
    const T* xp = x.flat<T>().data();
    T* yp = kValues ? y->flat<T>().data() : nullptr;
    C* cp = kCodes ? codes->flat<C>().data() : nullptr;
    const T lo = static_cast<T>(qmin_), hi = static_cast<T>(qmax_);
    // Pieces of at most kChunk values, so that the loops vectorize; the codes from a
    // second loop over the piece's q.
    ForEachStepPiece(ctx, size, scale.flat<T>().data(), scales, 8,
                     [&](int64_t first, int64_t n, T s) {
                       T q[kChunk];
                       for (int64_t k = 0; k < n; ++k) {
                         const T v = QuantCode(xp[first + k], s, lo, hi);
                         q[k] = v;
                         if (kValues) yp[first + k] = v * s;
                       }
                       if (kCodes) StoreCodes(q, n, cp + first);
                     });
  }

 private:
  float qmin_, qmax_;
};

// The min and max of x, or of each index of its first axis (per_axis), in one pass: the
// batch statistics of wa_tf.quantization.quantizers.EMAQuantizer, where TensorFlow reads the tensor
// twice (reduce_min, reduce_max).  As TensorFlow's reductions: a NaN makes both NaN, an
// empty reduction gives (+inf, -inf).  Work units are runs of kRun values of one index.
constexpr int64_t kRun = 16384;

template <typename T>
struct MinMaxPart {
  T min, max;
  bool nan;
};

template <typename T>
MinMaxPart<T> RunMinMax(const T* __restrict__ x, int64_t n) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int L = 64 / sizeof(T);
  const T inf = std::numeric_limits<T>::infinity();
  V lo = V{} + inf, hi = V{} - inf;
  V bad = V{};  // nonzero lanes where a NaN was seen (NaN != NaN)
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    V v;
    std::memcpy(&v, x + k, sizeof(v));
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    bad = v != v ? v : bad;
  }
  MinMaxPart<T> part{inf, -inf, false};
  for (int i = 0; i < L; ++i) {
    part.min = std::min(part.min, lo[i]);
    part.max = std::max(part.max, hi[i]);
    part.nan = part.nan || bad[i] != T(0);
  }
  for (; k < n; ++k) {
    part.nan = part.nan || x[k] != x[k];
    part.min = x[k] < part.min ? x[k] : part.min;
    part.max = x[k] > part.max ? x[k] : part.max;
  }
  return part;
}

template <typename T>
class MinMaxOp : public OpKernel {
 public:
  explicit MinMaxOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("per_axis", &per_axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES(ctx, !per_axis_ || x.dims() >= 1,
                InvalidArgument("per_axis needs x of rank >= 1, got a scalar"));
    const int64_t groups = per_axis_ ? x.dim_size(0) : 1;
    const int64_t inner = groups == 0 ? 0 : x.NumElements() / groups;
    const TensorShape shape = per_axis_ ? TensorShape({groups}) : TensorShape({});
    Tensor *out_min = nullptr, *out_max = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out_min));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, shape, &out_max));
    const int64_t runs = std::max<int64_t>(1, (inner + kRun - 1) / kRun);
    std::vector<MinMaxPart<T>> parts(groups * runs);
    const T* xp = x.flat<T>().data();
    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t group = unit / runs, first = (unit % runs) * kRun;
        parts[unit] = RunMinMax(xp + group * inner + first, std::min(kRun, inner - first));
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers->num_threads, workers->workers, groups * runs, kRun, work);
    T* mins = out_min->flat<T>().data();
    T* maxs = out_max->flat<T>().data();
    for (int64_t group = 0; group < groups; ++group) {
      MinMaxPart<T> total{std::numeric_limits<T>::infinity(),
                          -std::numeric_limits<T>::infinity(), false};
      for (int64_t run = 0; run < runs; ++run) {
        const MinMaxPart<T>& part = parts[group * runs + run];
        total.min = std::min(total.min, part.min);
        total.max = std::max(total.max, part.max);
        total.nan = total.nan || part.nan;
      }
      const T nan = std::numeric_limits<T>::quiet_NaN();
      mins[group] = total.nan ? nan : total.min;
      maxs[group] = total.nan ? nan : total.max;
    }
  }

 private:
  bool per_axis_;
};

// y = codes * scale, the values fake_quant_codes coded (a cast and a multiplication in
// TensorFlow, two passes): the scale a scalar or one per index of the first axis.
template <typename T, typename C>
class FromCodesOp : public OpKernel {
 public:
  explicit FromCodesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& codes = ctx->input(0);
    const Tensor& scale = ctx->input(1);
    const int64_t size = codes.NumElements();
    const int64_t scales = scale.NumElements();
    OP_REQUIRES_OK(ctx, CheckScale(codes, scales, "codes"));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, codes.shape(), &y));
    if (size == 0) return;
    const C* cp = codes.flat<C>().data();
    T* yp = y->flat<T>().data();
    ForEachStepPiece(ctx, size, scale.flat<T>().data(), scales, 2,
                     [&](int64_t first, int64_t n, T s) {
                       const C* __restrict__ in = cp + first;
                       T* __restrict__ out = yp + first;
                       for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(in[k]) * s;
                     });
  }
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

// The codes of WaFakeQuantCodes alone: a quarter (int8) of the values' memory to write,
// for a consumer that decodes them itself (WaTileTransformAdjointCodes).
REGISTER_OP("WaQuantize")
    .Input("x: T")
    .Input("scale: T")
    .Output("codes: Tcodes")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Attr("T: {float, double}")
    .Attr("Tcodes: {int8, int16}")
    .SetShapeFn(SameShape);

REGISTER_OP("WaMinMax")
    .Input("x: T")
    .Output("min: T")
    .Output("max: T")
    .Attr("per_axis: bool = false")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      bool per_axis;
      TF_RETURN_IF_ERROR(c->GetAttr("per_axis", &per_axis));
      ShapeHandle out = c->Scalar();
      if (per_axis) {
        ShapeHandle x;
        TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
        out = c->Vector(c->Dim(x, 0));
      }
      c->set_output(0, out);
      c->set_output(1, out);
      return Status();
    });

// An op with integer codes (Tcodes) from a FakeQuantOp writing values or not.
#define WA_REGISTER_CODED(name, type, codes_type, values)                                 \
  REGISTER_KERNEL_BUILDER(Name(name)                                                      \
                              .Device(::tensorflow::DEVICE_CPU)                           \
                              .TypeConstraint<type>("T")                                  \
                              .TypeConstraint<codes_type>("Tcodes"),                      \
                          FakeQuantOp<type, codes_type, values, true>);

#define WA_REGISTER_FAKE_QUANT(type)                                                      \
  REGISTER_KERNEL_BUILDER(                                                                \
      Name("WaFakeQuant").Device(::tensorflow::DEVICE_CPU).TypeConstraint<type>("T"),     \
      FakeQuantOp<type, int8_t, true, false>);                                            \
  WA_REGISTER_CODED("WaFakeQuantCodes", type, int8_t, true)                               \
  WA_REGISTER_CODED("WaFakeQuantCodes", type, int16_t, true)                              \
  WA_REGISTER_CODED("WaQuantize", type, int8_t, false)                                    \
  WA_REGISTER_CODED("WaQuantize", type, int16_t, false)

REGISTER_OP("WaFromCodes")
    .Input("codes: Tcodes")
    .Input("scale: T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("Tcodes: {int8, int16}")
    .SetShapeFn(SameShape);

#define WA_REGISTER_FROM_CODES(type, codes_type)                                          \
  REGISTER_KERNEL_BUILDER(Name("WaFromCodes")                                             \
                              .Device(::tensorflow::DEVICE_CPU)                           \
                              .TypeConstraint<type>("T")                                  \
                              .TypeConstraint<codes_type>("Tcodes"),                      \
                          FromCodesOp<type, codes_type>);

WA_REGISTER_FROM_CODES(float, int8_t)
WA_REGISTER_FROM_CODES(float, int16_t)
WA_REGISTER_FROM_CODES(double, int8_t)
WA_REGISTER_FROM_CODES(double, int16_t)

REGISTER_KERNEL_BUILDER(
    Name("WaMinMax").Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
    MinMaxOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("WaMinMax").Device(::tensorflow::DEVICE_CPU).TypeConstraint<double>("T"),
    MinMaxOp<double>);

WA_REGISTER_FAKE_QUANT(float)
WA_REGISTER_FAKE_QUANT(double)

}  // namespace wa_tf
