// Native INT8 Winograd inference: the plan every ISA variant runs, and the variants' entry points.
//
// Data flow of one call (NHWC int8 codes in and out), per block of tiles:
//   d (t x t int8, zero padded) --input transform, int32, requant in float--> V int16 [tap][p][c]
//   V x U per tap: int8 x int8 -> int32 GEMM, requant in float --------------> M int8 [tap][p][k]
//   A_t (w * M) A_t^T in double (exact: every partial sum < 2^53), + bias, requant --> y int8
//   optionally y * scale + offset per filter, requant (a fused batch norm and ReLU) --> z int8
// Each requantisation is clip(round_half_even(acc * multiplier)) in IEEE float (V, M) or double
// (y), the reference's arithmetic (wa_tf.deploy.integer), so every variant is bit-exact with it.
#ifndef WA_TF_KERNELS_INT8_WINOGRAD_INT8_H_
#define WA_TF_KERNELS_INT8_WINOGRAD_INT8_H_

#include <cstdint>
#include <vector>

namespace wa_int8 {

constexpr int kMaxT = 8;    // t = m + r - 1 of F(6x6, 3x3)
constexpr int kNR = 16;     // GEMM columns (filters) per micro-tile
constexpr int kMR = 4;      // GEMM rows (tiles) per micro-tile: 4 x 2 accumulators, U, V's
                            // broadcast and two products fit the 16 ymm registers

typedef int32_t I32x8 __attribute__((vector_size(32)));
typedef double F64x4 __attribute__((vector_size(32)));

struct alignas(32) Plan {
  int m, r, t, taps;        // taps = t * t
  int c, k;                 // channels in, filters
  int cp, kp;               // c rounded up to 8 (vectors), k rounded up to kNR
  bool same;                // 'same' padding, else 'valid'
  int32_t bt[kMaxT * kMaxT];            // B_t codes (t x t)
  I32x8 bt_lanes[kMaxT * kMaxT];        // B_t and A_t (m x t) broadcast to vectors
  F64x4 at_lanes[kMaxT * kMaxT];
  F64x4 aw_lanes[kMaxT][kMaxT][kMaxT];  // A_t[a][j] * tap_w[j][b], exact in double
  // B_t's rows as int16 pairs of neighbouring columns (vpmaddwd operands): [row][pair].
  I32x8 bt_pairs[kMaxT][kMaxT / 2];
  bool tmp16;  // B_t d fits int16 for every int8 d
  double tap_w[kMaxT * kMaxT];          // fixed-point tap weights w[a, b]
  float mult_v[kMaxT * kMaxT];          // input transform multiplier per tap (float32)
  float mult_m[kMaxT * kMaxT];          // element-wise stage multiplier per tap (float32)
  double mult_y;                        // output multiplier
  int v_min, v_max, m_min, m_max, y_min, y_max;  // code ranges of V, M, y
  std::vector<double> bias;             // bias / s_Y per filter (kp; zeros when none)
  // The fused epilogue (batch norm, ReLU), when `epi`: z = clip(rint(y * epi_scale + epi_offset),
  // z_min, z_max) per filter, from the output codes y, in double (kp each).
  bool epi = false;
  std::vector<double> epi_scale, epi_offset;
  int z_min = -128, z_max = 127;
  // U packed per tap and block of kNR filters: [tap][k / kNR][c / 2][kNR][2] int8.
  std::vector<int8_t> u_packed;
};

struct Geometry {
  int n, h, w, out_h, out_w, n_h, n_w, pad;
};

// One ISA variant: three stages over a block of `count` tiles starting at tile `first`.
struct Variant {
  const char* name;
  // x -> V block [taps][rows][cp] int16, rows [0, count) (rows: the row stride); the
  // channels past C of the last vector are zeros.
  void (*input_transform)(const Plan&, const Geometry&, const int8_t* x, int first, int count,
                          int rows, int16_t* v);
  // V block x U -> M block [taps][rows][kp] int8 for its first `count` rows, filters [k0, k1)
  // (multiples of kNR).
  void (*hadamard)(const Plan&, const int16_t* v, int rows, int count, int tap0, int tap1,
                   int k0, int k1, int8_t* mm);
  // M block -> y codes of the block's tiles, filters [k0, k1).
  void (*output_transform)(const Plan&, const Geometry&, const int8_t* mm, int first, int count,
                           int rows, int k0, int k1, int8_t* y);
};

const Variant& scalar_variant();
const Variant* avx2_variant();  // nullptr where the library was built without it
double avx2_madd_rate();        // vpmaddwd per ns in a register-only loop (AVX2 CPUs only)

}  // namespace wa_int8

#endif  // WA_TF_KERNELS_INT8_WINOGRAD_INT8_H_
