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

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

#include "Eigen/Core"
#include "common.h"

namespace wa_tf {
namespace {

// Channels are handled in blocks of CB (16, 32 or 64; a compile-time constant so
// that the inner loops vectorize without remainders), the last block padded
// with zeros: a tile's buffers stay in L1.
template <int CB>
using Block = std::integral_constant<int, CB>;

// Calls run(Block<CB>()) with the widest block that divides `channels` (16 when none does).
template <typename F>
void WithBlock(int channels, F run) {
  if (channels % 64 == 0) {
    run(Block<64>());
  } else if (channels % 32 == 0) {
    run(Block<32>());
  } else {
    run(Block<16>());
  }
}

template <int N>
using Size = std::integral_constant<int, N>;

// Calls run(block, p, q) with the transform's size (p, q) as compile-time constants for the
// transforms of F(2, 3), F(4, 3) and F(6, 3) in float32 (their loops then unroll and keep
// their sums in registers), as plain ints otherwise.
template <typename T, typename F>
void WithShape(int channels, int p, int q, F run) {
  WithBlock(channels, [&](auto block) {
    if (std::is_same<T, float>::value) {
      if (p == 4 && q == 4) return run(block, Size<4>(), Size<4>());  // F2 input
      if (p == 4 && q == 2) return run(block, Size<4>(), Size<2>());  // F2 output
      if (p == 6 && q == 6) return run(block, Size<6>(), Size<6>());  // F4 input
      if (p == 6 && q == 4) return run(block, Size<6>(), Size<4>());  // F4 output
      if (p == 8 && q == 8) return run(block, Size<8>(), Size<8>());  // F6 input
      if (p == 8 && q == 6) return run(block, Size<8>(), Size<6>());  // F6 output
    }
    run(block, p, q);
  });
}

// Tile geometry shared by the three kernels.
struct Geometry {
  int stride, pad_top, pad_left, n_h, n_w;
};

// The largest span of pixels the tiles (or an attribute's height or width) may cover.
constexpr int64_t kMaxExtent = int64_t{1} << 24;

Status ReadGeometry(OpKernelConstruction* ctx, Geometry* g) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("stride", &g->stride));
  TF_RETURN_IF_ERROR(ctx->GetAttr("pad_top", &g->pad_top));
  TF_RETURN_IF_ERROR(ctx->GetAttr("pad_left", &g->pad_left));
  TF_RETURN_IF_ERROR(ctx->GetAttr("n_h", &g->n_h));
  TF_RETURN_IF_ERROR(ctx->GetAttr("n_w", &g->n_w));
  if (g->stride < 1 || g->n_h < 0 || g->n_w < 0 || g->pad_top < 0 || g->pad_left < 0) {
    return InvalidArgument("stride must be >= 1 and n_h, n_w, pad_top, pad_left >= 0, got "
                           "stride ", g->stride, ", n_h ", g->n_h, ", n_w ", g->n_w,
                           ", pad_top ", g->pad_top, ", pad_left ", g->pad_left);
  }
  // Tile origins (th * stride - pad_top, ...) are ints: keep the span they cover far
  // from overflowing.
  for (int64_t extent : {static_cast<int64_t>(g->n_h) * g->stride + g->pad_top,
                         static_cast<int64_t>(g->n_w) * g->stride + g->pad_left}) {
    if (extent > kMaxExtent) {
      return InvalidArgument("the tiles span more than ", kMaxExtent, " pixels (n_h or n_w ",
                             "times stride, plus padding)");
    }
  }
  return Status();
}

// An image side (height, width) an attribute gives: from 0 to kMaxExtent.
Status CheckSide(const char* name, int value) {
  if (value < 0 || value > kMaxExtent) {
    return InvalidArgument(name, " must be between 0 and ", kMaxExtent, ", got ", value);
  }
  return Status();
}

// A shape built without TensorShape's CHECK on overflowing sizes.
Status MakeShape(std::initializer_list<int64_t> dims, TensorShape* shape) {
  return TensorShape::BuildTensorShape(dims, shape);
}

// Sums per-shard transform gradients (in double: many tiles and channels add up).  Each
// shard's part is kept under the first unit it worked on and the parts are added in that
// order, not in the order the threads finish: for a given thread count (which fixes how
// Shard splits the units) the sum is the same, bit for bit, on every run.
class MatGradTotal {
 public:
  explicit MatGradTotal(int size) : size_(size) {}

  template <typename T, int CB>
  void Add(int64_t first_unit, const T* acc) {
    std::vector<double> part(size_, 0.0);
    for (int e = 0; e < size_; ++e) {
      for (int k = 0; k < CB; ++k) part[e] += acc[e * CB + k];
    }
    std::lock_guard<std::mutex> guard(lock_);
    parts_.emplace(first_unit, std::move(part));
  }

  // Writes the total as output `index` of `ctx`, of `shape` (the transform's).
  template <typename T>
  Status Output(OpKernelContext* ctx, int index, const TensorShape& shape) const {
    std::vector<double> total(size_, 0.0);
    for (const auto& part : parts_) {  // ordered by first unit
      for (int e = 0; e < size_; ++e) total[e] += part.second[e];
    }
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->allocate_output(index, shape, &out));
    T* data = out->flat<T>().data();
    for (int e = 0; e < size_; ++e) data[e] = static_cast<T>(total[e]);
    return Status();
  }

 private:
  const int size_;
  std::map<int64_t, std::vector<double>> parts_;
  std::mutex lock_;
};

// The row kernels below keep pointers on the stack: for transforms up to this size.
constexpr int kMaxRowSize = 16;

// The vectors the row kernels' loops are written in: 64 bytes (one AVX-512 register, two
// AVX2 ones), GCC vector types, so that a tile's sums stay in registers whatever the
// compiler's heuristics; every block width CB is a multiple of their lanes.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
constexpr int Lanes() { return 64 / sizeof(T); }

template <typename T>
inline Vec<T> Load(const T* src) {
  Vec<T> v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}

template <typename T>
inline void Store(T* dst, const Vec<T>& v) {
  std::memcpy(dst, &v, sizeof(v));
}

// The lane block a missing row or column (outside the image) reads: the loops below
// multiply it like any other rather than branch.
template <typename T, int CB>
const T* Zeros() {
  alignas(64) static const T zeros[CB] = {};
  return zeros;
}

// Columns a row of tiles reads (tile-local column 0 of tile 0 is column 0).
inline int RowWidth(const Geometry& g, int q) { return (g.n_w - 1) * g.stride + q; }

// The q image rows a row of tiles (image img, tile row th) reads, channels [c0, c0 + cb):
// pointers into the image (column stride `channels`), or for a partial channel block into
// a zero-padded copy (column stride CB); a null row reads zeros.
template <typename T, int CB>
struct RowSource {
  const T* row[kMaxRowSize];
  bool direct;
  int64_t channels;
  int pad_left, width;

  // Column col (0 = the first tile's first column) of row i, or nullptr for zeros.
  const T* at(int i, int col) const {
    if (row[i] == nullptr) return nullptr;
    if (!direct) return row[i] + col * CB;
    const int xx = col - pad_left;
    return (xx < 0 || xx >= width) ? nullptr : row[i] + xx * channels;
  }

  // copy: q * RowWidth * CB values, used for a partial block.
  RowSource(const T* x, int height, int width_, int channels_, const Geometry& g, int q,
            int img, int th, int c0, int cb, T* copy)
      : direct(cb == CB), channels(channels_), pad_left(g.pad_left), width(width_) {
    const int wt = RowWidth(g, q);
    for (int i = 0; i < q; ++i) {
      const int y = th * g.stride + i - g.pad_top;
      row[i] = (y < 0 || y >= height) ? nullptr
          : x + (static_cast<int64_t>(img) * height + y) * width * channels + c0;
      if (direct || row[i] == nullptr) continue;
      T* rows = copy + static_cast<int64_t>(i) * wt * CB;
      for (int col = 0; col < wt; ++col) {
        const int xx = col - g.pad_left;
        T* dst = rows + col * CB;
        std::fill(dst, dst + CB, T(0));
        if (xx >= 0 && xx < width) {
          std::memcpy(dst, row[i] + static_cast<int64_t>(xx) * channels, cb * sizeof(T));
        }
      }
      row[i] = rows;
    }
  }
};

// h[a][col] = sum_i P[a][i] rows[i][col] for every column: the vertical pass, once per
// column, shared by the horizontally overlapping tiles.  h: p * wt * CB.  The loops run
// over vectors (Vec<T>), the p sums of a vector in registers (p and q compile-time
// sizes, Size<N>, unroll them); they carry no branches: a zero weight or a missing row
// costs a multiplication (0 * x adds nothing, so the values are those of a loop that
// skips them).
template <typename T, int CB, typename PS, typename QS>
void VerticalPass(const RowSource<T, CB>& src, const T* __restrict__ mat, PS p, QS q, int wt,
                  T* __restrict__ h) {
  constexpr int L = Lanes<T>();
  for (int col = 0; col < wt; ++col) {
    const T* v[kMaxRowSize];
    for (int i = 0; i < q; ++i) {
      v[i] = src.at(i, col);
      if (v[i] == nullptr) v[i] = Zeros<T, CB>();
    }
    for (int k0 = 0; k0 < CB; k0 += L) {
      Vec<T> acc[kMaxRowSize];
      for (int a = 0; a < p; ++a) acc[a] = Vec<T>{};
      for (int i = 0; i < q; ++i) {
        const Vec<T> x = Load(v[i] + k0);
        for (int a = 0; a < p; ++a) acc[a] += mat[a * q + i] * x;
      }
      for (int a = 0; a < p; ++a) {
        Store(h + (static_cast<int64_t>(a) * wt + col) * CB + k0, acc[a]);
      }
    }
  }
}

// Where HorizontalPass writes: position (a, b) of tile tw of the row goes to
// z + ((a - a_begin) * p + b) * position_stride + tw * channels, each lane block at c0.
template <typename T>
struct RowOut {
  T* z;
  int64_t position_stride;
  int a_begin = 0;
  int a_end = -1;       // -1: all p rows
  const T* scale = nullptr;  // fake-quantize with these steps (1 or p*p of them)
  int64_t scales = 0;
  T qmin = 0, qmax = 0;
};

// The row's tiles Z = (P X) P^T from the vertical pass h, rows a of `out`'s range,
// fake-quantized as wa_tf.quantizers.fake_quant does when `out.scale` is set.  Position
// (a, b) of the row's tiles is one run (tiles consecutive): for a given a, the p runs
// (a, 0..p-1) advance together, tile by tile.
template <typename T, int CB, typename PS, typename QS>
void HorizontalPass(const T* __restrict__ h, const T* __restrict__ mat, PS p, QS q,
                    const Geometry& g, int wt, int channels, int c0, int cb,
                    const RowOut<T>& out) {
  constexpr int L = Lanes<T>();
  const int a_end = out.a_end < 0 ? p : out.a_end;
  for (int a = out.a_begin; a < a_end; ++a) {
    T* runs = out.z + static_cast<int64_t>(a - out.a_begin) * p * out.position_stride + c0;
    for (int tw = 0; tw < g.n_w; ++tw) {
      const T* hr = h + (static_cast<int64_t>(a) * wt + tw * g.stride) * CB;
      T tile[kMaxRowSize][CB];
      for (int k0 = 0; k0 < CB; k0 += L) {
        Vec<T> acc[kMaxRowSize];
        for (int b = 0; b < p; ++b) acc[b] = Vec<T>{};
        for (int j = 0; j < q; ++j) {
          const Vec<T> x = Load(hr + j * CB + k0);
          for (int b = 0; b < p; ++b) acc[b] += mat[b * q + j] * x;
        }
        for (int b = 0; b < p; ++b) Store(tile[b] + k0, acc[b]);
      }
      for (int b = 0; b < p; ++b) {
        if (out.scale != nullptr) {  // wa_tf.quantizers.fake_quant, value for value
          const T s = out.scale[out.scales == 1 ? 0 : a * p + b];
          for (int k = 0; k < CB; ++k) {
            tile[b][k] = QuantCode(tile[b][k], s, out.qmin, out.qmax) * s;
          }
        }
        T* dst = runs + b * out.position_stride + static_cast<int64_t>(tw) * channels;
        if (cb == CB) {
          for (int k = 0; k < CB; ++k) dst[k] = tile[b][k];
        } else {
          std::memcpy(dst, tile[b], cb * sizeof(T));
        }
      }
    }
  }
}

// Prefetches the (p*p, tiles, C) tensor z's runs of the row of tiles that starts at tile
// `first` (all channels): the row a thread works on next, for reading or (kWrite) writing.
// The row kernels read or write z in p*p runs (or p at a time) a few cache lines long, too
// many streams for the hardware prefetcher, and stalled on memory without this: at
// 64x32x32x32 (F4) the prefetch made the A_t gradient ~25 %, the B_t one ~10 %, the
// codes-reading output transform ~15 % and the input transform ~8 % faster (a one-off
// in-process A/B on a 2-core AVX-512 EPYC).
template <bool kWrite = false, typename Z>
void PrefetchRuns(const Z* z, int pp, int n_w, int channels, int64_t tiles, int64_t first) {
  const int64_t bytes = static_cast<int64_t>(n_w) * channels * sizeof(Z);
  for (int ab = 0; ab < pp; ++ab) {
    const char* run = reinterpret_cast<const char*>(z + (ab * tiles + first) * channels);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(run + off, kWrite, 3);
  }
}

// A (p*p, tiles, C) tensor in z's layout as the row kernels read it: values of type T, or
// integer codes Z decoded as wa_tf.quantizers.from_codes decodes them, code * step with
// the step of the position (`steps` of them: 1, or p*p).
template <typename T, typename Z = T>
struct TileInput {
  const Z* data;
  const T* step = nullptr;
  int64_t steps = 0;

  // The step of position ab (1 for values).
  T Step(int ab) const { return step == nullptr ? T(1) : step[steps == 1 ? 0 : ab]; }

  // Takes the codes' step from `step_tensor`: one value, or one per position of `codes`.
  Status SetStep(const Tensor& codes, const Tensor& step_tensor) {
    steps = step_tensor.NumElements();
    TF_RETURN_IF_ERROR(CheckScale(codes, steps, "codes"));  // codes' first axis: p*p
    step = step_tensor.flat<T>().data();
    return Status();
  }
};

// Copies one tile's run of z (cb of CB lanes) to dst, zero-padded to CB lanes, decoding
// codes with their step s as wa_tf.quantizers.from_codes does.
template <typename T, int CB, typename Z>
inline void LoadRun(const Z* src, T s, int cb, T* __restrict__ dst) {
  if constexpr (!std::is_same<Z, T>::value) {
    if (cb == CB) {  // a compile-time count: no remainder loop
      for (int k = 0; k < CB; ++k) dst[k] = static_cast<T>(src[k]) * s;
      return;
    }
    for (int k = 0; k < cb; ++k) dst[k] = static_cast<T>(src[k]) * s;
  } else if (cb == CB) {
    for (int k = 0; k < CB; ++k) dst[k] = src[k];
    return;
  } else {
    std::memcpy(dst, src, cb * sizeof(T));
  }
  std::fill(dst + cb, dst + CB, T(0));
}

// Copies the row's tiles of z (p*p, tiles, C), channels [c0, c0 + cb), to buf[tw][a*p + b]
// (zero-padded to CB lanes), reading z run by run (decoding codes); with the first block of
// channels, prefetches the row starting at tile `next_first` (none if negative).
template <typename T, int CB, typename Z>
void LoadTiles(const TileInput<T, Z>& z, int p, int n_w, int64_t first, int64_t tiles,
               int channels, int c0, int cb, int64_t next_first, T* __restrict__ buf) {
  if (c0 == 0 && next_first >= 0) PrefetchRuns(z.data, p * p, n_w, channels, tiles, next_first);
  for (int ab = 0; ab < p * p; ++ab) {
    const Z* run = z.data + (ab * tiles + first) * channels + c0;
    const T s = z.Step(ab);
    for (int tw = 0; tw < n_w; ++tw) {
      LoadRun<T, CB>(run + static_cast<int64_t>(tw) * channels, s, cb,
                     buf + (static_cast<int64_t>(tw) * p * p + ab) * CB);
    }
  }
}

// zp[a][j] = sum_b Z[a][b] P[b][j] for one tile (Z: p*p*CB, zp: p*q*CB).
template <typename T, int CB, typename PS, typename QS>
inline void TimesMat(const T* __restrict__ zt, const T* __restrict__ mat, PS p, QS q,
                     T* __restrict__ zp) {
  constexpr int L = Lanes<T>();
  for (int a = 0; a < p; ++a) {
    for (int k0 = 0; k0 < CB; k0 += L) {
      Vec<T> acc[kMaxRowSize];
      for (int j = 0; j < q; ++j) acc[j] = Vec<T>{};
      for (int b = 0; b < p; ++b) {
        const Vec<T> v = Load(zt + (a * p + b) * CB + k0);
        for (int j = 0; j < q; ++j) acc[j] += mat[b * q + j] * v;
      }
      for (int j = 0; j < q; ++j) Store(zp + (a * q + j) * CB + k0, acc[j]);
    }
  }
}

// Columns v of the transform's gradient that AccumulateTileMatGrad sums at once.  With
// AVX-512 and p >= 6, two or three: each value of Z P and Z loaded serves them all, and
// their 2p or 3p sums are independent chains of multiply-adds (32 registers hold them).
// Otherwise one: a Vec is already two AVX2 registers, and for p = 4 (F2) two columns were
// ~10 % slower, where they made the F4 A_t gradient ~8 % faster (the same A/B as
// PrefetchRuns).
inline int MatGradColumns(int p, int q) {
#ifdef __AVX512F__
  return p < 6 ? 1 : q % 3 == 0 ? 3 : 2;
#else
  (void)p;
  (void)q;
  return 1;
#endif
}

// Columns v0 .. v0 + NV - 1 of AccumulateTileMatGrad: per vector of lanes, X's rows v and
// (P X)'s columns v are loaded once for the p sums of each, and Z P's and Z's values once
// for the NV columns.
template <int NV, typename T, int CB, typename PS, typename QS>
inline void AccumulateColumns(const T* __restrict__ zp, const T* __restrict__ zt,
                              const T* __restrict__ h, const RowSource<T, CB>& src, PS p,
                              QS q, int wt, int col0, int v0, T* __restrict__ acc) {
  constexpr int L = Lanes<T>();
  const T* x[NV][kMaxRowSize];
  for (int w = 0; w < NV; ++w) {
    for (int j = 0; j < q; ++j) {
      x[w][j] = src.at(v0 + w, col0 + j);
      if (x[w][j] == nullptr) x[w][j] = Zeros<T, CB>();
    }
  }
  const T* hv = h + (static_cast<int64_t>(col0) + v0) * CB;
  for (int k0 = 0; k0 < CB; k0 += L) {
    Vec<T> sum[NV][kMaxRowSize];
    for (int w = 0; w < NV; ++w) {
      for (int u = 0; u < p; ++u) sum[w][u] = Vec<T>{};
    }
    for (int j = 0; j < q; ++j) {
      Vec<T> xj[NV];
      for (int w = 0; w < NV; ++w) xj[w] = Load(x[w][j] + k0);
      for (int u = 0; u < p; ++u) {
        const Vec<T> zpu = Load(zp + (u * q + j) * CB + k0);
        for (int w = 0; w < NV; ++w) sum[w][u] += zpu * xj[w];
      }
    }
    for (int a = 0; a < p; ++a) {
      Vec<T> pxa[NV];
      for (int w = 0; w < NV; ++w) {
        pxa[w] = Load(hv + (static_cast<int64_t>(a) * wt + w) * CB + k0);
      }
      for (int u = 0; u < p; ++u) {
        const Vec<T> zau = Load(zt + (a * p + u) * CB + k0);
        for (int w = 0; w < NV; ++w) sum[w][u] += zau * pxa[w];
      }
    }
    for (int w = 0; w < NV; ++w) {
      for (int u = 0; u < p; ++u) {
        T* o = acc + (u * q + v0 + w) * CB + k0;
        Store(o, Load(o) + sum[w][u]);
      }
    }
  }
}

// For tile tw of the row: acc[u][v] += (Z P X^T)[u][v] + (Z^T P X)[u][v], per lane, from
// zp = Z P (p*q), Z (p*p), the vertical pass h = P X of the image rows and the rows
// themselves (X[v][j] = rows[v][tw*s + j]), MatGradColumns columns v at a time.
template <typename T, int CB, typename PS, typename QS>
inline void AccumulateTileMatGrad(const T* __restrict__ zp, const T* __restrict__ zt,
                                  const T* __restrict__ h, const RowSource<T, CB>& src, PS p,
                                  QS q, int wt, int col0, T* __restrict__ acc) {
  const int columns = MatGradColumns(p, q);
  int v = 0;
  if (columns == 3) {
    for (; v + 3 <= q; v += 3) AccumulateColumns<3, T, CB>(zp, zt, h, src, p, q, wt, col0, v, acc);
  } else if (columns == 2) {
    for (; v + 2 <= q; v += 2) AccumulateColumns<2, T, CB>(zp, zt, h, src, p, q, wt, col0, v, acc);
  }
  for (; v < q; ++v) AccumulateColumns<1, T, CB>(zp, zt, h, src, p, q, wt, col0, v, acc);
}

// Buffer sizes (in units of CB values) of the row kernels.
// TransformTileRow: the rows' copy (q wt) and h (p wt); with the gradient the row's tiles
// of zin (n_w p p) and Z P of one tile (p q).
inline int64_t TransformRowBuffer(int p, int q, int wt, int n_w, bool grad) {
  return static_cast<int64_t>(q + p) * wt +
         (grad ? static_cast<int64_t>(n_w) * p * p + p * q : 0);
}
// AdjointTileRow: h (p wt) and the p values Z[a][.] of a tile (p, for partial blocks);
// with the gradient the rows' copy (q wt), P X (p wt), the row's tiles of z (n_w p p) and
// Z P of one tile (p q).
inline int64_t AdjointRowBuffer(int p, int q, int wt, int n_w, bool grad) {
  return static_cast<int64_t>(p) * wt + p +
         (grad ? static_cast<int64_t>(q + p) * wt + static_cast<int64_t>(n_w) * p * p + p * q
               : 0);
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

Status CheckMatSize(int p, int q) {
  if (p < 1 || q < 1 || p > kMaxRowSize || q > kMaxRowSize) {
    return InvalidArgument("mat must be between 1 x 1 and ", kMaxRowSize, " x ", kMaxRowSize,
                           ", got ", p, " x ", q);
  }
  return Status();
}

// Per-unit cost hint for the sharder: a row of n_w tiles.
int64_t RowCost(const Geometry& g, int channels, int p, int q, bool grad) {
  return static_cast<int64_t>(g.n_w) * channels * (q * q + p * p) * (p + q) * (grad ? 3 : 1);
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

// The gradient with respect to the Winograd-domain weights U of the element-wise stage
// M = V U (per position, V the tile transform of x, fake-quantized when `scale` has values):
// dU[ab] = V[ab]^T dM[ab], summed over tiles, without V in memory.  V is recomputed block
// of tiles by block with the very code (and so the very values) of WaTileTransform, and
// quantized as wa_tf.quantizers.fake_quant does; the GEMMs run on blocks in cache.  Work
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

#define WA_GEOMETRY_ATTRS                                                              \
  Attr("stride: int").Attr("pad_top: int").Attr("pad_left: int").Attr("n_h: int")      \
      .Attr("n_w: int").Attr("T: {float, double}")

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
// one per position), decoded as wa_tf.quantizers.from_codes decodes them, tile by tile.
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

REGISTER_OP("WaTileTransformAdjoint")
    .Input("z: T")
    .Input("mat: T")
    .Output("x: T")
    .Attr("height: int")
    .Attr("width: int")
    .WA_GEOMETRY_ATTRS
    .SetShapeFn(AdjointShape);

// WaTileTransformAdjoint with z given as its integer codes and their step (one, or one per
// position), decoded as wa_tf.quantizers.from_codes decodes them, tile by tile.
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

// The kernel class comes last: its template arguments hold commas.
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

#define WA_REGISTER_KERNEL(name, type, ...)                                                 \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name(name).Device(::tensorflow::DEVICE_CPU).TypeConstraint<type>("T"), __VA_ARGS__);

#define WA_REGISTER_CODES(type, codes)                                                      \
  REGISTER_KERNEL_BUILDER(Name("WaTileTransformAdjointGradCodes")                           \
                              .Device(::tensorflow::DEVICE_CPU)                             \
                              .TypeConstraint<type>("T")                                    \
                              .TypeConstraint<codes>("Tcodes"),                             \
                          TileTransformOp<type, true, codes>);                              \
  REGISTER_KERNEL_BUILDER(Name("WaTileTransformAdjointCodes")                               \
                              .Device(::tensorflow::DEVICE_CPU)                             \
                              .TypeConstraint<type>("T")                                    \
                              .TypeConstraint<codes>("Tcodes"),                             \
                          TileTransformAdjointOp<type, false, codes>);
#define WA_REGISTER(type)                                                                   \
  WA_REGISTER_CODES(type, int8_t)                                                           \
  WA_REGISTER_CODES(type, int16_t)                                                          \
  WA_REGISTER_KERNEL("WaTileTransform", type, TileTransformOp<type, false>)                 \
  WA_REGISTER_KERNEL("WaTileTransformAdjointGrad", type, TileTransformOp<type, true>)       \
  WA_REGISTER_KERNEL("WaTileTransformAdjoint", type, TileTransformAdjointOp<type, false>)   \
  WA_REGISTER_KERNEL("WaTileTransformGrad", type, TileTransformAdjointOp<type, true>)       \
  WA_REGISTER_KERNEL("WaTileTransformWeightGrad", type, TileTransformWeightGradOp<type>)

WA_REGISTER(float)
WA_REGISTER(double)

}  // namespace wa_tf
