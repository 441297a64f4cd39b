// The gradient with respect to the Winograd-domain weights of the element-wise stage
// (WaTileTransformWeightGrad), the tile transform recomputed block by block with
// the row kernels of tile_rows.h (design at the top of tile_transform.cc) and never kept
// in memory.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "Eigen/Core"
#include "common.h"
#include "tile_common.h"
#include "tile_rows.h"

namespace wa_tf {
namespace {

using namespace tiles;  // NOLINT(build/namespaces): the kernels' shared pieces

// The gradient with respect to the Winograd-domain weights U of the element-wise stage
// M = V U (per position, V the tile transform of x, fake-quantized when `scale` has values):
// dU[ab] = V[ab]^T dM[ab], summed over tiles, without V in memory.  V is recomputed block
// of tiles by block with the very code (and so the very values) of WaTileTransform, and
// quantized as wa_tf.quantization.quantizers.fake_quant does; the GEMMs run on blocks in cache.  Work
// is split by the row a of the positions: each thread writes its own rows of dU.
// Inputs: x (N, H, W, C), mat (p, q), dm (p*p, tiles, K), scale (0, 1 or p*p values).
constexpr int64_t kWeightGradBytes = 512 * 1024;

template <typename T>
class TileTransformWeightGradOp : public OpKernel {
 public:
  explicit TileTransformWeightGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadGeometry(ctx, &geo_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmin", &qmin_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmax", &qmax_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& mat = ctx->input(1);
    const Tensor& dm = ctx->input(2);
    const Tensor& scale = ctx->input(3);
    OP_REQUIRES(ctx, x.dims() == 4 && mat.dims() == 2 && dm.dims() == 3,
                InvalidArgument("x, mat and dm must be 4-D, 2-D and 3-D"));
    const int n = x.dim_size(0), height = x.dim_size(1), width = x.dim_size(2),
              channels = x.dim_size(3);
    const int p = mat.dim_size(0), q = mat.dim_size(1);
    OP_REQUIRES_OK(ctx, CheckMatSize(p, q));
    const int64_t tiles = static_cast<int64_t>(n) * geo_.n_h * geo_.n_w;
    OP_REQUIRES(ctx, dm.dim_size(0) == p * p && dm.dim_size(1) == tiles,
                InvalidArgument("dm has shape ", dm.shape().DebugString(), ", expected [",
                                p * p, ", ", tiles, ", K]"));
    const int64_t scales = scale.NumElements();
    OP_REQUIRES(ctx, scales == 0 || scales == 1 || scales == p * p,
                InvalidArgument("scale must have 0, 1 or p*p values, got ", scales));
    const int k_out = dm.dim_size(2);
    Tensor* du = nullptr;
    TensorShape du_shape;
    OP_REQUIRES_OK(ctx, MakeShape({p * p, channels, k_out}, &du_shape));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, du_shape, &du));
    T* dup = du->flat<T>().data();
    std::fill(dup, dup + du->NumElements(), T(0));
    if (tiles == 0 || channels == 0 || k_out == 0) return;
    const T* xp = x.flat<T>().data();
    const T* mp = mat.flat<T>().data();
    const T* dmp = dm.flat<T>().data();
    const T* sp = scales > 0 ? scale.flat<T>().data() : nullptr;
    const T lo = static_cast<T>(qmin_), hi = static_cast<T>(qmax_);
    const Geometry geo = geo_;
    const int64_t units = static_cast<int64_t>(n) * geo.n_h;
    using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    WithShape<T>(channels, p, q, [&](auto block, auto p_size, auto q_size) {
      constexpr int CB = decltype(block)::value;
      const int p = p_size, q = q_size;
      const int wt = RowWidth(geo, q);
      auto work = [&](int64_t a_begin, int64_t a_end) {
        const int rows_a = a_end - a_begin;
        // Tiles per GEMM block: whole rows of tiles, as many as keep this shard's block
        // of V (rows_a * p * tiles * C values) within kWeightGradBytes (L2).
        const int64_t per_tile = static_cast<int64_t>(rows_a) * p * channels * sizeof(T);
        const int64_t block_units = std::max<int64_t>(
            1, kWeightGradBytes / per_tile / geo.n_w);
        const int64_t block_tiles = block_units * geo.n_w;
        std::vector<T> rows(static_cast<int64_t>(q) * wt * CB);
        std::vector<T> h(static_cast<int64_t>(p) * wt * CB);
        // v[a - a_begin][b][tile][c] for one block of tiles.
        std::vector<T> v(static_cast<int64_t>(rows_a) * p * block_tiles * channels);
        for (int64_t u0 = 0; u0 < units; u0 += block_units) {
          const int64_t u1 = std::min(units, u0 + block_units);
          const int64_t count = (u1 - u0) * geo.n_w;
          for (int64_t unit = u0; unit < u1; ++unit) {
            for (int c0 = 0; c0 < channels; c0 += CB) {
              const int cb = std::min(CB, channels - c0);
              const RowSource<T, CB> src(xp, height, width, channels, geo, q, unit / geo.n_h,
                                         unit % geo.n_h, c0, cb, rows.data());
              // Only this shard's rows a of the vertical pass, their count a
              // compile-time size where it is a usual one (so the sums stay in registers).
              auto rows_pass = [&](auto rows) {
                VerticalPass<T, CB>(src, mp + a_begin * q, rows, q_size, wt,
                                    h.data() + static_cast<int64_t>(a_begin) * wt * CB);
              };
              if (rows_a == p) {
                rows_pass(p_size);
              } else if (rows_a == 2) {
                rows_pass(Size<2>());
              } else if (rows_a == 3) {
                rows_pass(Size<3>());
              } else if (rows_a == 4) {
                rows_pass(Size<4>());
              } else {
                rows_pass(rows_a);
              }
              RowOut<T> out{v.data() + (unit - u0) * geo.n_w * channels,
                            block_tiles * channels, static_cast<int>(a_begin),
                            static_cast<int>(a_end), sp, scales, lo, hi};
              HorizontalPass<T, CB>(h.data(), mp, p_size, q_size, geo, wt, channels, c0, cb,
                                    out);
            }
          }
          for (int a = a_begin; a < a_end; ++a) {
            for (int b = 0; b < p; ++b) {
              const int ab = a * p + b;
              Eigen::Map<const Matrix> vb(
                  v.data() + (static_cast<int64_t>(a - a_begin) * p + b) * block_tiles * channels,
                  count, channels);
              Eigen::Map<const Matrix> db(dmp + (ab * tiles + u0 * geo.n_w) * k_out, count,
                                          k_out);
              Eigen::Map<Matrix> out(dup + static_cast<int64_t>(ab) * channels * k_out,
                                     channels, k_out);
              out.noalias() += vb.transpose() * db;
            }
          }
        }
      };
      // One contiguous range of rows a per thread: each part reads all of x once.
      const int parts = std::min(p, std::max(1, workers->num_threads));
      const int64_t cost = tiles * channels * (q * q + p * q + static_cast<int64_t>(p) * k_out);
      tensorflow::Shard(parts, workers->workers, parts, cost,
                        [&](int64_t begin, int64_t end) {
                          for (int64_t part = begin; part < end; ++part) {
                            work(part * p / parts, (part + 1) * p / parts);
                          }
                        });
    });
  }

 private:
  Geometry geo_;
  float qmin_, qmax_;
};

}  // namespace

REGISTER_OP("WaTileTransformWeightGrad")
    .Input("x: T")
    .Input("mat: T")
    .Input("dm: T")
    .Input("scale: T")
    .Output("du: T")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, mat, dm;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &mat));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, &dm));
      c->set_output(0, c->MakeShape({c->Dim(dm, 0), c->Dim(x, 3), c->Dim(dm, 2)}));
      return Status();
    });

WA_REGISTER_KERNEL("WaTileTransformWeightGrad", float, TileTransformWeightGradOp<float>)
WA_REGISTER_KERNEL("WaTileTransformWeightGrad", double, TileTransformWeightGradOp<double>)

}  // namespace wa_tf
