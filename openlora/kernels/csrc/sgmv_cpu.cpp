// SGMV (segmented gather matrix multiply) for the CPU: y[t] += (S * (x[t] @ A[R]^T)) @ Bt[R] for every
// token t of every segment, with the fp32 intermediate. See openlora/kernels/reference.py for the
// semantics and openlora/lora/batch.py for the metadata.
//
// Plan of one call:
//   * segments with >= mm_min_tokens tokens (prefill chunks) are real GEMMs: gather + at::mm in fp32,
//     run one after the other on the calling thread (at::mm is itself parallel);
//   * all other segments (decode: 1 token; short chunks) are cut into work items of <= kTokBlock tokens
//     and spread over the intra-op threads with at::parallel_for. A work item streams each of its
//     segment's A and Bt rows exactly once, converting bf16/fp16 to fp32 in registers, and applies it to
//     all (<= kTokBlock) tokens of the item, so a distinct adapter's rows are read from memory once.
// Preconditions (checked): a token index appears in at most one segment (items write disjoint y rows).
//
// DoRA (sgmv_dora): a segment with a row-scale entry d > 0 ends in the epilogue
//   y[t] = g[d] * (y[t] + delta[t]) + shift[d]     (fp32, then one rounding; multiply then add, no FMA)
// with g, shift = one layer of the row-scale tables, [E, N] fp32 (shift optional); see openlora/lora/dora.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define OPENLORA_AVX512 1
#else
#define OPENLORA_AVX512 0
#endif

namespace {

constexpr int64_t kTokBlock = 8;    // tokens per work item (dot kernel keeps 2*kTokBlock accumulators)
constexpr int64_t kPrefetchRows = 2;  // shrink: A rows prefetched ahead of the one being read

#if OPENLORA_AVX512

inline __mmask16 tail_mask(int64_t n) {  // n in [1, 16]
  return static_cast<__mmask16>((1u << n) - 1u);
}

// 16 elements of T <-> one __m512 of fp32.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
};

template <>
struct Vec<at::BFloat16> {
  // bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 word.
  static inline __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // fp32 -> bf16 rounding to nearest even, NaN kept quiet: the same rounding as c10::BFloat16.
  static inline __m256i narrow(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static inline __m512 load(const at::BFloat16* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline __m512 load(const at::BFloat16* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  static inline void store(at::BFloat16* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v));
  }
  static inline void store(at::BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
};

template <>
struct Vec<at::Half> {
  static inline __m512 load(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline __m512 load(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static inline __m256i narrow(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store(at::Half* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static inline void store(at::Half* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
};

// Prefetch one row (n elements of T) into L2 while the current row is being used: the rows of a
// segment are arbitrary pool rows, so the hardware prefetcher cannot guess the next one.
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
}

// dst[0:n] = fp32(src[0:n])
template <typename T>
inline void to_fp32(const T* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, Vec<T>::load(src + k));
  if (k < n) _mm512_mask_storeu_ps(dst + k, tail_mask(n - k), Vec<T>::load(src + k, tail_mask(n - k)));
}

// out[t] = dot(xf[t*K : t*K+K], arow[0:K]) for t < NB; xf fp32 [NB, K], arow one A row.
// Two accumulators per token hide the FMA latency when NB is small (decode: NB = 1).
template <typename T, int NB>
inline void dot_block(const float* xf, int64_t K, const T* arow, float* out) {
  __m512 acc0[NB], acc1[NB];
  for (int t = 0; t < NB; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 a0 = Vec<T>::load(arow + k);
    const __m512 a1 = Vec<T>::load(arow + k + 16);
    for (int t = 0; t < NB; ++t) {
      acc0[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xf + t * K + k), a0, acc0[t]);
      acc1[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xf + t * K + k + 16), a1, acc1[t]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, K - k));
    const __m512 a0 = Vec<T>::load(arow + k, m);
    for (int t = 0; t < NB; ++t) acc0[t] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xf + t * K + k), a0, acc0[t]);
  }
  for (int t = 0; t < NB; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
}

// y[tok[t]][c] += sum_j v[t*r + j] * Bt[rows[j]][c] for t < NB, all c < N (one rounding per element).
// Register-blocked: a strip of CV*16 columns of NB tokens is accumulated in zmm registers over all r
// rows, so each Bt element is loaded once and no fp32 accumulator goes through memory.
// The epilogue of one output vector: y + acc, then (DoRA) * g + shift.
inline __m512 finish(__m512 y, __m512 acc, const float* gv, const float* sv, int64_t c) {
  __m512 o = _mm512_add_ps(y, acc);
  if (gv != nullptr) {
    o = _mm512_mul_ps(o, _mm512_loadu_ps(gv + c));
    if (sv != nullptr) o = _mm512_add_ps(o, _mm512_loadu_ps(sv + c));
  }
  return o;
}
inline __m512 finish(__m512 y, __m512 acc, const float* gv, const float* sv, int64_t c, __mmask16 m) {
  __m512 o = _mm512_add_ps(y, acc);
  if (gv != nullptr) {
    o = _mm512_mul_ps(o, _mm512_maskz_loadu_ps(m, gv + c));
    if (sv != nullptr) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(m, sv + c));
  }
  return o;
}

template <typename T, int NB>
inline void expand_block(const float* v, int64_t r, const T* bt, int64_t ldb, const int64_t* rows, T* y,
                         int64_t ldy, const int64_t* tok, int64_t N, const float* gv, const float* sv) {
  constexpr int CV = NB <= 2 ? 4 : 2;  // vectors per token: enough independent FMA chains when NB is small
  constexpr int64_t W = CV * 16;
  int64_t c = 0;
  for (; c + W <= N; c += W) {
    __m512 acc[NB][CV];
    for (int t = 0; t < NB; ++t)
      for (int u = 0; u < CV; ++u) acc[t][u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < r; ++j) {
      const T* brow = bt + rows[j] * ldb + c;
      __m512 b[CV];
      for (int u = 0; u < CV; ++u) b[u] = Vec<T>::load(brow + 16 * u);
      for (int t = 0; t < NB; ++t) {
        const __m512 vt = _mm512_set1_ps(v[t * r + j]);
        for (int u = 0; u < CV; ++u) acc[t][u] = _mm512_fmadd_ps(vt, b[u], acc[t][u]);
      }
    }
    for (int t = 0; t < NB; ++t) {
      T* yrow = y + tok[t] * ldy + c;
      for (int u = 0; u < CV; ++u)
        Vec<T>::store(yrow + 16 * u, finish(Vec<T>::load(yrow + 16 * u), acc[t][u], gv, sv, c + 16 * u));
    }
  }
  for (; c < N; c += 16) {  // tail: one masked vector at a time
    const __mmask16 m = tail_mask(std::min<int64_t>(16, N - c));
    __m512 acc[NB];
    for (int t = 0; t < NB; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < r; ++j) {
      const __m512 b = Vec<T>::load(bt + rows[j] * ldb + c, m);
      for (int t = 0; t < NB; ++t) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(v[t * r + j]), b, acc[t]);
    }
    for (int t = 0; t < NB; ++t) {
      T* yrow = y + tok[t] * ldy + c;
      Vec<T>::store(yrow, finish(Vec<T>::load(yrow, m), acc[t], gv, sv, c, m), m);
    }
  }
}

#else  // portable scalar fallback (the compiler vectorizes the element-wise loops)

template <typename T>
inline void prefetch_row(const T*, int64_t) {}

template <typename T>
inline void to_fp32(const T* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

template <typename T, int NB>
inline void dot_block(const float* xf, int64_t K, const T* arow, float* out) {
  for (int t = 0; t < NB; ++t) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += xf[t * K + k] * static_cast<float>(arow[k]);
    out[t] = s;
  }
}

template <typename T, int NB>
inline void expand_block(const float* v, int64_t r, const T* bt, int64_t ldb, const int64_t* rows, T* y,
                         int64_t ldy, const int64_t* tok, int64_t N, const float* gv, const float* sv) {
  std::vector<float> acc(N);
  for (int t = 0; t < NB; ++t) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < r; ++j) {
      const T* brow = bt + rows[j] * ldb;
      const float vt = v[t * r + j];
      for (int64_t c = 0; c < N; ++c) acc[c] += vt * static_cast<float>(brow[c]);
    }
    T* yrow = y + tok[t] * ldy;
    if (gv == nullptr) {
      for (int64_t c = 0; c < N; ++c) yrow[c] = static_cast<T>(static_cast<float>(yrow[c]) + acc[c]);
    } else {
      for (int64_t c = 0; c < N; ++c) {
        float o = (static_cast<float>(yrow[c]) + acc[c]) * gv[c];
        if (sv != nullptr) o = o + sv[c];
        yrow[c] = static_cast<T>(o);
      }
    }
  }
}

#endif

template <typename T>
inline void dot_dispatch(int64_t nb, const float* xf, int64_t K, const T* arow, float* out) {
  switch (nb) {
    case 1: dot_block<T, 1>(xf, K, arow, out); break;
    case 2: dot_block<T, 2>(xf, K, arow, out); break;
    case 3: dot_block<T, 3>(xf, K, arow, out); break;
    case 4: dot_block<T, 4>(xf, K, arow, out); break;
    case 5: dot_block<T, 5>(xf, K, arow, out); break;
    case 6: dot_block<T, 6>(xf, K, arow, out); break;
    case 7: dot_block<T, 7>(xf, K, arow, out); break;
    default: dot_block<T, 8>(xf, K, arow, out); break;
  }
}
template <typename T>
inline void expand_dispatch(int64_t nb, const float* v, int64_t r, const T* bt, int64_t ldb, const int64_t* rows,
                            T* y, int64_t ldy, const int64_t* tok, int64_t N, const float* gv, const float* sv) {
  switch (nb) {
    case 1: expand_block<T, 1>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
    case 2: expand_block<T, 2>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
    case 3: expand_block<T, 3>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
    case 4: expand_block<T, 4>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
    case 5: expand_block<T, 5>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
    case 6: expand_block<T, 6>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
    case 7: expand_block<T, 7>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
    default: expand_block<T, 8>(v, r, bt, ldb, rows, y, ldy, tok, N, gv, sv); break;
  }
}
static_assert(kTokBlock == 8, "dot_dispatch / expand_dispatch cover 1..8 tokens");

struct Operands {
  int64_t K, N;                 // in_features, out_features
  int64_t ldx, lda, ldb, ldy;   // row strides in elements
};

struct Scratch {
  std::vector<float> xf;   // [kTokBlock, K]: the item's x rows in fp32
  std::vector<float> v;    // [kTokBlock, r]: scaled shrink output
};

// One work item: nb <= kTokBlock tokens that share the r rows `rows` (scales `scale`).
template <typename T>
void run_item(const Operands& op, const T* x, const T* a, const T* bt, T* y, const int64_t* tok, int64_t nb,
              const int64_t* rows, const float* scale, int64_t r, Scratch& s, const float* gv, const float* sv) {
  const int64_t K = op.K, N = op.N;
  s.xf.resize(kTokBlock * K);
  s.v.resize(kTokBlock * r);
  for (int64_t t = 0; t < nb; ++t) to_fp32(x + tok[t] * op.ldx, s.xf.data() + t * K, K);

  // Shrink: v[t, j] = scale[j] * <x[t], A[rows[j]]>, reading each A row once. The A rows kPrefetchRows
  // ahead and the Bt row the expand stage will need are prefetched meanwhile: a decode segment's rows are
  // a few KB scattered over the pool, too short for the hardware prefetcher to learn, so unprefetched the
  // kernel waits on memory latency rather than bandwidth.
  float d[kTokBlock];
  for (int64_t j = 0; j < std::min<int64_t>(r, kPrefetchRows); ++j) prefetch_row(a + rows[j] * op.lda, K);
  for (int64_t j = 0; j < r; ++j) {
    if (j + kPrefetchRows < r) prefetch_row(a + rows[j + kPrefetchRows] * op.lda, K);
    prefetch_row(bt + rows[j] * op.ldb, N);
    dot_dispatch(nb, s.xf.data(), K, a + rows[j] * op.lda, d);
    for (int64_t t = 0; t < nb; ++t) s.v[t * r + j] = d[t] * scale[j];
  }

  // Expand: y[t, c] += sum_j v[t, j] * Bt[rows[j], c]; each Bt row is read once (DoRA: and rescaled).
  expand_dispatch(nb, s.v.data(), r, bt, op.ldb, rows, y, op.ldy, tok, N, gv, sv);
}

// A long segment as two fp32 GEMMs: [n, K] x [K, r] -> [n, r] (scaled) x [r, N] -> [n, N].
// `g`, `shift`: the segment's DoRA row scales ([N] fp32), or undefined tensors.
void run_segment_mm(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                    const at::Tensor& tok, const at::Tensor& rows, const at::Tensor& scale,
                    const at::Tensor& g, const at::Tensor& shift) {
  const at::Tensor xs = x.index_select(0, tok).to(at::kFloat);                  // [n, K]
  const at::Tensor ar = a.index_select(0, rows).to(at::kFloat);                 // [r, K]
  const at::Tensor v = at::mm(xs, ar.t()).mul_(scale.unsqueeze(0));             // [n, r] fp32
  const at::Tensor out = at::mm(v, bt.index_select(0, rows).to(at::kFloat));    // [n, N] fp32
  if (g.defined()) {  // DoRA: (y + out) * g + shift, one rounding
    at::Tensor o = y.index_select(0, tok).to(at::kFloat).add_(out).mul_(g.unsqueeze(0));
    if (shift.defined()) o.add_(shift.unsqueeze(0));
    y.index_copy_(0, tok, o.to(y.scalar_type()));
  } else if (y.scalar_type() == at::kFloat) {
    y.index_add_(0, tok, out);
  } else {  // add in fp32, round once
    y.index_copy_(0, tok, y.index_select(0, tok).to(at::kFloat).add_(out).to(y.scalar_type()));
  }
}

// DoRA operands of one call: seg[g] = segment g's row-scale entry (0: none); g / shift: [E, N] fp32
// (shift may be undefined). All undefined for plain LoRA.
struct Dora {
  at::Tensor seg, g, shift;
  const float* gv(const int64_t g_idx, int64_t N) const {
    if (!seg.defined()) return nullptr;
    const int64_t d = seg.data_ptr<int64_t>()[g_idx];
    return d > 0 ? g.data_ptr<float>() + d * N : nullptr;
  }
  const float* sv(const int64_t g_idx, int64_t N) const {
    if (!seg.defined() || !shift.defined()) return nullptr;
    const int64_t d = seg.data_ptr<int64_t>()[g_idx];
    return d > 0 ? shift.data_ptr<float>() + d * N : nullptr;
  }
};

template <typename T>
void sgmv_typed(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                const at::Tensor& token_idx, const at::Tensor& seg_indptr, const at::Tensor& row_idx,
                const at::Tensor& row_indptr, const at::Tensor& row_scale, int64_t mm_min_tokens, const Dora& dora) {
  const int64_t G = seg_indptr.numel() - 1;
  const int64_t* seg = seg_indptr.data_ptr<int64_t>();
  const int64_t* rptr = row_indptr.data_ptr<int64_t>();
  const int64_t* tok = token_idx.data_ptr<int64_t>();
  const int64_t* rows = row_idx.data_ptr<int64_t>();
  const float* scale = row_scale.data_ptr<float>();
  const Operands op{x.size(1), y.size(1), x.stride(0), a.stride(0), bt.stride(0), y.stride(0)};

  struct Item {
    int64_t g, t0, t1;
  };
  std::vector<Item> items;
  items.reserve(G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t s0 = seg[g], s1 = seg[g + 1], r0 = rptr[g], r1 = rptr[g + 1];
    if (s1 <= s0 || r1 <= r0) continue;
    if (s1 - s0 >= mm_min_tokens) {
      const int64_t d = dora.seg.defined() ? dora.seg.data_ptr<int64_t>()[g] : 0;
      run_segment_mm(y, x, a, bt, token_idx.slice(0, s0, s1), row_idx.slice(0, r0, r1), row_scale.slice(0, r0, r1),
                     d > 0 ? dora.g.select(0, d) : at::Tensor(),
                     d > 0 && dora.shift.defined() ? dora.shift.select(0, d) : at::Tensor());
      continue;
    }
    for (int64_t t0 = s0; t0 < s1; t0 += kTokBlock) items.push_back({g, t0, std::min(s1, t0 + kTokBlock)});
  }
  if (items.empty()) return;

  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = bt.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch s;  // reused across calls: no allocation per call
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      const int64_t r0 = rptr[it.g], r1 = rptr[it.g + 1];
      if (i + 1 < end && items[i + 1].g != it.g) {  // the next segment's first A rows stream in meanwhile
        const int64_t n0 = rptr[items[i + 1].g], n1 = std::min(rptr[items[i + 1].g + 1], n0 + kPrefetchRows);
        for (int64_t j = n0; j < n1; ++j) prefetch_row(ap + rows[j] * op.lda, op.K);
      }
      run_item<T>(op, xp, ap, bp, yp, tok + it.t0, it.t1 - it.t0, rows + r0, scale + r0, r1 - r0, s,
                  dora.gv(it.g, op.N), dora.sv(it.g, op.N));
    }
  });
}

void check_index_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous int64 CPU vector");
}

// Validate everything a wrong value of would make us read or write out of bounds.
void check_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                  const at::Tensor& token_idx, const at::Tensor& seg_indptr, const at::Tensor& row_idx,
                  const at::Tensor& row_indptr, const at::Tensor& row_scale) {
  for (const at::Tensor* t : {&y, &x, &a, &bt}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->stride(1) == 1,
                "sgmv: y, x, a, bt must be 2-D CPU tensors with unit column stride");
    TORCH_CHECK(t->scalar_type() == y.scalar_type(), "sgmv: y, x, a, bt must share one dtype");
  }
  TORCH_CHECK(y.size(0) == x.size(0) && a.size(1) == x.size(1) && bt.size(1) == y.size(1) && a.size(0) == bt.size(0),
              "sgmv: shape mismatch y", y.sizes(), " x", x.sizes(), " a", a.sizes(), " bt", bt.sizes());
  check_index_vector(token_idx, "token_idx");
  check_index_vector(seg_indptr, "seg_indptr");
  check_index_vector(row_idx, "row_idx");
  check_index_vector(row_indptr, "row_indptr");
  TORCH_CHECK(row_scale.device().is_cpu() && row_scale.scalar_type() == at::kFloat && row_scale.is_contiguous() &&
                  row_scale.numel() == row_idx.numel(), "row_scale must be a contiguous fp32 CPU vector like row_idx");
  TORCH_CHECK(seg_indptr.numel() >= 1 && seg_indptr.numel() == row_indptr.numel(),
              "seg_indptr and row_indptr must both have G+1 entries");
  const int64_t G = seg_indptr.numel() - 1;
  const int64_t* seg = seg_indptr.data_ptr<int64_t>();
  const int64_t* rptr = row_indptr.data_ptr<int64_t>();
  TORCH_CHECK(seg[0] >= 0 && rptr[0] >= 0 && seg[G] <= token_idx.numel() && rptr[G] <= row_idx.numel(),
              "indptr out of range");
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(seg[g] <= seg[g + 1] && rptr[g] <= rptr[g + 1], "indptr must be non-decreasing");
  const int64_t T = x.size(0), P = a.size(0);
  const int64_t* tok = token_idx.data_ptr<int64_t>();
  std::vector<uint8_t> seen(T, 0);  // a token in two segments (or twice) would be a write race
  for (int64_t i = seg[0]; i < seg[G]; ++i) {
    TORCH_CHECK(tok[i] >= 0 && tok[i] < T, "token index out of range");
    TORCH_CHECK(!seen[tok[i]], "token ", tok[i], " is listed in more than one segment slot");
    seen[tok[i]] = 1;
  }
  const int64_t* rows = row_idx.data_ptr<int64_t>();
  for (int64_t i = rptr[0]; i < rptr[G]; ++i) TORCH_CHECK(rows[i] >= 0 && rows[i] < P, "pool row out of range");
}

}  // namespace

void sgmv_any(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
              const at::Tensor& token_idx, const at::Tensor& seg_indptr, const at::Tensor& row_idx,
              const at::Tensor& row_indptr, const at::Tensor& row_scale, int64_t mm_min_tokens, const Dora& dora) {
  check_inputs(y, x, a, bt, token_idx, seg_indptr, row_idx, row_indptr, row_scale);
  switch (y.scalar_type()) {
    case at::kFloat:
      sgmv_typed<float>(y, x, a, bt, token_idx, seg_indptr, row_idx, row_indptr, row_scale, mm_min_tokens, dora);
      break;
    case at::kBFloat16:
      sgmv_typed<at::BFloat16>(y, x, a, bt, token_idx, seg_indptr, row_idx, row_indptr, row_scale, mm_min_tokens,
                               dora);
      break;
    case at::kHalf:
      sgmv_typed<at::Half>(y, x, a, bt, token_idx, seg_indptr, row_idx, row_indptr, row_scale, mm_min_tokens, dora);
      break;
    default:
      TORCH_CHECK(false, "sgmv: unsupported dtype ", y.scalar_type());
  }
}

// y[T, N] += per segment: (scale * (x[tok] @ a[rows]^T)) @ bt[rows]; see the file header.
void sgmv_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
              const at::Tensor& token_idx, const at::Tensor& seg_indptr, const at::Tensor& row_idx,
              const at::Tensor& row_indptr, const at::Tensor& row_scale, int64_t mm_min_tokens) {
  sgmv_any(y, x, a, bt, token_idx, seg_indptr, row_idx, row_indptr, row_scale, mm_min_tokens, Dora{});
}

// sgmv_cpu plus the DoRA epilogue: seg_dora [G] int64 entries, g / shift [E, N] fp32 (one layer's tables).
void sgmv_dora_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                   const at::Tensor& token_idx, const at::Tensor& seg_indptr, const at::Tensor& row_idx,
                   const at::Tensor& row_indptr, const at::Tensor& row_scale, int64_t mm_min_tokens,
                   const at::Tensor& seg_dora, const at::Tensor& g, const c10::optional<at::Tensor>& shift) {
  check_index_vector(seg_dora, "seg_dora");
  TORCH_CHECK(seg_dora.numel() == seg_indptr.numel() - 1, "seg_dora must have one entry per segment");
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.dim() == 2 && g.is_contiguous() &&
                  g.size(1) == y.size(1), "DoRA g must be a contiguous fp32 [E, N] CPU tensor");
  const int64_t E = g.size(0);
  const int64_t* sd = seg_dora.data_ptr<int64_t>();
  for (int64_t i = 0; i < seg_dora.numel(); ++i) TORCH_CHECK(sd[i] >= 0 && sd[i] < E, "DoRA entry out of range");
  Dora dora{seg_dora, g, at::Tensor()};
  if (shift.has_value() && shift->defined()) {
    TORCH_CHECK(shift->sizes() == g.sizes() && shift->scalar_type() == at::kFloat && shift->is_contiguous(),
                "DoRA shift must be shaped like g");
    dora.shift = *shift;
  }
  sgmv_any(y, x, a, bt, token_idx, seg_indptr, row_idx, row_indptr, row_scale, mm_min_tokens, dora);
}


bool sgmv_has_avx512() { return OPENLORA_AVX512 != 0; }

// The kernels touch no Python object, so they release the GIL: a server's event loop thread can
// run while the engine thread is inside one (see openlora/engine/async_engine.py).
#ifndef OPENLORA_UNITY_BUILD  // csrc/decoder_cpu.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv", &sgmv_cpu, "SGMV LoRA apply on the CPU (adds into y in place)",
        py::call_guard<py::gil_scoped_release>());
  m.def("sgmv_dora", &sgmv_dora_cpu, "SGMV with the DoRA row-scale epilogue (see the file header)",
        py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &sgmv_has_avx512, "whether the AVX-512 kernels were compiled in");
}
#endif  // OPENLORA_UNITY_BUILD
