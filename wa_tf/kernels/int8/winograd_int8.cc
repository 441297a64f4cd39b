// The plan (packed weights, multipliers), the blocked driver with its threads, the ISA dispatch
// and the C interface that wa_tf.kernels.int8 loads with ctypes.
#include "winograd_int8.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace wa_int8 {
namespace {

constexpr int kBlockTiles = 32;  // tiles per block: V and M of a block stay in L2

const Variant* Select(const char* isa) {
#if defined(__x86_64__) || defined(__i386__)
  const bool has_avx2 = avx2_variant() != nullptr && __builtin_cpu_supports("avx2") &&
                        __builtin_cpu_supports("fma");
#else
  const bool has_avx2 = false;
#endif
  if (std::strcmp(isa, "scalar") == 0) return &scalar_variant();
  if (std::strcmp(isa, "avx2") == 0) return has_avx2 ? avx2_variant() : nullptr;
  if (std::strcmp(isa, "auto") == 0) return has_avx2 ? avx2_variant() : &scalar_variant();
  return nullptr;
}

struct Kernel {
  Plan plan;
  const Variant* variant;
};

Geometry MakeGeometry(const Plan& p, int n, int h, int w) {
  Geometry g{};
  g.n = n;
  g.h = h;
  g.w = w;
  g.pad = p.same ? (p.r - 1) / 2 : 0;
  g.out_h = p.same ? h : h - p.r + 1;
  g.out_w = p.same ? w : w - p.r + 1;
  g.n_h = (g.out_h + p.m - 1) / p.m;
  g.n_w = (g.out_w + p.m - 1) / p.m;
  return g;
}

// Work of one block, split among `threads` workers by tiles (transforms) and by filter blocks
// (element-wise stage), with a barrier between stages.
struct Barrier {
  std::atomic<int> count{0};
  std::atomic<int> phase{0};
  int total;
  explicit Barrier(int n) : total(n) {}
  void Wait() {
    const int ph = phase.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) + 1 == total) {
      count.store(0, std::memory_order_relaxed);
      phase.store(ph + 1, std::memory_order_release);
    } else {
      while (phase.load(std::memory_order_acquire) == ph) std::this_thread::yield();
    }
  }
};

// Work of the blocks, split among `threads` workers by tiles (transforms) and by filter blocks
// (element-wise stage), with a barrier between stages.  With `times` (one thread only), the
// seconds of the three stages are added to times[0..2].
void RunBlocks(const Kernel& kernel, const Geometry& g, const int8_t* x, int8_t* y, int tid,
               int threads, Barrier* barrier, int16_t* v, int8_t* mm, double* times = nullptr) {
  const Plan& p = kernel.plan;
  const Variant& var = *kernel.variant;
  const int tiles = g.n * g.n_h * g.n_w;
  const int kblocks = p.kp / kNR;
  using Clock = std::chrono::steady_clock;
  auto lap = [&](Clock::time_point* since, int stage) {
    if (times == nullptr) return;
    const Clock::time_point now = Clock::now();
    times[stage] += std::chrono::duration<double>(now - *since).count();
    *since = now;
  };
  for (int first = 0; first < tiles; first += kBlockTiles) {
    Clock::time_point since = times ? Clock::now() : Clock::time_point();
    const int count = std::min(kBlockTiles, tiles - first);
    const int rows = (count + kMR - 1) / kMR * kMR;  // the row stride of V and M
    // Input transform: this worker's share of the tiles.
    const int t0 = count * tid / threads, t1 = count * (tid + 1) / threads;
    if (t1 > t0) {  // rows [t0, t1) of the block: the pointer moves, the row stride stays
      var.input_transform(p, g, x, first + t0, t1 - t0, rows,
                          v + static_cast<int64_t>(t0) * p.cp);
    }
    if (threads > 1) barrier->Wait();
    lap(&since, 0);
    // Element-wise stage: filter blocks split among the workers (taps when too few blocks).
    if (kblocks >= threads) {
      const int b0 = kblocks * tid / threads, b1 = kblocks * (tid + 1) / threads;
      var.hadamard(p, v, rows, count, 0, p.taps, b0 * kNR, b1 * kNR, mm);
    } else {
      const int a0 = p.taps * tid / threads, a1 = p.taps * (tid + 1) / threads;
      var.hadamard(p, v, rows, count, a0, a1, 0, p.kp, mm);
    }
    if (threads > 1) barrier->Wait();
    lap(&since, 1);
    if (t1 > t0) {
      var.output_transform(p, g, mm + static_cast<int64_t>(t0) * p.kp, first + t0, t1 - t0, rows,
                           0, p.kp, y);
    }
    if (threads > 1) barrier->Wait();  // the block's buffers are reused
    lap(&since, 2);
  }
}

// Persistent workers: a call hands them a job and takes part itself as worker 0.  Idle
// workers spin briefly (back-to-back layers find them awake), then sleep.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  void Run(int threads, const std::function<void(int)>& job) {
    std::lock_guard<std::mutex> serial(run_mu_);
    while (static_cast<int>(workers_.size()) < threads - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id] { Work(id); });
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &job;
      threads_ = threads;
      pending_.store(threads - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job(0);
    while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

 private:
  void Work(int id) {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
      }
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (stop_) return;
      }
      if (id < threads_) {
        (*job_)(id);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* job_ = nullptr;
  int threads_ = 0;
  bool stop_ = false;
};

Pool& GlobalPool() {
  static Pool* pool = new Pool;  // never destroyed: workers may outlive static destructors
  return *pool;
}

void Run(const Kernel& kernel, const int8_t* x, int n, int h, int w, int8_t* y, int threads) {
  const Plan& p = kernel.plan;
  const Geometry g = MakeGeometry(p, n, h, w);
  const size_t rows = (kBlockTiles + kMR - 1) / kMR * kMR;
  const size_t v_size = static_cast<size_t>(p.taps) * rows * p.cp;
  const size_t m_size = static_cast<size_t>(p.taps) * rows * p.kp;
  thread_local std::vector<int16_t> v;
  thread_local std::vector<int8_t> mm;
  if (v.size() < v_size) v.resize(v_size);
  if (mm.size() < m_size) mm.resize(m_size);
  const int tiles = g.n * g.n_h * g.n_w;
  threads = std::max(1, std::min(threads, std::max(tiles, p.kp / kNR)));
  if (threads == 1) {
    RunBlocks(kernel, g, x, y, 0, 1, nullptr, v.data(), mm.data());
    return;
  }
  Barrier barrier(threads);
  int16_t* vp = v.data();
  int8_t* mp = mm.data();
  GlobalPool().Run(threads, [&](int tid) { RunBlocks(kernel, g, x, y, tid, threads, &barrier, vp, mp); });
}

// One thread, the stages timed apart (seconds summed over the blocks, into times[0..2]).
void RunTimed(const Kernel& kernel, const int8_t* x, int n, int h, int w, int8_t* y,
              double* times) {
  const Plan& p = kernel.plan;
  const size_t rows = (kBlockTiles + kMR - 1) / kMR * kMR;
  std::vector<int16_t> v(static_cast<size_t>(p.taps) * rows * p.cp);
  std::vector<int8_t> mm(static_cast<size_t>(p.taps) * rows * p.kp);
  RunBlocks(kernel, MakeGeometry(p, n, h, w), x, y, 0, 1, nullptr, v.data(), mm.data(), times);
}

}  // namespace
}  // namespace wa_int8

using wa_int8::Kernel;
using wa_int8::kNR;

extern "C" {

// Returns a kernel, or nullptr when `isa` is unknown or not available on this CPU.
// bt: t*t B_t codes; at: m*t A_t codes; u: t*t*c*k U codes; mult_v / mult_m / tap_w: t*t;
// bias: k values of bias / s_Y, or nullptr; ranges: {v_min, v_max, m_min, m_max, y_min, y_max}.
void* wa_int8_create(int m, int r, int c, int k, int same, const int8_t* bt, const int8_t* at,
                     const int8_t* u, const double* mult_v, const double* mult_m,
                     const double* tap_w, const double* bias, double mult_y, const int* ranges,
                     const char* isa) {
  const wa_int8::Variant* variant = wa_int8::Select(isa);
  const int t = m + r - 1;
  if (variant == nullptr || t > wa_int8::kMaxT || m < 1 || r < 1 || r % 2 == 0 || c < 1 || k < 1) {
    return nullptr;
  }
  auto* kernel = new Kernel;  // aligned: Plan holds vectors (C++17 aligned new)
  kernel->variant = variant;
  wa_int8::Plan& p = kernel->plan;
  p.m = m;
  p.r = r;
  p.t = t;
  p.taps = t * t;
  p.c = c;
  p.k = k;
  p.cp = (c + 7) / 8 * 8;  // whole vectors of 8 channels
  p.kp = (k + kNR - 1) / kNR * kNR;
  p.same = same != 0;
  for (int i = 0; i < t * t; ++i) {
    p.bt[i] = bt[i];
    p.mult_v[i] = static_cast<float>(mult_v[i]);  // rounded to nearest, as numpy's astype
    p.mult_m[i] = static_cast<float>(mult_m[i]);
    p.tap_w[i] = tap_w[i];
  }
  p.tmp16 = true;
  for (int a = 0; a < t; ++a) {
    // B_t d's extremes over int8 d in [-128, 127]: 127 P + 128 N and -(128 P + 127 N), with
    // P and N the row's positive and negative mass (learned rows sum to ~256: just inside).
    int pos = 0, neg = 0;
    for (int i = 0; i < t; ++i) (p.bt[a * t + i] > 0 ? pos : neg) += std::abs(p.bt[a * t + i]);
    p.tmp16 = p.tmp16 && 127 * pos + 128 * neg <= 32767 && 128 * pos + 127 * neg <= 32768;
    for (int ip = 0; ip < (t + 1) / 2; ++ip) {
      const int lo = p.bt[a * t + 2 * ip], hi = 2 * ip + 1 < t ? p.bt[a * t + 2 * ip + 1] : 0;
      const uint32_t pair = static_cast<uint16_t>(lo) | (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16);
      for (int l = 0; l < 8; ++l) p.bt_pairs[a][ip][l] = static_cast<int32_t>(pair);
    }
  }
  for (int a = 0; a < m; ++a) {
    for (int j = 0; j < t; ++j) {
      for (int b = 0; b < t; ++b) {
        for (int l = 0; l < 4; ++l) p.aw_lanes[a][j][b][l] = at[a * t + j] * p.tap_w[j * t + b];
      }
    }
  }
  for (int i = 0; i < t * t; ++i) {
    for (int l = 0; l < 8; ++l) p.bt_lanes[i][l] = p.bt[i];
    for (int l = 0; l < 4; ++l) p.at_lanes[i][l] = i < m * t ? at[i] : 0.0;
  }
  p.mult_y = mult_y;
  p.v_min = ranges[0];
  p.v_max = ranges[1];
  p.m_min = ranges[2];
  p.m_max = ranges[3];
  p.y_min = ranges[4];
  p.y_max = ranges[5];
  p.bias.assign(p.kp, 0.0);
  if (bias != nullptr) std::copy(bias, bias + k, p.bias.begin());
  const int pairs = p.cp / 2, kblocks = p.kp / kNR;
  p.u_packed.assign(static_cast<size_t>(p.taps) * kblocks * pairs * 2 * kNR, 0);
  for (int tap = 0; tap < p.taps; ++tap) {
    for (int ci = 0; ci < c; ++ci) {
      for (int ki = 0; ki < k; ++ki) {
        const size_t at_ = ((static_cast<size_t>(tap) * kblocks + ki / kNR) * pairs + ci / 2) *
                               2 * kNR + (ki % kNR) * 2 + ci % 2;
        p.u_packed[at_] = u[(static_cast<size_t>(tap) * c + ci) * k + ki];
      }
    }
  }
  return kernel;
}

// Fuses an epilogue into the output stage: z = clip(rint(y * scale[k] + offset[k]), lo, hi)
// per filter k, from the output codes y (a batch norm and a ReLU after the layer).
void wa_int8_set_epilogue(void* kernel, const double* scale, const double* offset, int lo,
                          int hi) {
  wa_int8::Plan& p = static_cast<Kernel*>(kernel)->plan;
  p.epi = true;
  p.epi_scale.assign(p.kp, 0.0);
  p.epi_offset.assign(p.kp, 0.0);
  std::copy(scale, scale + p.k, p.epi_scale.begin());
  std::copy(offset, offset + p.k, p.epi_offset.begin());
  p.z_min = lo;
  p.z_max = hi;
}

void wa_int8_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* wa_int8_isa(void* kernel) { return static_cast<Kernel*>(kernel)->variant->name; }

int wa_int8_filters(void* kernel) { return static_cast<Kernel*>(kernel)->plan.k; }

// Output size of an h x w input: {out_h, out_w}.
void wa_int8_output_size(void* kernel, int h, int w, int* out) {
  const wa_int8::Geometry g = wa_int8::MakeGeometry(static_cast<Kernel*>(kernel)->plan, 1, h, w);
  out[0] = g.out_h;
  out[1] = g.out_w;
}

void wa_int8_run(void* kernel, const int8_t* x, int n, int h, int w, int8_t* y, int threads) {
  wa_int8::Run(*static_cast<Kernel*>(kernel), x, n, h, w, y, threads);
}

// Per-stage seconds of one thread (input transform, element-wise GEMMs, output transform):
// the minimum over `reps` calls of each.  ops[0..2] receive the stages' multiply counts:
// input-transform int32 MACs, GEMM int8 MACs (over the padded tiles), output-transform MACs.
void wa_int8_stage_times(void* kernel, const int8_t* x, int n, int h, int w, int8_t* y, int reps,
                         double* seconds, double* ops) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  const wa_int8::Plan& p = k.plan;
  for (int s = 0; s < 3; ++s) seconds[s] = 1e30;
  for (int i = 0; i < std::max(1, reps); ++i) {
    double t[3] = {0, 0, 0};
    wa_int8::RunTimed(k, x, n, h, w, y, t);
    for (int s = 0; s < 3; ++s) seconds[s] = std::min(seconds[s], t[s]);
  }
  const wa_int8::Geometry g = wa_int8::MakeGeometry(p, n, h, w);
  const double tiles = static_cast<double>(g.n) * g.n_h * g.n_w;
  ops[0] = tiles * p.c * 2.0 * p.t * p.t * p.t;
  ops[1] = tiles * p.taps * static_cast<double>(p.c) * p.k;
  ops[2] = tiles * p.k * (static_cast<double>(p.m) * p.t * p.t + p.m * p.m * p.t);
}

// vpmaddwd per ns this CPU sustains (16 int8 MACs each), or 0 without AVX2.
double wa_int8_madd_per_ns() {
  return wa_int8::Select("avx2") != nullptr ? wa_int8::avx2_madd_rate() : 0.0;
}

}  // extern "C"
