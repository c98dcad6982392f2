// bf16 linear layer y = x @ W^T (+ b) on Intel AMX tiles, for the small-M matmuls of decode steps.
//
// Why: at batch 32 a bf16 decode step streams every weight once; on an AMX CPU the tiles do the FLOPs
// many times faster than memory delivers the weights, so the matmul should run at memory speed. oneDNN's
// packed linear reached 134-266 GFLOP/s here at M=32 (a third of the memory floor), so the weights are
// packed once at load time into the tile layout below and streamed in one pass per call.
//
// Packed weight layout, W [N, K] (Hugging Face [out, in]) -> P [Nb, Kb, 2, 16, 32] bf16, Nb = ceil(N/32),
// Kb = ceil(K/32), zero padded:
//     P[nb, kb, t, p, 2c + j] = W[32 nb + 16 t + c, 32 kb + 2 p + j]
// i.e. for each 32-column block and each 32-deep K step, two 1 KB B tiles in the "VNNI" pair layout that
// TDPBF16PS reads (row p holds the k-pair p of 16 output columns). One column block's K steps are
// contiguous, so each thread streams its share of the weights sequentially.
//
// One call: x [M, K] (row stride free) is copied into a zero-padded [Mp, Kp] scratch when its shape or
// strides do not fit the tiles (Mp = 16 ceil(M/16), Kp = 32 Kb). The column blocks are split over the
// intra-op threads (at::parallel_for). A thread walks its blocks; for each 32-row slab of x it keeps
// a 32 x 32 fp32 accumulator in four C tiles over all K steps, then adds the bias in fp32 and rounds
// once to bf16 (round to nearest even), as oneDNN and torch's bf16 matmul do. Rows are taken in chunks
// of kRowChunk so that a prefill's x chunk stays in L2 while the thread's weight blocks pass over it.
//
// Numerics: products and sums in fp32 (TDPBF16PS treats fp32 denormals as zero), so results agree with
// torch's F.linear in bf16 to bf16 rounding (sum order differs); tests/kernels/test_gemm.py.
//
// The file compiles on any x86-64 gcc >= 11 (the AMX code carries target attributes); `available()`
// checks CPUID and asks the kernel for the tile-data permission (arch_prctl), once per process.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define OPENLORA_AMX_BUILD 1
#else
#define OPENLORA_AMX_BUILD 0
#endif

namespace {

constexpr int64_t kBlockN = 32;     // output columns per block (two 16-column B tiles)
constexpr int64_t kStepK = 32;      // K per tile step (16 bf16 pairs = 64 bytes per tile row)
constexpr int64_t kTileElems = 16 * 32;         // bf16 elements in one B tile (1 KB)
constexpr int64_t kStepElems = 2 * kTileElems;  // both B tiles of one K step
constexpr int64_t kRowChunk = 256;  // x rows kept hot in L2 while a thread's blocks pass over them
constexpr int64_t kPrefetchSteps = 2;  // B is prefetched this many K steps (2 KB each) ahead (1-4 measured alike)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if OPENLORA_AMX_BUILD

#define OPENLORA_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool probe_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1u)) return false;  // AVX512_BF16
  // Linux hands out the 8 KB tile-data state only on request: ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA.
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
}

bool amx_ok() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] { ok = probe_amx(); });
  return ok;
}

// Accumulate one 32-column block for row tiles [m0, m0 + 16 MT) over all K steps, then write it out.
// Tiles: C0..C3 = tmm0..3 (C[rowtile][coltile] = tmm[2 r + t]), A = tmm4/5, B = tmm6/7.
template <int MT>
OPENLORA_AMX_TARGET void block(const c10::BFloat16* a, int64_t a_stride_bytes, const c10::BFloat16* bp,
                               int64_t kb_count, float* cbuf, int64_t pf_elems) {
  _tile_zero(0);
  _tile_zero(1);
  if (MT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < kb_count; ++kb) {
    const c10::BFloat16* b = bp + kb * kStepElems;
    if (pf_elems > 0) {
      // The hardware streamer stops at 4 KB pages (two K steps): fetch a later step's 32 lines now.
      const char* pf = reinterpret_cast<const char*>(b + pf_elems);
      for (int line = 0; line < 32; ++line) _mm_prefetch(pf + 64 * line, _MM_HINT_T0);
    }
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + kTileElems, 64);
    _tile_loadd(4, a + kb * kStepK, a_stride_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (MT == 2) {
      _tile_loadd(5, reinterpret_cast<const char*>(a + kb * kStepK) + 16 * a_stride_bytes, a_stride_bytes);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  // cbuf: [32 rows, 32 cols] fp32, row stride 128 bytes.
  _tile_stored(0, cbuf, 128);
  _tile_stored(1, cbuf + 16, 128);
  if (MT == 2) {
    _tile_stored(2, cbuf + 16 * 32, 128);
    _tile_stored(3, cbuf + 16 * 32 + 16, 128);
  }
}

// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 word.
OPENLORA_AMX_TARGET inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// cbuf rows [0, rows) x cols [0, cols) (+ bias) -> y rows, rounded to bf16.
OPENLORA_AMX_TARGET void write_out(const float* cbuf, int64_t rows, int64_t cols, const c10::BFloat16* bias,
                                   c10::BFloat16* y, int64_t y_stride) {
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1u);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1u);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias != nullptr) {
    b0 = widen(_mm256_maskz_loadu_epi16(m0, bias));
    b1 = widen(_mm256_maskz_loadu_epi16(m1, bias + 16));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cbuf + r * 32;
    c10::BFloat16* out = y + r * y_stride;
    __m256bh v0 = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c), b0));
    _mm256_mask_storeu_epi16(out, m0, reinterpret_cast<__m256i&>(v0));
    if (m1) {
      __m256bh v1 = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c + 16), b1));
      _mm256_mask_storeu_epi16(out + 16, m1, reinterpret_cast<__m256i&>(v1));
    }
  }
}

// One thread's share: column blocks [nb0, nb1) for all rows.
OPENLORA_AMX_TARGET void run_blocks(const c10::BFloat16* a, int64_t a_stride, int64_t M, int64_t Mp,
                                    const c10::BFloat16* packed, int64_t Kb, int64_t N, const c10::BFloat16* bias,
                                    c10::BFloat16* y, int64_t nb0, int64_t nb1) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float cbuf[32 * 32];
  const int64_t pf_elems = kPrefetchSteps * kStepElems;
  const int64_t a_stride_bytes = a_stride * static_cast<int64_t>(sizeof(c10::BFloat16));
  for (int64_t mc = 0; mc < Mp; mc += kRowChunk) {
    const int64_t mc_end = std::min(Mp, mc + kRowChunk);
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const c10::BFloat16* bp = packed + nb * Kb * kStepElems;
      const int64_t n0 = nb * kBlockN, cols = std::min<int64_t>(kBlockN, N - n0);
      for (int64_t m0 = mc; m0 < mc_end; m0 += 32) {
        const c10::BFloat16* arow = a + m0 * a_stride;
        if (mc_end - m0 >= 32) {
          block<2>(arow, a_stride_bytes, bp, Kb, cbuf, pf_elems);
        } else {
          block<1>(arow, a_stride_bytes, bp, Kb, cbuf, pf_elems);
        }
        const int64_t rows = std::min<int64_t>(std::min<int64_t>(32, mc_end - m0), M - m0);
        if (rows > 0) write_out(cbuf, rows, cols, bias == nullptr ? nullptr : bias + n0, y + m0 * N + n0, N);
      }
    }
  }
  _tile_release();
}

#endif  // OPENLORA_AMX_BUILD

void check_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "gemm_amx: weight must be a 2-D bf16 CPU tensor [out, in]");
}

}  // namespace

bool available() {
#if OPENLORA_AMX_BUILD
  return amx_ok();
#else
  return false;
#endif
}

// W [N, K] bf16 -> packed [Nb, Kb, 2, 16, 32] bf16 (layout at the top of the file).
torch::Tensor pack_weight(const torch::Tensor& w_in) {
  check_weight(w_in);
  const torch::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), Nb = ceil_div(N, kBlockN), Kb = ceil_div(K, kStepK);
  torch::Tensor packed = torch::zeros({Nb, Kb, 2, 16, 32}, w.options());
  const c10::BFloat16* src = w.data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, Nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      for (int64_t kb = 0; kb < Kb; ++kb) {
        c10::BFloat16* step = dst + (nb * Kb + kb) * kStepElems;
        for (int64_t t = 0; t < 2; ++t) {
          for (int64_t c = 0; c < 16; ++c) {
            const int64_t n = nb * kBlockN + 16 * t + c;
            if (n >= N) continue;
            for (int64_t kk = 0; kk < kStepK; ++kk) {
              const int64_t k = kb * kStepK + kk;
              if (k >= K) break;
              step[t * kTileElems + (kk / 2) * 32 + 2 * c + (kk % 2)] = src[n * K + k];
            }
          }
        }
      }
    }
  });
  return packed;
}

// y = x @ W^T (+ bias) -> new [M, N] bf16; x [M, K] bf16 with a contiguous last dim.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                     int64_t N) {
#if OPENLORA_AMX_BUILD
  TORCH_CHECK(amx_ok(), "gemm_amx: AMX is not available on this CPU");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "gemm_amx: x must be a 2-D bf16 CPU tensor with a contiguous last dim");
  TORCH_CHECK(packed.dim() == 5 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == 2 && packed.size(3) == 16 && packed.size(4) == 32,
              "gemm_amx: packed weight must come from pack_weight");
  const int64_t M = x.size(0), K = x.size(1), Nb = packed.size(0), Kb = packed.size(1);
  TORCH_CHECK(ceil_div(K, kStepK) == Kb && ceil_div(N, kBlockN) == Nb && N > 0,
              "gemm_amx: x has ", K, " features and N=", N, " but the packed weight is for ", Nb, " x ", Kb, " blocks");
  const c10::BFloat16* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kBFloat16 && b.numel() == N, "gemm_amx: bias must be bf16 [N]");
    bp = b.data_ptr<c10::BFloat16>();
  }
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const int64_t Mp = ceil_div(M, 16) * 16, Kp = Kb * kStepK;
  // The tiles read whole 16 x 32 blocks of x: pad (a small copy) unless x already has that shape.
  torch::Tensor a = x;
  if (Mp != M || Kp != K) {
    a = torch::zeros({Mp, Kp}, x.options());
    a.narrow(0, 0, M).narrow(1, 0, K).copy_(x);
  }
  const c10::BFloat16* ap = a.data_ptr<c10::BFloat16>();
  const int64_t a_stride = a.stride(0);
  const c10::BFloat16* pp = packed.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, Nb, 1, [&](int64_t nb0, int64_t nb1) {
    run_blocks(ap, a_stride, M, Mp, pp, Kb, N, bp, yp, nb0, nb1);
  });
  return y;
#else
  TORCH_CHECK(false, "gemm_amx: built without AMX support");
#endif
}

#ifndef OPENLORA_UNITY_BUILD  // csrc/decoder_cpu.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this CPU and OS allow AMX bf16 tiles");
  m.def("pack_weight", &pack_weight, "W [N, K] bf16 -> AMX tile layout", py::arg("w"));
  m.def("linear", &linear, "x [M, K] @ W^T (+ bias) -> [M, N] bf16", py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"));
}
#endif  // OPENLORA_UNITY_BUILD
