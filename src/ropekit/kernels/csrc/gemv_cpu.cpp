// Decode-time kernels for CPU: matrix-vector products that stream the weights once, and
// single-query attention over a static KV cache.
//
// Decoding one token reads every weight once and does 2 flops per weight: it is bound by
// memory bandwidth. Each kernel cuts the output rows into ~128 KB chunks of weights that the
// threads claim one at a time (see Pool); within a chunk a thread reads row after row, front to
// back (one sequential read stream per thread).
//
// Weights: float32 or bfloat16, 2-D row-major contiguous [N, K]. Activations are float32
// (bfloat16 weights are widened exactly to float32 and multiplied in float32).
// The vector paths are picked at compile time: the build uses -march=native (one cached build
// per CPU kind), so AVX-512 code is only compiled where the CPU has it; AVX2+FMA next; a plain
// loop otherwise. kernel_isa() says which one was compiled.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
inline void cpu_relax() { _mm_pause(); }
#else
inline void cpu_relax() {}
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "generic";
#endif

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---- threads: a small pool whose caller never waits for a helper that has not started ---------
// A decode step runs ~150 short parallel sections. With at::parallel_for (OpenMP) each one ends in
// a barrier that waits for every thread, so on a shared machine a thread the OS has parked costs a
// whole scheduler slice (measured: 2 threads 3x slower than 1 under load). Here the work is cut
// into chunks that the caller and the helpers claim one at a time; the caller returns when every
// chunk is done, and a helper that wakes late finds nothing left. On an idle machine both threads
// take chunks and it is as fast as OpenMP.
class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: helpers are detached and outlive main()
    return *pool;
  }

  // fn(c) for every chunk c in [0, n), on up to `threads` threads (the caller included).
  template <typename F>
  void run(int64_t n, int threads, const F& fn) {
    if (n <= 0) return;
    if (threads <= 1 || n == 1 || n > kMaxChunks) {
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    ensure_helpers(threads - 1);
    call_.store(&invoke<F>, std::memory_order_relaxed);
    ctx_.store(&fn, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (ticket_.load(std::memory_order_relaxed) >> 40) + 1;
    ticket_.store(((gen & kGenMask) << 40) | (static_cast<uint64_t>(n) << 20), std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) generation_.notify_all();
    work();
    while (done_.load(std::memory_order_acquire) < n) cpu_relax();
  }

 private:
  // ticket: generation (24 bits) | chunk count (20 bits) | next chunk (20 bits). A claim is a CAS
  // on the whole word, so it fails if a newer job was published; a successful claim means the job
  // is unfinished, so call_/ctx_ (written before the ticket) still describe it.
  static constexpr uint64_t kGenMask = (uint64_t{1} << 24) - 1;
  static constexpr int64_t kMaxChunks = (int64_t{1} << 20) - 1;
  static constexpr auto kSpin = std::chrono::microseconds(200);  // then sleep on a futex

  template <typename F>
  static void invoke(const void* ctx, int64_t c) {
    (*static_cast<const F*>(ctx))(c);
  }

  void work() {
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      const int64_t n = static_cast<int64_t>((t >> 20) & kMaxChunks), c = static_cast<int64_t>(t & kMaxChunks);
      if (c >= n) return;
      auto call = call_.load(std::memory_order_relaxed);
      const void* ctx = ctx_.load(std::memory_order_relaxed);
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      call(ctx, c);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void helper_loop() {
    uint32_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
        cpu_relax();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          generation_.wait(seen, std::memory_order_seq_cst);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          start = std::chrono::steady_clock::now();
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      work();
    }
  }

  void ensure_helpers(int wanted) {
    while (static_cast<int>(helpers_.load(std::memory_order_relaxed)) < wanted) {
      std::thread([this] { helper_loop(); }).detach();
      helpers_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> sleepers_{0}, helpers_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<void (*)(const void*, int64_t)> call_{nullptr};
  std::atomic<const void*> ctx_{nullptr};
};

std::atomic<bool> g_use_pool{true};

// fn(begin, end) over [0, total) in chunks of `grain`: on the pool, or with at::parallel_for.
template <typename F>
void parallel_chunks(int64_t total, int64_t grain, const F& fn) {
  if (total <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = at::get_num_threads();
  if (!g_use_pool.load(std::memory_order_relaxed)) {
    at::parallel_for(0, total, grain, fn);
    return;
  }
  const int64_t chunks = (total + grain - 1) / grain;
  Pool::instance().run(chunks, threads, [&](int64_t c) { fn(c * grain, std::min(total, (c + 1) * grain)); });
}

// ---- the dot product of one weight row with the input vector ------------------------------
// A row is read front to back: one sequential stream per thread, which the hardware prefetcher
// follows best (measured: 1.7x the bandwidth of reading four rows side by side). Four
// accumulators hide the FMA latency.

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_mask(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_mask(const uint16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename W>
inline float dot_row(const W* __restrict__ w, const float* __restrict__ x, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(load16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(load16(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(load16(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(x + k), a0);
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    a1 = _mm512_fmadd_ps(load16_mask(w + k, m), _mm512_maskz_loadu_ps(m, x + k), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_float(v); }

template <typename W>
inline float dot_row(const W* __restrict__ w, const float* __restrict__ x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
  const __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float total = _mm_cvtss_f32(s);
  for (; k < K; ++k) total += widen(w[k]) * x[k];
  return total;
}

#else
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_float(v); }

template <typename W>
inline float dot_row(const W* __restrict__ w, const float* __restrict__ x, int64_t K) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += widen(w[k]) * x[k];
  return s;
}
#endif

// y[i - begin] (op)= dot(W[i], x) for rows [begin, end) of one matrix.
template <typename W>
inline void rows_block(const W* w, int64_t K, const float* x, float* y, int64_t begin, int64_t end,
                       bool accumulate) {
  for (int64_t i = begin; i < end; ++i, ++y) {
    const float v = dot_row(w + i * K, x, K);
    *y = accumulate ? *y + v : v;
  }
}

template <typename W>
inline void rows_block_any(const at::Tensor& w, const float* x, float* y, int64_t begin, int64_t end,
                           bool accumulate) {
  rows_block(reinterpret_cast<const W*>(w.const_data_ptr()), w.size(1), x, y, begin, end, accumulate);
}

inline void rows(const at::Tensor& w, const float* x, float* y, int64_t begin, int64_t end, bool accumulate) {
  if (w.scalar_type() == at::kFloat) {
    rows_block_any<float>(w, x, y, begin, end, accumulate);
  } else {
    rows_block_any<uint16_t>(w, x, y, begin, end, accumulate);
  }
}

// ---- argument checks and the optional RMSNorm of the input --------------------------------

void check_weight(const at::Tensor& w, int64_t K, const char* what) {
  TORCH_CHECK(w.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), what, ": weight must be a contiguous 2-D [N, K] tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, what,
              ": weight must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.size(1) == K, what, ": weight has K=", w.size(1), " but x has ", K, " elements");
}

void check_vector(const at::Tensor& v, const char* what, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.is_contiguous(), what, ": ", name,
              " must be a contiguous float32 CPU tensor");
}

// The vector the rows are multiplied with: x itself, or RMSNorm(x) * norm_weight (computed
// once, before the threads start: K is small) in `scratch`.
const float* input_vector(const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight, double eps,
                          std::vector<float>& scratch, const char* what) {
  check_vector(x, what, "x");
  const float* xp = x.const_data_ptr<float>();
  if (!norm_weight) return xp;
  const at::Tensor& g = *norm_weight;
  check_vector(g, what, "norm_weight");
  const int64_t K = x.numel();
  TORCH_CHECK(g.numel() == K, what, ": norm_weight has ", g.numel(), " elements, x has ", K);
  const float* gp = g.const_data_ptr<float>();
  double ss = 0.0;
  for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(xp[k]) * xp[k];
  // The model's RMSNorm: x * rsqrt(mean(x^2) + eps), then times the weight, in float32.
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / K) + static_cast<float>(eps));
  scratch.resize(K);
  for (int64_t k = 0; k < K; ++k) scratch[k] = gp[k] * (xp[k] * inv);
  return scratch.data();
}

// Rows per chunk: ~128 KB of weights, long enough to amortize a claim (~0.1 us vs ~5 us of
// streaming), short enough that a parked thread holds little work hostage.
int64_t grain_rows(int64_t K, int64_t itemsize) {
  return std::max<int64_t>(4, (int64_t{128} << 10) / std::max<int64_t>(K * itemsize, 1));
}

// ---- the exported operations -------------------------------------------------------------

// y = W_0 x ++ W_1 x ++ ... (rows of several matrices, one after the other), or y += ... when
// accumulate. With norm_weight, x is replaced by RMSNorm(x) * norm_weight.
// With residual, y = residual + W x (the residual add of a layer, in the same call).
void gemv(const std::vector<at::Tensor>& weights, const at::Tensor& x, const at::Tensor& y, bool accumulate,
          const c10::optional<at::Tensor>& norm_weight, double eps, const c10::optional<at::Tensor>& residual) {
  const char* what = "gemv";
  TORCH_CHECK(!weights.empty(), what, ": no weights");
  std::vector<float> scratch;
  const float* xp = input_vector(x, norm_weight, eps, scratch, what);
  const int64_t K = x.numel();
  std::vector<int64_t> offsets{0};
  for (const auto& w : weights) {
    check_weight(w, K, what);
    offsets.push_back(offsets.back() + w.size(0));
  }
  check_vector(y, what, "y");
  TORCH_CHECK(y.numel() == offsets.back(), what, ": y has ", y.numel(), " elements, the weights have ",
              offsets.back(), " rows");
  float* yp = y.mutable_data_ptr<float>();
  TORCH_CHECK(yp + y.numel() <= xp || xp + K <= yp, what, ": y must not overlap x");
  if (residual) {
    TORCH_CHECK(!accumulate, what, ": residual and accumulate exclude each other");
    check_vector(*residual, what, "residual");
    TORCH_CHECK(residual->numel() == y.numel(), what, ": residual has ", residual->numel(), " elements, y ",
                y.numel());
    std::memmove(yp, residual->const_data_ptr<float>(), sizeof(float) * y.numel());
    accumulate = true;
  }
  const int64_t grain = grain_rows(K, weights[0].element_size());
  parallel_chunks(offsets.back(), grain, [&](int64_t begin, int64_t end) {
    for (size_t m = 0; m < weights.size(); ++m) {
      const int64_t lo = std::max(begin, offsets[m]), hi = std::min(end, offsets[m + 1]);
      if (lo < hi) rows(weights[m], xp, yp + lo, lo - offsets[m], hi - offsets[m], accumulate);
    }
  });
}

// y = silu(W_gate x) * (W_up x): the SwiGLU hidden vector in one pass over both matrices.
void gemv_swiglu(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& x, const at::Tensor& y,
                 const c10::optional<at::Tensor>& norm_weight, double eps) {
  const char* what = "gemv_swiglu";
  std::vector<float> scratch;
  const float* xp = input_vector(x, norm_weight, eps, scratch, what);
  const int64_t K = x.numel(), N = w_gate.size(0);
  check_weight(w_gate, K, what);
  check_weight(w_up, K, what);
  TORCH_CHECK(w_up.size(0) == N, what, ": gate and up have different row counts");
  check_vector(y, what, "y");
  TORCH_CHECK(y.numel() == N, what, ": y has ", y.numel(), " elements, need ", N);
  float* yp = y.mutable_data_ptr<float>();
  parallel_chunks(N, grain_rows(2 * K, w_gate.element_size()), [&](int64_t begin, int64_t end) {
    constexpr int64_t kChunk = 64;  // gate and up rows of a chunk, then combine (stays in L1)
    float up[kChunk];
    for (int64_t lo = begin; lo < end; lo += kChunk) {
      const int64_t hi = std::min(end, lo + kChunk);
      rows(w_gate, xp, yp + lo, lo, hi, false);
      rows(w_up, xp, up, lo, hi, false);
      for (int64_t i = lo; i < hi; ++i) {
        const float g = yp[i];
        yp[i] = g / (1.0f + std::exp(-g)) * up[i - lo];
      }
    }
  });
}

// float32 -> bfloat16, rounding to nearest even (torch's conversion); NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void store_row(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}
inline float cache_value(float v) { return v; }
inline float cache_value(uint16_t v) { return bf16_to_float(v); }

// One token's attention over the cache of one layer, for cache element type C (float or bf16).
template <typename C>
void attend_one(const float* q, const float* k_new, const float* v_new, C* kc, C* vc, int64_t H, int64_t Hkv,
                int64_t S_max, int64_t D, int64_t slot, float sc, float* o) {
  for (int64_t g = 0; g < Hkv; ++g) {
    store_row(kc + (g * S_max + slot) * D, k_new + g * D, D);
    store_row(vc + (g * S_max + slot) * D, v_new + g * D, D);
  }
  const int64_t S = slot + 1, groups = H / Hkv;
  parallel_chunks(H, S * D >= 4096 ? 1 : H, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t h = begin; h < end; ++h) {
      const float* qh = q + h * D;
      const C* kh = kc + (h / groups) * S_max * D;
      const C* vh = vc + (h / groups) * S_max * D;
      float m = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        p[s] = dot_row(kh + s * D, qh, D) * sc;
        m = std::max(m, p[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        p[s] = std::exp(p[s] - m);
        total += p[s];
      }
      float* oh = o + h * D;
      std::fill(oh, oh + D, 0.f);
      for (int64_t s = 0; s < S; ++s) {
        const float ps = p[s] / total;
        const C* vs = vh + s * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) oh[d] += ps * cache_value(vs[d]);
      }
    }
  });
}

// Attention of one new token (all heads) over the cached keys of one layer.
// q: [H * D], k_new/v_new: [Hkv * D] float32 (q and k already rotated). k_new and v_new are first
// written into slot `slot` of k_cache/v_cache ([Hkv, S_max, D], float32 or bfloat16, contiguous;
// bfloat16 rounds to nearest even); then query head h (grouped: kv head h / (H / Hkv)) attends to
// slots 0..slot. out: [H * D] float32. slot_t: a 0-dim int64 tensor, read when the kernel runs (a
// recorded decode step replays with the slot of its own step).
void decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                      const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_t,
                      const at::Tensor& out, double scale) {
  const char* what = "decode_attention";
  TORCH_CHECK(slot_t.numel() == 1 && slot_t.scalar_type() == at::kLong && slot_t.device().is_cpu(), what,
              ": slot must be a one-element int64 CPU tensor");
  const int64_t slot = slot_t.item<int64_t>();
  check_vector(q, what, "q");
  check_vector(k_new, what, "k");
  check_vector(v_new, what, "v");
  check_vector(out, what, "out");
  TORCH_CHECK(k_cache.device().is_cpu() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              what, ": caches must be contiguous float32 or bfloat16 CPU tensors of one dtype");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), what,
              ": caches must be [Hkv, S_max, D] of the same shape");
  const int64_t Hkv = k_cache.size(0), S_max = k_cache.size(1), D = k_cache.size(2);
  TORCH_CHECK(D > 0 && q.numel() % D == 0, what, ": q size ", q.numel(), " is not a multiple of D=", D);
  const int64_t H = q.numel() / D;
  TORCH_CHECK(H > 0 && H % Hkv == 0, what, ": the query heads must be a multiple of the kv heads");
  TORCH_CHECK(k_new.numel() == Hkv * D && v_new.numel() == Hkv * D && out.numel() == H * D, what,
              ": k/v/out sizes do not match the cache");
  TORCH_CHECK(slot >= 0 && slot < S_max, what, ": slot ", slot, " outside the cache of ", S_max, " slots");
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k_new.const_data_ptr<float>();
  const float* vp = v_new.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const float sc = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kFloat) {
    attend_one(qp, kp, vp, k_cache.mutable_data_ptr<float>(), v_cache.mutable_data_ptr<float>(), H, Hkv, S_max, D,
               slot, sc, o);
  } else {
    attend_one(qp, kp, vp, reinterpret_cast<uint16_t*>(k_cache.mutable_data_ptr()),
               reinterpret_cast<uint16_t*>(v_cache.mutable_data_ptr()), H, Hkv, S_max, D, slot, sc, o);
  }
}

// Read every element once (a dot product with ones, the GEMV's own inner loop): the read
// bandwidth the GEMV is measured against.
double stream_sum(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), "stream_sum: contiguous float32 only");
  const float* p = w.const_data_ptr<float>();
  constexpr int64_t kChunk = 4096;
  const int64_t n = w.numel(), chunks = (n + kChunk - 1) / kChunk;
  std::vector<float> ones(kChunk, 1.0f), parts(chunks, 0.0f);
  parallel_chunks(chunks, 32, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      parts[c] = dot_row(p + c * kChunk, ones.data(), std::min(kChunk, n - c * kChunk));
    }
  });
  double total = 0.0;
  for (float v : parts) total += v;
  return total;
}

std::string kernel_isa() { return kIsa; }

// Which threading the kernels use: the pool (default) or at::parallel_for (for A/B runs).
void set_threading(const std::string& name) {
  TORCH_CHECK(name == "pool" || name == "openmp", "set_threading: 'pool' or 'openmp', got '", name, "'");
  g_use_pool.store(name == "pool");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y (+)= [residual +] concat_i(W_i @ [rmsnorm](x))", py::arg("weights"), py::arg("x"),
        py::arg("y"), py::arg("accumulate") = false, py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-5,
        py::arg("residual") = py::none());
  m.def("gemv_swiglu", &gemv_swiglu, "y = silu(W_gate @ x) * (W_up @ x)", py::arg("w_gate"), py::arg("w_up"),
        py::arg("x"), py::arg("y"), py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-5);
  m.def("decode_attention", &decode_attention, "one-token GQA attention over a preallocated cache", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot"), py::arg("out"),
        py::arg("scale"));
  m.def("stream_sum", &stream_sum, "sum of a float32 tensor (a read-bandwidth probe)", py::arg("w"));
  m.def("kernel_isa", &kernel_isa, "which vector path was compiled: avx512, avx2 or generic");
  m.def("set_threading", &set_threading, "'pool' (default) or 'openmp' (at::parallel_for)", py::arg("name"));
}
