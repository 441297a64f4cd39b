// What the kernel files share: TensorFlow's names, the one fake-quantization
// rounding that must equal wa_tf.quantization.quantizers.fake_quant (TensorFlow's ops) bit for bit,
// and the check of a quantization step's shape.

#ifndef WA_TF_KERNELS_COMMON_H_
#define WA_TF_KERNELS_COMMON_H_

#include <cmath>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace wa_tf {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// The code of x at step s, clip(round(x / s), lo, hi), as TensorFlow computes it operation
// for operation: a true division, rounding half to even (tf.round), clipping that keeps
// NaN (tf.clip_by_value).  The fake-quantized value is QuantCode(...) * s.  Branch-free,
// so that loops over it vectorize (the library is built with -fno-trapping-math).
template <typename T>
inline T QuantCode(T x, T s, T lo, T hi) {
  T q = std::nearbyint(x / s);
  q = q < lo ? lo : q;
  return q > hi ? hi : q;
}

// A step for `x`: one value, or one per index of its first axis (`what` names x).
inline Status CheckScale(const Tensor& x, int64_t scales, const char* what) {
  if (scales == 1 || (x.dims() >= 1 && scales == x.dim_size(0))) return Status();
  return InvalidArgument("scale must have 1 value or one per index of ", what,
                         "'s first axis (", x.dims() >= 1 ? x.dim_size(0) : 0, "), got ",
                         scales);
}

}  // namespace wa_tf

#endif  // WA_TF_KERNELS_COMMON_H_
