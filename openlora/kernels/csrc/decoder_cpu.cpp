// The decoder layer loop of a row-wise step in C++: every layer of the model for a batch whose query rows
// all attend through the paged kernel (decode tokens and short prompt chunks), with or without LoRA
// deltas (SGMV into column slices of the fused projections, as openlora/model/llama.py's _lora does). It
// runs the same kernels, in the same order, on the same data as llama.py's Python loop, so the result is
// bit-identical to it (tests/kernels/test_decoder_stack.py); what goes away is the Python and pybind work
// between the ~300 kernel calls of a step (see openlora/kernels/decoder.py for the measurements).
//
// Unity build: the kernel sources are compiled into this module, each inside its own namespace (their
// PYBIND11_MODULE blocks drop out under OPENLORA_UNITY_BUILD), so no kernel is written twice. The
// system and torch headers they use are included first, here, at global scope; their include guards make
// the sources' own #includes no-ops inside the namespaces. Compiled with -ffp-contract=off like the
// standalone fused-ops and attention modules, so both builds round alike.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define OPENLORA_UNITY_BUILD 1

namespace olgemm {
#include "gemm_avx512.cpp"
}  // namespace olgemm
namespace olamx {
#include "gemm_amx.cpp"
}  // namespace olamx
namespace olfused {
#include "fused_ops_cpu.cpp"
}  // namespace olfused
namespace olattn {
#include "paged_attention_cpu.cpp"
}  // namespace olattn
namespace olsgmv {
#include "sgmv_cpu.cpp"
}  // namespace olsgmv

namespace {

using Tensor = torch::Tensor;
using OptTensor = c10::optional<torch::Tensor>;

// One decoder layer's weights (packed by the chosen GEMM backend) and its KV cache.
struct Layer {
  Tensor input_norm, post_norm;  // [hidden]
  Tensor qkv, o, gate_up, down;  // packed [q + 2kv | hidden | 2i | hidden, ...] weights
  OptTensor qkv_bias;            // [q + 2kv] (Qwen2) or none
  Tensor k_cache, v_cache;       // [num_blocks, block_size, KVH, d]
};

// LoRA sites in openlora.config.LORA_SITES order.
enum Site { kQ, kK, kV, kO, kGate, kUp, kDown, kNumSites };

// One step's LoRA metadata (openlora.lora.batch.LoRABatch) and the adapter pool (openlora.lora.pool).
struct LoraStep {
  Tensor token_idx, seg_indptr;  // int64 [N], [G + 1]
  struct SiteRows {
    bool on = false;                          // some segment targets this site
    Tensor a, bt;                             // pool [layers, rows, in], [layers, rows, out]
    Tensor row_idx, row_indptr, row_scale;    // int64 [R], int64 [G + 1], fp32 [R]
  } site[kNumSites];
  int64_t mm_min_tokens = 0;
};

// Unwrap a fused op's result; the Python loop would have fallen back to the composite here, which the
// stack does not do: Python checks eligibility (dtype, device, shapes) before calling forward.
Tensor need(const OptTensor& t, const char* op) {
  TORCH_CHECK(t.has_value(), "decoder stack: ", op, " declined its inputs");
  return *t;
}

class DecoderStack {
 public:
  // backend: "f32-panels", "bf16-panels" or "amx" (openlora.model.linear's names for these kernels).
  DecoderStack(const std::string& backend, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t intermediate, double eps, double scale, int64_t window, Tensor final_norm)
      : amx_(backend == "amx"), H_(num_heads), KVH_(num_kv_heads), d_(head_dim), inter_(intermediate), eps_(eps),
        scale_(scale), window_(window), final_norm_(std::move(final_norm)) {
    TORCH_CHECK(backend == "amx" || backend == "f32-panels" || backend == "bf16-panels",
                "decoder stack: unsupported linear backend ", backend);
    TORCH_CHECK(H_ > 0 && KVH_ > 0 && H_ % KVH_ == 0 && d_ > 0 && d_ % 2 == 0, "decoder stack: bad head geometry");
  }

  void add_layer(Tensor input_norm, Tensor post_norm, Tensor qkv, OptTensor qkv_bias, Tensor o, Tensor gate_up,
                 Tensor down, Tensor k_cache, Tensor v_cache) {
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == KVH_ && k_cache.size(3) == d_ && k_cache.is_contiguous() &&
                    v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous(),
                "decoder stack: KV cache must be contiguous [num_blocks, block_size, ", KVH_, ", ", d_, "]");
    layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), std::move(qkv), std::move(o),
                            std::move(gate_up), std::move(down), std::move(qkv_bias), std::move(k_cache),
                            std::move(v_cache)});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // h [T, hidden]: the token embeddings (updated in place as the residual stream); cos/sin [T, d];
  // slots int64 [T]; block_table int64 [T, max_blocks] and seq_lens int64 [T]: row t sees keys
  // [0, seq_lens[t]) (with the window: the last `window` of them). Returns the final-normed hidden [T, hidden].
  Tensor forward(Tensor h, const Tensor& cos, const Tensor& sin, const Tensor& slots, const Tensor& block_table,
                 const Tensor& seq_lens) {
    return run(h, cos, sin, slots, block_table, seq_lens, nullptr);
  }

  // forward() plus LoRA: per site (LORA_SITES order) either None or (a, bt, row_idx, row_indptr,
  // row_scale); token_idx/seg_indptr and mm_min_tokens as openlora.kernels.cpu.CppBackend passes them.
  Tensor forward_lora(Tensor h, const Tensor& cos, const Tensor& sin, const Tensor& slots,
                      const Tensor& block_table, const Tensor& seq_lens, Tensor token_idx, Tensor seg_indptr,
                      const std::vector<c10::optional<std::vector<Tensor>>>& sites, int64_t mm_min_tokens) {
    TORCH_CHECK(sites.size() == kNumSites, "decoder stack: expected ", static_cast<int>(kNumSites), " LoRA sites");
    LoraStep ls;
    ls.token_idx = std::move(token_idx);
    ls.seg_indptr = std::move(seg_indptr);
    ls.mm_min_tokens = mm_min_tokens;
    for (int s = 0; s < kNumSites; ++s) {
      if (!sites[s].has_value()) continue;
      const std::vector<Tensor>& t = *sites[s];
      TORCH_CHECK(t.size() == 5, "decoder stack: a LoRA site is (a, bt, row_idx, row_indptr, row_scale)");
      TORCH_CHECK(t[0].dim() == 3 && t[1].dim() == 3 && t[0].size(0) == num_layers() && t[1].size(0) == num_layers(),
                  "decoder stack: LoRA pool tensors must be [layers, rows, features]");
      ls.site[s] = LoraStep::SiteRows{true, t[0], t[1], t[2], t[3], t[4]};
    }
    return run(h, cos, sin, slots, block_table, seq_lens, &ls);
  }

 private:
  Tensor run(Tensor h, const Tensor& cos, const Tensor& sin, const Tensor& slots, const Tensor& block_table,
             const Tensor& seq_lens, const LoraStep* ls) {
    const int64_t T = h.size(0), hidden = h.size(1), q = H_ * d_, kv = KVH_ * d_;
    TORCH_CHECK(block_table.size(0) == T && seq_lens.size(0) == T && slots.size(0) == T,
                "decoder stack: every row must be a row-wise (paged) query row");
    Tensor resid;  // the previous layer's MLP output, added at the next norm
    for (int64_t li = 0; li < num_layers(); ++li) {
      const Layer& L = layers_[li];
      const Tensor x = resid.defined() ? need(olfused::add_rms_norm_(h, resid, L.input_norm, eps_), "add_rms_norm_")
                                       : need(olfused::rms_norm(h, L.input_norm, eps_), "rms_norm");
      const Tensor qkv = linear(x, L.qkv, L.qkv_bias, q + 2 * kv);  // [T, q + 2kv]
      if (ls) {
        lora(*ls, kQ, li, qkv.narrow(1, 0, q), x);
        lora(*ls, kK, li, qkv.narrow(1, q, kv), x);
        lora(*ls, kV, li, qkv.narrow(1, q + kv, kv), x);
      }
      const Tensor qk = qkv.narrow(1, 0, q + kv).view({T, H_ + KVH_, d_});
      TORCH_CHECK(olfused::rope_(qk, cos, sin), "decoder stack: rope_ declined its inputs");
      const Tensor k = qk.narrow(1, H_, KVH_);
      const Tensor v = qkv.narrow(1, q + kv, kv).view({T, KVH_, d_});
      TORCH_CHECK(olfused::write_kv_(L.k_cache, L.v_cache, k, v, slots), "decoder stack: write_kv_ declined its inputs");
      Tensor attn = torch::empty({T, H_, d_}, h.options());
      olattn::paged_decode(qk.narrow(1, 0, H_), L.k_cache, L.v_cache, block_table, seq_lens, scale_, window_, false,
                           attn);
      const Tensor attn2d = attn.view({T, q});
      const Tensor attn_out = linear(attn2d, L.o, c10::nullopt, hidden);
      if (ls) lora(*ls, kO, li, attn_out, attn2d);
      const Tensor x2 = need(olfused::add_rms_norm_(h, attn_out, L.post_norm, eps_), "add_rms_norm_");
      const Tensor gu = linear(x2, L.gate_up, c10::nullopt, 2 * inter_);
      if (ls) {
        lora(*ls, kGate, li, gu.narrow(1, 0, inter_), x2);
        lora(*ls, kUp, li, gu.narrow(1, inter_, inter_), x2);
      }
      const Tensor act = need(olfused::silu_mul(gu), "silu_mul");
      resid = linear(act, L.down, c10::nullopt, hidden);
      if (ls) lora(*ls, kDown, li, resid, act);
    }
    if (!resid.defined()) return need(olfused::rms_norm(h, final_norm_, eps_), "rms_norm");
    return need(olfused::add_rms_norm_(h, resid, final_norm_, eps_), "add_rms_norm_");
  }

  // y (a view) += this layer's LoRA deltas of one site for x, as CppBackend.sgmv (no-op when untargeted).
  static void lora(const LoraStep& ls, Site s, int64_t layer, const Tensor& y, const Tensor& x) {
    const LoraStep::SiteRows& r = ls.site[s];
    if (!r.on) return;
    olsgmv::sgmv_cpu(y, x, r.a.select(0, layer), r.bt.select(0, layer), ls.token_idx, ls.seg_indptr, r.row_idx,
                     r.row_indptr, r.row_scale, ls.mm_min_tokens);
  }

  Tensor linear(const Tensor& x, const Tensor& w, const OptTensor& b, int64_t n) const {
    return amx_ ? olamx::linear(x, w, b, n) : olgemm::linear(x, w, b, n);
  }

  bool amx_;
  int64_t H_, KVH_, d_, inter_;
  double eps_, scale_;
  int64_t window_;  // 0: none
  Tensor final_norm_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<const std::string&, int64_t, int64_t, int64_t, int64_t, double, double, int64_t, Tensor>(),
           py::arg("backend"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("eps"), py::arg("scale"), py::arg("window"), py::arg("final_norm"))
      .def("add_layer", &DecoderStack::add_layer, py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"),
           py::arg("qkv_bias"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("k_cache"),
           py::arg("v_cache"))
      .def("num_layers", &DecoderStack::num_layers)
      // No Python object is touched inside: the GIL is released (a server's event loop keeps running).
      .def("forward", &DecoderStack::forward, py::call_guard<py::gil_scoped_release>(), py::arg("h"), py::arg("cos"),
           py::arg("sin"), py::arg("slots"), py::arg("block_table"), py::arg("seq_lens"))
      .def("forward_lora", &DecoderStack::forward_lora, py::call_guard<py::gil_scoped_release>(), py::arg("h"),
           py::arg("cos"), py::arg("sin"), py::arg("slots"), py::arg("block_table"), py::arg("seq_lens"),
           py::arg("token_idx"), py::arg("seg_indptr"), py::arg("sites"), py::arg("mm_min_tokens"));
}
