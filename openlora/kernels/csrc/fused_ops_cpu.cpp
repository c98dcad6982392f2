// Fused elementwise ops of a Llama decoder layer for the CPU: RMSNorm, residual add + RMSNorm, in-place
// RoPE (rotate-half) and SiLU(gate) * up. See openlora/kernels/fused_ops.py for the semantics (the torch
// composites each op must equal), the Python entry points and the fallbacks.
//
// Layouts (T token rows; every last dim contiguous, row strides free):
//   rms_norm       x [T, h] -> out [T, h] contiguous; weight [h] contiguous
//   add_rms_norm_  h [T, h] (updated in place), delta [T, h] -> out [T, h] contiguous
//   rope_          t [T, nh, d] (in place; any row/head strides), cos/sin [T, d]
//   silu_mul       gu [T, 2i] -> out [T, i] contiguous
//   argmax_rows    x [B, V] -> int64 [B]: torch.argmax(x, dim=1) (first maximum; a NaN wins, first NaN)
// dtypes: fp32 or bf16, all operands of a call alike.
//
// Numerics: the kernels replay torch's own rounding steps so results are bit-identical to the composites
// on an AVX-512 build of torch (ATen CPU capability AVX512):
//   * every bf16 result is the round-to-nearest-even of the fp32 value torch computes for it (torch's
//     bf16 elementwise kernels widen to fp32, compute, round once per op);
//   * the sum of squares of RMSNorm follows ATen's cascade_sum (SumKernel.cpp, vectorized_inner_sum:
//     8-lane vectors (AVX2 build), 4 ILP accumulators, cascade levels, scalar tail first, then the lanes in order);
//     mean = sum / h, rsqrt = 1 / sqrt;
//   * SiLU = x / (1 + exp(-x)) with Sleef_expf16_u10 (what Vectorized<float>::exp() calls, exported by
//     libtorch_cpu) on the elements torch's vectorized_loop covers (multiples of 2 vectors per row) and
//     std::exp on the row tail, as cpu_kernel_vec does;
//   * the file is compiled with -ffp-contract=off: a fused multiply-add would round differently from
//     torch's separate mul and add (RoPE).
// Parallelism: rows are split over the intra-op threads with at::parallel_for only when the call touches
// at least g_min_parallel_elems elements; below that the fork/join costs more than the work (measured in
// bench/fused_ops_micro.py) and the call runs on the calling thread.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define OPENLORA_FO_AVX512 1
extern "C" __m512 Sleef_expf16_u10(__m512);  // exported by libtorch_cpu (ATen's Vectorized<float>::exp)
#else
#define OPENLORA_FO_AVX512 0
#endif

namespace {

// Elements (rows x row length; 3 x i for silu_mul) below which a call runs on one thread. From the
// --sweep of bench/fused_ops_micro.py (bf16, 135M shapes): 1 vs 2 threads break even near 8-12k
// (e.g. add_rms_norm T=8 x 576: 18 vs 19 us, T=16: 23 vs 21 us; rope T=16 x 768: 19 vs 18 us).
std::atomic<int64_t> g_min_parallel_elems{8192};

constexpr int kLanes = 16;     // Vectorized<float>::size() in ATen's AVX-512 kernels (silu's exp)
// ATen builds SumKernel (vectorized_inner_sum) for AVX2 only, so even with capability AVX512 the sum runs
// on 8-lane vectors (no AVX512 instantiation in libtorch_cpu; bit-equality in tests confirms it).
constexpr int kSumLanes = 8;
constexpr int kIlp = 4;     // ATen's row_sum ilp_factor
constexpr int kLevels = 4;  // ATen's multi_row_sum num_levels

// --- scalar conversions (identical to c10's bf16 round-to-nearest-even) ---------------------------------

inline float ld(float x) { return x; }
inline float ld(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> inline T st(float f);
template <> inline float st<float>(float f) { return f; }
template <> inline at::BFloat16 st<at::BFloat16>(float f) {
  at::BFloat16 r;
  if (std::isnan(f)) {
    r.x = 0x7FC0;
    return r;
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  r.x = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return r;
}
// Round a float the way a T-typed torch op stores it (identity for fp32).
template <typename T> inline float rnd(float f) { return ld(st<T>(f)); }

#if OPENLORA_FO_AVX512
// 16-lane versions of ld / st / rnd (same bits as the scalar ones, NaN -> 0x7FC0 included).
inline __m512 vld(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 vld(const at::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
// bits of RNE(v) to bf16, kept in the high half of each 32-bit lane (low half zero)
inline __m512i bf16_hi(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                                     _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC00000));
}
inline void vst(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void vst(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_hi(v), 16)));
}
template <typename T> inline __m512 vrnd(__m512 v);
template <> inline __m512 vrnd<float>(__m512 v) { return v; }
template <> inline __m512 vrnd<at::BFloat16>(__m512 v) { return _mm512_castsi512_ps(bf16_hi(v)); }
#endif

// --- parallel driver ---------------------------------------------------------------------------------

template <typename F>
void for_rows(int64_t rows, int64_t elems_per_row, const F& f) {
  if (rows <= 0) return;
  if (rows == 1 || rows * elems_per_row < g_min_parallel_elems.load(std::memory_order_relaxed) ||
      at::get_num_threads() <= 1) {
    f(0, rows);
    return;
  }
  at::parallel_for(0, rows, 1, f);
}

// --- sum of squares in ATen's cascade_sum order ----------------------------------------------------------

inline int64_t ceil_log2(int64_t x) {  // c10 utils::CeilLog2
  if (x <= 2) return 1;
  uint64_t v = static_cast<uint64_t>(x) - 1;
  int64_t bits = 0;
  while (v) {
    ++bits;
    v >>= 1;
  }
  return bits;
}

// sum_k sq[k] for a row of n fp32 squares, W lanes per "element" (W = 16: vectorized_inner_sum; W = 1:
// scalar_inner_sum for rows shorter than one vector). acc arrays are [W] lanes added lane-wise.
template <int W>
float cascade_sum(const float* sq, int64_t n) {
  const int64_t nv = n / W;             // whole W-lane elements
  const int64_t size = nv / kIlp;       // multi_row_sum rows
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  float acc[kLevels][kIlp][W];
  std::memset(acc, 0, sizeof(acc));
  auto add_row = [&](int64_t i) {  // acc[0][k] += element(i * kIlp + k)
    for (int k = 0; k < kIlp; ++k) {
      const float* v = sq + (i * kIlp + k) * W;
      for (int l = 0; l < W; ++l) acc[0][k][l] += v[l];
    }
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  // row_sum: leftover elements into partial 0, then partials 1..3 into partial 0
  for (int64_t e = size * kIlp; e < nv; ++e)
    for (int l = 0; l < W; ++l) acc[0][0][l] += sq[e * W + l];
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  if (W == 1) return acc[0][0][0] ;  // scalar_inner_sum: the tail was part of nv
  // vectorized_inner_sum: scalar tail first, then the lanes in order
  float total = 0.f;
  for (int64_t e = nv * W; e < n; ++e) total += sq[e];
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

inline float sum_squares(const float* sq, int64_t n) {
  return n >= kSumLanes ? cascade_sum<kSumLanes>(sq, n) : cascade_sum<1>(sq, n);
}

// out[c] = w[c] * rnd_T(v[c] * r), v = the row in fp32 (already rounded to T), r = rsqrt(mean(v^2) + eps)
template <typename T>
void norm_row(const float* v, float* sq, int64_t n, const T* w, float eps, T* out) {
  for (int64_t c = 0; c < n; ++c) sq[c] = v[c] * v[c];
  const float ms = sum_squares(sq, n) / static_cast<float>(n);
  const float r = 1.f / std::sqrt(ms + eps);
  int64_t c = 0;
#if OPENLORA_FO_AVX512
  const __m512 rv = _mm512_set1_ps(r);
  for (; c + kLanes <= n; c += kLanes)
    vst(out + c, _mm512_mul_ps(vld(w + c), vrnd<T>(_mm512_mul_ps(vld(v + c), rv))));
#endif
  for (; c < n; ++c) out[c] = st<T>(ld(w[c]) * rnd<T>(v[c] * r));
}

// Per-thread scratch: the row in fp32 and its squares (2 * n floats), reused across calls.
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < 2 * n) buf.resize(2 * n);
  return buf.data();
}

template <typename T>
void rms_norm_impl(const torch::Tensor& x, const torch::Tensor& w, float eps, torch::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1), xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for_rows(rows, n, [&](int64_t b, int64_t e) {
    float* v = scratch(n);
    for (int64_t r = b; r < e; ++r) {
      const T* xr = xp + r * xs;
      int64_t c = 0;
#if OPENLORA_FO_AVX512
      for (; c + kLanes <= n; c += kLanes) vst(v + c, vld(xr + c));
#endif
      for (; c < n; ++c) v[c] = ld(xr[c]);
      norm_row<T>(v, v + n, n, wp, eps, op + r * n);
    }
  });
}

template <typename T>
void add_rms_norm_impl(torch::Tensor& h, const torch::Tensor& d, const torch::Tensor& w, float eps,
                       torch::Tensor& out) {
  const int64_t rows = h.size(0), n = h.size(1), hs = h.stride(0), ds = d.stride(0);
  T* hp = h.data_ptr<T>();
  const T* dp = d.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for_rows(rows, n, [&](int64_t b, int64_t e) {
    float* v = scratch(n);
    for (int64_t r = b; r < e; ++r) {
      T* hr = hp + r * hs;
      const T* dr = dp + r * ds;
      int64_t c = 0;
#if OPENLORA_FO_AVX512
      for (; c + kLanes <= n; c += kLanes) {
        const __m512 sum = vrnd<T>(_mm512_add_ps(vld(hr + c), vld(dr + c)));
        vst(hr + c, sum);
        vst(v + c, sum);
      }
#endif
      for (; c < n; ++c) {
        const T sum = st<T>(ld(hr[c]) + ld(dr[c]));  // h + delta, rounded to T as torch's add
        hr[c] = sum;
        v[c] = ld(sum);
      }
      norm_row<T>(v, v + n, n, wp, eps, op + r * n);
    }
  });
}

// --- RoPE ---------------------------------------------------------------------------------------------

template <typename T>
void rope_impl(torch::Tensor& t, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t rows = t.size(0), nh = t.size(1), d = t.size(2), half = d / 2;
  const int64_t s0 = t.stride(0), s1 = t.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  T* tp = t.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  for_rows(rows, nh * d, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* c = cp + r * cs;
      const T* s = sp + r * ss;
      for (int64_t hh = 0; hh < nh; ++hh) {
        T* x = tp + r * s0 + hh * s1;
        int64_t j = 0;
#if OPENLORA_FO_AVX512
        for (; j + kLanes <= half; j += kLanes) {
          const __m512 x1 = vld(x + j), x2 = vld(x + j + half);
          const __m512 nx2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
          const __m512 a1 = vrnd<T>(_mm512_mul_ps(x1, vld(c + j))), b1 = vrnd<T>(_mm512_mul_ps(nx2, vld(s + j)));
          const __m512 a2 = vrnd<T>(_mm512_mul_ps(x2, vld(c + j + half)));
          const __m512 b2 = vrnd<T>(_mm512_mul_ps(x1, vld(s + j + half)));
          vst(x + j, _mm512_add_ps(a1, b1));
          vst(x + j + half, _mm512_add_ps(a2, b2));
        }
#endif
        for (; j < half; ++j) {
          const float x1 = ld(x[j]), x2 = ld(x[j + half]);
          // t * cos, rot * sin and their sum each rounded to T (three torch ops); rot = (-x2, x1)
          const float a1 = rnd<T>(x1 * ld(c[j])), b1 = rnd<T>(-x2 * ld(s[j]));
          const float a2 = rnd<T>(x2 * ld(c[j + half])), b2 = rnd<T>(x1 * ld(s[j + half]));
          x[j] = st<T>(a1 + b1);
          x[j + half] = st<T>(a2 + b2);
        }
      }
    }
  });
}

// --- SiLU(gate) * up ------------------------------------------------------------------------------------

inline float silu_scalar(float x) { return x / (1.f + std::exp(-x)); }

// out[c] = silu(g[c]) for c < n: vectorized_loop covers [0, n - n % step) in chunks of 2 vectors of T
// (step 32 fp32 / 64 bf16 elements) with Sleef exp; the rest uses the scalar lambda (std::exp).
template <typename T>
void silu_row(const T* g, int64_t n, float* out) {
  constexpr int64_t step = 2 * (64 / sizeof(T));
  const int64_t nvec = OPENLORA_FO_AVX512 ? n - n % step : 0;
  int64_t c = 0;
#if OPENLORA_FO_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; c < nvec; c += kLanes) {
    const __m512 x = vld(g + c);
    const __m512 ex = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_storeu_ps(out + c, _mm512_div_ps(x, _mm512_add_ps(one, ex)));
  }
#endif
  for (; c < n; ++c) out[c] = silu_scalar(ld(g[c]));
}

template <typename T>
void silu_mul_impl(const torch::Tensor& gu, torch::Tensor& out) {
  const int64_t rows = gu.size(0), n = gu.size(1) / 2, gs = gu.stride(0);
  const T* gp = gu.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for_rows(rows, 3 * n, [&](int64_t b, int64_t e) {
    float* a = scratch(n);
    for (int64_t r = b; r < e; ++r) {
      const T* g = gp + r * gs;
      silu_row<T>(g, n, a);
      T* o = op + r * n;
      int64_t c = 0;
#if OPENLORA_FO_AVX512
      for (; c + kLanes <= n; c += kLanes) vst(o + c, _mm512_mul_ps(vrnd<T>(vld(a + c)), vld(g + n + c)));
#endif
      for (; c < n; ++c) o[c] = st<T>(rnd<T>(a[c]) * ld(g[n + c]));
    }
  });
}

// --- argmax over rows (greedy sampling) ---------------------------------------------------------------------
// torch.argmax runs a scalar reduction (~2.2 ms for 32 x 49152 fp32 on this VM); here each row is two
// vector passes over data that stays in L2 (one row is at most a few hundred KB): the maximum (NaN noted),
// then the first index holding it. Comparisons are exact, so the result equals torch's bit for bit,
// including ties (lowest index) and NaN (torch treats NaN as the maximum: first NaN index).

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
#if OPENLORA_FO_AVX512
  __m512 vmax = _mm512_set1_ps(best);
  __mmask16 nan = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const __m512 v = vld(x + c);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  if (nan) c = 0;  // a NaN somewhere in the vector part: the scalar scan below finds the first one
  else best = _mm512_reduce_max_ps(vmax);
#endif
  for (int64_t k = c; k < n; ++k) {
    const float v = ld(x[k]);
    if (std::isnan(v)) return k;
    if (v > best) best = v;
  }
  // First index equal to `best` (no NaN beyond this point). -inf rows: best stays -inf, index 0 matches.
  int64_t k = 0;
#if OPENLORA_FO_AVX512
  const __m512 vb = _mm512_set1_ps(best);
  for (; k + kLanes <= n; k += kLanes) {
    const __mmask16 m = _mm512_cmp_ps_mask(vld(x + k), vb, _CMP_EQ_OQ);
    if (m) return k + __builtin_ctz(static_cast<unsigned>(m));
  }
#endif
  for (; k < n; ++k)
    if (ld(x[k]) == best) return k;
  return 0;
}

template <typename T>
void argmax_impl(const torch::Tensor& x, torch::Tensor& out) {
  const int64_t B = x.size(0), V = x.size(1), xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, g_min_parallel_elems.load() / std::max<int64_t>(1, V));
  at::parallel_for(0, B, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) op[r] = argmax_row<T>(xp + r * xs, V);
  });
}

// --- entry points ---------------------------------------------------------------------------------------
// Each returns None (false for rope_) without touching anything when its inputs are outside the kernel's
// domain (device, dtype, dims, shapes, strides, autograd); the Python wrapper then runs the torch composite,
// which also raises the user-facing errors. Checks are done here because they cost ~0.1 us in C++ and
// ~5 us in Python (the ops are called ~120 times per step).

using OptTensor = c10::optional<torch::Tensor>;

// CPU, dtype `dt` (fp32 or bf16), `dim` dims, last dim contiguous, not needing autograd.
bool fits(const torch::Tensor& t, at::ScalarType dt, int64_t dim) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == dt && t.dim() == dim &&
         (t.stride(dim - 1) == 1 || t.size(dim - 1) <= 1) && !(t.requires_grad() && at::GradMode::is_enabled());
}
bool float_dtype(const torch::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}
bool fits_weight(const torch::Tensor& w, const torch::Tensor& x) {
  return fits(w, x.scalar_type(), 1) && w.size(0) == x.size(1) && w.is_contiguous();
}

OptTensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (!float_dtype(x) || !fits(x, x.scalar_type(), 2) || !fits_weight(weight, x)) return c10::nullopt;
  torch::Tensor out = torch::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kFloat)
    rms_norm_impl<float>(x, weight, static_cast<float>(eps), out);
  else
    rms_norm_impl<at::BFloat16>(x, weight, static_cast<float>(eps), out);
  return out;
}

OptTensor add_rms_norm_(torch::Tensor h, const torch::Tensor& delta, const torch::Tensor& weight, double eps) {
  if (!float_dtype(h) || !fits(h, h.scalar_type(), 2) || !fits(delta, h.scalar_type(), 2) ||
      delta.size(0) != h.size(0) || delta.size(1) != h.size(1) || !fits_weight(weight, h))
    return c10::nullopt;
  torch::Tensor out = torch::empty({h.size(0), h.size(1)}, h.options());
  if (h.scalar_type() == at::kFloat)
    add_rms_norm_impl<float>(h, delta, weight, static_cast<float>(eps), out);
  else
    add_rms_norm_impl<at::BFloat16>(h, delta, weight, static_cast<float>(eps), out);
  return out;
}

bool rope_(torch::Tensor t, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (!float_dtype(t) || !fits(t, t.scalar_type(), 3) || t.size(2) % 2 != 0) return false;
  for (const auto* cs : {&cos, &sin})
    if (!fits(*cs, t.scalar_type(), 2) || cs->size(0) != t.size(0) || cs->size(1) != t.size(2)) return false;
  if (t.scalar_type() == at::kFloat)
    rope_impl<float>(t, cos, sin);
  else
    rope_impl<at::BFloat16>(t, cos, sin);
  return true;
}

OptTensor silu_mul(const torch::Tensor& gu) {
  if (!float_dtype(gu) || !fits(gu, gu.scalar_type(), 2) || gu.size(1) % 2 != 0) return c10::nullopt;
  torch::Tensor out = torch::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  if (gu.scalar_type() == at::kFloat)
    silu_mul_impl<float>(gu, out);
  else
    silu_mul_impl<at::BFloat16>(gu, out);
  return out;
}

OptTensor argmax_rows(const torch::Tensor& x) {
  if (!float_dtype(x) || !fits(x, x.scalar_type(), 2) || x.size(1) == 0) return c10::nullopt;
  torch::Tensor out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kFloat)
    argmax_impl<float>(x, out);
  else
    argmax_impl<at::BFloat16>(x, out);
  return out;
}

// k_cache/v_cache [num_blocks, block_size, KVH, d] (contiguous) at flat row slot[t] <- k[t], v[t] ([T, KVH, d]
// with each token's KVH * d elements contiguous, e.g. head views of the fused qkv buffer). A plain copy
// (bit-exact in any dtype); one call instead of two index_copy_ dispatches per layer. Returns false
// (nothing written) when a slot is out of range or the layouts differ: the composite then raises.
bool write_kv_(torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& k, const torch::Tensor& v,
               const torch::Tensor& slots) {
  if (!k_cache.defined() || k_cache.dim() != 4 || !k_cache.device().is_cpu() || !k_cache.is_contiguous() ||
      !v_cache.is_contiguous() || v_cache.sizes() != k_cache.sizes() || k.dim() != 3 || v.dim() != 3 ||
      k.sizes() != v.sizes() || !k.device().is_cpu() || !v.device().is_cpu() || !slots.device().is_cpu())
    return false;
  const auto dt = k_cache.scalar_type();
  if (v_cache.scalar_type() != dt || k.scalar_type() != dt || v.scalar_type() != dt) return false;
  if ((k_cache.requires_grad() || v_cache.requires_grad()) && at::GradMode::is_enabled()) return false;
  const int64_t T = k.size(0), kvh = k.size(1), d = k.size(2), row = kvh * d;
  if (k_cache.size(2) != kvh || k_cache.size(3) != d) return false;
  for (const auto* x : {&k, &v})
    if (T > 0 && (x->stride(2) != 1 || (kvh > 1 && x->stride(1) != d))) return false;
  if (slots.scalar_type() != at::kLong || slots.dim() != 1 || slots.size(0) != T || !slots.is_contiguous())
    return false;
  const int64_t n_rows = k_cache.size(0) * k_cache.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    if (sl[t] < 0 || sl[t] >= n_rows) return false;
  const int64_t es = static_cast<int64_t>(k_cache.element_size()), bytes = row * es;
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * es, vs = v.stride(0) * es;
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(kc + sl[t] * bytes, kp + t * ks, static_cast<size_t>(bytes));
    std::memcpy(vc + sl[t] * bytes, vp + t * vs, static_cast<size_t>(bytes));
  }
  return true;
}

void set_min_parallel_elems(int64_t n) { g_min_parallel_elems.store(std::max<int64_t>(0, n)); }
int64_t get_min_parallel_elems() { return g_min_parallel_elems.load(); }
bool fo_has_avx512() { return OPENLORA_FO_AVX512 != 0; }

}  // namespace

// The kernels touch no Python object, so they release the GIL: a server's event loop thread can
// run while the engine thread is inside one (see openlora/engine/async_engine.py).
#ifndef OPENLORA_UNITY_BUILD  // csrc/decoder_cpu.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of x [T, h] -> [T, h], or None if unsupported", py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta (in place), then RMSNorm(h) -> [T, h], or None if unsupported", py::call_guard<py::gil_scoped_release>(), py::arg("h"),
        py::arg("delta"), py::arg("weight"), py::arg("eps"));
  m.def("rope_", &rope_, "rotate-half RoPE of t [T, heads, d] in place; False if unsupported", py::call_guard<py::gil_scoped_release>(), py::arg("t"), py::arg("cos"),
        py::arg("sin"));
  m.def("silu_mul", &silu_mul, "silu(gu[:, :i]) * gu[:, i:] -> [T, i], or None if unsupported", py::call_guard<py::gil_scoped_release>(), py::arg("gu"));
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=1) of x [B, V], or None if unsupported",
        py::call_guard<py::gil_scoped_release>(), py::arg("x"));
  m.def("write_kv_", &write_kv_, "k_cache/v_cache rows slot[t] <- k[t], v[t]; False if unsupported",
        py::call_guard<py::gil_scoped_release>(), py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"),
        py::arg("slots"));
  m.def("set_min_parallel_elems", &set_min_parallel_elems, "elements per call below which a call runs on one thread");
  m.def("get_min_parallel_elems", &get_min_parallel_elems);
  m.def("has_avx512", &fo_has_avx512, "whether the AVX-512 (Sleef exp) path was compiled in");
}
#endif  // OPENLORA_UNITY_BUILD
