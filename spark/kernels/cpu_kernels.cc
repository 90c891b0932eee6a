// CPU decode kernels for XLA's FFI (spark/kernels/__init__.py registers and calls them).
//
// Three products of a decode step (N tokens, 1..16; weights stored neuron-major [F, D] as in
// spark/ffn.py; f32 or bf16 weights, f32 inputs and accumulation):
//   spark_gemv_rows    y[N, F] = x[N, D] · W[F, D]ᵀ        (projections, predictor, vocabulary head)
//   spark_gemv_cols    y[N, D] = h[N, F] · W[F, D]         (down projections)
//   spark_ffn_gather   y[N, D] = Σ_{f: a[n, f] ≠ 0} a[n, f] (x2[n] · K2[f]) V[f]
//                                                         (the Spark FFN: only the active rows)
//   spark_attention    decode attention over a KV cache, dense or Spark (below)
//   spark_take_rows    out[N, D] = table[ids] as f32     (the embedding lookup)
// Every weight row is read once per call, whatever N is (the gather reads the union of the
// tokens' index sets). Work is split in a fixed number of chunks over rows, run by the caller and
// XLA's intra-op thread pool; a chunk writes its own partial sum and the partials are added in
// chunk order, so results do not depend on which thread ran what.
//
// `isa` (an attribute): the most capable path to run — 2 AVX-512 (avx512f/bw/vl), 1 AVX2 + FMA,
// 0 portable C++; the best one at or below it that this CPU has runs (checked at run time).

#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARK_X86 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxTokens = 16;

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename W>
inline float load1(const W* p) {
  if constexpr (std::is_same_v<W, uint16_t>) return bf16_to_f32(*p);
  else return *p;
}

// ---------------------------------------------------------------- chunked parallel loop

// The relay: the pool task that helped the last call stays awake for up to `spin_us` µs (0: never),
// polling and yielding its core, and takes the next call's job, instead of the next call scheduling
// a new task: waking a sleeping pool thread cost ~30 µs a call here (README, sessions 42 and 44), and
// a decode step makes ~200 calls. One task at most spins; it holds one of XLA's pool threads while
// it does (so the window is short); a job nobody takes is run by its caller, who then retracts it.
struct Relay {
  std::atomic<int64_t> spin_us{0};  // the window, set by the Python module (set_spin_us)
  std::atomic<int64_t> relayed{0};  // chunks a spinning task ran (the Python module's relayed_chunks)
  std::mutex m;
  std::shared_ptr<std::function<int64_t()>> job;  // posted under m, not yet taken; returns the chunks it ran
  std::atomic<bool> posted{false};  // job is set: polled without taking m
  std::atomic<int> spinners{0};     // tasks in spin_for_jobs (running a job or waiting for one)
} relay;

// Run posted jobs until none comes for spin_us µs (returns at once if another task spins).
void spin_for_jobs() {
  if (relay.spinners.fetch_add(1) > 0) {
    relay.spinners.fetch_sub(1);
    return;
  }
  using clock = std::chrono::steady_clock;
  auto until = clock::now() + std::chrono::microseconds(relay.spin_us.load());
  for (;;) {
    if (relay.posted.load(std::memory_order_acquire)) {
      std::shared_ptr<std::function<int64_t()>> job;
      {
        std::lock_guard<std::mutex> lock(relay.m);
        job = std::move(relay.job);
        relay.posted.store(false);
      }
      if (job) relay.relayed.fetch_add((*job)());
      until = clock::now() + std::chrono::microseconds(relay.spin_us.load());
    } else if (clock::now() > until || relay.spin_us.load() == 0) {
      break;
    } else {
      std::this_thread::yield();  // not a pause loop: a runnable XLA thread may need this core
    }
  }
  relay.spinners.fetch_sub(1);
}

// Runs body(c) for c in [0, n) on the caller and up to num_threads − 1 helpers (the spinning task
// of the relay, else pool tasks); returns when every chunk is done. Helpers that start late find no
// chunk left; the shared state outlives them.
template <typename Body>
void parallel_chunks(ffi::ThreadPool& pool, int64_t n, Body&& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto* fn = &body;
  auto work = [state, fn, n]() {
    int64_t ran = 0;
    for (int64_t c; (c = state->next.fetch_add(1)) < n; ++ran) {
      (*fn)(c);
      state->done.fetch_add(1, std::memory_order_release);
    }
    return ran;
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  bool spin = relay.spin_us.load() > 0;
  std::shared_ptr<std::function<int64_t()>> job;
  if (spin && helpers > 0 && relay.spinners.load() > 0) {
    std::lock_guard<std::mutex> lock(relay.m);
    if (!relay.job) {
      relay.job = job = std::make_shared<std::function<int64_t()>>(work);
      relay.posted.store(true, std::memory_order_release);
    }
  }
  for (int64_t t = job ? 1 : 0; t < helpers; ++t)
    pool.Schedule([work, spin] {
      work();
      if (spin) spin_for_jobs();
    });
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  if (job) {
    std::lock_guard<std::mutex> lock(relay.m);
    if (relay.job == job) relay.job.reset(), relay.posted.store(false);
  }
}

// The split of `rows` rows into ≤ 16 chunks of whole row groups (kGroup), each of at least
// min_rows rows where there are enough; at least one chunk (empty when rows = 0).
struct Chunks {
  int64_t count, per;
};

Chunks plan_chunks(int64_t rows, int64_t min_rows);

// ---------------------------------------------------------------- row-group primitives
//
// A group of nr rows against n_tok tokens (simd_rows.inc has the SIMD paths):
//   dots:  out[r * kMaxTokens + n] = rows[r] · x[n]                 (x rows xs apart)
//   axpys: y[n] += Σ_r a[r * kMaxTokens + n] · rows[r]             (y rows ys apart)

template <typename W>
inline void dots_portable(const W* const* rows, int64_t nr, const float* x, int64_t xs, int64_t n_tok, int64_t d,
                          float* out) {
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t n = 0; n < n_tok; ++n) {
      const W* w = rows[r];
      const float* xp = x + n * xs;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += load1(w + i + j) * xp[i + j];
      float s = 0;
      for (; i < d; ++i) s += load1(w + i) * xp[i];
      for (int j = 0; j < 8; ++j) s += acc[j];
      out[r * kMaxTokens + n] = s;
    }
}

template <typename W>
inline void axpys_portable(const W* const* rows, int64_t nr, const float* a, float* y, int64_t ys, int64_t n_tok,
                           int64_t d) {
  for (int64_t n = 0; n < n_tok; ++n) {
    float* yp = y + n * ys;
    for (int64_t r = 0; r < nr; ++r) {
      float c = a[r * kMaxTokens + n];
      if (c == 0.0f) continue;
      const W* w = rows[r];
      for (int64_t i = 0; i < d; ++i) yp[i] += c * load1(w + i);
    }
  }
}

// ---------------------------------------------------------------- the SIMD paths
//
// simd_rows.inc, compiled once per ISA in its own namespace under a target pragma (so the build
// needs no -march and the CPU is checked at run time): AVX-512 (avx512f/bw/vl, 16 lanes) and
// AVX2 + FMA (8 lanes; x86-64 CPUs without AVX-512, e.g. AMD EPYC before Zen 4).

enum Isa : int32_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };  // ordered: a larger one is preferred
constexpr int64_t kGroup = 4;

#ifdef SPARK_X86
// Everything between the two is compiled for target t (function templates included).
#define SPARK_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define SPARK_TARGET_BEGIN(t) SPARK_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define SPARK_TARGET_END SPARK_PRAGMA(clang attribute pop)
#else
#define SPARK_TARGET_BEGIN(t) SPARK_PRAGMA(GCC push_options) SPARK_PRAGMA(GCC target(t))
#define SPARK_TARGET_END SPARK_PRAGMA(GCC pop_options)
#endif

namespace avx512 {
SPARK_TARGET_BEGIN("avx512f,avx512bw,avx512vl")
struct S {
  using V = __m512;
  static constexpr int64_t L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static float max_all(V v) { return _mm512_reduce_max_ps(v); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {  // 2^n for an integral n in [−126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static V sign_of(V mag, V s) {  // |mag| with the sign of s
    const __m512i m = _mm512_set1_epi32(int32_t(0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(m, _mm512_castps_si512(mag)),
                                               _mm512_and_si512(m, _mm512_castps_si512(s))));
  }
  static V lt(V a, V b, V x, V y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x); }
  static V eq(V a, V b, V x, V y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), y, x); }
  static void split(const uint16_t* p, V& even, V& odd) {
    __m512i raw = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
  }
};
#include "simd_rows.inc"
#include "simd_math.inc"
SPARK_TARGET_END
}  // namespace avx512

namespace avx2 {
SPARK_TARGET_BEGIN("avx2,fma")
struct S {
  using V = __m256;
  static constexpr int64_t L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static float max_all(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {  // 2^n for an integral n in [−126, 127]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static V sign_of(V mag, V s) {  // |mag| with the sign of s
    const __m256 m = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(m, mag), _mm256_and_ps(m, s));
  }
  static V lt(V a, V b, V x, V y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
  static V eq(V a, V b, V x, V y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
  static void split(const uint16_t* p, V& even, V& odd) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
  }
};
#include "simd_rows.inc"
#include "simd_math.inc"
SPARK_TARGET_END
}  // namespace avx2

int32_t cpu_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return kAvx512;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? kAvx2 : kPortable;
}
#else
int32_t cpu_isa() { return kPortable; }
#endif


Chunks plan_chunks(int64_t rows, int64_t min_rows) {
  int64_t count = std::max<int64_t>(1, std::min<int64_t>(16, rows / min_rows));
  int64_t per = std::max<int64_t>(kGroup, ((rows + count - 1) / count + kGroup - 1) / kGroup * kGroup);
  return {std::max<int64_t>(1, (rows + per - 1) / per), per};
}

// Calls fn with the weight buffer's data typed by its element type (f32, or bf16 as uint16_t).
template <typename Fn>
ffi::Error with_weights(const ffi::AnyBuffer& w, const char* what, Fn&& fn) {
  if (w.element_type() == ffi::DataType::F32) return fn(w.typed_data<float>());
  if (w.element_type() == ffi::DataType::BF16) return fn(reinterpret_cast<const uint16_t*>(w.untyped_data()));
  return ffi::Error::InvalidArgument(std::string(what) + ": weights must be f32 or bf16");
}

// One group of nr ≤ kGroup rows, on the ISA `isa` (run_isa: one this CPU has); `next`: the next
// group's kGroup rows to prefetch (nullptr: none; the SIMD paths only).
template <typename W>
inline void dots(int32_t isa, const W* const* rows, const W* const* next, int64_t nr, const float* x, int64_t xs,
                 int64_t n_tok, int64_t d, float* out) {
#ifdef SPARK_X86
  if (isa == kAvx512) return avx512::dots_rows(rows, next, nr, x, xs, n_tok, d, out);
  if (isa == kAvx2) return avx2::dots_rows(rows, next, nr, x, xs, n_tok, d, out);
#endif
  dots_portable(rows, nr, x, xs, n_tok, d, out);
}

template <typename W>
inline void axpys(int32_t isa, const W* const* rows, const W* const* next, int64_t nr, const float* a, float* y,
                  int64_t ys, int64_t n_tok, int64_t d) {
#ifdef SPARK_X86
  if (isa == kAvx512) return avx512::axpys_rows(rows, next, nr, a, y, ys, n_tok, d);
  if (isa == kAvx2) return avx2::axpys_rows(rows, next, nr, a, y, ys, n_tok, d);
#endif
  axpys_portable(rows, nr, a, y, ys, n_tok, d);
}

#ifdef SPARK_X86
// out[n * os + r] = (w + r·stride)[:d] · x[n] for r < nr, n < n_tok, rows one after another (SIMD paths).
template <typename W>
inline void dots_strided(int32_t isa, const W* w, int64_t nr, int64_t stride, int64_t d, const float* x, int64_t xs,
                         int64_t n_tok, float* out, int64_t os) {
  if (isa == kAvx512) return avx512::dots_ahead_n(w, nr, stride, d, x, xs, n_tok, out, os);
  avx2::dots_ahead_n(w, nr, stride, d, x, xs, n_tok, out, os);
}
#endif

// The next group's row pointers into `next` (contiguous rows r0 + kGroup …); nullptr past the end.
template <typename W>
inline const W* const* next_rows(const W* w, int64_t r0, int64_t end, int64_t d, const W** next) {
  if (r0 + 2 * kGroup > end) return nullptr;
  for (int64_t r = 0; r < kGroup; ++r) next[r] = w + (r0 + kGroup + r) * d;
  return next;
}

// Gathered rows: base + idx[j]·stride for the group at j0 (up to kGroup, idx[j0 + r] < idx.size()),
// and the next group's into `next` if it lies whole before `end` (else nullptr): a jump no hardware
// prefetcher guesses.
template <typename W>
inline const W* const* gathered_rows(const W* base, const std::vector<int32_t>& idx, int64_t j0, int64_t end,
                                     int64_t stride, const W** rows, const W** next) {
  int64_t nr = std::min<int64_t>(kGroup, int64_t(idx.size()) - j0);
  for (int64_t r = 0; r < nr; ++r) rows[r] = base + int64_t(idx[j0 + r]) * stride;
  if (j0 + 2 * kGroup > end) return nullptr;
  for (int64_t r = 0; r < kGroup; ++r) next[r] = base + int64_t(idx[j0 + kGroup + r]) * stride;
  return next;
}

// The ISA to run: the requested one (the `isa` attribute, an Isa) or the best below it this CPU has.
int32_t run_isa(int32_t requested) { return std::clamp(std::min(requested, cpu_isa()), 0, int32_t(kAvx512)); }

// The SIMD paths read bf16 weights in pairs (simd_rows.inc dots_pairs), x in the pair layout of
// half h = their lane count L, and write y in it: n rows of d values, per whole 2·h values the h at
// even offsets then the h at odd ones, a last < 2·h as they are. 0: no pair layout (f32, portable).
template <typename W>
int64_t pair_half(int32_t isa) {
  if (!std::is_same_v<W, uint16_t>) return 0;
  return isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 0;
}

std::vector<float> to_pairs(const float* x, int64_t n, int64_t d, int64_t h) {
  std::vector<float> out(x, x + n * d);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i + 2 * h <= d; i += 2 * h)
      for (int64_t k = 0; k < h; ++k) {
        out[t * d + i + k] = x[t * d + i + 2 * k];
        out[t * d + i + h + k] = x[t * d + i + 2 * k + 1];
      }
  return out;
}

void from_pairs(float* y, int64_t n, int64_t d, int64_t h) {
  float tmp[32];
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i + 2 * h <= d; i += 2 * h) {
      float* p = y + t * d + i;
      for (int64_t k = 0; k < h; ++k) {
        tmp[2 * k] = p[k];
        tmp[2 * k + 1] = p[h + k];
      }
      std::memcpy(p, tmp, 2 * h * sizeof(float));
    }
}

// Adds chunk partials [chunks, N·D] into y [N·D] in chunk order.
void reduce_partials(const std::vector<float>& part, int64_t chunks, int64_t size, float* y) {
  std::memcpy(y, part.data(), size * sizeof(float));
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = part.data() + c * size;
    for (int64_t i = 0; i < size; ++i) y[i] += p[i];
  }
}

ffi::Error check_tokens(int64_t n_tok) {
  if (n_tok < 1 || n_tok > kMaxTokens)
    return ffi::Error::InvalidArgument("spark kernels take 1..16 tokens per call");
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- spark_gemv_rows

// Rows [c·per, min(f, (c + 1)·per)) of y = x · Wᵀ (y rows ys apart); x in the pair layout for bf16.
// One token against rows shorter than 4 KB (`ahead`): the rows one after another (simd_rows.inc
// dots_ahead_n). Measured on an AVX2 host (AMD EPYC), bf16 [13824, 1024] (the Spark predictor):
// 65% -> 90% of the read bandwidth with its one-token predecessor (session 39; dots_ahead_n read as
// much as it on an AVX-512 host, 95% both, and was not re-measured on AVX2); with rows of 2304
// and more the row groups are as fast.
template <typename W>
void rows_chunk(int32_t isa, const float* x, const W* w, float* y, int64_t ys, int64_t n_tok, int64_t f, int64_t d,
                int64_t c, int64_t per) {
  float out[kGroup * kMaxTokens];
  const W* rows[kGroup];
  const W* next[kGroup];
  int64_t end = std::min(f, (c + 1) * per);
#ifdef SPARK_X86
  if (n_tok == 1 && isa != kPortable && d * int64_t(sizeof(W)) < 4096)
    return dots_strided(isa, w + c * per * d, end - c * per, d, d, x, d, 1, y + c * per, ys);
#endif
  for (int64_t r0 = c * per; r0 < end; r0 += kGroup) {
    int64_t nr = std::min(kGroup, f - r0);
    for (int64_t r = 0; r < nr; ++r) rows[r] = w + (r0 + r) * d;
    dots(isa, rows, next_rows(w, r0, end, d, next), nr, x, d, n_tok, d, out);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t n = 0; n < n_tok; ++n) y[n * ys + r0 + r] = out[r * kMaxTokens + n];
  }
}

template <typename W>
ffi::Error gemv_rows(ffi::ThreadPool pool, int32_t isa, const float* x, const W* w, float* y, int64_t n_tok,
                     int64_t f, int64_t d) {
  if (auto e = check_tokens(n_tok); e.failure()) return e;
  isa = run_isa(isa);
  std::vector<float> xp;
  if (int64_t h = pair_half<W>(isa)) x = (xp = to_pairs(x, n_tok, d, h)).data();
  auto [chunks, per] = plan_chunks(f, 64);
  parallel_chunks(pool, chunks, [&](int64_t c) { rows_chunk(isa, x, w, y, f, n_tok, f, d, c, per); });
  return ffi::Error::Success();
}

ffi::Error GemvRows(ffi::ThreadPool pool, int32_t isa, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) return ffi::Error::InvalidArgument("rows: x [N, D], W [F, D]");
  return with_weights(w, "rows", [&](auto* wp) {
    return gemv_rows(pool, isa, x.typed_data(), wp, y->typed_data(), xd[0], wd[0], wd[1]);
  });
}

// ---------------------------------------------------------------- spark_gemv_cols

template <typename W>
ffi::Error gemv_cols(ffi::ThreadPool pool, int32_t isa, const float* h, const W* w, float* y, int64_t n_tok,
                     int64_t f, int64_t d) {
  if (auto e = check_tokens(n_tok); e.failure()) return e;
  isa = run_isa(isa);
  auto [chunks, per] = plan_chunks(f, 64);
  int64_t size = n_tok * d;
  std::vector<float> part(chunks * size, 0.0f);
  parallel_chunks(pool, chunks, [&](int64_t c) {
    float a[kGroup * kMaxTokens];
    const W* rows[kGroup];
    const W* next[kGroup];
    float* yp = part.data() + c * size;
    int64_t end = std::min(f, (c + 1) * per);
    for (int64_t r0 = c * per; r0 < end; r0 += kGroup) {
      int64_t nr = std::min(kGroup, f - r0);
      bool any = false;
      for (int64_t r = 0; r < nr; ++r) {
        rows[r] = w + (r0 + r) * d;
        for (int64_t n = 0; n < n_tok; ++n) any |= (a[r * kMaxTokens + n] = h[n * f + r0 + r]) != 0.0f;
      }
      if (any) axpys(isa, rows, next_rows(w, r0, end, d, next), nr, a, yp, d, n_tok, d);  // zeros: read nothing
    }
  });
  reduce_partials(part, chunks, size, y);
  if (int64_t h = pair_half<W>(isa)) from_pairs(y, n_tok, d, h);
  return ffi::Error::Success();
}

ffi::Error GemvCols(ffi::ThreadPool pool, int32_t isa, ffi::Buffer<ffi::F32> h, ffi::AnyBuffer w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto hd = h.dimensions(), wd = w.dimensions();
  if (hd.size() != 2 || wd.size() != 2 || hd[1] != wd[0]) return ffi::Error::InvalidArgument("cols: h [N, F], W [F, D]");
  return with_weights(w, "cols", [&](auto* wp) {
    return gemv_cols(pool, isa, h.typed_data(), wp, y->typed_data(), hd[0], wd[0], wd[1]);
  });
}

#include "ffn_kernels.inc"

// ---------------------------------------------------------------- spark_take_rows

// out[n] = table[clamp(ids[n])] as f32: an embedding lookup that reads only those rows (XLA:CPU
// computes a bf16 gather by casting the whole table to f32, and hoists that cast out of loops).
template <typename W>
void take_rows(const W* table, const int32_t* ids, float* out, int64_t n, int64_t v, int64_t d) {
  for (int64_t i = 0; i < n; ++i) {
    const W* row = table + std::clamp<int64_t>(ids[i], 0, v - 1) * d;
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = load1(row + j);
  }
}

ffi::Error TakeRows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> out) {
  auto td = table.dimensions();
  if (td.size() != 2 || ids.dimensions().size() != 1 || td[0] < 1)
    return ffi::Error::InvalidArgument("take_rows: table [V, D], ids [N]");
  return with_weights(table, "take_rows", [&](auto* tp) {
    take_rows(tp, ids.typed_data(), out->typed_data(), ids.dimensions()[0], td[0], td[1]);
    return ffi::Error::Success();
  });
}

#include "attention_kernel.inc"

}  // namespace

// Both GEMVs: (x f32, w f32 | bf16) -> y f32, on the intra-op pool, with the ISA attribute.
static auto GemvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Attr<int32_t>("isa")
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkGemvRows, GemvRows, GemvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkGemvCols, GemvCols, GemvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkFfnGather, FfnGather,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int32_t>("isa")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkFfnDecode, FfnDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("width")
                                  .Attr<float>("z")
                                  .Attr<int32_t>("round")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkTakeRows, TakeRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("mode")
                                  .Attr<int32_t>("rank")
                                  .Attr<float>("softcap")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// ---------------------------------------------------------------- the Python module

static PyObject* registrations(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  auto add = [d](const char* name, void* fn) {
    PyObject* cap = PyCapsule_New(fn, nullptr, nullptr);
    PyDict_SetItemString(d, name, cap);
    Py_DECREF(cap);
  };
  add("spark_gemv_rows", reinterpret_cast<void*>(SparkGemvRows));
  add("spark_gemv_cols", reinterpret_cast<void*>(SparkGemvCols));
  add("spark_ffn_gather", reinterpret_cast<void*>(SparkFfnGather));
  add("spark_ffn_decode", reinterpret_cast<void*>(SparkFfnDecode));
  add("spark_attention", reinterpret_cast<void*>(SparkAttention));
  add("spark_take_rows", reinterpret_cast<void*>(SparkTakeRows));
  return d;
}

static PyObject* cpu_isa_py(PyObject*, PyObject*) { return PyLong_FromLong(cpu_isa()); }

static PyObject* set_spin_us_py(PyObject*, PyObject* arg) {
  long long us = PyLong_AsLongLong(arg);
  if (us == -1 && PyErr_Occurred()) return nullptr;
  relay.spin_us.store(std::max<long long>(us, 0));
  Py_RETURN_NONE;
}

static PyObject* relayed_chunks_py(PyObject*, PyObject*) { return PyLong_FromLongLong(relay.relayed.load()); }

static PyMethodDef kMethods[] = {
    {"registrations", registrations, METH_NOARGS, "name -> PyCapsule of each FFI handler"},
    {"cpu_isa", cpu_isa_py, METH_NOARGS, "the best ISA path this CPU runs: 0 portable, 1 AVX2 + FMA, 2 AVX-512"},
    {"set_spin_us", set_spin_us_py, METH_O, "how long (µs) a helper waits awake for the next call; 0: never"},
    {"relayed_chunks", relayed_chunks_py, METH_NOARGS, "how many chunks a waiting (spinning) helper ran so far"},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu", "Spark CPU decode kernels (XLA FFI)", -1, kMethods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
