// The adjoint of the tile transform (design at the top of tile_transform.cc): x = P^T Z P
// per tile of z, added into the image (the output transform, and the input transform's
// gradient), its codes form (WaTileTransformAdjointCodes: z as integer codes decoded tile
// by tile) and, with the gradient with respect to P, WaTileTransformGrad.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "tile_common.h"
#include "tile_rows.h"

namespace wa_tf {
namespace {

using namespace tiles;  // NOLINT(build/namespaces): the kernels' shared pieces

// The buffer size (in units of CB values) of AdjointTileRow: h (p wt) and the p values
// Z[a][.] of a tile (p, for partial blocks); with the gradient the rows' copy (q wt),
// P X (p wt), the row's tiles of z (n_w p p) and Z P of one tile (p q).
inline int64_t AdjointRowBuffer(int p, int q, int wt, int n_w, bool grad) {
  return static_cast<int64_t>(p) * wt + p +
         (grad ? static_cast<int64_t>(q + p) * wt + static_cast<int64_t>(n_w) * p * p + p * q
               : 0);
}

// The adjoint of one row of tiles: per tile Z P (the horizontal pass), summed into h where
// tiles overlap, then P^T (the vertical pass) once per column, written (`store`) or added
// into x; with `acc` (kGrad) also the transform's gradient against xin, the image whose
// tiles the adjoint's input is the gradient of.  z: values, or codes decoded as they are
// read.  buf: AdjointRowBuffer * CB values.
template <typename T, int CB, typename PS, typename QS, typename Z>
void AdjointTileRow(const TileInput<T, Z>& zin, const T* mat, PS p, QS q, const Geometry& g,
                    int img, int th, int c0, int cb, int channels, int64_t tiles, int height,
                    int width, bool store, T* x, const T* xin, T* acc, int64_t next_first,
                    T* buf) {
  constexpr int L = Lanes<T>();
  constexpr bool kCodes = !std::is_same<Z, T>::value;
  const int wt = RowWidth(g, q);
  const bool direct = cb == CB;
  const int64_t first = (static_cast<int64_t>(img) * g.n_h + th) * g.n_w;
  T* h = buf;
  T* zt = h + static_cast<int64_t>(p) * wt * CB;  // Z[a][.] of a tile (partial blocks)
  std::fill(h, h + static_cast<int64_t>(p) * wt * CB, T(0));
  if (acc == nullptr) {
    if (c0 == 0 && next_first >= 0) {
      PrefetchRuns(zin.data, p * p, g.n_w, channels, tiles, next_first);
    }
    // For each a, the runs (a, 0..p-1) of z advance together, tile by tile: the tile's
    // row Z[a][.] P is summed into h (q columns; tiles overlap where stride < q).
    for (int a = 0; a < p; ++a) {
      const Z* runs = zin.data + (static_cast<int64_t>(a) * p * tiles + first) * channels + c0;
      for (int tw = 0; tw < g.n_w; ++tw) {
        const T* v[kMaxRowSize];
        for (int b = 0; b < p; ++b) {
          const Z* run = runs + (b * tiles + tw) * channels;
          if constexpr (!kCodes) {
            if (direct) {  // values read in place
              v[b] = run;
              continue;
            }
          }
          // Codes decoded, or a partial block zero-padded, into a copy.
          LoadRun<T, CB>(run, zin.Step(a * p + b), cb, zt + b * CB);
          v[b] = zt + b * CB;
        }
        T* __restrict__ hr = h + (static_cast<int64_t>(a) * wt + tw * g.stride) * CB;
        for (int k0 = 0; k0 < CB; k0 += L) {
          Vec<T> sum[kMaxRowSize];
          for (int j = 0; j < q; ++j) sum[j] = Vec<T>{};
          for (int b = 0; b < p; ++b) {
            const Vec<T> z_ab = Load(v[b] + k0);
            for (int j = 0; j < q; ++j) sum[j] += mat[b * q + j] * z_ab;
          }
          for (int j = 0; j < q; ++j) {
            T* dst = hr + j * CB + k0;
            Store(dst, Load(dst) + sum[j]);
          }
        }
      }
    }
  } else {
    T* copy = zt + static_cast<int64_t>(p) * CB;
    T* hx = copy + static_cast<int64_t>(q) * wt * CB;  // P X of xin's rows
    T* tiles_buf = hx + static_cast<int64_t>(p) * wt * CB;
    T* zp = tiles_buf + static_cast<int64_t>(g.n_w) * p * p * CB;  // Z P of one tile
    const RowSource<T, CB> src(xin, height, width, channels, g, q, img, th, c0, cb, copy);
    VerticalPass<T, CB>(src, mat, p, q, wt, hx);
    LoadTiles<T, CB>(zin, p, g.n_w, first, tiles, channels, c0, cb, next_first, tiles_buf);
    for (int tw = 0; tw < g.n_w; ++tw) {
      const T* ztile = tiles_buf + static_cast<int64_t>(tw) * p * p * CB;
      TimesMat<T, CB>(ztile, mat, p, q, zp);
      for (int a = 0; a < p; ++a) {
        T* __restrict__ hr = h + (static_cast<int64_t>(a) * wt + tw * g.stride) * CB;
        const T* za = zp + a * q * CB;
        for (int k = 0; k < q * CB; ++k) hr[k] += za[k];
      }
      AccumulateTileMatGrad<T, CB>(zp, ztile, hx, src, p, q, wt, tw * g.stride, acc);
    }
  }
  // The vertical pass P^T once per column, the q rows' sums of a vector in registers.
  for (int col = 0; col < wt; ++col) {
    const int xx = col - g.pad_left;
    if (xx < 0 || xx >= width) continue;
    T* dst0 = x + ((static_cast<int64_t>(img) * height) * width + xx) * channels + c0;
    for (int k0 = 0; k0 < CB; k0 += L) {
      Vec<T> sum[kMaxRowSize];
      for (int i = 0; i < q; ++i) sum[i] = Vec<T>{};
      for (int a = 0; a < p; ++a) {
        const Vec<T> v = Load(h + (static_cast<int64_t>(a) * wt + col) * CB + k0);
        for (int i = 0; i < q; ++i) sum[i] += mat[a * q + i] * v;
      }
      const int lanes = std::min(L, cb - k0);
      if (lanes <= 0) break;
      for (int i = 0; i < q; ++i) {
        const int y = th * g.stride + i - g.pad_top;
        if (y < 0 || y >= height) continue;
        T* dst = dst0 + static_cast<int64_t>(y) * width * channels + k0;
        if (lanes == L) {
          Store(dst, store ? sum[i] : Load(dst) + sum[i]);
        } else {
          for (int k = 0; k < lanes; ++k) dst[k] = (store ? T(0) : dst[k]) + sum[i][k];
        }
      }
    }
  }
}

// x = P^T Z P per tile of z, added into an (N, height, width, C) image; with kGrad also the
// gradient with respect to P of <X, P^T Z P> (X: the tiles of the incoming gradient xin).
// Inputs: z, [xin,] mat; with integer Z (z as codes, no kGrad): codes, step, mat.
template <typename T, bool kGrad, typename Z = T>
class TileTransformAdjointOp : public OpKernel {
  static constexpr bool kCodes = !std::is_same<Z, T>::value;
  static_assert(!(kGrad && kCodes), "the codes form has no transform gradient");

 public:
  explicit TileTransformAdjointOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadGeometry(ctx, &geo_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("height", &height_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("width", &width_));
    OP_REQUIRES_OK(ctx, CheckSide("height", height_));
    OP_REQUIRES_OK(ctx, CheckSide("width", width_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& z = ctx->input(0);
    const Tensor& mat = ctx->input(kGrad || kCodes ? 2 : 1);
    OP_REQUIRES(ctx, z.dims() == 3, InvalidArgument("z must be 3-D"));
    OP_REQUIRES(ctx, mat.dims() == 2, InvalidArgument("mat must be 2-D"));
    const int p = mat.dim_size(0), q = mat.dim_size(1);
    OP_REQUIRES_OK(ctx, CheckMatSize(p, q));
    const int64_t per_image = static_cast<int64_t>(geo_.n_h) * geo_.n_w;
    OP_REQUIRES(ctx, z.dim_size(0) == p * p,
                InvalidArgument("z must have p*p = ", p * p, " rows, got ", z.dim_size(0)));
    OP_REQUIRES(ctx, per_image > 0 && z.dim_size(1) % per_image == 0,
                InvalidArgument("z's tiles (", z.dim_size(1), ") are not a multiple of n_h*n_w"));
    const int n = z.dim_size(1) / per_image;
    const int channels = z.dim_size(2);
    const int64_t tiles = z.dim_size(1);
    const int height = height_, width = width_;
    const T* xin = nullptr;
    if (kGrad) {
      const Tensor& xg = ctx->input(1);
      OP_REQUIRES(ctx, xg.dims() == 4 && xg.dim_size(0) == n && xg.dim_size(1) == height &&
                           xg.dim_size(2) == width && xg.dim_size(3) == channels,
                  InvalidArgument("x has shape ", xg.shape().DebugString(), ", expected [", n,
                                  ", ", height, ", ", width, ", ", channels, "]"));
      xin = xg.flat<T>().data();
    }
    Tensor* x = nullptr;
    TensorShape x_shape;
    OP_REQUIRES_OK(ctx, MakeShape({n, height, width, channels}, &x_shape));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_shape, &x));
    TileInput<T, Z> zin{z.flat<Z>().data()};
    if (kCodes) OP_REQUIRES_OK(ctx, zin.SetStep(z, ctx->input(1)));
    const T* mp = mat.flat<T>().data();
    T* xp = x->flat<T>().data();
    const Geometry geo = geo_;
    MatGradTotal total(p * q);
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    // Disjoint tiles that cover the output (the output transform) are written; otherwise
    // tiles add into the output, zeroed first (pixels no tile reaches stay 0).
    const bool store = geo.stride == q && geo.pad_top == 0 &&
                       geo.pad_left == 0 && static_cast<int64_t>(geo.n_h) * q >= height &&
                       static_cast<int64_t>(geo.n_w) * q >= width;
    const int64_t row = static_cast<int64_t>(width) * channels;
    if (!store) {
      tensorflow::Shard(workers->num_threads, workers->workers,
                        static_cast<int64_t>(n) * height, row,
                        [&](int64_t begin, int64_t end) {
                          std::fill(xp + begin * row, xp + end * row, T(0));
                        });
    }
    // Tile rows th and th + k overlap when k*stride < q: run the rows in
    // `period` passes so that no two concurrent units write the same pixels.
    const int period = q > geo.stride ? (q + geo.stride - 1) / geo.stride : 1;
    if (tiles > 0 && channels > 0) {
      WithShape<T>(channels, p, q, [&](auto block, auto p_size, auto q_size) {
        constexpr int CB = decltype(block)::value;
        const auto p = p_size;
        const auto q = q_size;
        int64_t phase_first = 0;  // the units of earlier phases, for MatGradTotal's order
        for (int phase = 0; phase < period; ++phase) {
          const int rows = geo.n_h > phase ? (geo.n_h - phase + period - 1) / period : 0;
          const int wt = RowWidth(geo, q);
          auto rows_work = [&](int64_t begin, int64_t end) {
            std::vector<T> buf(AdjointRowBuffer(p, q, wt, geo.n_w, kGrad) * CB);
            std::vector<T> acc(kGrad ? p * q * CB : 0, T(0));
            for (int64_t unit = begin; unit < end; ++unit) {
              const int img = unit / rows, th = phase + (unit % rows) * period;
              // The next unit's first tile: its z is fetched while this one is worked on.
              const int64_t next = unit + 1;
              const int64_t next_first =
                  next < end ? ((next / rows) * geo.n_h + phase + (next % rows) * period) *
                                   static_cast<int64_t>(geo.n_w)
                             : -1;
              for (int c0 = 0; c0 < channels; c0 += CB) {
                AdjointTileRow<T, CB>(zin, mp, p, q, geo, img, th, c0,
                                      std::min(CB, channels - c0), channels, tiles, height,
                                      width, store, xp, xin, kGrad ? acc.data() : nullptr,
                                      next_first, buf.data());
              }
            }
            if (kGrad) total.Add<T, CB>(phase_first + begin, acc.data());
          };
          tensorflow::Shard(workers->num_threads, workers->workers,
                            static_cast<int64_t>(n) * rows,
                            RowCost(geo, channels, p, q, kGrad), rows_work);
          phase_first += static_cast<int64_t>(n) * rows;
        }
      });
    }
    if (kGrad) OP_REQUIRES_OK(ctx, total.Output<T>(ctx, 1, mat.shape()));
  }

 private:
  Geometry geo_;
  int height_, width_;
};

Status AdjointShape(InferenceContext* c) {
  ShapeHandle z;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &z));
  int n_h, n_w, height, width;
  TF_RETURN_IF_ERROR(c->GetAttr("n_h", &n_h));
  TF_RETURN_IF_ERROR(c->GetAttr("n_w", &n_w));
  TF_RETURN_IF_ERROR(c->GetAttr("height", &height));
  TF_RETURN_IF_ERROR(c->GetAttr("width", &width));
  for (auto [name, value] : {std::pair<const char*, int>{"n_h", n_h}, {"n_w", n_w},
                             {"height", height}, {"width", width}}) {
    TF_RETURN_IF_ERROR(CheckSide(name, value));
  }
  if (static_cast<int64_t>(n_h) * n_w == 0) {
    return InvalidArgument("n_h and n_w must be >= 1, got ", n_h, " and ", n_w);
  }
  DimensionHandle n;
  TF_RETURN_IF_ERROR(
      c->Divide(c->Dim(z, 1), static_cast<int64_t>(n_h) * n_w, /*evenly_divisible=*/true, &n));
  c->set_output(0, c->MakeShape({n, height, width, c->Dim(z, 2)}));
  return Status();
}

}  // namespace

REGISTER_OP("WaTileTransformAdjoint")
    .Input("z: T")
    .Input("mat: T")
    .Output("x: T")
    .Attr("height: int")
    .Attr("width: int")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn(AdjointShape);

// WaTileTransformAdjoint with z given as its integer codes and their step (one, or one per
// position), decoded as wa_tf.quantization.quantizers.from_codes decodes them, tile by tile.
REGISTER_OP("WaTileTransformAdjointCodes")
    .Input("codes: Tcodes")
    .Input("scale: T")
    .Input("mat: T")
    .Output("x: T")
    .Attr("height: int")
    .Attr("width: int")
    .Attr("Tcodes: {int8, int16}")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn(AdjointShape);

// The gradient of WaTileTransform: (dx, dmat) from the incoming gradient dz, its x and mat
// (the adjoint kernel with the transform's gradient).
REGISTER_OP("WaTileTransformGrad")
    .Input("dz: T")
    .Input("x: T")
    .Input("mat: T")
    .Output("dx: T")
    .Output("dmat: T")
    .Attr("height: int")
    .Attr("width: int")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(AdjointShape(c));
      c->set_output(1, c->input(2));
      return Status();
    });

#define WA_REGISTER_CODES(type, codes)                                                      \
  REGISTER_KERNEL_BUILDER(Name("WaTileTransformAdjointCodes")                               \
                              .Device(::tensorflow::DEVICE_CPU)                             \
                              .TypeConstraint<type>("T")                                    \
                              .TypeConstraint<codes>("Tcodes"),                             \
                          TileTransformAdjointOp<type, false, codes>);
#define WA_REGISTER(type)                                                                   \
  WA_REGISTER_CODES(type, int8_t)                                                           \
  WA_REGISTER_CODES(type, int16_t)                                                          \
  WA_REGISTER_KERNEL("WaTileTransformAdjoint", type, TileTransformAdjointOp<type, false>)   \
  WA_REGISTER_KERNEL("WaTileTransformGrad", type, TileTransformAdjointOp<type, true>)

WA_REGISTER(float)
WA_REGISTER(double)

}  // namespace wa_tf
