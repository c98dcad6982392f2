// Quantized linear layers y = x @ W^T (+ b) for the small-M matmuls of decode steps, on weights packed at
// load time by openlora/kernels/quant_gemm.py from a QuantWeight (openlora/quant/types.py):
//     W[n, k] = scale[n, g] * (q[n, k] - zero[n, g]) + min[n, g],   g = k // group
// x is fp32 or bf16 [M, K] (read through the optional column permutation `perm`: the GEMM reads
// x[:, perm]); y has x's dtype.
//
// Modes and packed layouts (NR = 16 output columns per panel, Nb = ceil(N/16), columns past N are zero):
//   W8A16  codes int8  [Nb, K, 16]      P[p, k, j] = q[16 p + j, k]
//   W4A16  codes uint8 [Nb, K, 8]       P[p, k, j] = u[16 p + j, k] | u[16 p + j + 8, k] << 4, u = q - qmin
//          (qmin = -8 for signed codes, else 0), so one 8-byte load zero-extended to eight int32 lanes
//          gives columns 0..7 (& 15) and 8..15 (>> 4) of a k step.
//     both with fp32 [Nb, G, 16] scale s and offset c = min - s * (zero - qmin) per (panel, group), and
//     computed as
//          y[m, n] = sum_b  s[n, g(b)] * sum_{k in b} x[m, k] u[n, k]  +  c[n, g(b)] * xsum[m, b]
//     over k blocks b (a group, cut into at most kKB steps), xsum[m, b] = sum_{k in b} x[m, k]: the codes
//     are converted to fp32 in registers and multiplied by broadcast x values (fp32 FMAs); the scale and
//     offset are applied once per block in the block's epilogue, never to each weight.
//   W8A8   codes int8  [Nb, ceil(K/4), 16, 4]   P[p, s, j, i] = q[16 p + j, 4 s + i] (symmetric weights in
//          [-127, 127], one scale per row and group of `group` columns: a multiple of 4 dividing K, or K for
//          one scale per row), plus fp32 scale [Nb, G, 16] and int32 wsum [Nb, G, 16] = 128 * the group's
//          sum of q (the VNNI path's correction). x is quantized per row and group at every call:
//          sx = max|x| / 127 over the group (1 where that is 0), xq = clamp(round_half_even(x / sx), -127,
//          127), exactly as quant_gemm.quantize_activations does in torch; int32 sums per group, then
//          y = fma(float(acc_g), sx_g * s_g, y) over g in order, + b.
//
// ISA paths (compiled under #if on the compiler's macros, the module being built with -march=native;
// chosen at run time, or forced by name for tests):
//   avx512_vnni  W8A8: u8 (xq + 128) x s8 VPDPBUSD into 16 int32 lanes per panel, minus wsum.
//                W8A16/W4A16 run the avx2 code.
//   avx2         W8A8: VPMADDUBSW on |xq| (u8) and sign(w, xq) (s8): each int16 pair sum is at most
//                2 * 127 * 127 = 32258 (no saturation), then VPMADDWD by ones to int32.
//                W8A16/W4A16: VPMOVSX/ZXBD + CVTDQ2PS of the codes and FMAs into fp32.
//   scalar       the same sums in plain loops (any CPU; also the tests' cross-check of the others).
//
// Parallel over panels (at::parallel_for with torch's intra-op threads). Within a panel each k block of
// weights (at most kKB x 16 codes, <= 4 KB) is read from memory by the first row block and from L1 by the
// others; row blocks of up to 3-6 rows x 16 columns keep their sums in registers, the panel's [M, 16] outputs
// in an L1 buffer. Panels are contiguous, so one thread's weights are one sequential stream (the hardware
// prefetcher follows it).
//
// Numerics: W8A16/W4A16 sum x * u in fp32 in k order per block and apply the scale and offset once per
// block (a different rounding order from dequantize-then-GEMM: agreement to fp32 rounding). W8A8 sums are
// exact integers; only the per-group epilogue rounds, in one order on every path (paths agree bit for bit).
// bf16 output rounds once, to nearest even.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define OPENLORA_QG_AVX2 1
#else
#define OPENLORA_QG_AVX2 0
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define OPENLORA_QG_VNNI 1
#else
#define OPENLORA_QG_VNNI 0
#endif

namespace {

constexpr int64_t kNR = 16;   // output columns per panel (two ymm / one zmm)
constexpr int64_t kKB = 256;  // most k steps per block: a block of W8 codes is 4 KB, L1-resident
// Rows per register block, chosen so that GCC keeps every sum in a ymm register (objdump: no stack
// traffic in the k loops): W8A16 6 (12 sums + 2 codes + 1 broadcast), W4A16 4 (the nibble unpack needs two
// more registers), W8A8 avx2 3 (6 sums + 2 codes + ones + x, |x| and two products; 4 rows spilled).
template <bool W4>
constexpr int kMR = W4 ? 4 : 6;
constexpr int kMR8 = 3;

enum class Isa { kScalar = 0, kAvx2 = 1, kVnni = 2 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Isa best_isa() {
#if OPENLORA_QG_VNNI
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni")) return Isa::kVnni;
#endif
#if OPENLORA_QG_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

const char* isa_name(Isa i) { return i == Isa::kVnni ? "avx512_vnni" : i == Isa::kAvx2 ? "avx2" : "scalar"; }

// "" -> the best this CPU runs; a name -> that path, which must not be beyond the best.
Isa pick_isa(const std::string& name) {
  const Isa best = best_isa();
  if (name.empty()) return best;
  const Isa want = name == "avx512_vnni" ? Isa::kVnni : name == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  TORCH_CHECK(name == "scalar" || name == "avx2" || name == "avx512_vnni", "quant_gemm: unknown isa ", name);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "quant_gemm: isa ", name,
              " not available here (best: ", isa_name(best), ")");
  return want;
}

// k blocks: group g covers [g G, (g + 1) G) and is cut into sub = ceil(G / kKB) blocks of at most kKB.
struct Blocks {
  int64_t K, G, sub;
  Blocks(int64_t k, int64_t g) : K(k), G(g), sub(ceil_div(g, kKB)) {}
  int64_t count() const { return (K / G) * sub; }
  int64_t group(int64_t b) const { return b / sub; }
  int64_t k0(int64_t b) const { return group(b) * G + (b % sub) * kKB; }
  int64_t k1(int64_t b) const { return std::min(k0(b) + kKB, (group(b) + 1) * G); }
};

// x [M, K] (fp32 / bf16, rows x.stride(0) apart) read through perm -> contiguous fp32 [M, K].
torch::Tensor to_f32(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm) {
  const int64_t M = x.size(0), K = x.size(1);
  torch::Tensor xf = torch::empty({M, K}, x.options().dtype(at::kFloat));
  const bool has_perm = perm.has_value() && perm->defined();
  if (!has_perm) {
    xf.copy_(x);
    return xf;
  }
  const torch::Tensor p = perm->contiguous();
  TORCH_CHECK(p.scalar_type() == at::kLong && p.numel() == K, "quant_gemm: perm must be int64 [K]");
  const torch::Tensor xc = x.to(at::kFloat).contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const float* src = xc.data_ptr<float>();
  float* dst = xf.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j) dst[m * K + j] = src[m * K + pp[j]];
  return xf;
}

// y[m, n] = acc[m, n - n0] + bias[n] for the panel's real columns, in y's dtype (bf16: nearest even).
void store_panel(const float* out, int64_t M, int64_t n0, int64_t cols, int64_t N, const float* bias, float* yf,
                 c10::BFloat16* yb) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < cols; ++j) {
      const float v = out[m * kNR + j] + (bias ? bias[n0 + j] : 0.f);
      if (yf) yf[m * N + n0 + j] = v;
      else yb[m * N + n0 + j] = c10::BFloat16(v);
    }
}

// ---------------------------------------------------------------------------------------------------------
// W8A16 / W4A16

struct A16Args {
  const float* x;      // [M, K] fp32 (permuted)
  const float* xsum;   // [M, nblk]
  const uint8_t* codes;  // packed codes
  const float* scale;  // [Nb, G, 16]
  const float* off;    // [Nb, G, 16]
  int64_t M, K, N, nblk, groups;
  int64_t bytes_k;     // code bytes per k step of a panel: 16 (W8) or 8 (W4)
  Blocks blocks;
};

// Scalar: out[m, :] += s * sum_k x u + c * xsum for one block of one panel.
template <bool W4>
void block_scalar(const A16Args& a, const uint8_t* codes, int64_t k0, int64_t k1, const float* s, const float* c,
                  int64_t b, float* out) {
  for (int64_t m = 0; m < a.M; ++m) {
    float acc[kNR] = {};
    const float* xr = a.x + m * a.K;
    for (int64_t k = k0; k < k1; ++k) {
      const uint8_t* ck = codes + k * a.bytes_k;
      for (int64_t j = 0; j < kNR; ++j) {
        float u;
        if constexpr (W4) u = static_cast<float>(j < 8 ? ck[j] & 15 : ck[j - 8] >> 4);
        else u = static_cast<float>(static_cast<int8_t>(ck[j]));
        acc[j] += xr[k] * u;
      }
    }
    const float xs = a.xsum[m * a.nblk + b];
    for (int64_t j = 0; j < kNR; ++j) out[m * kNR + j] += s[j] * acc[j] + c[j] * xs;
  }
}

#if OPENLORA_QG_AVX2

// Codes of one k step (16 columns) as two fp32 vectors.
template <bool W4>
inline void load_codes(const uint8_t* p, __m256& q0, __m256& q1) {
  if constexpr (W4) {
    const __m256i t = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    q0 = _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32(15)));
    q1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(t, 4));
  } else {
    q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
}

// MR rows x 16 columns of one block: sums in registers, then out += s * sum + c * xsum.
// NOTE: one FMA chain per output over k, whatever MR is: a row's sums must not depend on how many rows
// share its call (batch invariance: a request's logits are bit-identical alone or in any batch). Splitting
// k into U interleaved sums for small MR (more chains in flight at batch 1) changed the rounding with M.
template <bool W4, int MR>
inline void micro_a16(const float* x, int64_t ldx, const uint8_t* codes, int64_t bytes_k, int64_t steps,
                      const float* s, const float* c, const float* xsum, int64_t ldxs, float* out) {
  constexpr int U = 1;
  __m256 acc[U][MR][2];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MR; ++m) acc[u][m][0] = acc[u][m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= steps; k += U) {
    for (int u = 0; u < U; ++u) {
      __m256 q0, q1;
      load_codes<W4>(codes + (k + u) * bytes_k, q0, q1);
      for (int m = 0; m < MR; ++m) {
        const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k + u);
        acc[u][m][0] = _mm256_fmadd_ps(xb, q0, acc[u][m][0]);
        acc[u][m][1] = _mm256_fmadd_ps(xb, q1, acc[u][m][1]);
      }
    }
  }
  for (; k < steps; ++k) {
    __m256 q0, q1;
    load_codes<W4>(codes + k * bytes_k, q0, q1);
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      acc[0][m][0] = _mm256_fmadd_ps(xb, q0, acc[0][m][0]);
      acc[0][m][1] = _mm256_fmadd_ps(xb, q1, acc[0][m][1]);
    }
  }
  const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
  const __m256 c0 = _mm256_loadu_ps(c), c1 = _mm256_loadu_ps(c + 8);
  for (int m = 0; m < MR; ++m) {
    __m256 a0 = acc[0][m][0], a1 = acc[0][m][1];
    for (int u = 1; u < U; ++u) a0 = _mm256_add_ps(a0, acc[u][m][0]), a1 = _mm256_add_ps(a1, acc[u][m][1]);
    const __m256 xs = _mm256_broadcast_ss(xsum + m * ldxs);
    float* o = out + m * kNR;
    _mm256_storeu_ps(o, _mm256_fmadd_ps(c0, xs, _mm256_fmadd_ps(s0, a0, _mm256_loadu_ps(o))));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(c1, xs, _mm256_fmadd_ps(s1, a1, _mm256_loadu_ps(o + 8))));
  }
}

// MR rows x 16 columns of one block from codes already converted to fp32 (`tile` [steps, 16]): the same
// FMA chain per output as micro_a16 on the same values, so the same bits; only the conversion is shared.
template <int MR>
inline void micro_tile(const float* x, int64_t ldx, const float* tile, int64_t steps, const float* s,
                       const float* c, const float* xsum, int64_t ldxs, float* out) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < steps; ++k) {
    const __m256 q0 = _mm256_loadu_ps(tile + k * kNR), q1 = _mm256_loadu_ps(tile + k * kNR + 8);
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      acc[m][0] = _mm256_fmadd_ps(xb, q0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xb, q1, acc[m][1]);
    }
  }
  const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
  const __m256 c0 = _mm256_loadu_ps(c), c1 = _mm256_loadu_ps(c + 8);
  for (int m = 0; m < MR; ++m) {
    const __m256 xs = _mm256_broadcast_ss(xsum + m * ldxs);
    float* o = out + m * kNR;
    _mm256_storeu_ps(o, _mm256_fmadd_ps(c0, xs, _mm256_fmadd_ps(s0, acc[m][0], _mm256_loadu_ps(o))));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(c1, xs, _mm256_fmadd_ps(s1, acc[m][1], _mm256_loadu_ps(o + 8))));
  }
}

constexpr int kMRTile = 6;  // rows per register block over a converted tile (12 sums + 2 codes + 1 x)

// W4 with several row blocks: unpack and convert the block's codes once (`tile`, kKB x 16 floats, L1/L2-
// resident) and run every row block over it; else convert in registers as it goes (micro_a16). Measured
// against the previous build in one process, alternating (AVX2, the 30 layers' SmolLM2 shapes, groups of
// 128/64): W4 1.21x at M = 32, 1.04x at M = 8; W8 was slower with the tile (its conversion is two
// widening loads, cheaper than the tile's stores and reloads), so W8 keeps micro_a16.
template <bool W4>
void block_avx2(const A16Args& a, const uint8_t* codes, int64_t k0, int64_t k1, const float* s, const float* c,
                int64_t b, float* out, float* tile) {
  const int64_t steps = k1 - k0;
  const uint8_t* ck = codes + k0 * a.bytes_k;
  constexpr int MR = kMR<W4>;
  if (W4 && a.M > MR) {
    for (int64_t k = 0; k < steps; ++k) {
      __m256 q0, q1;
      load_codes<W4>(ck + k * a.bytes_k, q0, q1);
      _mm256_storeu_ps(tile + k * kNR, q0);
      _mm256_storeu_ps(tile + k * kNR + 8, q1);
    }
    for (int64_t m = 0; m < a.M; m += kMRTile) {
      const float* x = a.x + m * a.K + k0;
      const float* xs = a.xsum + m * a.nblk + b;
      float* o = out + m * kNR;
      switch (std::min<int64_t>(kMRTile, a.M - m)) {
        case 1: micro_tile<1>(x, a.K, tile, steps, s, c, xs, a.nblk, o); break;
        case 2: micro_tile<2>(x, a.K, tile, steps, s, c, xs, a.nblk, o); break;
        case 3: micro_tile<3>(x, a.K, tile, steps, s, c, xs, a.nblk, o); break;
        case 4: micro_tile<4>(x, a.K, tile, steps, s, c, xs, a.nblk, o); break;
        case 5: micro_tile<5>(x, a.K, tile, steps, s, c, xs, a.nblk, o); break;
        default: micro_tile<kMRTile>(x, a.K, tile, steps, s, c, xs, a.nblk, o); break;
      }
    }
    return;
  }
  for (int64_t m = 0; m < a.M; m += MR) {
    const float* x = a.x + m * a.K + k0;
    const float* xs = a.xsum + m * a.nblk + b;
    float* o = out + m * kNR;
    switch (std::min<int64_t>(MR, a.M - m)) {
      case 1: micro_a16<W4, 1>(x, a.K, ck, a.bytes_k, steps, s, c, xs, a.nblk, o); break;
      case 2: micro_a16<W4, 2>(x, a.K, ck, a.bytes_k, steps, s, c, xs, a.nblk, o); break;
      case 3: micro_a16<W4, 3>(x, a.K, ck, a.bytes_k, steps, s, c, xs, a.nblk, o); break;
      case 4: micro_a16<W4, 4>(x, a.K, ck, a.bytes_k, steps, s, c, xs, a.nblk, o); break;
      case 5: micro_a16<W4, 5>(x, a.K, ck, a.bytes_k, steps, s, c, xs, a.nblk, o); break;
      default: micro_a16<W4, MR>(x, a.K, ck, a.bytes_k, steps, s, c, xs, a.nblk, o); break;
    }
  }
}

#endif  // OPENLORA_QG_AVX2

template <bool W4>
void panels_a16(const A16Args& a, Isa isa, const float* bias, float* yf, c10::BFloat16* yb, int64_t p0, int64_t p1) {
  std::vector<float> out(a.M * kNR);
  std::vector<float> tile(W4 && a.M > kMR<W4> ? kKB * kNR : 0);  // block_avx2's converted W4 codes
  for (int64_t p = p0; p < p1; ++p) {
    std::fill(out.begin(), out.end(), 0.f);
    const uint8_t* codes = a.codes + p * a.K * a.bytes_k;
    for (int64_t b = 0; b < a.blocks.count(); ++b) {
      const int64_t g = a.blocks.group(b);
      const float* s = a.scale + (p * a.groups + g) * kNR;
      const float* c = a.off + (p * a.groups + g) * kNR;
#if OPENLORA_QG_AVX2
      if (isa != Isa::kScalar) {
        block_avx2<W4>(a, codes, a.blocks.k0(b), a.blocks.k1(b), s, c, b, out.data(), tile.data());
        continue;
      }
#endif
      block_scalar<W4>(a, codes, a.blocks.k0(b), a.blocks.k1(b), s, c, b, out.data());
    }
    store_panel(out.data(), a.M, p * kNR, std::min<int64_t>(kNR, a.N - p * kNR), a.N, bias, yf, yb);
  }
}

// ---------------------------------------------------------------------------------------------------------
// W8A8

// Row m of xf -> xq (int8, K4 * 4 with zero pad) and one scale per group of `group` columns (the last
// group may be short only when group = K); `offset`: store xq + 128 (u8, VNNI).
void quantize_row(const float* x, int64_t K, int64_t K4, int64_t group, int8_t* q, float* scale, bool offset) {
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
    const int64_t g1 = std::min(g0 + group, K);
    float amax = 0.f;
    for (int64_t k = g0; k < g1; ++k) amax = std::max(amax, std::fabs(x[k]));
    float s = amax / 127.f;
    if (s == 0.f) s = 1.f;
    scale[gi] = s;
    int64_t k = g0;
#if OPENLORA_QG_AVX2
    const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    for (; k + 8 <= g1; k += 8) {  // IEEE division and half-to-even rounding: the same values as the scalar loop
      __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
      alignas(32) int32_t tmp[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), i);
      for (int j = 0; j < 8; ++j) q[k + j] = static_cast<int8_t>(offset ? tmp[j] + 128 : tmp[j]);
    }
#endif
    for (; k < g1; ++k) {
      const float v = std::min(std::max(std::nearbyint(x[k] / s), -127.f), 127.f);
      q[k] = static_cast<int8_t>(offset ? static_cast<int>(v) + 128 : static_cast<int>(v));
    }
  }
  for (int64_t k = K; k < 4 * K4; ++k) q[k] = static_cast<int8_t>(offset ? 128 : 0);
}

struct A8Args {
  const int8_t* xq;     // [M, 4 K4]
  const float* sx;      // [M, G]
  const int8_t* codes;  // [Nb, K4, 16, 4]
  const float* sw;      // [Nb, G, 16]
  const int32_t* wsum;  // [Nb, G, 16]: 128 * sum of the group's q
  int64_t M, K4, N, G;
  int64_t gs;           // k steps (of 4) per group: group / 4, or K4 for one group
  int64_t s0(int64_t g) const { return g * gs; }
  int64_t s1(int64_t g) const { return std::min(K4, (g + 1) * gs); }
};

// out[m, j] = fma(float(acc[j]), sx[m, g] * sw[g, j], out[m, j]) for one row and group: every path applies
// groups in order with this one rounding sequence, so all paths give the same bits.
inline void epilogue_a8(const int32_t* acc, float sx, const float* sw, float* out) {
  for (int64_t j = 0; j < kNR; ++j) out[j] = std::fma(static_cast<float>(acc[j]), sx * sw[j], out[j]);
}

void panel_a8_scalar(const A8Args& a, int64_t p, float* out) {
  const int8_t* w = a.codes + p * a.K4 * kNR * 4;
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* xr = a.xq + m * a.K4 * 4;
    for (int64_t g = 0; g < a.G; ++g) {
      int32_t acc[kNR] = {};
      for (int64_t s = a.s0(g); s < a.s1(g); ++s)
        for (int64_t j = 0; j < kNR; ++j)
          for (int i = 0; i < 4; ++i) acc[j] += int32_t(xr[4 * s + i]) * int32_t(w[(s * kNR + j) * 4 + i]);
      epilogue_a8(acc, a.sx[m * a.G + g], a.sw + (p * a.G + g) * kNR, out + m * kNR);
    }
  }
}

#if OPENLORA_QG_AVX2

// MR rows x 16 columns over k steps [s0, s1) (one group): |x| (u8) x sign(w, x) (s8) pair sums in int16,
// widened by VPMADDWD; then out += float(sum) * (sx * sw) (FMA), row by row.
template <int MR>
inline void micro_a8_avx2(const int8_t* xq, int64_t ldx, const int8_t* w, int64_t s0, int64_t s1, const float* sx,
                          int64_t ldsx, const float* sw, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t s = s0; s < s1; ++s) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 64 + 32));
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, xq + m * ldx + 4 * s, 4);
      const __m256i xb = _mm256_set1_epi32(four);  // x[m, 4s .. 4s+3] in every lane
      const __m256i ax = _mm256_abs_epi8(xb);
      const __m256i p0 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb));
      const __m256i p1 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb));
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(p0, ones));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(p1, ones));
    }
  }
  const __m256 sw0 = _mm256_loadu_ps(sw), sw1 = _mm256_loadu_ps(sw + 8);
  for (int m = 0; m < MR; ++m) {
    const __m256 sxb = _mm256_set1_ps(sx[m * ldsx]);
    float* o = out + m * kNR;
    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][0]), _mm256_mul_ps(sxb, sw0), _mm256_loadu_ps(o)));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][1]), _mm256_mul_ps(sxb, sw1),
                                            _mm256_loadu_ps(o + 8)));
  }
}

void panel_a8_avx2(const A8Args& a, int64_t p, float* out) {
  const int8_t* w = a.codes + p * a.K4 * kNR * 4;
  const int64_t ldx = a.K4 * 4;
  for (int64_t m = 0; m < a.M; m += kMR8)
    for (int64_t g = 0; g < a.G; ++g) {  // the row block's x stays in L1 across groups; W's group, in L1 too
      const int8_t* x = a.xq + m * ldx;
      const float* sw = a.sw + (p * a.G + g) * kNR;
      const float* sx = a.sx + m * a.G + g;
      const int64_t s0 = a.s0(g), s1 = a.s1(g);
      float* o = out + m * kNR;
      switch (std::min<int64_t>(kMR8, a.M - m)) {
        case 1: micro_a8_avx2<1>(x, ldx, w, s0, s1, sx, a.G, sw, o); break;
        case 2: micro_a8_avx2<2>(x, ldx, w, s0, s1, sx, a.G, sw, o); break;
        default: micro_a8_avx2<kMR8>(x, ldx, w, s0, s1, sx, a.G, sw, o); break;
      }
    }
}

#endif  // OPENLORA_QG_AVX2

#if OPENLORA_QG_VNNI

// MR rows x 16 columns over k steps [s0, s1) (one group): VPDPBUSD of u8 (xq + 128, broadcast 4 at a time)
// by s8 weights, minus the group's 128 sum(w); then out += float(sum) * (sx * sw) (FMA). U unrolled sums per
// row keep >= 4 independent VPDPBUSD chains in flight (latency 4-5).
template <int MR>
inline void micro_a8_vnni(const int8_t* xu, int64_t ldx, const int8_t* w, int64_t s0, int64_t s1, const float* sx,
                          int64_t ldsx, const float* sw, const int32_t* wsum, float* out) {
  constexpr int U = MR >= 4 ? 1 : MR >= 2 ? 2 : 4;
  __m512i acc[U][MR];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MR; ++m) acc[u][m] = _mm512_setzero_si512();
  int64_t s = s0;
  for (; s + U <= s1; s += U)
    for (int u = 0; u < U; ++u) {
      const __m512i wv = _mm512_loadu_si512(w + (s + u) * 64);
      for (int m = 0; m < MR; ++m) {
        int32_t four;
        std::memcpy(&four, xu + m * ldx + 4 * (s + u), 4);
        acc[u][m] = _mm512_dpbusd_epi32(acc[u][m], _mm512_set1_epi32(four), wv);
      }
    }
  for (; s < s1; ++s) {
    const __m512i wv = _mm512_loadu_si512(w + s * 64);
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, xu + m * ldx + 4 * s, 4);
      acc[0][m] = _mm512_dpbusd_epi32(acc[0][m], _mm512_set1_epi32(four), wv);
    }
  }
  const __m512i corr = _mm512_loadu_si512(wsum);
  const __m512 swv = _mm512_loadu_ps(sw);
  for (int m = 0; m < MR; ++m) {
    __m512i t = acc[0][m];
    for (int u = 1; u < U; ++u) t = _mm512_add_epi32(t, acc[u][m]);
    t = _mm512_sub_epi32(t, corr);
    float* o = out + m * kNR;
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(_mm512_set1_ps(sx[m * ldsx]), swv),
                                        _mm512_loadu_ps(o)));
  }
}

void panel_a8_vnni(const A8Args& a, int64_t p, float* out) {
  constexpr int MR = 8;  // 8 sums of 32: room to spare; B (one zmm per k step) is reused 8 times
  const int8_t* w = a.codes + p * a.K4 * kNR * 4;
  const int64_t ldx = a.K4 * 4;
  for (int64_t m = 0; m < a.M; m += MR)
    for (int64_t g = 0; g < a.G; ++g) {
      const int8_t* x = a.xq + m * ldx;
      const float* sw = a.sw + (p * a.G + g) * kNR;
      const int32_t* ws = a.wsum + (p * a.G + g) * kNR;
      const float* sx = a.sx + m * a.G + g;
      const int64_t s0 = a.s0(g), s1 = a.s1(g);
      float* o = out + m * kNR;
      switch (std::min<int64_t>(MR, a.M - m)) {
        case 1: micro_a8_vnni<1>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
        case 2: micro_a8_vnni<2>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
        case 3: micro_a8_vnni<3>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
        case 4: micro_a8_vnni<4>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
        case 5: micro_a8_vnni<5>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
        case 6: micro_a8_vnni<6>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
        case 7: micro_a8_vnni<7>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
        default: micro_a8_vnni<MR>(x, ldx, w, s0, s1, sx, a.G, sw, ws, o); break;
      }
    }
}

#endif  // OPENLORA_QG_VNNI

// ---------------------------------------------------------------------------------------------------------
// Entry points

struct Out {
  torch::Tensor y;
  float* yf = nullptr;
  c10::BFloat16* yb = nullptr;
  torch::Tensor bias;  // fp32 [N] or undefined
  const float* bp = nullptr;
};

Out make_out(const torch::Tensor& x, int64_t N, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "quant_gemm: x must be a 2-D fp32 or bf16 CPU tensor");
  Out o;
  o.y = torch::empty({x.size(0), N}, x.options());
  if (x.scalar_type() == at::kFloat) o.yf = o.y.data_ptr<float>();
  else o.yb = o.y.data_ptr<c10::BFloat16>();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "quant_gemm: bias must have N = ", N, " values");
    o.bias = bias->to(at::kFloat).contiguous();
    o.bp = o.bias.data_ptr<float>();
  }
  return o;
}

// W8A16 (bits 8) / W4A16 (bits 4). codes: [Nb, K, 16] int8 or [Nb, K, 8] uint8; scale, off: [Nb, G, 16].
torch::Tensor linear_a16(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                         const torch::Tensor& off, int64_t bits, int64_t group, int64_t N,
                         const c10::optional<torch::Tensor>& perm, const c10::optional<torch::Tensor>& bias,
                         const std::string& isa_name_in) {
  const Isa isa = pick_isa(isa_name_in);
  const int64_t M = x.size(0), K = x.size(1), Nb = ceil_div(N, kNR);
  const int64_t bytes_k = bits == 4 ? kNR / 2 : kNR;
  TORCH_CHECK((bits == 4 || bits == 8) && group > 0 && K % group == 0, "quant_gemm: x has ", K,
              " features, not a multiple of the group ", group);
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 3 && codes.size(0) == Nb && codes.size(1) == K &&
                  codes.size(2) == bytes_k && codes.element_size() == 1,
              "quant_gemm: x has ", K, " features but the packed codes are ", codes.sizes());
  TORCH_CHECK(scale.is_contiguous() && off.is_contiguous() && scale.scalar_type() == at::kFloat &&
                  off.scalar_type() == at::kFloat && scale.numel() == Nb * (K / group) * kNR && off.numel() == scale.numel(),
              "quant_gemm: packed scales do not match");
  Out o = make_out(x, N, bias);
  if (M == 0) return o.y;
  const torch::Tensor xf = to_f32(x, perm);
  const Blocks blocks(K, group);
  const int64_t nblk = blocks.count();
  torch::Tensor xsum = torch::empty({M, nblk}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* xs = xsum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nblk; ++b) {
      float t = 0.f;
      for (int64_t k = blocks.k0(b); k < blocks.k1(b); ++k) t += xp[m * K + k];
      xs[m * nblk + b] = t;
    }
  const A16Args a{xp, xs, static_cast<const uint8_t*>(codes.data_ptr()), scale.data_ptr<float>(),
                  off.data_ptr<float>(), M, K, N, nblk, K / group, bytes_k, blocks};
  at::parallel_for(0, Nb, 1, [&](int64_t p0, int64_t p1) {
    if (bits == 4) panels_a16<true>(a, isa, o.bp, o.yf, o.yb, p0, p1);
    else panels_a16<false>(a, isa, o.bp, o.yf, o.yb, p0, p1);
  });
  return o.y;
}

// W8A8. codes [Nb, K4, 16, 4] int8; sw fp32 [Nb, G, 16]; wsum int32 [Nb, G, 16]; group: columns per scale
// (a multiple of 4 dividing K, or K).
torch::Tensor linear_a8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& sw,
                        const torch::Tensor& wsum, int64_t group, int64_t N, const c10::optional<torch::Tensor>& perm,
                        const c10::optional<torch::Tensor>& bias, const std::string& isa_name_in) {
  const Isa isa = pick_isa(isa_name_in);
  const int64_t M = x.size(0), K = x.size(1), Nb = ceil_div(N, kNR), K4 = ceil_div(K, 4);
  TORCH_CHECK(group == K || (group > 0 && group % 4 == 0 && K % group == 0), "quant_gemm: x has ", K,
              " features, not a multiple of the W8A8 group ", group);
  const int64_t G = K / group;
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 4 && codes.size(0) == Nb && codes.size(1) == K4 &&
                  codes.size(2) == kNR && codes.size(3) == 4 && codes.scalar_type() == at::kChar,
              "quant_gemm: x has ", K, " features but the packed W8A8 codes are ", codes.sizes());
  TORCH_CHECK(sw.is_contiguous() && sw.scalar_type() == at::kFloat && sw.numel() == Nb * G * kNR &&
                  wsum.is_contiguous() && wsum.scalar_type() == at::kInt && wsum.numel() == Nb * G * kNR,
              "quant_gemm: packed W8A8 scales do not match");
  Out o = make_out(x, N, bias);
  if (M == 0) return o.y;
  const torch::Tensor xf = to_f32(x, perm);
  torch::Tensor xq = torch::empty({M, 4 * K4}, xf.options().dtype(at::kChar));
  torch::Tensor sx = torch::empty({M, G}, xf.options());
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xf.data_ptr<float>() + m * K, K, K4, group, xq.data_ptr<int8_t>() + m * 4 * K4,
                 sx.data_ptr<float>() + m * G, isa == Isa::kVnni);
  const A8Args a{xq.data_ptr<int8_t>(), sx.data_ptr<float>(), codes.data_ptr<int8_t>(), sw.data_ptr<float>(),
                 wsum.data_ptr<int32_t>(), M, K4, N, G, group == K ? K4 : group / 4};
  at::parallel_for(0, Nb, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> out(M * kNR);
    for (int64_t p = p0; p < p1; ++p) {
      std::fill(out.begin(), out.end(), 0.f);
#if OPENLORA_QG_VNNI
      if (isa == Isa::kVnni) panel_a8_vnni(a, p, out.data());
      else
#endif
#if OPENLORA_QG_AVX2
      if (isa != Isa::kScalar) panel_a8_avx2(a, p, out.data());
      else
#endif
        panel_a8_scalar(a, p, out.data());
      store_panel(out.data(), M, p * kNR, std::min<int64_t>(kNR, N - p * kNR), N, o.bp, o.yf, o.yb);
    }
  });
  return o.y;
}

// (xq [M, K] int8, sx [M, G] fp32): the activation quantization linear_a8 applies (for tests).
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm,
                                                int64_t group) {
  TORCH_CHECK(x.dim() == 2, "quant_gemm: x must be 2-D");
  const torch::Tensor xf = to_f32(x, perm);
  const int64_t M = xf.size(0), K = xf.size(1), K4 = ceil_div(K, 4);
  if (group <= 0) group = K;
  TORCH_CHECK(K % group == 0, "quant_gemm: K ", K, " is not a multiple of the group ", group);
  torch::Tensor xq = torch::empty({M, 4 * K4}, xf.options().dtype(at::kChar));
  torch::Tensor sx = torch::empty({M, K / group}, xf.options());
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xf.data_ptr<float>() + m * K, K, K4, group, xq.data_ptr<int8_t>() + m * 4 * K4,
                 sx.data_ptr<float>() + m * (K / group), false);
  return {xq.narrow(1, 0, K).contiguous(), sx};
}

std::string isa() { return isa_name(best_isa()); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the best path this module runs here: avx512_vnni, avx2 or scalar");
  m.def("linear_a16", &linear_a16, "W8A16 / W4A16: x [M, K] @ W^T (+ bias) -> [M, N]",
        py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("off"),
        py::arg("bits"), py::arg("group"), py::arg("n"), py::arg("perm"), py::arg("bias"), py::arg("isa") = "");
  m.def("linear_a8", &linear_a8, "W8A8 (dynamic int8 x per token and group): x [M, K] @ W^T (+ bias) -> [M, N]",
        py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("codes"), py::arg("sw"), py::arg("wsum"),
        py::arg("group"), py::arg("n"), py::arg("perm"), py::arg("bias"), py::arg("isa") = "");
  m.def("quantize_activations", &quantize_activations, "x [M, K] -> (int8 [M, K], fp32 scale [M, G])", py::arg("x"),
        py::arg("perm"), py::arg("group") = 0);
}
