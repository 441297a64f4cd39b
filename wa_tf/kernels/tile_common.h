// What the tile-transform kernels (tile_transform.cc, tile_adjoint.cc,
// tile_weight_grad.cc; their design at the top of tile_transform.cc) share: the tile
// geometry and the checks of attributes and shapes, the dispatch of the channel block
// and transform size to compile-time constants, the fixed-order sum of the transform's
// gradient, the vector types the row kernels are written in and the image rows a row of
// tiles reads.  Several files include it: everything is a template or inline, in
// wa_tf::tiles.

#ifndef WA_TF_KERNELS_TILE_COMMON_H_
#define WA_TF_KERNELS_TILE_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace wa_tf {
namespace tiles {

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
inline constexpr int64_t kMaxExtent = int64_t{1} << 24;

inline Status ReadGeometry(OpKernelConstruction* ctx, Geometry* g) {
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
inline Status CheckSide(const char* name, int value) {
  if (value < 0 || value > kMaxExtent) {
    return InvalidArgument(name, " must be between 0 and ", kMaxExtent, ", got ", value);
  }
  return Status();
}

// A shape built without TensorShape's CHECK on overflowing sizes.
inline Status MakeShape(std::initializer_list<int64_t> dims, TensorShape* shape) {
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
inline constexpr int kMaxRowSize = 16;

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

inline Status CheckMatSize(int p, int q) {
  if (p < 1 || q < 1 || p > kMaxRowSize || q > kMaxRowSize) {
    return InvalidArgument("mat must be between 1 x 1 and ", kMaxRowSize, " x ", kMaxRowSize,
                           ", got ", p, " x ", q);
  }
  return Status();
}

// Per-unit cost hint for the sharder: a row of n_w tiles.
inline int64_t RowCost(const Geometry& g, int channels, int p, int q, bool grad) {
  return static_cast<int64_t>(g.n_w) * channels * (q * q + p * p) * (p + q) * (grad ? 3 : 1);
}

}  // namespace tiles
}  // namespace wa_tf

// The attributes every tile op has.
#define WA_GEOMETRY_ATTRS                                                              \
  Attr("stride: int").Attr("pad_top: int").Attr("pad_left: int").Attr("n_h: int")      \
      .Attr("n_w: int").Attr("T: {float, double}")

// Registers a CPU kernel for type T; the kernel class comes last: its template arguments
// hold commas.
#define WA_REGISTER_KERNEL(name, type, ...)                                                 \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name(name).Device(::tensorflow::DEVICE_CPU).TypeConstraint<type>("T"), __VA_ARGS__);

#endif  // WA_TF_KERNELS_TILE_COMMON_H_
