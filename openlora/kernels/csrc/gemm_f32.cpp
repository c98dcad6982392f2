// fp32 linear layer y = x @ W^T (+ b) with AVX-512 FMAs on weights packed at load time, for the small-M
// matmuls of decode steps (M = batch rows, weights streamed from memory once per call).
//
// Packed layout, W [N, K] -> P [Nb, K, 32] fp32, Nb = ceil(N/32), zero padded:
//     P[nb, k, c] = W[32 nb + c, k]
// so one 32-column panel is a contiguous stream of K rows of 128 bytes (two zmm per k).
//
// One call: the panels are split over the intra-op threads (at::parallel_for). For each panel a thread
// walks rows in chunks of kRowChunk and K in slices of kSliceK; within a slice every 12-row block of the
// chunk multiplies the same 2 x kSliceK zmm of B (from L1) into a 12 x 32 accumulator held in 24 zmm
// (+2 for B, 1 broadcast), so B is read from memory once per call, at the pace of all rows' FMAs, and
// the accumulators go through L1 only once per slice. Bias is added at the end; fp32 throughout.
//
// Numerics: plain fp32 FMAs, each output summed in k order; the order differs from MKL/oneDNN's blocked
// sums, so results agree with F.linear to fp32 rounding, not bit for bit (tests/kernels/test_gemm.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define OPENLORA_GEMM_F32 1
#else
#define OPENLORA_GEMM_F32 0
#endif

namespace {

constexpr int64_t kPanel = 32;     // output columns per panel (two zmm)
constexpr int kMR = 12;            // rows per register block: 24 accumulators
constexpr int64_t kSliceK = 64;    // K per slice: an 8 KB B slice stays in L1 across the row blocks
constexpr int64_t kRowChunk = 48;  // rows whose accumulators (6 KB) and x slice (12 KB) stay in L1
std::atomic<int64_t> g_prefetch_bytes{1024};  // B prefetched this far ahead (0 = off)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if OPENLORA_GEMM_F32

// acc[MR][32] (+)= a[MR rows, k0:k0+kc] @ b[kc][32]; a rows lda apart.
template <int MR>
inline void micro(const float* a, int64_t lda, const float* b, int64_t kc, float* acc, bool first, int64_t pf) {
  __m512 c0[MR], c1[MR];
  for (int m = 0; m < MR; ++m) {
    c0[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel);
    c1[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel + 16);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * kPanel;
    if (pf > 0 && (k & 1) == 0) {  // one 128-byte B row per k: two lines every other k
      _mm_prefetch(reinterpret_cast<const char*>(bk) + pf, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(bk) + pf + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(bk) + pf + 128, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(bk) + pf + 192, _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 av = _mm512_set1_ps(a[m * lda + k]);
      c0[m] = _mm512_fmadd_ps(av, b0, c0[m]);
      c1[m] = _mm512_fmadd_ps(av, b1, c1[m]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(acc + m * kPanel, c0[m]);
    _mm512_storeu_ps(acc + m * kPanel + 16, c1[m]);
  }
}

inline void micro_tail(int mr, const float* a, int64_t lda, const float* b, int64_t kc, float* acc, bool first,
                       int64_t pf) {
  switch (mr) {
    case 1: return micro<1>(a, lda, b, kc, acc, first, pf);
    case 2: return micro<2>(a, lda, b, kc, acc, first, pf);
    case 3: return micro<3>(a, lda, b, kc, acc, first, pf);
    case 4: return micro<4>(a, lda, b, kc, acc, first, pf);
    case 5: return micro<5>(a, lda, b, kc, acc, first, pf);
    case 6: return micro<6>(a, lda, b, kc, acc, first, pf);
    case 7: return micro<7>(a, lda, b, kc, acc, first, pf);
    case 8: return micro<8>(a, lda, b, kc, acc, first, pf);
    case 9: return micro<9>(a, lda, b, kc, acc, first, pf);
    case 10: return micro<10>(a, lda, b, kc, acc, first, pf);
    case 11: return micro<11>(a, lda, b, kc, acc, first, pf);
    default: return micro<kMR>(a, lda, b, kc, acc, first, pf);
  }
}

// Panels [nb0, nb1) for all M rows.
void run_panels(const float* x, int64_t lda, int64_t M, int64_t K, const float* packed, int64_t N,
                const float* bias, float* y, int64_t nb0, int64_t nb1) {
  alignas(64) float acc[kRowChunk * kPanel];
  const int64_t pf = g_prefetch_bytes.load(std::memory_order_relaxed);
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const float* panel = packed + nb * K * kPanel;
    const int64_t n0 = nb * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
    const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1u);
    const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1u);
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias + n0) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int64_t r0 = 0; r0 < M; r0 += kRowChunk) {
      const int64_t rows = std::min<int64_t>(kRowChunk, M - r0);
      for (int64_t k0 = 0; k0 < K; k0 += kSliceK) {
        const int64_t kc = std::min<int64_t>(kSliceK, K - k0);
        const float* b = panel + k0 * kPanel;
        for (int64_t m = 0; m < rows; m += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - m));
          // Only the first row block of a slice reads B from memory: it prefetches.
          micro_tail(mr, x + (r0 + m) * lda + k0, lda, b, kc, acc + m * kPanel, k0 == 0, m == 0 ? pf : 0);
        }
      }
      for (int64_t m = 0; m < rows; ++m) {
        float* out = y + (r0 + m) * N + n0;
        _mm512_mask_storeu_ps(out, m0, _mm512_add_ps(_mm512_loadu_ps(acc + m * kPanel), bias0));
        if (m1) _mm512_mask_storeu_ps(out + 16, m1, _mm512_add_ps(_mm512_loadu_ps(acc + m * kPanel + 16), bias1));
      }
    }
  }
}

#endif  // OPENLORA_GEMM_F32

}  // namespace

bool available() { return OPENLORA_GEMM_F32 != 0; }

// W [N, K] fp32 -> packed [Nb, K, 32] fp32.
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
  const int64_t lda = x.stride(0);
  const float* pp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, Nb, 1, [&](int64_t nb0, int64_t nb1) { run_panels(xp, lda, M, K, pp, N, bp, yp, nb0, nb1); });
  return y;
#else
  TORCH_CHECK(false, "gemm_f32: built without AVX-512");
#endif
}

void set_prefetch_bytes(int64_t n) { g_prefetch_bytes.store(std::max<int64_t>(0, n)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the AVX-512 kernel was compiled in");
  m.def("pack_weight", &pack_weight, "W [N, K] fp32 -> [ceil(N/32), K, 32] panels", py::arg("w"));
  m.def("linear", &linear, "x [M, K] @ W^T (+ bias) -> [M, N] fp32", py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"));
  m.def("set_prefetch_bytes", &set_prefetch_bytes, "how far ahead B is prefetched; 0 = off");
}
