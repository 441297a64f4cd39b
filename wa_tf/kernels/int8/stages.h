// The input and output transforms, written as loops over a block of channels that the compiler
// vectorizes for whichever ISA the including file is compiled for (one copy per variant, as each
// file's functions live in an anonymous namespace).  Integer values stay exact: int32 for the
// input transform (|B| |d| t^2 <= 2^27 at 8 bits), double for the output transform (partial sums
// below 2^53 by the choice of the tap weights' fraction bits).
#ifndef WA_TF_KERNELS_INT8_STAGES_H_
#define WA_TF_KERNELS_INT8_STAGES_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "winograd_int8.h"

namespace wa_int8 {
namespace {

constexpr int kCB = 64;  // channels (filters) per pass of the generic loops


inline double Requant(double acc, double mult, int lo, int hi) {
  double q = std::rint(acc * mult);  // round half to even, as numpy.rint
  return std::min(std::max(q, static_cast<double>(lo)), static_cast<double>(hi));
}

// The Winograd-domain stages' requantisation: float32 throughout (integer.requantize_f32).
inline int RequantF(int32_t acc, float mult, int lo, int hi) {
  const float q = std::rint(static_cast<float>(acc) * mult);
  return static_cast<int>(std::min(std::max(q, static_cast<float>(lo)), static_cast<float>(hi)));
}

// The lane operations of the portable variant; an ISA variant passes its own (same results).
struct PortableOps {
  static void StoreV(I32x8 acc, float mult, int lo, int hi, int16_t* out) {
    for (int i = 0; i < 8; ++i) out[i] = static_cast<int16_t>(RequantF(acc[i], mult, lo, hi));
  }
  static F64x4 LoadM(const int8_t* src) {
    return F64x4{static_cast<double>(src[0]), static_cast<double>(src[1]),
                 static_cast<double>(src[2]), static_cast<double>(src[3])};
  }
  static F64x4 MulAdd(F64x4 a, F64x4 b, F64x4 c) { return a * b + c; }  // exact: integers
  static void StoreY(F64x4 acc, double mult, int lo, int hi, int8_t* out, int n) {
    for (int i = 0; i < n; ++i) out[i] = static_cast<int8_t>(Requant(acc[i], mult, lo, hi));
  }
  // StoreY, then the epilogue: z = clip(rint(y * scale + offset)) (a multiply, then an add).
  static void StoreZ(F64x4 acc, double mult, int lo, int hi, const double* scale,
                     const double* offset, int z_lo, int z_hi, int8_t* out, int n) {
    for (int i = 0; i < n; ++i) {
      const double y = Requant(acc[i], mult, lo, hi);
      out[i] = static_cast<int8_t>(Requant(y * scale[i] + offset[i], 1.0, z_lo, z_hi));
    }
  }
};

// Tile `tile` of the batch: image, first input row and column (may be negative: padding).
inline void TileOrigin(const Plan& p, const Geometry& g, int tile, int* n, int* y0, int* x0) {
  const int per_image = g.n_h * g.n_w;
  *n = tile / per_image;
  const int rest = tile % per_image;
  *y0 = (rest / g.n_w) * p.m - g.pad;
  *x0 = (rest % g.n_w) * p.m - g.pad;
}

// Input transform of tiles [first, first + count) into rows [0, count) of each tap's rows x cp
// block at v, 8 channels at a time with the tile held in vectors (t a compile-time constant,
// so the loops unroll and the accumulators stay in registers).  Lanes past C are zeros.
template <int T, class Ops>
void InputTransformT(const Plan& p, const Geometry& g, const int8_t* x, int first, int count,
                     int rows, int16_t* v) {
  const int c = p.c, cp = p.cp;
  for (int tile = 0; tile < count; ++tile) {
    int n, y0, x0;
    TileOrigin(p, g, first + tile, &n, &y0, &x0);
    for (int c0 = 0; c0 < c; c0 += 8) {
      const int nc = std::min(8, c - c0);
      I32x8 d[T][T];
      for (int a = 0; a < T; ++a) {
        const int yy = y0 + a;
        for (int b = 0; b < T; ++b) {
          const int xx = x0 + b;
          d[a][b] = I32x8{};
          if (yy < 0 || yy >= g.h || xx < 0 || xx >= g.w) continue;
          const int8_t* src = x + ((static_cast<int64_t>(n) * g.h + yy) * g.w + xx) * c + c0;
          if (nc == 8) {
            typedef int8_t I8x8 __attribute__((vector_size(8)));
            I8x8 bytes;
            std::memcpy(&bytes, src, 8);
            d[a][b] = __builtin_convertvector(bytes, I32x8);
          } else {
            for (int cc = 0; cc < nc; ++cc) d[a][b][cc] = src[cc];
          }
        }
      }
      // tmp[a][j] = sum_i B[a][i] d[i][j], column by column: d's column and tmp's stay in
      // registers, B comes broadcast from the plan.
      I32x8 tmp[T][T];
      for (int j = 0; j < T; ++j) {
        for (int a = 0; a < T; ++a) {
          I32x8 acc = p.bt_lanes[a * T] * d[0][j];
          for (int i = 1; i < T; ++i) acc += p.bt_lanes[a * T + i] * d[i][j];
          tmp[a][j] = acc;
        }
      }
      for (int a = 0; a < T; ++a) {  // V[a][b] = sum_j tmp[a][j] B[b][j], requantised per tap
        for (int b = 0; b < T; ++b) {
          I32x8 acc = p.bt_lanes[b * T] * tmp[a][0];
          for (int j = 1; j < T; ++j) acc += p.bt_lanes[b * T + j] * tmp[a][j];
          const int tap = a * T + b;
          Ops::StoreV(acc, p.mult_v[tap], p.v_min, p.v_max,
                      v + (static_cast<int64_t>(tap) * rows + tile) * cp + c0);
        }
      }
    }
  }
}

// Output transform of the block's tiles, filters [k0, k1), 4 at a time in double.  Column
// by column first (s[a][b] = sum_j A[a][j] w[j][b] M[j][b], the tap weights folded into
// aw[a][j][b] = A[a][j] w[j][b], exact), then row by row: each pass holds one column or row
// and its sums in registers (the whole t x t tile would spill).  Every partial sum is an
// integer below 2^53, so any order gives the reference's exact values.
template <int T, int M, class Ops>
void OutputTransformT(const Plan& p, const Geometry& g, const int8_t* mm, int first, int count,
                      int rows, int k0, int k1, int8_t* y) {
  const int kp = p.kp, k_end = std::min(k1, p.k);
  for (int tile = 0; tile < count; ++tile) {
    int n, y0, x0;
    TileOrigin(p, g, first + tile, &n, &y0, &x0);
    y0 += g.pad;  // the output tile's origin
    x0 += g.pad;
    const int rows_out = std::min(M, g.out_h - y0), cols_out = std::min(M, g.out_w - x0);
    const int8_t* src = mm + static_cast<int64_t>(tile) * kp;
    const int64_t tap_stride = static_cast<int64_t>(rows) * kp;
    int8_t* out_tile = y + ((static_cast<int64_t>(n) * g.out_h + y0) * g.out_w + x0) * p.k;
    for (int c0 = k0; c0 < k_end; c0 += 4) {
      const int nc = std::min(4, k_end - c0);
      F64x4 s[M][T];
#pragma GCC unroll 8
      for (int b = 0; b < T; ++b) {
        F64x4 col[T];
#pragma GCC unroll 8
        for (int j = 0; j < T; ++j) col[j] = Ops::LoadM(src + (j * T + b) * tap_stride + c0);
#pragma GCC unroll 8
        for (int a = 0; a < M; ++a) {
          F64x4 acc = p.aw_lanes[a][0][b] * col[0];
#pragma GCC unroll 8
          for (int j = 1; j < T; ++j) acc = Ops::MulAdd(p.aw_lanes[a][j][b], col[j], acc);
          s[a][b] = acc;
        }
      }
      F64x4 bias;
      std::memcpy(&bias, p.bias.data() + c0, sizeof(bias));
#pragma GCC unroll 8
      for (int a = 0; a < M; ++a) {
        if (a >= rows_out) break;
#pragma GCC unroll 8
        for (int b = 0; b < M; ++b) {
          if (b >= cols_out) break;
          F64x4 acc = p.at_lanes[b * T] * s[a][0];
#pragma GCC unroll 8
          for (int j = 1; j < T; ++j) acc = Ops::MulAdd(p.at_lanes[b * T + j], s[a][j], acc);
          int8_t* out = out_tile + (static_cast<int64_t>(a) * g.out_w + b) * p.k + c0;
          if (p.epi) {
            Ops::StoreZ(acc + bias, p.mult_y, p.y_min, p.y_max, p.epi_scale.data() + c0,
                        p.epi_offset.data() + c0, p.z_min, p.z_max, out, nc);
          } else {
            Ops::StoreY(acc + bias, p.mult_y, p.y_min, p.y_max, out, nc);
          }
        }
      }
    }
  }
}

// Calls fn(std::integral_constant<int, t>()) for the tile input size t (1..8), so that a
// stage runs with t a compile-time constant.
template <typename Fn>
inline void WithTileSize(int t, Fn&& fn) {
  switch (t) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    case 5: return fn(std::integral_constant<int, 5>());
    case 6: return fn(std::integral_constant<int, 6>());
    case 7: return fn(std::integral_constant<int, 7>());
    default: return fn(std::integral_constant<int, 8>());
  }
}

template <class Ops>
void InputTransformAny(const Plan& p, const Geometry& g, const int8_t* x, int first, int count,
                       int rows, int16_t* v) {
  WithTileSize(p.t, [&](auto t) {
    InputTransformT<decltype(t)::value, Ops>(p, g, x, first, count, rows, v);
  });
}

// F(m, r) for r = 1, 3, 5, 7 and t = m + r - 1 <= 8: every (t, m) pair of the same parity.
#define WA_INT8_OUTPUT(T, M) \
  case T * 16 + M: return OutputTransformT<T, M, Ops>(p, g, mm, first, count, rows, k0, k1, y)

template <class Ops>
void OutputTransformAny(const Plan& p, const Geometry& g, const int8_t* mm, int first, int count,
                        int rows, int k0, int k1, int8_t* y) {
  switch (p.t * 16 + p.m) {
    WA_INT8_OUTPUT(1, 1); WA_INT8_OUTPUT(2, 2); WA_INT8_OUTPUT(3, 3); WA_INT8_OUTPUT(3, 1);
    WA_INT8_OUTPUT(4, 4); WA_INT8_OUTPUT(4, 2); WA_INT8_OUTPUT(5, 5); WA_INT8_OUTPUT(5, 3);
    WA_INT8_OUTPUT(5, 1); WA_INT8_OUTPUT(6, 6); WA_INT8_OUTPUT(6, 4); WA_INT8_OUTPUT(6, 2);
    WA_INT8_OUTPUT(7, 7); WA_INT8_OUTPUT(7, 5); WA_INT8_OUTPUT(7, 3); WA_INT8_OUTPUT(7, 1);
    WA_INT8_OUTPUT(8, 8); WA_INT8_OUTPUT(8, 6); WA_INT8_OUTPUT(8, 4); WA_INT8_OUTPUT(8, 2);
    default: return;  // even r: refused when the kernel is created
  }
}

#undef WA_INT8_OUTPUT

// Element-wise stage without intrinsics: rows x [k0, k1) per tap, from the packed U.
inline void HadamardLoops(const Plan& p, const int16_t* v, int rows, int count, int tap0,
                          int tap1, int k0, int k1, int8_t* mm) {
  const int cp = p.cp, kp = p.kp, pairs = p.cp / 2, kblocks = p.kp / kNR;
  alignas(64) int32_t acc[kNR];
  for (int tap = tap0; tap < tap1; ++tap) {
    const float mult = p.mult_m[tap];
    for (int kb = k0 / kNR; kb < k1 / kNR; ++kb) {
      const int8_t* u = p.u_packed.data() + (static_cast<int64_t>(tap) * kblocks + kb) * pairs * 2 * kNR;
      for (int row = 0; row < count; ++row) {
        const int16_t* vr = v + (static_cast<int64_t>(tap) * rows + row) * cp;
        for (int kk = 0; kk < kNR; ++kk) acc[kk] = 0;
        for (int c2 = 0; c2 < pairs; ++c2) {
          const int32_t v0 = vr[2 * c2], v1 = vr[2 * c2 + 1];
          const int8_t* uc = u + c2 * 2 * kNR;
          for (int kk = 0; kk < kNR; ++kk) acc[kk] += v0 * uc[2 * kk] + v1 * uc[2 * kk + 1];
        }
        int8_t* out = mm + (static_cast<int64_t>(tap) * rows + row) * kp + kb * kNR;
        for (int kk = 0; kk < kNR; ++kk) {
          out[kk] = static_cast<int8_t>(RequantF(acc[kk], mult, p.m_min, p.m_max));
        }
      }
    }
  }
}

}  // namespace
}  // namespace wa_int8

#endif  // WA_TF_KERNELS_INT8_STAGES_H_
