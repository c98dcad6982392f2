// Linear layer y = x @ W^T (+ b) with AVX-512 on weights packed at load time, for the small-M matmuls of
// decode steps (M = batch rows, weights streamed from memory once per call). Two element types share one
// loop nest:
//     fp32: FMAs (AVX-512F);
//     bf16: VDPBF16PS (AVX512_BF16: each fp32 lane accumulates the products of one k pair), for CPUs
//           that have AVX512_BF16 but no AMX tiles (AMD Zen 4/5, Intel Cooper Lake); csrc/gemm_amx.cpp
//           serves AMX CPUs.
//
// Packed layout, W [N, K] -> P [Nb, Ks, 48 * G], Nb = ceil(N/48), G = k values per 32-bit lane (1 for
// fp32, 2 for bf16), Ks = ceil(K/G) k steps, zero padded:
//     P[nb, s, G c + j] = W[48 nb + c, G s + j]
// so one 48-column panel is a contiguous stream of Ks rows of 192 bytes (three zmm per k step). 48 divides
// the projection widths of the common models (576, 960, 1536, 2048, 3072, 4096, 49152, ...).
//
// One call: the panels are split over the intra-op threads (at::parallel_for). For each panel a thread
// walks rows in chunks of kRowChunk and k steps in slices of kSlice; within a slice every 8-row block of
// the chunk multiplies the same 3 x kSlice zmm of B (from L1) into an 8 x 48 fp32 accumulator held in 24
// zmm (+3 for B; each row's x value is a broadcast memory operand of its three FMAs), so B is read from
// memory once per call, and the accumulators go through L1 once per slice. x is read in place (rows lda
// apart; bf16 broadcasts one 32-bit k pair). While a slice is used, the next one is prefetched, its lines spread over
// all row blocks' k steps, so the weight stream never pauses while the later blocks reuse the slice.
// Bias is added in fp32 at the end; bf16 output is rounded once (to nearest even), as oneDNN does.
// Measured at M=32 over 30 layers' distinct weights of the SmolLM2-135M shapes plus the LM head:
//   Intel Xeon (AMX machine), fp32, A/B in one process: 142-148 GFLOP/s against 116 for a version that
//     copied x k-major before every call and prefetched only from the first row block; oneDNN 102-112;
//   AMD EPYC Zen 4 (2 cores): fp32 211 GFLOP/s (FMA peak 229), bf16 395 (VDPBF16PS peak 468), 412 with
//     the pinned 8-row block (micro8_bf16); the set took 23 ms in bf16 against 30 with oneDNN's packed linear;
//     without the B prefetch below, bf16 1.2x and fp32 1.7x slower.
//
// Numerics: products and sums in fp32, each output summed in k order (bf16: one k pair per step;
// VDPBF16PS treats denormals as zero); the order differs from oneDNN's blocked sums, so results agree with
// F.linear to rounding, not bit for bit (tests/kernels/test_gemm.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define OPENLORA_GEMM_F32 1
#else
#define OPENLORA_GEMM_F32 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define OPENLORA_GEMM_BF16 1
#else
#define OPENLORA_GEMM_BF16 0
#endif

namespace {

constexpr int64_t kPanel = 48;     // output columns per panel (three zmm of fp32 accumulators)
constexpr int kMR = 8;             // rows per register block: 24 accumulators
constexpr int64_t kSlice = 64;     // k steps per slice: a 12 KB B slice stays in L1 across the row blocks
constexpr int64_t kRowChunk = 48;  // rows whose accumulators (9 KB) and x slice (12 KB) stay in L1

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

using bf16 = c10::BFloat16;
template <typename T>
constexpr int64_t kGroup = sizeof(float) / sizeof(T);  // k values per 32-bit lane: fp32 1, bf16 2

#if OPENLORA_GEMM_F32

// acc[MR][48] (+)= A[MR rows, steps] @ b[steps][48]. a: row 0 of this row block at the slice's first k,
// rows lda elements apart. pf, pf_lines: cache lines to prefetch during the call (spread evenly over its
// k steps), or 0 lines.
template <typename T, int MR>
inline void micro(const T* a, int64_t lda, const T* b, int64_t steps, float* acc, bool first, const char* pf,
                  int64_t pf_lines) {
  const T* ar[MR];
  for (int m = 0; m < MR; ++m) ar[m] = a + m * lda;
  __m512 c0[MR], c1[MR], c2[MR];
  for (int m = 0; m < MR; ++m) {
    c0[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel);
    c1[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel + 16);
    c2[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel + 32);
  }
  int64_t line = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const T* bs = b + s * kPanel * kGroup<T>;
    for (; line * steps < (s + 1) * pf_lines; ++line) _mm_prefetch(pf + 64 * line, _MM_HINT_T1);  // L2: T0 measured the same
    // The x value (fp32) or k pair (bf16) of each row is an embedded-broadcast memory operand of its three
    // FMAs ({1to16}: read from L1 by the FMA itself) rather than a separate broadcast into a register,
    // which the compiler emits for the intrinsics and which competes with the FMAs for the vector pipes
    // on AMD Zen 4. A/B in one process (M=32, 30 layers' distinct weights + LM head): fp32 200 -> 211
    // GFLOP/s (FMA peak measured 229), bf16 383 -> 395 (VDPBF16PS peak 468); M=1024 fp32 190 -> 199.
    if constexpr (std::is_same_v<T, float>) {
      const __m512 b0 = _mm512_loadu_ps(bs), b1 = _mm512_loadu_ps(bs + 16), b2 = _mm512_loadu_ps(bs + 32);
      for (int m = 0; m < MR; ++m) {
        asm("vfmadd231ps %[a]%{1to16%}, %[b0], %[c0]\n\t"
            "vfmadd231ps %[a]%{1to16%}, %[b1], %[c1]\n\t"
            "vfmadd231ps %[a]%{1to16%}, %[b2], %[c2]"
            : [c0] "+v"(c0[m]), [c1] "+v"(c1[m]), [c2] "+v"(c2[m])
            : [a] "m"(ar[m][s]), [b0] "v"(b0), [b1] "v"(b1), [b2] "v"(b2));
      }
    } else {
#if OPENLORA_GEMM_BF16
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bs), b1 = (__m512bh)_mm512_loadu_si512(bs + 32),
                     b2 = (__m512bh)_mm512_loadu_si512(bs + 64);
      for (int m = 0; m < MR; ++m) {
        const int32_t* pair = reinterpret_cast<const int32_t*>(ar[m] + 2 * s);  // x[m, 2s], x[m, 2s + 1]
        asm("vdpbf16ps %[a]%{1to16%}, %[b0], %[c0]\n\t"
            "vdpbf16ps %[a]%{1to16%}, %[b1], %[c1]\n\t"
            "vdpbf16ps %[a]%{1to16%}, %[b2], %[c2]"
            : [c0] "+v"(c0[m]), [c1] "+v"(c1[m]), [c2] "+v"(c2[m])
            : [a] "m"(*pair), [b0] "v"(b0), [b1] "v"(b1), [b2] "v"(b2));
      }
#endif
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(acc + m * kPanel, c0[m]);
    _mm512_storeu_ps(acc + m * kPanel + 16, c1[m]);
    _mm512_storeu_ps(acc + m * kPanel + 32, c2[m]);
  }
}

#if OPENLORA_GEMM_BF16
// The full 8-row bf16 block, as micro<bf16, 8>, with its 24 accumulators pinned to zmm8-zmm31 and the B
// vectors to zmm0-zmm2 (local register variables used as asm operands). Left to itself, GCC 12 kept two
// of the 24 accumulators of micro<bf16, 8> in stack slots, loading and storing them at every k step
// (perf annotate on the bf16 bench workload: about a fifth of the kernel's samples on that reload).
// A/B in one process (30 layers' distinct weights + LM head, AMD Zen 4, bf16): M=32 386 -> 412 GFLOP/s
// (VDPBF16PS peak 468), M=1024 386 -> 405. The same block for fp32 measured alike (M=32 199 vs 202,
// M=1024 189 vs 190), so fp32 keeps micro<>.
#define OPENLORA_GEMM_ROW(A, C0, C1, C2)                                                                   \
  asm("vdpbf16ps %[a]%{1to16%}, %[b0], %[c0]\n\tvdpbf16ps %[a]%{1to16%}, %[b1], %[c1]\n\t"                \
      "vdpbf16ps %[a]%{1to16%}, %[b2], %[c2]"                                                               \
      : [c0] "+v"(C0), [c1] "+v"(C1), [c2] "+v"(C2)                                                         \
      : [a] "m"(A), [b0] "v"(b0), [b1] "v"(b1), [b2] "v"(b2))
#define OPENLORA_GEMM_ACC(NAME, REG, OFF) \
  register __m512 NAME asm(REG) = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (OFF))

inline void micro8_bf16(const bf16* a, int64_t lda, const bf16* b, int64_t steps, float* acc, bool first,
                        const char* pf, int64_t pf_lines) {
  OPENLORA_GEMM_ACC(c00, "zmm8", 0); OPENLORA_GEMM_ACC(c01, "zmm9", 16); OPENLORA_GEMM_ACC(c02, "zmm10", 32);
  OPENLORA_GEMM_ACC(c10, "zmm11", 48); OPENLORA_GEMM_ACC(c11, "zmm12", 64); OPENLORA_GEMM_ACC(c12, "zmm13", 80);
  OPENLORA_GEMM_ACC(c20, "zmm14", 96); OPENLORA_GEMM_ACC(c21, "zmm15", 112); OPENLORA_GEMM_ACC(c22, "zmm16", 128);
  OPENLORA_GEMM_ACC(c30, "zmm17", 144); OPENLORA_GEMM_ACC(c31, "zmm18", 160); OPENLORA_GEMM_ACC(c32, "zmm19", 176);
  OPENLORA_GEMM_ACC(c40, "zmm20", 192); OPENLORA_GEMM_ACC(c41, "zmm21", 208); OPENLORA_GEMM_ACC(c42, "zmm22", 224);
  OPENLORA_GEMM_ACC(c50, "zmm23", 240); OPENLORA_GEMM_ACC(c51, "zmm24", 256); OPENLORA_GEMM_ACC(c52, "zmm25", 272);
  OPENLORA_GEMM_ACC(c60, "zmm26", 288); OPENLORA_GEMM_ACC(c61, "zmm27", 304); OPENLORA_GEMM_ACC(c62, "zmm28", 320);
  OPENLORA_GEMM_ACC(c70, "zmm29", 336); OPENLORA_GEMM_ACC(c71, "zmm30", 352); OPENLORA_GEMM_ACC(c72, "zmm31", 368);
  // Row m's k pair at k step s: 32 bits at x0[m * ld + s], the broadcast operand of the row's three FMAs.
  const int32_t* x0 = reinterpret_cast<const int32_t*>(a);
  const int64_t ld = lda / 2;  // row stride in k pairs (lda is even: run() pads odd K)
  int64_t line = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const float* bs = reinterpret_cast<const float*>(b + s * kPanel * 2);
    for (; line * steps < (s + 1) * pf_lines; ++line) _mm_prefetch(pf + 64 * line, _MM_HINT_T1);
    register __m512 b0 asm("zmm0") = _mm512_loadu_ps(bs);
    register __m512 b1 asm("zmm1") = _mm512_loadu_ps(bs + 16);
    register __m512 b2 asm("zmm2") = _mm512_loadu_ps(bs + 32);
    const int32_t* xs = x0 + s;
    OPENLORA_GEMM_ROW(xs[0], c00, c01, c02);
    OPENLORA_GEMM_ROW(xs[ld], c10, c11, c12);
    OPENLORA_GEMM_ROW(xs[2 * ld], c20, c21, c22);
    OPENLORA_GEMM_ROW(xs[3 * ld], c30, c31, c32);
    OPENLORA_GEMM_ROW(xs[4 * ld], c40, c41, c42);
    OPENLORA_GEMM_ROW(xs[5 * ld], c50, c51, c52);
    OPENLORA_GEMM_ROW(xs[6 * ld], c60, c61, c62);
    OPENLORA_GEMM_ROW(xs[7 * ld], c70, c71, c72);
  }
  // Stored one by one: an array of the 24 values made GCC copy them through the stack with memcpy.
  _mm512_storeu_ps(acc, c00), _mm512_storeu_ps(acc + 16, c01), _mm512_storeu_ps(acc + 32, c02);
  _mm512_storeu_ps(acc + 48, c10), _mm512_storeu_ps(acc + 64, c11), _mm512_storeu_ps(acc + 80, c12);
  _mm512_storeu_ps(acc + 96, c20), _mm512_storeu_ps(acc + 112, c21), _mm512_storeu_ps(acc + 128, c22);
  _mm512_storeu_ps(acc + 144, c30), _mm512_storeu_ps(acc + 160, c31), _mm512_storeu_ps(acc + 176, c32);
  _mm512_storeu_ps(acc + 192, c40), _mm512_storeu_ps(acc + 208, c41), _mm512_storeu_ps(acc + 224, c42);
  _mm512_storeu_ps(acc + 240, c50), _mm512_storeu_ps(acc + 256, c51), _mm512_storeu_ps(acc + 272, c52);
  _mm512_storeu_ps(acc + 288, c60), _mm512_storeu_ps(acc + 304, c61), _mm512_storeu_ps(acc + 320, c62);
  _mm512_storeu_ps(acc + 336, c70), _mm512_storeu_ps(acc + 352, c71), _mm512_storeu_ps(acc + 368, c72);
}
#undef OPENLORA_GEMM_ACC
#undef OPENLORA_GEMM_ROW
#endif  // OPENLORA_GEMM_BF16

template <typename T>
inline void micro_tail(int mr, const T* a, int64_t lda, const T* b, int64_t steps, float* acc, bool first,
                       const char* pf, int64_t pf_lines) {
  switch (mr) {
    case 1: return micro<T, 1>(a, lda, b, steps, acc, first, pf, pf_lines);
    case 2: return micro<T, 2>(a, lda, b, steps, acc, first, pf, pf_lines);
    case 3: return micro<T, 3>(a, lda, b, steps, acc, first, pf, pf_lines);
    case 4: return micro<T, 4>(a, lda, b, steps, acc, first, pf, pf_lines);
    case 5: return micro<T, 5>(a, lda, b, steps, acc, first, pf, pf_lines);
    case 6: return micro<T, 6>(a, lda, b, steps, acc, first, pf, pf_lines);
    case 7: return micro<T, 7>(a, lda, b, steps, acc, first, pf, pf_lines);
    default:
#if OPENLORA_GEMM_BF16
      if constexpr (std::is_same_v<T, bf16>) return micro8_bf16(a, lda, b, steps, acc, first, pf, pf_lines);
#endif
      return micro<T, kMR>(a, lda, b, steps, acc, first, pf, pf_lines);
  }
}

// bias (16 values, masked) as fp32; bf16 -> fp32 is exact (the 16 bits become the high half).
template <typename T>
inline __m512 load_f32(__mmask16 mk, const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mk, p);
  } else {
#if OPENLORA_GEMM_BF16
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
#else
    return _mm512_setzero_ps();
#endif
  }
}

// 16 fp32 values (masked) -> out; bf16 rounds to nearest even.
template <typename T>
inline void store_out(T* out, __mmask16 mk, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(out, mk, v);
  } else {
#if OPENLORA_GEMM_BF16
    _mm256_mask_storeu_epi16(out, mk, (__m256i)_mm512_cvtneps_pbh(v));
#endif
  }
}

// Panels [nb0, nb1) for all M rows; x [M, K] with rows lda apart (K a multiple of the group size).
template <typename T>
void run_panels(const T* x, int64_t lda, int64_t M, int64_t K, const T* packed, int64_t N, const T* bias, T* y,
                int64_t nb0, int64_t nb1) {
  constexpr int64_t G = kGroup<T>;
  const int64_t Ks = K / G;
  alignas(64) float acc[kRowChunk * kPanel];
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const T* panel = packed + nb * Ks * kPanel * G;
    const int64_t n0 = nb * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
    __mmask16 mk[3];
    __m512 bv[3];
    for (int v = 0; v < 3; ++v) {
      const int64_t c = cols - 16 * v;  // columns left for vector v
      mk[v] = c >= 16 ? 0xFFFF : c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1u);
      bv[v] = bias ? load_f32(mk[v], bias + n0 + 16 * v) : _mm512_setzero_ps();
    }
    for (int64_t r0 = 0; r0 < M; r0 += kRowChunk) {
      const int64_t rows = std::min<int64_t>(kRowChunk, M - r0);
      const int64_t blocks = ceil_div(rows, kMR);
      for (int64_t s0 = 0; s0 < Ks; s0 += kSlice) {
        const int64_t sc = std::min<int64_t>(kSlice, Ks - s0);
        const T* b = panel + s0 * kPanel * G;
        // The next slice of B (the next panel's first after the last; panels are contiguous) is
        // prefetched while this one is used, its lines split evenly over the row blocks, so the weight
        // stream from memory never pauses while the later row blocks reuse the slice from L1.
        const char* next = reinterpret_cast<const char*>(b + sc * kPanel * G);
        const int64_t next_lines = std::min<int64_t>(kSlice, s0 + sc < Ks ? Ks - s0 - sc : Ks) * kPanel * 4 / 64;
        for (int64_t j = 0; j < blocks; ++j) {
          const int64_t m = j * kMR;
          const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - m));
          const int64_t l0 = next_lines * j / blocks, l1 = next_lines * (j + 1) / blocks;
          micro_tail<T>(mr, x + (r0 + m) * lda + s0 * G, lda, b, sc, acc + m * kPanel, s0 == 0, next + 64 * l0,
                        l1 - l0);
        }
      }
      for (int64_t m = 0; m < rows; ++m) {
        T* out = y + (r0 + m) * N + n0;
        for (int v = 0; v < 3; ++v)
          if (mk[v]) store_out(out + 16 * v, mk[v], _mm512_add_ps(_mm512_loadu_ps(acc + m * kPanel + 16 * v), bv[v]));
      }
    }
  }
}

#endif  // OPENLORA_GEMM_F32

template <typename T>
const char* type_name() {
  return std::is_same_v<T, float> ? "fp32" : "bf16";
}

template <typename T>
at::ScalarType scalar_type() {
  return std::is_same_v<T, float> ? at::kFloat : at::kBFloat16;
}

// W [N, K] -> packed [Nb, Ks, 48 G] (layout above).
template <typename T>
torch::Tensor pack(const torch::Tensor& w_in) {
  TORCH_CHECK(w_in.device().is_cpu() && w_in.scalar_type() == scalar_type<T>() && w_in.dim() == 2,
              "gemm_avx512: weight must be a 2-D ", type_name<T>(), " CPU tensor [out, in]");
  constexpr int64_t G = kGroup<T>;
  const torch::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), Nb = ceil_div(N, kPanel), Ks = ceil_div(K, G);
  torch::Tensor packed = torch::zeros({Nb, Ks, kPanel * G}, w.options());
  const T* src = w.data_ptr<T>();
  T* dst = packed.data_ptr<T>();
  at::parallel_for(0, Nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t c = 0; c < kPanel && nb * kPanel + c < N; ++c)
        for (int64_t k = 0; k < K; ++k) dst[((nb * Ks + k / G) * kPanel + c) * G + k % G] = src[(nb * kPanel + c) * K + k];
  });
  return packed;
}

template <typename T>
torch::Tensor run(const torch::Tensor& x_in, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                  int64_t N) {
  constexpr int64_t G = kGroup<T>;
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == kPanel * G,
              "gemm_avx512: packed weight must come from pack_weight");
  const int64_t M = x_in.size(0), K = x_in.size(1), Nb = packed.size(0);
  TORCH_CHECK(packed.size(1) == ceil_div(K, G) && ceil_div(N, kPanel) == Nb && N > 0, "gemm_avx512: x has ", K,
              " features and N=", N, " but the packed weight is ", Nb, " panels x ", packed.size(1), " k steps");
  const T* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == scalar_type<T>() && b.numel() == N, "gemm_avx512: bias must be ", type_name<T>(), " [N]");
    bp = b.data_ptr<T>();
  }
  torch::Tensor y = torch::empty({M, N}, x_in.options());
  if (M == 0) return y;
  // bf16 with odd K: one zero column so that every k pair of x exists (the packed pad is zero too).
  const torch::Tensor x = K % G ? at::constant_pad_nd(x_in, {0, G - K % G}) : x_in;
  const int64_t lda = x.size(1) <= 1 ? x.size(1) : x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* pp = packed.data_ptr<T>();
  T* yp = y.data_ptr<T>();
#if OPENLORA_GEMM_F32
  at::parallel_for(0, Nb, 1, [&](int64_t nb0, int64_t nb1) { run_panels<T>(xp, lda, M, x.size(1), pp, N, bp, yp, nb0, nb1); });
#endif
  return y;
}

}  // namespace

// Which element types were compiled in ("float32", "bfloat16").
bool available(const std::string& dtype) {
  if (dtype == "float32") return OPENLORA_GEMM_F32 != 0;
  if (dtype == "bfloat16") return OPENLORA_GEMM_BF16 != 0;
  return false;
}

torch::Tensor pack_weight(const torch::Tensor& w) {
  if (w.scalar_type() == at::kBFloat16 && OPENLORA_GEMM_BF16) return pack<bf16>(w);
  return pack<float>(w);
}

// y = x @ W^T (+ bias) -> new [M, N] in x's dtype; x [M, K] with a contiguous last dim.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                     int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (x.stride(1) == 1 || x.size(1) <= 1) &&
                  x.scalar_type() == packed.scalar_type() &&
                  ((x.scalar_type() == at::kFloat && OPENLORA_GEMM_F32) ||
                   (x.scalar_type() == at::kBFloat16 && OPENLORA_GEMM_BF16)),
              "gemm_avx512: x must be a 2-D CPU tensor with a contiguous last dim, of the packed weight's dtype "
              "(fp32, or bf16 where AVX512_BF16 was compiled in)");
  if (x.scalar_type() == at::kBFloat16) return run<bf16>(x, packed, bias, N);
  return run<float>(x, packed, bias, N);
}

#ifndef OPENLORA_UNITY_BUILD  // csrc/decoder_cpu.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the kernel for this dtype name was compiled in", py::arg("dtype"));
  m.def("pack_weight", &pack_weight, "W [N, K] -> [ceil(N/48), ceil(K/G), 48 G] panels (G = 1 fp32, 2 bf16)",
        py::arg("w"));
  m.def("linear", &linear, "x [M, K] @ W^T (+ bias) -> [M, N]", py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"));
}
#endif  // OPENLORA_UNITY_BUILD
