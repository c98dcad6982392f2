"""Shared benchmark helpers: the SmolLM2-135M-shaped random model, machine roofline, timing."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, rope_theta=100000.0)


def bench_root() -> Path:
    from openlora.config import cache_dir

    root = cache_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def smol_model_dir() -> Path:
    """Random-init Llama with the SmolLM2-135M shape (built once, cached)."""
    path = bench_root() / "smol135m"
    if (path / "model.safetensors").is_file():
        return path
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import write_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOL), torch_dtype=torch.float32)
    tmp = path.with_suffix(".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer(tmp, SMOL["vocab_size"])
    os.replace(tmp, path)
    return path


def add_model_arg(ap) -> None:
    """`--model`: `random` (random-init SmolLM2-135M shape, the default), `default` (the real demo model,
    SmolLM2-135M-Instruct from its GGUF file), or a model folder / GGUF file."""
    ap.add_argument("--model", default="random",
                    help="random | default (SmolLM2-135M-Instruct) | model folder or .gguf file")


def resolve_model(arg: str) -> tuple[Path, str]:
    """(HF folder, label for the JSON) for a `--model` value."""
    if arg == "random":
        return smol_model_dir(), "random-init SmolLM2-135M shape"
    if arg == "default":
        from openlora.demo import DEMO_MODEL_ID, ensure_demo_model

        return ensure_demo_model(), f"{DEMO_MODEL_ID} (Q4_1 GGUF, dequantized)"
    from openlora.llm import _resolve_model_path

    return Path(_resolve_model_path(arg)), arg


def prompts_32x32(n: int = 32, length: int = 32, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (n, length), generator=g).tolist()


def measure_machine(dtype: torch.dtype) -> dict:
    """Read bandwidth (sum over 1 GiB, best of 5) and matmul throughput (2048^3) in `dtype`."""
    x = torch.empty(1 << 28, dtype=torch.float32)  # 1 GiB
    x.fill_(1.0)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    bw = x.numel() * 4 / best
    del x
    a = torch.randn(2048, 2048).to(dtype)
    b = torch.randn(2048, 2048).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return {"bandwidth_GBps": bw / 1e9, "matmul_GFLOPs": 2 * 2048**3 / best / 1e9}


def cold_chunk_reads_ms(chunks: dict[int, int], samples: int = 7) -> dict:
    """Time to read a decode step's bytes as the step reads them: `chunks` maps a chunk size in bytes (one
    weight matrix, one layer's K/V) to how many such reads a step makes. Each size is timed as a read
    (torch.sum over fp32) of a buffer of that size right after 256 MiB of other reads evicted it from
    the caches (median of `samples`), which is the state a decode step finds each weight in. Unlike
    bytes / bandwidth, the sum includes the cost of starting ~150 separate streams of 0.5-60 MB from cold
    caches. A reference, not a strict floor: a reader that prefetches harder (the AMX matmul does) can
    beat torch.sum on the small chunks."""
    flush = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB
    total, per_size = 0.0, {}
    for size, count in sorted(chunks.items()):
        buf = torch.ones(max(1, size // 4), dtype=torch.float32)
        ts = []
        for _ in range(samples):
            flush.sum()
            t = time.perf_counter()
            buf.sum()
            ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        per_size[str(size)] = round(size / med / 1e9, 2)
        total += count * med
    return {"cold_chunk_reads_ms": 1e3 * total, "cold_read_GBps_by_bytes": per_size}


def step_read_chunks(cfg, batch: int, avg_ctx: int, elem: int) -> dict[int, int]:
    """{bytes: count} of one decode step's reads: each projection's weights, the LM head, each layer's K+V."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    chunks: dict[int, int] = {}
    for n_in, n_out in ((h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)):
        b = n_in * n_out * elem
        chunks[b] = chunks.get(b, 0) + cfg.num_layers
    lm = cfg.vocab_size * h * elem
    chunks[lm] = chunks.get(lm, 0) + 1
    kv_layer = 2 * batch * avg_ctx * kv * elem
    chunks[kv_layer] = chunks.get(kv_layer, 0) + cfg.num_layers
    return chunks


def model_counts(cfg) -> dict:
    """Parameter counts of an openlora ModelConfig: matmul weights (LM head included) and total."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + 2 * h * i + i * h
    linear = cfg.num_layers * per_layer + cfg.vocab_size * h
    total = linear + 2 * cfg.num_layers * h + h + (0 if cfg.tie_word_embeddings else cfg.vocab_size * h)
    return {"linear_params": linear, "total_params": total}


def dense_floor_ms(llm, batch: int, reps: int = 5) -> float:
    """Time of one decode step's dense matmuls alone (every layer's projections and the LM head at
    M = batch, through the engine's own Linear objects): what the rest of the step is added to."""
    m = llm.engine.runner.model
    cfg = llm.config.model
    dt = m.dtype
    xs = {n: torch.randn(batch, n).to(dt)
          for n in {cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size}}

    def once() -> None:
        for layer in m.layers:
            layer.qkv(xs[layer.qkv.in_features])
            layer.o(xs[layer.o.in_features])
            layer.gate_up(xs[layer.gate_up.in_features])
            layer.down(xs[layer.down.in_features])
        m.lm_head_proj(xs[cfg.hidden_size])

    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return 1e3 * (time.perf_counter() - t) / reps


def decode_roofline_s(n_params_linear: int, n_params_total: int, batch: int, avg_ctx: int, kv_bytes_per_token: int,
                      elem: int, machine: dict, extra_flops: float = 0.0, extra_bytes: float = 0.0) -> dict:
    """Lower bound of one decode step: max(bytes / bandwidth, FLOPs / matmul throughput)."""
    flops = 2 * n_params_linear * batch + extra_flops
    bytes_ = n_params_total * elem + batch * avg_ctx * kv_bytes_per_token + extra_bytes
    t_mem = bytes_ / (machine["bandwidth_GBps"] * 1e9)
    t_cmp = flops / (machine["matmul_GFLOPs"] * 1e9)
    return {"flops_per_step": flops, "bytes_per_step": bytes_, "roofline_step_ms": 1e3 * max(t_mem, t_cmp),
            "bound": "compute" if t_cmp > t_mem else "memory"}


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    with open(out / f"{result.get('bench', 'bench')}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def write_random_adapter(path: Path, *, r: int, targets: tuple[str, ...], seed: int, layers: int = 30,
                         hidden: int = 576, kv: int = 192, inter: int = 1536, alpha: int = 16,
                         base: str = "smol135m", dora: bool = False) -> Path:
    """A PEFT-format LoRA adapter with random A and B (non-zero B) for the SmolLM2-135M shape; with
    `dora`, a DoRA adapter (PEFT's use_dora: a random positive magnitude per output row)."""
    import json

    from safetensors.torch import save_file

    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    kind = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for t in targets:
            fin, fout = dims[t]
            pre = f"base_model.model.model.layers.{layer}.{kind[t]}.{t}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, fin, generator=g) / fin ** 0.5
            tensors[f"{pre}.lora_B.weight"] = torch.randn(fout, r, generator=g) * 0.01
            if dora:
                tensors[f"{pre}.lora_magnitude_vector"] = torch.rand(fout, generator=g) + 0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": base, "use_rslora": False,
        "use_dora": dora}))
    return path


def time_generate(llm, prompts, new_tokens: int, adapters=None) -> float:
    """Seconds for llm.generate on the whole workload (greedy, exactly new_tokens each)."""
    from openlora import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, p, adapters=adapters)
    return time.perf_counter() - t


def wall_and_step_ms(llm, prompts, new_tokens: int, runs: int, adapters=None) -> tuple[float, float]:
    """(median wall seconds of the full workload, ms per decode step). A full-length warm-up run
    first; the decode step is (T(new_tokens) - T(1)) / (new_tokens - 1), medians of `runs`."""
    time_generate(llm, prompts, new_tokens, adapters)
    full = sorted(time_generate(llm, prompts, new_tokens, adapters) for _ in range(runs))[runs // 2]
    one = sorted(time_generate(llm, prompts, 1, adapters) for _ in range(runs))[runs // 2]
    return full, 1e3 * (full - one) / (new_tokens - 1)


def paired_runs(a: Callable[[int], float], b: Callable[[int], float], new_tokens: int, runs: int) -> dict:
    """Time two workloads in alternation. `a(n)` / `b(n)` run the whole workload with n new tokens each and
    return seconds. After a full-length warm-up of each, every round times a(new), b(new), a(1), b(1).

    NOTE: this VM's speed drifts by 20-50% over minutes (other tenants), so two figures measured a few
    minutes apart can disagree by more than the effect being measured; comparing inside each round and
    taking the median of the per-round ratios keeps the drift out of the ratio.

    Returns per-round lists `a_wall`, `b_wall` (s), `a_step`, `b_step` (ms per decode step, as in
    wall_and_step_ms) and their medians under the same names with a `_median` suffix."""
    a(new_tokens)
    b(new_tokens)
    out: dict = {"a_wall": [], "b_wall": [], "a_step": [], "b_step": []}
    for _ in range(runs):
        fa, fb, oa, ob = a(new_tokens), b(new_tokens), a(1), b(1)
        out["a_wall"].append(fa)
        out["b_wall"].append(fb)
        out["a_step"].append(1e3 * (fa - oa) / (new_tokens - 1))
        out["b_step"].append(1e3 * (fb - ob) / (new_tokens - 1))
    for k in list(out):
        out[k + "_median"] = statistics.median(out[k])
    return out


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return statistics.median(x / y for x, y in zip(num, den))


def hf_generate_fn(model, prompts, **generate_kw) -> Callable[[int], float]:
    """n -> seconds of a transformers (or PEFT) model's greedy `generate` of exactly n new tokens for the
    batch of equal-length prompts (extra kwargs such as adapter_names go to generate)."""
    ids = torch.tensor(prompts)

    def go(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **generate_kw)
        return time.perf_counter() - t

    return go


def hf_wall_and_step_ms(model, prompts, new_tokens: int, runs: int, **generate_kw) -> tuple[float, float]:
    """The same measurement as wall_and_step_ms for a transformers (or PEFT) model's `generate`
    (batch of equal-length prompts, greedy, exactly new_tokens each; extra kwargs such as
    adapter_names go to generate)."""
    go = hf_generate_fn(model, prompts, **generate_kw)
    go(new_tokens)  # full-length warm-up: the first generate is several times slower
    full = sorted(go(new_tokens) for _ in range(runs))[runs // 2]
    one = sorted(go(1) for _ in range(runs))[runs // 2]
    return full, 1e3 * (full - one) / (new_tokens - 1)
