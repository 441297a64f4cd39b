// Fused tile gather + 2-D transform kernels for the Winograd pipeline (CPU).
//
// A "tile transform" reads the q x q tiles of an (N, H, W, C) tensor at a
// stride s (tile (th, tw) starts at row th*s - pad_top, column tw*s - pad_left;
// outside the tensor reads zero) and writes Z = P X P^T for each tile X and
// channel, P of shape (p, q), in the Winograd layout (p*p, N*n_h*n_w, C):
//
//   z[a*p + b, (n*n_h + th)*n_w + tw, c] = sum_ij P[a,i] P[b,j] x[n, th*s+i-pt, tw*s+j-pl, c]
//
// The input transform of F(m, r) is one with P = B_t, q = t, s = m; the
// gradient of the output transform is one with P = A_t^T, q = m, s = m.  Its
// adjoint (WaTileTransformAdjoint) computes P^T Z P per tile and adds it into
// the tensor: the output transform, and the input transform's gradient.  Its codes form
// (WaTileTransformAdjointCodes) reads Z as integer codes and their step, decoded tile by
// tile: the output transform of a quantized element-wise stage, which is then never
// written as float values.
//
// Each op's gradient is the other op; the "...Grad" ops compute it together
// with the gradient with respect to P (trainable transforms), in the same pass
// over the tiles:  d<Z, P X P^T>/dP = sum over tiles and channels of
// Z P X^T + Z^T P X.
//
// TensorFlow runs each of these as several memory-bound passes (a gather, two
// GEMMs with a 6-row matrix, transposes); here each tile is read once, kept
// in a small buffer and transformed there, vectorized over channels.
//
// Files: tile_common.h (geometry, checks, dispatch, vectors, image rows), tile_rows.h (the
// row kernels' passes), this file (the tile transform, WaTileTransform and the adjoint's
// gradients), tile_adjoint.cc (the adjoint, WaTileTransformAdjoint[Codes] and the
// transform's gradient) and tile_weight_grad.cc (WaTileTransformWeightGrad).

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"
#include "tile_common.h"
#include "tile_rows.h"

namespace wa_tf {
namespace {

using namespace tiles;  // NOLINT(build/namespaces): the kernels' shared pieces

// The buffer size (in units of CB values) of TransformTileRow: the rows' copy (q wt) and
// h (p wt); with the gradient the row's tiles of zin (n_w p p) and Z P of one tile (p q).
inline int64_t TransformRowBuffer(int p, int q, int wt, int n_w, bool grad) {
  return static_cast<int64_t>(q + p) * wt +
         (grad ? static_cast<int64_t>(n_w) * p * p + p * q : 0);
}

// The tile transform of one row of tiles (image img, tile row th), channels [c0, c0 + cb),
// written to z; with `acc` (kGrad) also the transform's gradient against zin, the adjoint's
// input in z's layout (values or codes).  buf: TransformRowBuffer * CB values.
template <typename T, int CB, typename PS, typename QS, typename Z>
void TransformTileRow(const T* x, int height, int width, int channels, const Geometry& g,
                      const T* mat, PS p, QS q, int img, int th, int c0, int cb,
                      int64_t tiles, T* z, const TileInput<T, Z>& zin, T* acc,
                      int64_t next_first, T* buf) {
  const int wt = RowWidth(g, q);
  const int64_t first = (static_cast<int64_t>(img) * g.n_h + th) * g.n_w;
  T* copy = buf;
  T* h = copy + static_cast<int64_t>(q) * wt * CB;
  const RowSource<T, CB> src(x, height, width, channels, g, q, img, th, c0, cb, copy);
  // The runs of z the next row writes, fetched for writing (~8 % faster forward).
  if (c0 == 0 && next_first >= 0) {
    PrefetchRuns<true>(z, p * p, g.n_w, channels, tiles, next_first);
  }
  VerticalPass<T, CB>(src, mat, p, q, wt, h);
  HorizontalPass<T, CB>(h, mat, p, q, g, wt, channels, c0, cb,
                        RowOut<T>{z + first * channels, tiles * channels});
  if (acc == nullptr) return;
  T* zt = h + static_cast<int64_t>(p) * wt * CB;  // the row's tiles of zin
  T* zp = zt + static_cast<int64_t>(g.n_w) * p * p * CB;
  LoadTiles<T, CB>(zin, p, g.n_w, first, tiles, channels, c0, cb, next_first, zt);
  for (int tw = 0; tw < g.n_w; ++tw) {
    const T* ztile = zt + static_cast<int64_t>(tw) * p * p * CB;
    TimesMat<T, CB>(ztile, mat, p, q, zp);
    AccumulateTileMatGrad<T, CB>(zp, ztile, h, src, p, q, wt, tw * g.stride, acc);
  }
}

// z = tiles of x transformed (P X P^T); with kGrad also the gradient with respect to P of
// <zin, P X P^T> (zin: the incoming gradient, in z's layout).  Inputs: x, [zin,] mat; with
// integer Z (zin as codes): x, codes, step, mat.
template <typename T, bool kGrad, typename Z = T>
class TileTransformOp : public OpKernel {
 public:
  explicit TileTransformOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadGeometry(ctx, &geo_));
  }

  void Compute(OpKernelContext* ctx) override {
    constexpr bool kCodes = !std::is_same<Z, T>::value;
    const Tensor& x = ctx->input(0);
    const Tensor& mat = ctx->input(kGrad ? (kCodes ? 3 : 2) : 1);
    OP_REQUIRES(ctx, x.dims() == 4, InvalidArgument("x must be 4-D, got ", x.shape().DebugString()));
    OP_REQUIRES(ctx, mat.dims() == 2, InvalidArgument("mat must be 2-D"));
    const int n = x.dim_size(0), height = x.dim_size(1), width = x.dim_size(2),
              channels = x.dim_size(3);
    const int p = mat.dim_size(0), q = mat.dim_size(1);
    OP_REQUIRES_OK(ctx, CheckMatSize(p, q));
    const int64_t tiles = static_cast<int64_t>(n) * geo_.n_h * geo_.n_w;
    TileInput<T, Z> zin{nullptr};
    if (kGrad) {
      const Tensor& z = ctx->input(1);
      OP_REQUIRES(ctx, z.dims() == 3 && z.dim_size(0) == p * p && z.dim_size(1) == tiles &&
                           z.dim_size(2) == channels,
                  InvalidArgument("z has shape ", z.shape().DebugString(), ", expected [",
                                  p * p, ", ", tiles, ", ", channels, "]"));
      zin.data = z.flat<Z>().data();
      if (kCodes) OP_REQUIRES_OK(ctx, zin.SetStep(z, ctx->input(2)));
    }
    Tensor* z = nullptr;
    TensorShape z_shape;
    OP_REQUIRES_OK(ctx, MakeShape({p * p, tiles, channels}, &z_shape));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, z_shape, &z));
    MatGradTotal total(p * q);
    const T* xp = x.flat<T>().data();
    const T* mp = mat.flat<T>().data();
    T* zp = z->flat<T>().data();
    const Geometry geo = geo_;
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    if (tiles > 0 && channels > 0) {
      WithShape<T>(channels, p, q, [&](auto block, auto p_size, auto q_size) {
        constexpr int CB = decltype(block)::value;
        const auto p = p_size;
        const auto q = q_size;
        const int wt = RowWidth(geo, q);
        auto rows_work = [&](int64_t begin, int64_t end) {
          std::vector<T> buf(TransformRowBuffer(p, q, wt, geo.n_w, kGrad) * CB);
          std::vector<T> acc(kGrad ? p * q * CB : 0, T(0));
          for (int64_t unit = begin; unit < end; ++unit) {  // unit = n * n_h + th
            // The next row's first tile: its zin is fetched while this one is worked on.
            const int64_t next_first = unit + 1 < end ? (unit + 1) * geo.n_w : -1;
            for (int c0 = 0; c0 < channels; c0 += CB) {
              TransformTileRow<T, CB>(xp, height, width, channels, geo, mp, p, q,
                                      unit / geo.n_h, unit % geo.n_h, c0,
                                      std::min(CB, channels - c0), tiles, zp, zin,
                                      kGrad ? acc.data() : nullptr, next_first, buf.data());
            }
          }
          if (kGrad) total.Add<T, CB>(begin, acc.data());
        };
        tensorflow::Shard(workers->num_threads, workers->workers,
                          static_cast<int64_t>(n) * geo.n_h,
                          RowCost(geo, channels, p, q, kGrad), rows_work);
      });
    }
    if (kGrad) OP_REQUIRES_OK(ctx, total.Output<T>(ctx, 1, mat.shape()));
  }

 private:
  Geometry geo_;
};

Status TileTransformShape(InferenceContext* c, int mat_input, int out_index) {
  ShapeHandle x, mat;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(mat_input), 2, &mat));
  int n_h, n_w;
  TF_RETURN_IF_ERROR(c->GetAttr("n_h", &n_h));
  TF_RETURN_IF_ERROR(c->GetAttr("n_w", &n_w));
  TF_RETURN_IF_ERROR(CheckSide("n_h", n_h));
  TF_RETURN_IF_ERROR(CheckSide("n_w", n_w));
  DimensionHandle pp, tiles;
  TF_RETURN_IF_ERROR(c->Multiply(c->Dim(mat, 0), c->Dim(mat, 0), &pp));
  TF_RETURN_IF_ERROR(c->Multiply(c->Dim(x, 0), static_cast<int64_t>(n_h) * n_w, &tiles));
  c->set_output(out_index, c->MakeShape({pp, tiles, c->Dim(x, 3)}));
  return Status();
}

}  // namespace

REGISTER_OP("WaTileTransform")
    .Input("x: T")
    .Input("mat: T")
    .Output("z: T")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn([](InferenceContext* c) { return TileTransformShape(c, 1, 0); });

// The gradient of WaTileTransformAdjoint: (dz, dmat) from the incoming gradient dx, its z
// and mat (the tile-transform kernel with the transform's gradient).
REGISTER_OP("WaTileTransformAdjointGrad")
    .Input("dx: T")
    .Input("z: T")
    .Input("mat: T")
    .Output("dz: T")
    .Output("dmat: T")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(TileTransformShape(c, 2, 0));
      c->set_output(1, c->input(2));
      return Status();
    });

// WaTileTransformAdjointGrad with z given as its integer codes and their step (one, or
// one per position), decoded as wa_tf.quantization.quantizers.from_codes decodes them, tile by tile.
REGISTER_OP("WaTileTransformAdjointGradCodes")
    .Input("dx: T")
    .Input("codes: Tcodes")
    .Input("scale: T")
    .Input("mat: T")
    .Output("dz: T")
    .Output("dmat: T")
    .Attr("Tcodes: {int8, int16}")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(TileTransformShape(c, 3, 0));
      c->set_output(1, c->input(3));
      return Status();
    });

#define WA_REGISTER_CODES(type, codes)                                                      \
  REGISTER_KERNEL_BUILDER(Name("WaTileTransformAdjointGradCodes")                           \
                              .Device(::tensorflow::DEVICE_CPU)                             \
                              .TypeConstraint<type>("T")                                    \
                              .TypeConstraint<codes>("Tcodes"),                             \
                          TileTransformOp<type, true, codes>);
#define WA_REGISTER(type)                                                                   \
  WA_REGISTER_CODES(type, int8_t)                                                           \
  WA_REGISTER_CODES(type, int16_t)                                                          \
  WA_REGISTER_KERNEL("WaTileTransform", type, TileTransformOp<type, false>)                 \
  WA_REGISTER_KERNEL("WaTileTransformAdjointGrad", type, TileTransformOp<type, true>)

WA_REGISTER(float)
WA_REGISTER(double)

}  // namespace wa_tf
