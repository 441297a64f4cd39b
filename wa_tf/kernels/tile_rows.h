// The row kernels' building blocks (see tile_transform.cc for the design): the vertical
// and horizontal passes of a transform P X P^T over a row of tiles, the prefetch of the
// next row's runs, the reading of tiles in the Winograd layout (values or codes) and the
// accumulation of the transform's gradient tile by tile.  Templates and inline functions
// in wa_tf::tiles, included by several kernel files.

#ifndef WA_TF_KERNELS_TILE_ROWS_H_
#define WA_TF_KERNELS_TILE_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "tile_common.h"

namespace wa_tf {
namespace tiles {

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
// fake-quantized as wa_tf.quantization.quantizers.fake_quant does when `out.scale` is set.  Position
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
        if (out.scale != nullptr) {  // wa_tf.quantization.quantizers.fake_quant, value for value
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
// integer codes Z decoded as wa_tf.quantization.quantizers.from_codes decodes them, code * step with
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
// codes with their step s as wa_tf.quantization.quantizers.from_codes does.
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

}  // namespace tiles
}  // namespace wa_tf

#endif  // WA_TF_KERNELS_TILE_ROWS_H_
