"""The C++ decoder loop (openlora.kernels.decoder) against the Python layer loop it replaces: the same kernels
in the same order, so logits must be bit-identical (torch.equal), in fp32 and bf16, for every architecture
the loader supports; steps it cannot take (long chunks through SDPA) must fall back to the Python loop."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS

from openlora import LLM, SamplingParams
from openlora.config import KernelConfig
from openlora.kernels.select import select_kernels
from openlora.worker import model_runner


def _loop_runs_here(dtype: torch.dtype) -> bool:
    return select_kernels(KernelConfig(), "cpu", dtype).layer_loop == "cpp"


class CountingStack:
    """Wraps the C++ stack and counts the steps it ran (with LoRA: `lora_calls` as well)."""

    def __init__(self, stack) -> None:
        self.stack, self.calls, self.lora_calls = stack, 0, 0

    def forward(self, *args):
        self.calls += 1
        return self.stack.forward(*args)

    def forward_lora(self, *args):
        self.calls += 1
        self.lora_calls += 1
        return self.stack.forward_lora(*args)


PROMPTS = [[5, 9, 33, 2, 71, 8, 100, 42, 17], [3, 4], list(range(10, 47)), [200, 201, 202, 203, 204, 205]]


def run(llm: LLM, params: SamplingParams, adapters=None) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Token ids and the captured logits rows of each prompt, in prompt order."""
    cap: list = []
    llm.engine.runner.capture_logits = cap
    outs = llm.generate(PROMPTS, params, adapters=adapters)
    llm.engine.runner.capture_logits = None
    by_req: dict[str, list[torch.Tensor]] = {}
    for rid, row in cap:
        by_req.setdefault(rid, []).append(row)
    return [o.outputs[0].token_ids for o in outs], [by_req[o.request_id] for o in outs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", [*ARCHS, "mistral-window"])
def test_cpp_loop_bit_identical_to_python_loop(tiny_model_factory, arch, dtype, monkeypatch):
    if not _loop_runs_here(getattr(torch, dtype)):
        pytest.skip(f"the C++ decoder loop does not run here for {dtype} (needs AVX-512 GEMM backends)")
    # A window (8) shorter than the prompts exercises the windowed attention path too.
    path = tiny_model_factory("mistral", sliding_window=8) if arch == "mistral-window" else tiny_model_factory(arch)
    # Chunks longer than 8 tokens go to SDPA: the first step (the 9- and 37-token prompts) must fall back to
    # the Python loop; later steps (decode rows, the short prompts' chunks) run in C++.
    monkeypatch.setattr(model_runner, "FUSED_PREFILL_MAX_TOKENS", 8)
    llm = LLM(str(path), dtype=dtype, block_size=4, num_kv_blocks=128, max_num_batched_tokens=24,
              enable_prefix_caching=False)  # the second run must recompute the same chunks
    model = llm.engine.runner.model
    assert model.stack is not None
    stack = CountingStack(model.stack)
    model.stack = stack
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    toks_cpp, logits_cpp = run(llm, params)
    steps = llm.engine.stats["steps"]
    assert 0 < stack.calls < steps  # both loops ran (the long chunks took the Python loop)
    model.stack = None
    toks_py, logits_py = run(llm, params)
    assert_identical(toks_cpp, logits_cpp, toks_py, logits_py)


def assert_identical(toks_a, logits_a, toks_b, logits_b) -> None:
    assert toks_a == toks_b
    for i, (rows_a, rows_b) in enumerate(zip(logits_a, logits_b, strict=True)):
        for a, b in zip(rows_a, rows_b, strict=True):
            assert torch.equal(a, b), f"prompt {i}: max diff {(a - b).abs().max().item()}"


def _save_adapter(model_path, folder, seed: int, **lora_kw) -> str:
    """A random PEFT adapter (B scaled up so it clearly moves the logits) saved to `folder`."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf

    torch.manual_seed(seed)
    pm = get_peft_model(load_hf(model_path), LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    pm.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpp_loop_with_lora_bit_identical_to_python_loop(tiny_model_factory, tmp_path, dtype):
    """Mixed adapters in one batch (all sites, attention-only, MLP-only, a weighted composition and a
    base-only row): the C++ loop applies the SGMV deltas exactly where and as the Python loop does."""
    if not _loop_runs_here(getattr(torch, dtype)):
        pytest.skip(f"the C++ decoder loop does not run here for {dtype} (needs AVX-512 GEMM backends)")
    path = tiny_model_factory("qwen2")
    llm = LLM(str(path), dtype=dtype, block_size=4, num_kv_blocks=256, max_loras=8, enable_prefix_caching=False)
    specs = {"all": dict(r=8, lora_alpha=16, target_modules="all-linear"),
             "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
             "mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"])}
    for i, (name, kw) in enumerate(specs.items()):
        llm.register_adapter(name, _save_adapter(path, tmp_path / name, 10 + i, **kw))
    assert llm.engine.runner.plan.lora.name == "cpp"
    adapters = ["all", [("attn", 0.5), ("mlp", 1.5)], None, "mlp"]
    model = llm.engine.runner.model
    stack = CountingStack(model.stack)
    model.stack = stack
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    toks_cpp, logits_cpp = run(llm, params, adapters)
    assert stack.lora_calls == llm.engine.stats["steps"]  # every step carried LoRA rows and ran in C++
    model.stack = None
    toks_py, logits_py = run(llm, params, adapters)
    assert_identical(toks_cpp, logits_cpp, toks_py, logits_py)
    _, logits_base = run(llm, params)
    assert logits_base[0][0].ne(logits_cpp[0][0]).any()  # the adapters do change the logits


def test_cpp_loop_takes_every_row_wise_step(tiny_model_factory):
    if not _loop_runs_here(torch.float32):
        pytest.skip("the C++ decoder loop does not run here (needs the AVX-512 fp32 GEMM)")
    llm = LLM(str(tiny_model_factory("qwen2")), dtype="float32", block_size=4, num_kv_blocks=128)
    stack = CountingStack(llm.engine.runner.model.stack)
    llm.engine.runner.model.stack = stack
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert stack.calls == llm.engine.stats["steps"]  # every chunk is short: all steps in C++


def test_no_cpp_loop_with_other_linear_backends(tiny_model_factory):
    """With a linear backend whose weights the loop cannot use (here plain F.linear), the plan keeps the
    Python loop and the model still generates; forcing the C++ loop then is a start-up error."""
    path = str(tiny_model_factory("llama"))
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=64, kernels="linear=torch")
    assert llm.engine.runner.plan.layer_loop == "python" and llm.engine.runner.model.stack is None
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="layer_loop=cpp cannot run here: it needs linear in"):
        LLM(path, dtype="float32", block_size=4, num_kv_blocks=64, kernels="linear=torch,layer_loop=cpp")
