// The AVX2 variant (compiled with -mavx2 -mfma): the element-wise stage as int16 pair products
// (vpmaddwd: 16 int8 x int8 MACs into 8 int32 lanes, never saturating, unlike vpmaddubsw), the
// input transform by hand (vpmaddwd, vpmulld), the output transform as the compiler vectorizes
// stages.h for AVX2.
#include "winograd_int8.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <chrono>

#include "stages.h"

namespace wa_int8 {
namespace {

// Requantises 8 int32 accumulators to codes as 8 int16: float multiply, clip, round half to
// even (clipping first is the same for integer bounds, and keeps the conversion in range).
inline __m128i RequantLanes(__m256i acc, __m256 mult, __m256 lo, __m256 hi) {
  __m256 q = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), mult);
  q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
  const __m256i codes = _mm256_cvtps_epi32(q);  // MXCSR's default: round half to even
  return _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
}

// The lane operations of stages.h with AVX2 + FMA intrinsics (same values as PortableOps).
struct Avx2Ops {
  static void StoreV(I32x8 acc, float mult, int lo, int hi, int16_t* out) {
    const __m128i q = RequantLanes(reinterpret_cast<__m256i&>(acc), _mm256_set1_ps(mult),
                                   _mm256_set1_ps(static_cast<float>(lo)),
                                   _mm256_set1_ps(static_cast<float>(hi)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), q);
  }
  static F64x4 LoadM(const int8_t* src) {
    int32_t bytes;
    __builtin_memcpy(&bytes, src, sizeof(bytes));
    return _mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(bytes)));
  }
  static F64x4 MulAdd(F64x4 a, F64x4 b, F64x4 c) { return _mm256_fmadd_pd(a, b, c); }
  static void StoreY(F64x4 acc, double mult, int lo, int hi, int8_t* out, int n) {
    __m256d scaled = _mm256_mul_pd(acc, _mm256_set1_pd(mult));  // clip, then round half even
    scaled = _mm256_min_pd(_mm256_max_pd(scaled, _mm256_set1_pd(lo)), _mm256_set1_pd(hi));
    Store4(_mm256_cvtpd_epi32(scaled), out, n);
  }
  static void StoreZ(F64x4 acc, double mult, int lo, int hi, const double* scale,
                     const double* offset, int z_lo, int z_hi, int8_t* out, int n) {
    __m256d y = _mm256_round_pd(_mm256_mul_pd(acc, _mm256_set1_pd(mult)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y = _mm256_min_pd(_mm256_max_pd(y, _mm256_set1_pd(lo)), _mm256_set1_pd(hi));
    __m256d z = _mm256_add_pd(_mm256_mul_pd(y, _mm256_loadu_pd(scale)),  // no FMA: the
                              _mm256_loadu_pd(offset));                   // reference rounds twice
    z = _mm256_min_pd(_mm256_max_pd(z, _mm256_set1_pd(z_lo)), _mm256_set1_pd(z_hi));
    Store4(_mm256_cvtpd_epi32(z), out, n);
  }
  static void Store4(__m128i q, int8_t* out, int n) {  // n <= 4 int32 lanes as int8
    q = _mm_packs_epi16(_mm_packs_epi32(q, q), q);
    const int32_t bytes = _mm_cvtsi128_si32(q);
    if (n == 4) {
      __builtin_memcpy(out, &bytes, sizeof(bytes));
    } else {
      __builtin_memcpy(out, &bytes, n);
    }
  }
};


inline void Store16(int8_t* out, __m128i lo8, __m128i hi8) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(lo8, hi8));
}

// acc += x in place.  Written with intrinsics, GCC adds into a fresh register and copies it
// back: six extra moves per step of the GEMM's inner loop, which then issued ~26 instructions
// for 6 vpmaddwd and ran front-end bound.
inline void AddTo(__m256i& acc, __m256i x) { __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(x)); }

// R <= kMR rows x kNR filters of one tap: V rows (int16 pairs broadcast) x packed U (int8 ->
// int16), then requantised into M.
template <int R>
inline void MicroKernel(const int16_t* v, int cp, int pairs, const int8_t* u, __m256 mult,
                        __m256 lo, __m256 hi, int8_t* out, int kp) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int c2 = 0; c2 < pairs; ++c2) {
    const __m256i u0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
    const __m256i u1 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 16)));
    u += 2 * kNR;
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, v + r * cp + 2 * c2, sizeof(pair));
      const __m256i vb = _mm256_set1_epi32(pair);
      AddTo(acc[r][0], _mm256_madd_epi16(vb, u0));
      AddTo(acc[r][1], _mm256_madd_epi16(vb, u1));
    }
  }
  for (int r = 0; r < R; ++r) {
    Store16(out + static_cast<int64_t>(r) * kp, RequantLanes(acc[r][0], mult, lo, hi),
            RequantLanes(acc[r][1], mult, lo, hi));
  }
}

// Input transform with vpmaddwd: pass 1 pairs neighbouring rows of the tile, pass 2 pairs
// neighbouring columns of B_t d, as int16; when a learned B_t row sums past 255, B_t d may
// not fit int16 and pass 2 multiplies int32 lanes instead (vpmulld; cheaper than splitting
// B_t d into bytes for two vpmaddwd passes).  8 channels per step, t a compile-time constant.
inline __m256i BtPair(const Plan& p, int row, int pair) {
  return reinterpret_cast<const __m256i&>(p.bt_pairs[row][pair]);
}

inline __m256i BtLane(const Plan& p, int i) {  // B_t's entry i broadcast to int32 lanes
  return reinterpret_cast<const __m256i&>(p.bt_lanes[i]);
}

inline __m256i Pair(__m256i lo, __m256i hi) {  // int16 pairs (lo, hi) of two int32 vectors
  return _mm256_blend_epi16(lo, _mm256_slli_epi32(hi, 16), 0xAA);
}

template <int T, bool kWide>
void InputTransformAvx2T(const Plan& p, const Geometry& g, const int8_t* x, int first, int count,
                         int rows, int16_t* v) {
  constexpr int P = (T + 1) / 2;
  const int c = p.c, cp = p.cp;
  for (int tile = 0; tile < count; ++tile) {
    int n, y0, x0;
    TileOrigin(p, g, first + tile, &n, &y0, &x0);
    for (int c0 = 0; c0 < c; c0 += 8) {
      const int nc = std::min(8, c - c0);
      __m256i d[T + 1][T];
      #pragma GCC unroll 8
      for (int a = 0; a < T; ++a) {
        const int yy = y0 + a;
        #pragma GCC unroll 8
        for (int b = 0; b < T; ++b) {
          const int xx = x0 + b;
          d[a][b] = _mm256_setzero_si256();
          if (yy < 0 || yy >= g.h || xx < 0 || xx >= g.w) continue;
          const int8_t* src = x + ((static_cast<int64_t>(n) * g.h + yy) * g.w + xx) * c + c0;
          if (nc == 8) {
            int64_t bytes;
            __builtin_memcpy(&bytes, src, 8);
            d[a][b] = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bytes));
          } else {
            alignas(32) int32_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int cc = 0; cc < nc; ++cc) lanes[cc] = src[cc];
            d[a][b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
          }
        }
      }
      #pragma GCC unroll 8
      for (int b = 0; b < T; ++b) d[T][b] = _mm256_setzero_si256();
      // Pairs of neighbouring rows of the tile, once; then row by row of B_t d, each row
      // consumed at once by the second pass (it stays in registers).
      __m256i pairs[P][T];
#pragma GCC unroll 8
      for (int ip = 0; ip < P; ++ip) {
#pragma GCC unroll 8
        for (int j = 0; j < T; ++j) pairs[ip][j] = Pair(d[2 * ip][j], d[2 * ip + 1][j]);
      }
#pragma GCC unroll 8
      for (int a = 0; a < T; ++a) {
        __m256i row[T + 1];  // row[j] = sum_i B[a][i] d[i][j]
#pragma GCC unroll 8
        for (int j = 0; j < T; ++j) {
          __m256i acc = _mm256_madd_epi16(pairs[0][j], BtPair(p, a, 0));
#pragma GCC unroll 8
          for (int ip = 1; ip < P; ++ip) {
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs[ip][j], BtPair(p, a, ip)));
          }
          row[j] = acc;
        }
        row[T] = _mm256_setzero_si256();
        if (kWide) {  // rows of B_t d past int16: int32 products (vpmulld)
#pragma GCC unroll 8
          for (int b = 0; b < T; ++b) {
            __m256i acc = _mm256_mullo_epi32(row[0], BtLane(p, b * T));
#pragma GCC unroll 8
            for (int j = 1; j < T; ++j) {
              acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(row[j], BtLane(p, b * T + j)));
            }
            const int tap = a * T + b;
            Avx2Ops::StoreV(reinterpret_cast<I32x8&>(acc), p.mult_v[tap], p.v_min, p.v_max,
                            v + (static_cast<int64_t>(tap) * rows + tile) * cp + c0);
          }
          continue;
        }
        __m256i lo[P];
#pragma GCC unroll 8
        for (int jp = 0; jp < P; ++jp) lo[jp] = Pair(row[2 * jp], row[2 * jp + 1]);
#pragma GCC unroll 8
        for (int b = 0; b < T; ++b) {  // V[a][b] = sum_j row[j] B[b][j]
          __m256i acc = _mm256_madd_epi16(lo[0], BtPair(p, b, 0));
#pragma GCC unroll 8
          for (int jp = 1; jp < P; ++jp) {
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(lo[jp], BtPair(p, b, jp)));
          }
          const int tap = a * T + b;
          Avx2Ops::StoreV(reinterpret_cast<I32x8&>(acc), p.mult_v[tap], p.v_min, p.v_max,
                          v + (static_cast<int64_t>(tap) * rows + tile) * cp + c0);
        }
      }
    }
  }
}

void InputTransformAvx2(const Plan& p, const Geometry& g, const int8_t* x, int first, int count,
                        int rows, int16_t* v) {
  WithTileSize(p.t, [&](auto t) {
    constexpr int T = decltype(t)::value;
    if (p.tmp16) {
      InputTransformAvx2T<T, false>(p, g, x, first, count, rows, v);
    } else {
      InputTransformAvx2T<T, true>(p, g, x, first, count, rows, v);
    }
  });
}

void HadamardAvx2(const Plan& p, const int16_t* v, int rows, int count, int tap0, int tap1,
                  int k0, int k1, int8_t* mm) {
  const int cp = p.cp, kp = p.kp, pairs = p.cp / 2, kblocks = p.kp / kNR;
  const __m256 lo = _mm256_set1_ps(static_cast<float>(p.m_min));
  const __m256 hi = _mm256_set1_ps(static_cast<float>(p.m_max));
  for (int tap = tap0; tap < tap1; ++tap) {
    const __m256 mult = _mm256_set1_ps(p.mult_m[tap]);
    const int16_t* vt = v + static_cast<int64_t>(tap) * rows * cp;
    int8_t* mt = mm + static_cast<int64_t>(tap) * rows * kp;
    for (int kb = k0 / kNR; kb < k1 / kNR; ++kb) {
      const int8_t* u =
          p.u_packed.data() + (static_cast<int64_t>(tap) * kblocks + kb) * pairs * 2 * kNR;
      int row = 0;
      for (; row + kMR <= count; row += kMR) {
        MicroKernel<kMR>(vt + static_cast<int64_t>(row) * cp, cp, pairs, u, mult, lo, hi,
                         mt + static_cast<int64_t>(row) * kp + kb * kNR, kp);
      }
      const int16_t* vr = vt + static_cast<int64_t>(row) * cp;
      int8_t* out = mt + static_cast<int64_t>(row) * kp + kb * kNR;
      switch (count - row) {  // the last rows: no work on padding rows
        case 3: MicroKernel<3>(vr, cp, pairs, u, mult, lo, hi, out, kp); break;
        case 2: MicroKernel<2>(vr, cp, pairs, u, mult, lo, hi, out, kp); break;
        case 1: MicroKernel<1>(vr, cp, pairs, u, mult, lo, hi, out, kp); break;
        default: break;
      }
    }
  }
}

}  // namespace

// The GEMM stage's roofline: 12 independent vpmaddwd chains (latency hidden), timed; the best
// of 5 runs, as a run that another process interrupts reads low.
double avx2_madd_rate() {
  double best = 0.0;
  for (int run = 0; run < 5; ++run) {
    __m256i acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi16(static_cast<int16_t>(i));
    const __m256i b = _mm256_set1_epi16(3);
    constexpr long kRounds = 400000;
    const auto start = std::chrono::steady_clock::now();
    for (long n = 0; n < kRounds; ++n) {
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_madd_epi16(acc[i], b);
      __asm__ volatile("" : "+x"(acc[0]), "+x"(acc[1]), "+x"(acc[2]), "+x"(acc[3]),
                       "+x"(acc[4]), "+x"(acc[5]), "+x"(acc[6]), "+x"(acc[7]), "+x"(acc[8]),
                       "+x"(acc[9]), "+x"(acc[10]), "+x"(acc[11]));
    }
    const double ns = std::chrono::duration<double, std::nano>(
        std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 12.0 * kRounds / ns);
  }
  return best;
}

const Variant* avx2_variant() {
  static const Variant variant{"avx2", InputTransformAvx2, HadamardAvx2,
                               OutputTransformAny<Avx2Ops>};
  return &variant;
}

}  // namespace wa_int8

#else  // built for a CPU family without AVX2: this variant is absent

namespace wa_int8 {
const Variant* avx2_variant() { return nullptr; }
double avx2_madd_rate() { return 0.0; }
}  // namespace wa_int8

#endif
