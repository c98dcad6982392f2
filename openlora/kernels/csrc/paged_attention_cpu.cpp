// Paged attention for the CPU, read straight from the block cache (no gather copy), flash-decoding style
// (online softmax over tiles of keys, fp32 accumulation). See openlora/kernels/attention_cpu.py for the
// semantics, the Python entry points and the SDPA fallback.
//
// Layouts:
//   q        [N, H, d]                      fp32 or bf16; any strides on dims 0 and 1, dim 2 contiguous
//   k_cache  [num_blocks, block_size, KVH, d] same dtype, contiguous (v_cache alike)
//   out      [N, H, d]                      q's dtype, contiguous
//
// Plan of one call: work items of (query row, kv heads), spread over the intra-op threads with
// at::parallel_for (one kv head per item when rows are few, all KVH heads of the row when there are
// enough rows to keep the threads busy). For each of its kv heads an item processes the G = H / KVH
// query heads that share it (GQA) together, walking the visible keys [lo, hi) in tiles of kTile keys.
// Per tile and kv head it
//   1. computes the [G, nt] scores, reading each K row once for all G heads (bf16 widened in registers),
//   2. updates the running max m, the running denominator l and rescales the [G, d] fp32 accumulator,
//   3. accumulates p @ V, reading each V row once for all G heads.
// Key positions map to cache rows through the block table: pos -> (blocks[pos / bs], pos % bs).
// Heads are register-blocked in sub-groups of at most 4 (scores) and kMaxG (p @ V); larger groups
// re-read the tile's K/V rows from L1/L2 (a tile is at most kTile rows).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define OPENLORA_PA_AVX512 1
#else
#define OPENLORA_PA_AVX512 0
#endif
#if OPENLORA_PA_AVX512 && defined(__AVX512BF16__)
#define OPENLORA_PA_DPBF16 1  // bf16 scores with VDPBF16PS (qk_dp64)
#else
#define OPENLORA_PA_DPBF16 0
#endif

namespace {

// Keys per online-softmax step (two 16-row blocks). 16 and 64 measured no better on 32 x 512 keys.
constexpr int kTile = 32;
constexpr int kMaxG = 8;   // query heads per register-blocked sub-group (2 x 8 zmm accumulators)

inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) { return static_cast<float>(x); }

// ---------------------------------------------------------------------------------------------------
// Portable scalar kernels (any CPU; also selectable at run time with portable=True so tests cover them)
// ---------------------------------------------------------------------------------------------------

// s[j * ss + r] = q[j*d : j*d+d] . k_r   for j < ng, r < nk; k_r = kp[r] + koff.   q: fp32 [ng, d] (already scaled)
template <typename T>
void qk_scalar(const float* q, int ng, int64_t d, const T* const* kp, int64_t koff, int nk, float* s,
               int64_t ss) {
  for (int r = 0; r < nk; ++r) {
    const T* k = kp[r] + koff;
    for (int j = 0; j < ng; ++j) {
      const float* qj = q + j * d;
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc += qj[c] * to_f(k[c]);
      s[j * ss + r] = acc;
    }
  }
}

// acc[j*d + c] += sum_r p[j * ps + r] * v_r[c]   for j < ng; v_r = vp[r] + voff
template <typename T>
void pv_scalar(const float* p, int64_t ps, int ng, const T* const* vp, int64_t voff, int nk, float* acc,
               int64_t d) {
  for (int r = 0; r < nk; ++r) {
    const T* v = vp[r] + voff;
    for (int j = 0; j < ng; ++j) {
      const float w = p[j * ps + r];
      float* a = acc + j * d;
      for (int64_t c = 0; c < d; ++c) a[c] += w * to_f(v[c]);
    }
  }
}

// x[r] = exp(x[r] - m) for r < n; returns the sum.
inline float exp_sub_sum_scalar(float* x, int n, float m) {
  float sum = 0.f;
  for (int r = 0; r < n; ++r) {
    x[r] = std::exp(x[r] - m);
    sum += x[r];
  }
  return sum;
}

#if OPENLORA_PA_AVX512

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }  // n in [1, 16]

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 word.
inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load16(const at::BFloat16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }

// exp(x) for x <= 0 (Cephes expf: range reduction by ln2 split in two, degree-6 polynomial, about 1 ulp);
// 2^n is applied with scalef, which underflows to 0 cleanly for very negative x.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline float exp_sub_sum_vec(float* x, int n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int r = 0; r < n; r += 16) {
    const __mmask16 k = tail_mask(std::min(16, n - r));
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + r), mv));
    _mm512_mask_storeu_ps(x + r, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// Four dot products at once: [sum(a), sum(b), sum(c), sum(d)] (13 shuffles/adds instead of 4 full
// horizontal reductions of ~8 each).
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // per lane: [a, b, c, d] partial sums
  const __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  // across the 4 lanes
  const __m512 y = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 z = _mm512_add_ps(y, _mm512_shuffle_f32x4(y, y, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castps512_ps128(z);
}

// 16 elements at p + c*16; NC > 0 means d == 16 * NC (full vectors, loops unrolled, q stays in registers).
template <int NC, typename T>
inline __m512 ld(const T* p, int64_t c, int64_t d) {
  if constexpr (NC > 0) {
    return load16(p + c * 16);
  } else {
    return load16(p + c * 16, tail_mask(std::min<int64_t>(16, d - c * 16)));
  }
}

// s[j * ss + r] = q_j . k_r for j < NG (NG <= 4), r < nk; k_r = kp[r] + koff. Four key rows per
// iteration: 4*NG independent FMA chains, and the four dots of a head are reduced together.
template <typename T, int NG, int NC>
void qk_vec(const float* q, int64_t d, const T* const* kp, int64_t koff, int nk, float* s, int64_t ss) {
  const int64_t nc = NC > 0 ? NC : (d + 15) / 16;
  int r = 0;
  for (; r + 4 <= nk; r += 4) {
    const T* k0 = kp[r] + koff;
    const T* k1 = kp[r + 1] + koff;
    const T* k2 = kp[r + 2] + koff;
    const T* k3 = kp[r + 3] + koff;
    __m512 a[NG][4];
    for (int j = 0; j < NG; ++j) a[j][0] = a[j][1] = a[j][2] = a[j][3] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      const __m512 x0 = ld<NC>(k0, c, d), x1 = ld<NC>(k1, c, d), x2 = ld<NC>(k2, c, d), x3 = ld<NC>(k3, c, d);
      for (int j = 0; j < NG; ++j) {
        const __m512 qv = ld<NC>(q + j * d, c, d);
        a[j][0] = _mm512_fmadd_ps(qv, x0, a[j][0]);
        a[j][1] = _mm512_fmadd_ps(qv, x1, a[j][1]);
        a[j][2] = _mm512_fmadd_ps(qv, x2, a[j][2]);
        a[j][3] = _mm512_fmadd_ps(qv, x3, a[j][3]);
      }
    }
    for (int j = 0; j < NG; ++j) _mm_storeu_ps(s + j * ss + r, hsum4(a[j][0], a[j][1], a[j][2], a[j][3]));
  }
  for (; r < nk; ++r) {
    const T* k0 = kp[r] + koff;
    __m512 a0[NG];
    for (int j = 0; j < NG; ++j) a0[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      const __m512 x0 = ld<NC>(k0, c, d);
      for (int j = 0; j < NG; ++j) a0[j] = _mm512_fmadd_ps(ld<NC>(q + j * d, c, d), x0, a0[j]);
    }
    for (int j = 0; j < NG; ++j) s[j * ss + r] = _mm512_reduce_add_ps(a0[j]);
  }
}

// acc[j*d + :] += sum_r p[j * ps + r] * v_r for j < NG (NG <= 8); v_r = vp[r] + voff. A 16-column strip
// of the NG accumulators lives in registers over all nk rows, even/odd rows in separate registers.
template <typename T, int NG, int NC>
void pv_vec(const float* p, int64_t ps, const T* const* vp, int64_t voff, int nk, float* acc, int64_t d) {
  const int64_t nc = NC > 0 ? NC : (d + 15) / 16;
  for (int64_t c = 0; c < nc; ++c) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, d - c * 16));
    __m512 a0[NG], a1[NG];
    for (int j = 0; j < NG; ++j) {
      a0[j] = load16(acc + j * d + c * 16, m);
      a1[j] = _mm512_setzero_ps();
    }
    int r = 0;
    for (; r + 2 <= nk; r += 2) {
      const __m512 x0 = ld<NC>(vp[r] + voff, c, d);
      const __m512 x1 = ld<NC>(vp[r + 1] + voff, c, d);
      for (int j = 0; j < NG; ++j) {
        a0[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[j * ps + r]), x0, a0[j]);
        a1[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[j * ps + r + 1]), x1, a1[j]);
      }
    }
    if (r < nk) {
      const __m512 x0 = ld<NC>(vp[r] + voff, c, d);
      for (int j = 0; j < NG; ++j) a0[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[j * ps + r]), x0, a0[j]);
    }
    for (int j = 0; j < NG; ++j) _mm512_mask_storeu_ps(acc + j * d + c * 16, m, _mm512_add_ps(a0[j], a1[j]));
  }
}

template <typename T, int NC>
void qk_ng(const float* q, int ng, int64_t d, const T* const* kp, int64_t koff, int nk, float* s, int64_t ss) {
  switch (ng) {
    case 1: return qk_vec<T, 1, NC>(q, d, kp, koff, nk, s, ss);
    case 2: return qk_vec<T, 2, NC>(q, d, kp, koff, nk, s, ss);
    case 3: return qk_vec<T, 3, NC>(q, d, kp, koff, nk, s, ss);
    default: return qk_vec<T, 4, NC>(q, d, kp, koff, nk, s, ss);
  }
}

template <typename T, int NC>
void pv_ng(const float* p, int64_t ps, int ng, const T* const* vp, int64_t voff, int nk, float* acc, int64_t d) {
  switch (ng) {
    case 1: return pv_vec<T, 1, NC>(p, ps, vp, voff, nk, acc, d);
    case 2: return pv_vec<T, 2, NC>(p, ps, vp, voff, nk, acc, d);
    case 3: return pv_vec<T, 3, NC>(p, ps, vp, voff, nk, acc, d);
    case 4: return pv_vec<T, 4, NC>(p, ps, vp, voff, nk, acc, d);
    case 5: return pv_vec<T, 5, NC>(p, ps, vp, voff, nk, acc, d);
    case 6: return pv_vec<T, 6, NC>(p, ps, vp, voff, nk, acc, d);
    case 7: return pv_vec<T, 7, NC>(p, ps, vp, voff, nk, acc, d);
    default: return pv_vec<T, 8, NC>(p, ps, vp, voff, nk, acc, d);
  }
}

// Head dims 64 and 128 get fully unrolled kernels; any other d uses masked 16-wide chunks.
template <typename T>
void qk_dispatch(const float* q, int ng, int64_t d, const T* const* kp, int64_t koff, int nk, float* s,
                 int64_t ss) {
  if (d == 64) return qk_ng<T, 4>(q, ng, d, kp, koff, nk, s, ss);
  if (d == 128) return qk_ng<T, 8>(q, ng, d, kp, koff, nk, s, ss);
  qk_ng<T, 0>(q, ng, d, kp, koff, nk, s, ss);
}

#if OPENLORA_PA_DPBF16
// bf16, d = 64: s[j * ss + r] = scale * (q_j . k_r) for j < NG (NG <= 4), r < nk, with VDPBF16PS on the raw
// bf16 q and k (each fp32 lane sums the exact products of one element pair), q heads q_hs elements apart.
// Half the instructions of widening k to fp32 (q stays in 2 NG registers); the per-head scale is applied
// to the four scores at once. A/B in one process (32 rows x 64 keys, H=9, KVH=3, AMD Zen 4): a call
// 60 -> 48 us with hot caches, 133 -> 124 us cold (30 layers' caches round robin); outputs within one
// bf16 rounding of the fp32-widened path.
template <int NG>
void qk_dp64(const at::BFloat16* q, int64_t q_hs, const at::BFloat16* const* kp, int64_t koff, int nk, float* s,
             int64_t ss, float scale) {
  __m512bh qv[NG][2];
  for (int j = 0; j < NG; ++j)
    for (int c = 0; c < 2; ++c) qv[j][c] = (__m512bh)_mm512_loadu_si512(q + j * q_hs + 32 * c);
  const __m128 sv = _mm_set1_ps(scale);
  int r = 0;
  for (; r + 4 <= nk; r += 4) {
    __m512 a[NG][4];
    for (int j = 0; j < NG; ++j) a[j][0] = a[j][1] = a[j][2] = a[j][3] = _mm512_setzero_ps();
    for (int c = 0; c < 2; ++c) {
      __m512bh x[4];
      for (int i = 0; i < 4; ++i) x[i] = (__m512bh)_mm512_loadu_si512(kp[r + i] + koff + 32 * c);
      for (int j = 0; j < NG; ++j)
        for (int i = 0; i < 4; ++i) a[j][i] = _mm512_dpbf16_ps(a[j][i], qv[j][c], x[i]);
    }
    for (int j = 0; j < NG; ++j)
      _mm_storeu_ps(s + j * ss + r, _mm_mul_ps(hsum4(a[j][0], a[j][1], a[j][2], a[j][3]), sv));
  }
  for (; r < nk; ++r) {
    for (int j = 0; j < NG; ++j) {
      __m512 a0 = _mm512_setzero_ps();
      for (int c = 0; c < 2; ++c)
        a0 = _mm512_dpbf16_ps(a0, qv[j][c], (__m512bh)_mm512_loadu_si512(kp[r] + koff + 32 * c));
      s[j * ss + r] = _mm512_reduce_add_ps(a0) * scale;
    }
  }
}

void qk_dp64_ng(const at::BFloat16* q, int64_t q_hs, int ng, const at::BFloat16* const* kp, int64_t koff, int nk,
                float* s, int64_t ss, float scale) {
  switch (ng) {
    case 1: return qk_dp64<1>(q, q_hs, kp, koff, nk, s, ss, scale);
    case 2: return qk_dp64<2>(q, q_hs, kp, koff, nk, s, ss, scale);
    case 3: return qk_dp64<3>(q, q_hs, kp, koff, nk, s, ss, scale);
    default: return qk_dp64<4>(q, q_hs, kp, koff, nk, s, ss, scale);
  }
}
#endif

template <typename T>
void pv_dispatch(const float* p, int64_t ps, int ng, const T* const* vp, int64_t voff, int nk, float* acc,
                 int64_t d) {
  if (d == 64) return pv_ng<T, 4>(p, ps, ng, vp, voff, nk, acc, d);
  if (d == 128) return pv_ng<T, 8>(p, ps, ng, vp, voff, nk, acc, d);
  pv_ng<T, 0>(p, ps, ng, vp, voff, nk, acc, d);
}

#endif  // OPENLORA_PA_AVX512

// Per-thread scratch, allocated once per parallel_for chunk (not per work item). HG = heads per item.
template <typename T>
struct Scratch {
  std::vector<float> q, acc, s, m, l;  // [HG, d], [HG, d], [HG, kTile], [HG], [HG]
  std::vector<const T*> kp, vp;        // [kTile] cache rows (kv head 0) of the current tile
  Scratch(int64_t hg, int64_t d) : q(hg * d), acc(hg * d), s(hg * kTile), m(hg), l(hg), kp(kTile), vp(kTile) {}
};

// Where one work item reads and writes: kv heads [g0, g0 + ng) of one query row, i.e. the query heads
// [g0 * G, (g0 + ng) * G).
template <typename T>
struct Item {
  const T* q;              // first query head; heads are q_hs apart
  int64_t q_hs;
  T* out;                  // contiguous [ng * G, d]
  const int64_t* blocks;   // block ids of this sequence, indexed by pos / bs
  int64_t lo, hi;          // visible key positions [lo, hi)
  int64_t g0, ng;          // kv heads
};

struct Geometry {
  int G;             // query heads per kv head
  int64_t d;
  int64_t bs;        // block size
  int64_t row;       // elements between consecutive cache rows: KVH * d
  float scale;
};

// Load one byte of every cache line of an item's K and V rows (its kv heads, all its key positions), so
// that they arrive together. A decode step's K/V rows come from DRAM (the layer's weights evicted them)
// in block-size pieces scattered by the block table, which the hardware prefetcher cannot follow. Software
// prefetches of the same lines measured no faster than none on an AMD EPYC (Zen 4) VM, while this burst
// of real loads, which the out-of-order core keeps in flight together, cut a cold call on a step-like
// cache (32 rows, 64 keys, bf16, random block table, 30 layers round robin) from 225-271 us to 139-151.
template <typename T>
inline void touch_item(const Item<T>& it, const T* kc, const T* vc, const Geometry& g) {
  const int64_t bytes = it.ng * g.d * static_cast<int64_t>(sizeof(T));
  int64_t b = it.lo / g.bs, off = it.lo % g.bs;
  for (int64_t t = it.lo; t < it.hi; ++t) {
    const int64_t row = (it.blocks[b] * g.bs + off) * g.row + it.g0 * g.d;
    const volatile unsigned char* kr = reinterpret_cast<const volatile unsigned char*>(kc + row);
    const volatile unsigned char* vr = reinterpret_cast<const volatile unsigned char*>(vc + row);
    // Volatile reads: the compiler must perform each one, though the values are unused.
    for (int64_t o = 0; o < bytes; o += 64) {
      (void)kr[o];
      (void)vr[o];
    }
    (void)kr[bytes - 1];  // the last line, when rows are not line aligned
    (void)vr[bytes - 1];
    if (++off == g.bs) {
      off = 0;
      ++b;
    }
  }
}

// out[j] = softmax(scale * q_j . K[lo:hi]^T) @ V[lo:hi] for the query heads of one item.
// NOTE: tiles are the outer loop and kv heads the inner one, so a tile's cache rows (all KVH heads,
// contiguous within a block) are consumed while they are in L1/L2 rather than re-streamed per head.
template <typename T, bool kVec>
void attend(const Item<T>& it, const T* kc, const T* vc, const Geometry& g, Scratch<T>& sc) {
  const int G = g.G;
  const int64_t d = g.d;
  const int64_t HG = it.ng * G;  // query heads of this item
  float* q = sc.q.data();
  float* acc = sc.acc.data();
  float* s = sc.s.data();
  // bf16 scores straight from the raw q and k (qk_dp64) where the CPU has AVX512_BF16 and d = 64.
  constexpr bool kDpType = OPENLORA_PA_DPBF16 && kVec && std::is_same_v<T, at::BFloat16>;
  const bool dp = kDpType && d == 64;
  for (int64_t j = 0; j < HG && !dp; ++j) {  // widen + pre-scale q once per item: [HG, d] fp32
    const T* src = it.q + j * it.q_hs;
    for (int64_t c = 0; c < d; ++c) q[j * d + c] = to_f(src[c]) * g.scale;
  }
  std::fill(acc, acc + HG * d, 0.f);
  std::fill(sc.m.begin(), sc.m.begin() + HG, -std::numeric_limits<float>::infinity());
  std::fill(sc.l.begin(), sc.l.begin() + HG, 0.f);
  for (int64_t t0 = it.lo; t0 < it.hi; t0 += kTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kTile, it.hi - t0));
    int64_t b = t0 / g.bs, off = t0 % g.bs;  // walk the block table without a division per key
    for (int r = 0; r < nt; ++r) {
      const int64_t row = (it.blocks[b] * g.bs + off) * g.row;  // cache row of position t0 + r, kv head 0
      sc.kp[r] = kc + row;
      sc.vp[r] = vc + row;
      if (++off == g.bs) {
        off = 0;
        ++b;
      }
    }
    for (int64_t h = 0; h < it.ng; ++h) {
      const int64_t koff = (it.g0 + h) * d;
      float* qh = q + h * G * d;      // [G, d]
      float* sh = s + h * G * kTile;  // [G, kTile]
      float* ah = acc + h * G * d;    // [G, d]
      for (int j0 = 0; j0 < G; j0 += 4) {  // 1. scores [G, nt], sub-groups of <= 4 heads
        const int ng = std::min(4, G - j0);
#if OPENLORA_PA_AVX512
#if OPENLORA_PA_DPBF16
        if constexpr (kDpType) {
          if (dp) {
            qk_dp64_ng(it.q + (h * G + j0) * it.q_hs, it.q_hs, ng, sc.kp.data(), koff, nt, sh + j0 * kTile, kTile,
                       g.scale);
            continue;
          }
        }
#endif
        if (kVec) {
          qk_dispatch<T>(qh + j0 * d, ng, d, sc.kp.data(), koff, nt, sh + j0 * kTile, kTile);
          continue;
        }
#endif
        qk_scalar<T>(qh + j0 * d, ng, d, sc.kp.data(), koff, nt, sh + j0 * kTile, kTile);
      }
      for (int j = 0; j < G; ++j) {  // 2. online softmax update
        const int64_t jj = h * G + j;
        float* sj = sh + j * kTile;
        const float tmax = *std::max_element(sj, sj + nt);
        const float m_new = std::max(sc.m[jj], tmax);
        // First tile: m = -inf, alpha = 0 (acc and l are 0 anyway).
        const float alpha =
            sc.m[jj] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(sc.m[jj] - m_new);
        float sum;
#if OPENLORA_PA_AVX512
        if (kVec) sum = exp_sub_sum_vec(sj, nt, m_new); else
#endif
        sum = exp_sub_sum_scalar(sj, nt, m_new);
        sc.l[jj] = sc.l[jj] * alpha + sum;
        sc.m[jj] = m_new;
        if (alpha != 1.f) {
          float* a = ah + j * d;
          for (int64_t c = 0; c < d; ++c) a[c] *= alpha;
        }
      }
      for (int j0 = 0; j0 < G; j0 += kMaxG) {  // 3. acc += p @ V, sub-groups of <= kMaxG heads
        const int ng = std::min(kMaxG, G - j0);
#if OPENLORA_PA_AVX512
        if (kVec) {
          pv_dispatch<T>(sh + j0 * kTile, kTile, ng, sc.vp.data(), koff, nt, ah + j0 * d, d);
          continue;
        }
#endif
        pv_scalar<T>(sh + j0 * kTile, kTile, ng, sc.vp.data(), koff, nt, ah + j0 * d, d);
      }
    }
  }
  for (int64_t j = 0; j < HG; ++j) {  // normalize; no visible key (empty range) -> zeros
    const float inv = sc.l[j] > 0.f ? 1.f / sc.l[j] : 0.f;
    T* o = it.out + j * d;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(acc[j * d + c] * inv);
  }
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3, "q must be [N, H, d]");
  TORCH_CHECK(q.stride(2) == 1, "q's last dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q must be fp32 or bf16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache/v_cache must be contiguous [num_blocks, block_size, KVH, d]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must have the same dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head dim of q and cache differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "H must be a multiple of KVH");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "CPU tensors only");
}

torch::Tensor make_out(const torch::Tensor& q, const c10::optional<torch::Tensor>& out) {
  if (out.has_value()) {
    const torch::Tensor& o = *out;
    TORCH_CHECK(o.sizes() == q.sizes() && o.scalar_type() == q.scalar_type() && o.is_contiguous(),
                "out must be a contiguous tensor shaped and typed like q");
    return o;
  }
  return torch::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
}

// Run attend() over all (query row, kv-head chunk) items. A chunk is all KVH heads when there are
// enough rows to keep every thread busy (rows are then read once, whole), else a single kv head
// (N = 1 decode still spreads its KVH heads over the threads).
template <typename T, typename ItemFn>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, torch::Tensor& out,
         double scale, bool portable, ItemFn make_item) {
  const int64_t N = q.size(0), H = q.size(1), d = q.size(2);
  const int64_t KVH = k_cache.size(2);
  const Geometry geo{static_cast<int>(H / KVH), d, k_cache.size(1), KVH * d, static_cast<float>(scale)};
  const int64_t hpi = N >= 4 * at::get_num_threads() ? KVH : 1;  // kv heads per item
  const int64_t chunks = KVH / hpi;
  const T* qp = q.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(hpi * geo.G, d);
    auto item_at = [&](int64_t i) {
      const int64_t n = i / chunks, g0 = (i % chunks) * hpi;
      Item<T> it{qp + n * qs0 + g0 * geo.G * qs1, qs1, op + (n * H + g0 * geo.G) * d, nullptr, 0, 0, g0, hpi};
      make_item(n, it);
      return it;
    };
    // Items are touched two ahead, so the computation of the previous ones overlaps the burst's tail.
    for (int64_t i = begin; i < std::min(begin + 2, end); ++i) touch_item(item_at(i), kc, vc, geo);
    for (int64_t i = begin; i < end; ++i) {
      const Item<T> it = item_at(i);
      if (i + 2 < end) touch_item(item_at(i + 2), kc, vc, geo);
      if (!portable && OPENLORA_PA_AVX512) {
        attend<T, true>(it, kc, vc, geo, sc);
      } else {
        attend<T, false>(it, kc, vc, geo, sc);
      }
    }
  });
}

// Decode: one query row per sequence; row n sees positions [max(0, L - window), L), L = seq_lens[n].
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_table, const torch::Tensor& seq_lens, double scale,
                           int64_t window, bool portable, const c10::optional<torch::Tensor>& out) {
  check_inputs(q, k_cache, v_cache);
  const int64_t N = q.size(0);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == N && block_table.scalar_type() == at::kLong &&
                  block_table.is_contiguous(), "block_table must be contiguous int64 [N, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == N && seq_lens.scalar_type() == at::kLong &&
                  seq_lens.is_contiguous(), "seq_lens must be contiguous int64 [N]");
  const int64_t bs = k_cache.size(1), nblk = k_cache.size(0), width = block_table.size(1);
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  // Validate once, outside the parallel region: every block a sequence reads must exist.
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(lens[n] >= 0 && lens[n] <= width * bs, "seq_lens[", n, "]=", lens[n], " exceeds the block table");
    const int64_t first = window > 0 ? std::max<int64_t>(0, lens[n] - window) / bs : 0;
    for (int64_t b = first; b < (lens[n] + bs - 1) / bs; ++b)
      TORCH_CHECK(bt[n * width + b] >= 0 && bt[n * width + b] < nblk, "block id out of range in row ", n);
  }
  torch::Tensor o = make_out(q, out);
  auto make_item = [&](int64_t n, auto& it) {
    it.blocks = bt + n * width;
    it.hi = lens[n];
    it.lo = window > 0 ? std::max<int64_t>(0, it.hi - window) : 0;
  };
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k_cache, v_cache, o, scale, portable, make_item);
  } else {
    run<at::BFloat16>(q, k_cache, v_cache, o, scale, portable, make_item);
  }
  return o;
}

// Prefill chunk with cached context: query i (position start + i) sees [max(0, p + 1 - window), p + 1).
torch::Tensor paged_prefill(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& block_ids, int64_t start, double scale, int64_t window,
                            bool portable, const c10::optional<torch::Tensor>& out) {
  check_inputs(q, k_cache, v_cache);
  TORCH_CHECK(block_ids.dim() == 1 && block_ids.scalar_type() == at::kLong && block_ids.is_contiguous(),
              "block_ids must be contiguous int64 [num_blocks]");
  const int64_t n = q.size(0), bs = k_cache.size(1), nblk = k_cache.size(0);
  TORCH_CHECK(start >= 0 && start + n <= block_ids.size(0) * bs, "start + q_len exceeds the blocks given");
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < (start + n + bs - 1) / bs; ++b)
    TORCH_CHECK(ids[b] >= 0 && ids[b] < nblk, "block id out of range");
  torch::Tensor o = make_out(q, out);
  auto make_item = [&](int64_t i, auto& it) {
    it.blocks = ids;
    it.hi = start + i + 1;
    it.lo = window > 0 ? std::max<int64_t>(0, it.hi - window) : 0;
  };
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k_cache, v_cache, o, scale, portable, make_item);
  } else {
    run<at::BFloat16>(q, k_cache, v_cache, o, scale, portable, make_item);
  }
  return o;
}

bool pa_has_avx512() { return OPENLORA_PA_AVX512 != 0; }

}  // namespace

// The kernels touch no Python object, so they release the GIL: a server's event loop thread can
// run while the engine thread is inside one (see openlora/engine/async_engine.py).
#ifndef OPENLORA_UNITY_BUILD  // csrc/decoder_cpu.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (one query row per sequence)", py::call_guard<py::gil_scoped_release>(), py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("seq_lens"), py::arg("scale"),
        py::arg("window"), py::arg("portable"), py::arg("out") = py::none());
  m.def("paged_prefill", &paged_prefill, "paged causal attention of a chunk against its cached context",
        py::call_guard<py::gil_scoped_release>(), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_ids"), py::arg("start"),
        py::arg("scale"), py::arg("window"), py::arg("portable"), py::arg("out") = py::none());
  m.def("has_avx512", &pa_has_avx512, "whether the AVX-512 kernels were compiled in");
}
#endif  // OPENLORA_UNITY_BUILD
