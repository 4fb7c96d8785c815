// Fused rotary apply for CPU tensors: reads x once, writes once (in place or into out).
//
// x and out are 4-D with any strides on the first three dims and a contiguous last dim:
// [B, H, T, D] (heads_first) or [B, T, H, D]. cos/sin are float32, contiguous, (N, R/2) or
// (Bc, N, R/2) with Bc in {1, B}. Without positions, the table row of token t is t (N == T); with
// positions (Bp, T) int64, Bp in {1, B}, it is positions[b, t] (the gather fused in).
// Pair i turns (a, b) -> (a cos - b sin, b cos + a sin) in float32 and is rounded once.
// Built with -ffp-contract=off so each product is rounded as in torch's eager reference:
// float32 results then match the reference bit for bit.
//
// Out of place with a large output (more than stream_threshold bytes, default 4 MiB: it would
// not stay in cache anyway), each row is rotated into an L1-resident scratch row and written to
// out with non-temporal (streaming) stores, as glibc's memcpy does for large copies: ordinary
// stores would first read every destination line (read for ownership, ~1.5x the traffic).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#if defined(__F16C__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

// float <-> storage type. Written as plain scalar code that gcc vectorizes (omp simd).
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
// float16 is stored as gcc's native _Float16 (same bits as c10::Half): its conversions
// vectorize (vcvtph2ps / vcvtps2ph with F16C), c10::Half's do not.
inline float to_float(_Float16 v) { return static_cast<float>(v); }

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  // Round to nearest even, NaN stays a quiet NaN: the same rounding as torch's .to(bfloat16).
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  c10::BFloat16 out;
  out.x = (v != v) ? static_cast<uint16_t>(0x7FC0) : rounded;
  return out;
}
template <> inline _Float16 from_float<_Float16>(float v) { return static_cast<_Float16>(v); }  // IEEE RNE

template <typename scalar_t>
inline void rotate_row_generic(const scalar_t* src, scalar_t* dst, const float* __restrict__ c,
                       const float* __restrict__ s, int64_t half, int64_t dim, bool interleaved) {
  // dst may equal src (in place): iteration i reads exactly the elements it writes, and src is
  // not __restrict__ so the compiler may not reload a or b after storing to dst.
  if (interleaved) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      float a = to_float(src[2 * i]), b = to_float(src[2 * i + 1]);
      float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
      dst[2 * i] = from_float<scalar_t>(ac - bs);
      dst[2 * i + 1] = from_float<scalar_t>(bc + as);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      float a = to_float(src[i]), b = to_float(src[i + half]);
      float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
      dst[i] = from_float<scalar_t>(ac - bs);
      dst[i + half] = from_float<scalar_t>(bc + as);
    }
  }
  if (dst != src && 2 * half < dim) {
    std::memcpy(dst + 2 * half, src + 2 * half, sizeof(scalar_t) * (dim - 2 * half));
  }
}

template <typename scalar_t>
inline void rotate_row(const scalar_t* src, scalar_t* dst, const float* __restrict__ c,
                       const float* __restrict__ s, int64_t half, int64_t dim, bool interleaved) {
  rotate_row_generic<scalar_t>(src, dst, c, s, half, dim, interleaved);
}

// gcc 12 keeps _Float16 conversions scalar inside the rotation loop, so float16 rows go
// through a float32 scratch row with explicit 8-wide F16C conversions (an L1-resident detour).
constexpr int64_t kMaxScratch = 2048;

inline void half_to_float(const _Float16* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void float_to_half(const float* src, _Float16* dst, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<_Float16>(src[i]);
}

template <>
inline void rotate_row<_Float16>(const _Float16* src, _Float16* dst, const float* __restrict__ c,
                                 const float* __restrict__ s, int64_t half, int64_t dim, bool interleaved) {
  const int64_t rot = 2 * half;
  if (rot > kMaxScratch) {  // rare: very wide heads take the scalar path
    rotate_row_generic<_Float16>(src, dst, c, s, half, dim, interleaved);
    return;
  }
  float row[kMaxScratch];
  half_to_float(src, row, rot);
  rotate_row_generic<float>(row, row, c, s, half, rot, interleaved);
  float_to_half(row, dst, rot);
  if (dst != src && rot < dim) std::memcpy(dst + rot, src + rot, sizeof(_Float16) * (dim - rot));
}

// Copy n bytes to dst with non-temporal stores where dst is aligned to the vector width; the
// unaligned head and tail (and everything on targets without SSE2) use ordinary stores. The
// caller issues the store fence (_mm_sfence) once its whole chunk is written.
inline void stream_bytes(const char* src, char* dst, size_t n) {
#if defined(__AVX512F__)
  constexpr size_t kVec = 64;
#elif defined(__AVX2__)
  constexpr size_t kVec = 32;
#elif defined(__SSE2__)
  constexpr size_t kVec = 16;
#else
  constexpr size_t kVec = 0;
#endif
  if constexpr (kVec == 0) {
    std::memcpy(dst, src, n);
  } else {
    size_t head = (kVec - reinterpret_cast<uintptr_t>(dst) % kVec) % kVec;
    if (head > n) head = n;
    std::memcpy(dst, src, head);
    size_t i = head;
    for (; i + kVec <= n; i += kVec) {
#if defined(__AVX512F__)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
#elif defined(__AVX2__)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
#elif defined(__SSE2__)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
#endif
    }
    std::memcpy(dst + i, src + i, n - i);
  }
}

inline void store_fence() {
#ifdef __SSE2__
  _mm_sfence();
#endif
}

// Outputs larger than this many bytes take the streaming path (out of place only).
std::atomic<int64_t> g_stream_threshold{int64_t{4} << 20};
// Rows wider than this many bytes keep ordinary stores (the scratch row lives on the stack).
constexpr int64_t kMaxStreamRowBytes = 16384;

template <typename scalar_t>
void rope_kernel(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin,
                 const c10::optional<at::Tensor>& positions, bool interleaved, bool heads_first) {
  const int64_t B = x.size(0), S1 = x.size(1), S2 = x.size(2), D = x.size(3);
  const int64_t half = cos.size(-1), rows = cos.size(-2);
  const int64_t T = heads_first ? S2 : S1;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const int64_t table_batch_stride = (cos.dim() == 3 && cos.size(0) > 1) ? rows * half : 0;
  const scalar_t* xp = static_cast<const scalar_t*>(x.const_data_ptr());
  scalar_t* op = static_cast<scalar_t*>(out.mutable_data_ptr());
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  const int64_t* pp = positions ? positions->const_data_ptr<int64_t>() : nullptr;
  const int64_t pos_batch_stride = (positions && positions->size(0) > 1) ? T : 0;

  const int64_t n_rows = B * S1 * S2;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = op != xp && row_bytes <= kMaxStreamRowBytes &&
                      n_rows * row_bytes > g_stream_threshold.load(std::memory_order_relaxed);
  // About 32K elements per task: big enough to amortize the fork, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    if (stream) {
      alignas(64) char scratch[kMaxStreamRowBytes];
      scalar_t* buf = reinterpret_cast<scalar_t*>(scratch);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i2 = r % S2, i1 = (r / S2) % S1, b = r / (S1 * S2);
        const int64_t t = heads_first ? i2 : i1;
        const int64_t row = pp ? pp[b * pos_batch_stride + t] : t;
        const int64_t table_off = b * table_batch_stride + row * half;
        // Rotation and pass-through channels into the scratch row, then one streamed write.
        rotate_row<scalar_t>(xp + b * xs0 + i1 * xs1 + i2 * xs2, buf, cp + table_off, sp + table_off, half, D,
                             interleaved);
        stream_bytes(scratch, reinterpret_cast<char*>(op + b * os0 + i1 * os1 + i2 * os2), row_bytes);
      }
      store_fence();
      return;
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i2 = r % S2, i1 = (r / S2) % S1, b = r / (S1 * S2);
      const int64_t t = heads_first ? i2 : i1;
      const int64_t row = pp ? pp[b * pos_batch_stride + t] : t;
      const int64_t table_off = b * table_batch_stride + row * half;
      rotate_row<scalar_t>(xp + b * xs0 + i1 * xs1 + i2 * xs2, op + b * os0 + i1 * os1 + i2 * os2,
                    cp + table_off, sp + table_off, half, D, interleaved);
    }
  });
}

void rope_apply(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin,
                const c10::optional<at::Tensor>& positions, bool interleaved, bool heads_first) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "rope_cpu: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "rope_cpu: x and out must be 4-D with the same shape and dtype");
  TORCH_CHECK(x.size(3) <= 1 || (x.stride(3) == 1 && out.stride(3) == 1), "rope_cpu: last dim must be contiguous");
  TORCH_CHECK((cos.dim() == 2 || cos.dim() == 3) && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_cpu: cos/sin must be contiguous float32 (N, R/2) or (Bc, N, R/2)");
  TORCH_CHECK(2 * cos.size(-1) <= x.size(3), "rope_cpu: rotary dim exceeds head dim");
  if (positions) {
    TORCH_CHECK(positions->dim() == 2 && positions->is_contiguous() && positions->scalar_type() == at::kLong,
                "rope_cpu: positions must be contiguous int64 (Bp, T)");
  }
  if (x.numel() == 0) return;
  switch (x.scalar_type()) {
    case at::kFloat: rope_kernel<float>(x, out, cos, sin, positions, interleaved, heads_first); break;
    case at::kBFloat16: rope_kernel<c10::BFloat16>(x, out, cos, sin, positions, interleaved, heads_first); break;
    case at::kHalf: rope_kernel<_Float16>(x, out, cos, sin, positions, interleaved, heads_first); break;
    default: TORCH_CHECK(false, "rope_cpu: unsupported dtype ", x.scalar_type());
  }
}

// Sets the output size (bytes) above which out-of-place calls stream; returns the previous one.
int64_t set_stream_threshold(int64_t bytes) { return g_stream_threshold.exchange(bytes); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rope_apply", &rope_apply, "Fused rotary apply (CPU)", py::arg("x"), py::arg("out"), py::arg("cos"),
        py::arg("sin"), py::arg("positions"), py::arg("interleaved"), py::arg("heads_first"));
  m.def("set_stream_threshold", &set_stream_threshold,
        "Output bytes above which out-of-place calls use streaming stores; returns the previous value",
        py::arg("bytes"));
}
