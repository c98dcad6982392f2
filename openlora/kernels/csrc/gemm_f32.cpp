// fp32 linear layer y = x @ W^T (+ b) with AVX-512 FMAs on weights packed at load time, for the small-M
// matmuls of decode steps (M = batch rows, weights streamed from memory once per call).
//
// Packed layout, W [N, K] -> P [Nb, K, 48] fp32, Nb = ceil(N/48), zero padded:
//     P[nb, k, c] = W[48 nb + c, k]
// so one 48-column panel is a contiguous stream of K rows of 192 bytes (three zmm per k). 48 divides the
// projection widths of the common models (576, 960, 1536, 2048, 3072, 4096, 49152, ...).
//
// One call: the panels are split over the intra-op threads (at::parallel_for). For each panel a thread
// walks rows in chunks of kRowChunk and K in slices of kSliceK; within a slice every 8-row block of the
// chunk multiplies the same 3 x kSliceK zmm of B (from L1) into an 8 x 48 accumulator held in 24 zmm
// (+3 for B, 1 broadcast: 24 FMAs per 11 loads), so B is read from memory once per call, and the
// accumulators go through L1 once per slice. x is read in place (one row pointer per block row). While a
// slice is used, the next one is prefetched, its lines spread over all row blocks' k steps, so the
// weight stream never pauses while the later blocks reuse the slice. Bias is added at the end; fp32
// throughout.
// Measured at M=32 over 30 layers' distinct weights (the SmolLM2-135M shapes) plus the LM head, A/B in one
// process: 142-148 GFLOP/s against 116 for the previous version of this file, which copied x k-major
// before every call (serial, ~50 us at K=1536) and prefetched only from the first row block, 4 KB ahead
// (the stream paused during the other three). oneDNN's packed linear: 102-112.
//
// Numerics: plain fp32 FMAs, each output summed in k order; the order differs from MKL/oneDNN's blocked
// sums, so results agree with F.linear to fp32 rounding, not bit for bit (tests/kernels/test_gemm.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define OPENLORA_GEMM_F32 1
#else
#define OPENLORA_GEMM_F32 0
#endif

namespace {

constexpr int64_t kPanel = 48;     // output columns per panel (three zmm)
constexpr int kMR = 8;             // rows per register block: 24 accumulators
constexpr int64_t kSliceK = 64;    // K per slice: a 12 KB B slice stays in L1 across the row blocks
constexpr int64_t kRowChunk = 48;  // rows whose accumulators (9 KB) and x slice (12 KB) stay in L1

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if OPENLORA_GEMM_F32

// acc[MR][48] (+)= A[MR rows, kc] @ b[kc][48]. a: row 0 of this row block at the slice's first k, rows
// lda apart (x read in place: MR row pointers, one broadcast per row and k).
// pf, pf_lines: cache lines to prefetch during the call (spread evenly over its k steps), or 0 lines.
template <int MR>
inline void micro(const float* a, int64_t lda, const float* b, int64_t kc, float* acc, bool first, const char* pf,
                  int64_t pf_lines) {
  const float* ar[MR];
  for (int m = 0; m < MR; ++m) ar[m] = a + m * lda;
  __m512 c0[MR], c1[MR], c2[MR];
  for (int m = 0; m < MR; ++m) {
    c0[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel);
    c1[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel + 16);
    c2[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel + 32);
  }
  int64_t line = 0;
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * kPanel;
    for (; line * kc < (k + 1) * pf_lines; ++line) _mm_prefetch(pf + 64 * line, _MM_HINT_T1);  // L2: T0 measured the same
    const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16), b2 = _mm512_loadu_ps(bk + 32);
    for (int m = 0; m < MR; ++m) {
      const __m512 av = _mm512_set1_ps(ar[m][k]);
      c0[m] = _mm512_fmadd_ps(av, b0, c0[m]);
      c1[m] = _mm512_fmadd_ps(av, b1, c1[m]);
      c2[m] = _mm512_fmadd_ps(av, b2, c2[m]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(acc + m * kPanel, c0[m]);
    _mm512_storeu_ps(acc + m * kPanel + 16, c1[m]);
    _mm512_storeu_ps(acc + m * kPanel + 32, c2[m]);
  }
}

inline void micro_tail(int mr, const float* a, int64_t lda, const float* b, int64_t kc, float* acc, bool first,
                       const char* pf, int64_t pf_lines) {
  switch (mr) {
    case 1: return micro<1>(a, lda, b, kc, acc, first, pf, pf_lines);
    case 2: return micro<2>(a, lda, b, kc, acc, first, pf, pf_lines);
    case 3: return micro<3>(a, lda, b, kc, acc, first, pf, pf_lines);
    case 4: return micro<4>(a, lda, b, kc, acc, first, pf, pf_lines);
    case 5: return micro<5>(a, lda, b, kc, acc, first, pf, pf_lines);
    case 6: return micro<6>(a, lda, b, kc, acc, first, pf, pf_lines);
    case 7: return micro<7>(a, lda, b, kc, acc, first, pf, pf_lines);
    default: return micro<kMR>(a, lda, b, kc, acc, first, pf, pf_lines);
  }
}

// Panels [nb0, nb1) for all M rows; x [M, K] with rows lda apart.
void run_panels(const float* x, int64_t lda, int64_t M, int64_t K, const float* packed, int64_t N,
                const float* bias, float* y, int64_t nb0, int64_t nb1) {
  alignas(64) float acc[kRowChunk * kPanel];
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const float* panel = packed + nb * K * kPanel;
    const int64_t n0 = nb * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
    __mmask16 mk[3];
    __m512 bv[3];
    for (int v = 0; v < 3; ++v) {
      const int64_t c = cols - 16 * v;  // columns left for vector v
      mk[v] = c >= 16 ? 0xFFFF : c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1u);
      bv[v] = bias ? _mm512_maskz_loadu_ps(mk[v], bias + n0 + 16 * v) : _mm512_setzero_ps();
    }
    for (int64_t r0 = 0; r0 < M; r0 += kRowChunk) {
      const int64_t rows = std::min<int64_t>(kRowChunk, M - r0);
      const int64_t blocks = ceil_div(rows, kMR);
      for (int64_t k0 = 0; k0 < K; k0 += kSliceK) {
        const int64_t kc = std::min<int64_t>(kSliceK, K - k0);
        const float* b = panel + k0 * kPanel;
        // The next slice of B (the next panel's first after the last; panels are contiguous) is
        // prefetched while this one is used, its lines split evenly over the row blocks, so the weight
        // stream from memory never pauses while the later row blocks reuse the slice from L1.
        const char* next = reinterpret_cast<const char*>(b + kc * kPanel);
        const int64_t next_lines = std::min<int64_t>(kSliceK, k0 + kc < K ? K - k0 - kc : K) * kPanel * 4 / 64;
        for (int64_t j = 0; j < blocks; ++j) {
          const int64_t m = j * kMR;
          const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - m));
          const int64_t l0 = next_lines * j / blocks, l1 = next_lines * (j + 1) / blocks;
          micro_tail(mr, x + (r0 + m) * lda + k0, lda, b, kc, acc + m * kPanel, k0 == 0, next + 64 * l0, l1 - l0);
        }
      }
      for (int64_t m = 0; m < rows; ++m) {
        float* out = y + (r0 + m) * N + n0;
        for (int v = 0; v < 3; ++v)
          if (mk[v]) _mm512_mask_storeu_ps(out + 16 * v, mk[v], _mm512_add_ps(_mm512_loadu_ps(acc + m * kPanel + 16 * v), bv[v]));
      }
    }
  }
}

#endif  // OPENLORA_GEMM_F32

}  // namespace

bool available() { return OPENLORA_GEMM_F32 != 0; }

// W [N, K] fp32 -> packed [Nb, K, 48] fp32.
torch::Tensor pack_weight(const torch::Tensor& w_in) {
  TORCH_CHECK(w_in.device().is_cpu() && w_in.scalar_type() == at::kFloat && w_in.dim() == 2,
              "gemm_f32: weight must be a 2-D fp32 CPU tensor [out, in]");
  const torch::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), Nb = ceil_div(N, kPanel);
  torch::Tensor packed = torch::zeros({Nb, K, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, Nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t c = 0; c < kPanel && nb * kPanel + c < N; ++c)
        for (int64_t k = 0; k < K; ++k) dst[(nb * K + k) * kPanel + c] = src[(nb * kPanel + c) * K + k];
  });
  return packed;
}

// y = x @ W^T (+ bias) -> new [M, N] fp32; x [M, K] fp32 with a contiguous last dim.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                     int64_t N) {
#if OPENLORA_GEMM_F32
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && (x.stride(1) == 1 || x.size(1) <= 1),
              "gemm_f32: x must be a 2-D fp32 CPU tensor with a contiguous last dim");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.is_contiguous() && packed.size(2) == kPanel,
              "gemm_f32: packed weight must come from pack_weight");
  const int64_t M = x.size(0), K = x.size(1), Nb = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && ceil_div(N, kPanel) == Nb && N > 0,
              "gemm_f32: x has ", K, " features and N=", N, " but the packed weight is ", Nb, " panels x ", packed.size(1));
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == N, "gemm_f32: bias must be fp32 [N]");
    bp = b.data_ptr<float>();
  }
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int64_t lda = x.size(1) <= 1 ? K : x.stride(0);
  const float* pp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, Nb, 1, [&](int64_t nb0, int64_t nb1) { run_panels(xp, lda, M, K, pp, N, bp, yp, nb0, nb1); });
  return y;
#else
  TORCH_CHECK(false, "gemm_f32: built without AVX-512");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the AVX-512 kernel was compiled in");
  m.def("pack_weight", &pack_weight, "W [N, K] fp32 -> [ceil(N/48), K, 48] panels", py::arg("w"));
  m.def("linear", &linear, "x [M, K] @ W^T (+ bias) -> [M, N] fp32", py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"));
}
