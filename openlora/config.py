"""Frozen configuration dataclasses, one per subsystem, and the one place env vars are read."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from openlora.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# The seven projections LoRA may target, in the order the model applies them.
LORA_SITES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def env(name: str, default: str | None = None) -> str | None:
    """Read an OPENLORA_* environment variable (the only place the package reads os.environ)."""
    return os.environ.get(name, default)


def cache_dir() -> Path:
    """Root of OpenLoRA's caches (demo model, downloaded adapters, compiled kernels)."""
    root = env("OPENLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "openlora")
    return Path(root)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions adapters are checked against (torch-free)."""

    num_layers: int
    hidden_size: int
    q_size: int  # num_heads * head_dim
    kv_size: int  # num_kv_heads * head_dim
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False  # the output head is the embedding matrix

    def site_dims(self, site: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection."""
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }[site]


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a Hugging Face `config.json` the Llama-family model needs."""

    path: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: bias on q/k/v
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None

    @property
    def shape(self) -> ModelShape:
        return ModelShape(
            self.num_layers, self.hidden_size, self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim, self.intermediate_size, self.vocab_size, self.tie_word_embeddings,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Parse `config.json` in a model folder; unsupported architectures are a clear error."""
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"model folder {path} has no config.json")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from e
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or raw.get('model_type')!r} in {cfg_path}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_scaling = raw.get("rope_scaling")
        rope_theta = raw.get("rope_theta")
        rope_params = raw.get("rope_parameters")  # transformers 5 style
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "llama3":
            raise ModelLoadError(f"unsupported rope_scaling {rope_scaling!r} in {cfg_path}; supported: llama3")
        use_sw = raw.get("use_sliding_window", arch == "MistralForCausalLM")
        return cls(
            path=str(path),
            architecture=arch,
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            vocab_size=raw["vocab_size"],
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=raw.get("sliding_window") if use_sw else None,
        )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size in tokens and the memory budget that sizes the block pool."""

    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    num_blocks: int | None = None  # overrides the memory budget (tests use it)
    enable_prefix_caching: bool = True
    # Zero KV blocks once no request may read them again (and adapter slots once unloaded): no request's
    # data stays in memory after it is done, except prefix-cached blocks, which only their tenant can hit.
    scrub_freed_memory: bool = True

    def __post_init__(self) -> None:
        _check(self, block_size=1, kv_cache_memory_bytes=1, num_blocks=1)


@dataclass(frozen=True)
class SchedulerConfig:
    """Token budget per step, running-sequence limit, context length, waiting-queue bound."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_waiting: int = 4096  # the server answers 429 beyond this
    adapter_time_slice_s: float = 2.0  # fairness across adapters when more want to run than slots

    def __post_init__(self) -> None:
        _check(self, max_num_seqs=1, max_num_batched_tokens=1, max_model_len=2, max_waiting=0)
        if not self.adapter_time_slice_s > 0:
            raise ValueError(f"adapter_time_slice_s must be > 0, got {self.adapter_time_slice_s!r}")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter pool (device) and host cache sizes."""

    max_loras: int = 32  # distinct adapters resident on the device (and per step)
    max_cpu_loras: int = 128  # adapters kept in host memory
    max_lora_rank: int = 64
    pool_rows: int | None = None  # rank rows per projection in the device pool (default max_loras * 16)
    max_adapter_bytes: int = 4 << 30  # an adapter's weights file (and an S3 download) may not be larger

    def __post_init__(self) -> None:
        _check(self, max_loras=1, max_cpu_loras=0, max_lora_rank=1, pool_rows=1, max_adapter_bytes=1)


# The kernels each part of a step may run on (openlora.kernels.select); "auto" picks the fastest that
# works on this machine. A forced choice that cannot run here is an error at start-up, never a fallback.
KERNEL_CHOICES: dict[str, tuple[str, ...]] = {
    "linear": ("auto", "amx", "bf16-panels", "f32-panels", "dnnl-packed", "torch"),
    "lora": ("auto", "cpp", "torch", "triton", "reference"),
    "attention": ("auto", "paged", "sdpa"),
    "fused_ops": ("auto", "on", "off"),
    "layer_loop": ("auto", "cpp", "python"),
}


@dataclass(frozen=True)
class KernelConfig:
    """Kernel choices for the dense matmuls, SGMV, decode attention, fused elementwise ops and the layer
    loop (see KERNEL_CHOICES). A/B runs and debugging force one, e.g. `KernelConfig(layer_loop="python")`."""

    linear: str = "auto"
    lora: str = "auto"
    attention: str = "auto"
    fused_ops: str = "auto"
    layer_loop: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in KERNEL_CHOICES.items():
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"KernelConfig.{name} must be one of {', '.join(allowed)}, got {v!r}")

    @classmethod
    def parse(cls, text: str) -> "KernelConfig":
        """'lora=torch,layer_loop=python' (the CLI's --kernels) -> KernelConfig; '' gives all auto."""
        kw: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in KERNEL_CHOICES:
                raise ValueError(f"--kernels takes PART=CHOICE pairs with PART in {', '.join(KERNEL_CHOICES)}; "
                                 f"got {part!r}")
            kw[key] = value.strip()
        return cls(**kw)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, built once from user options."""

    model: ModelConfig
    dtype: str = "float32"  # "float32" | "bfloat16"
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    num_threads: int | None = None
    seed: int = 0
    # Base projections kept quantized (openlora.model.quant_linear, openlora.model.stored_quant):
    #   "w8a16" | "w4a16" | "w8a8"  quantized at load from a float checkpoint
    #   "gguf"                      a GGUF file's own Q8_0 / Q4_0 / Q4_1 codes
    #   "checkpoint"                a GPTQ / AWQ / compressed-tensors folder's own codes; chosen at start-up
    #                               whenever the model folder declares a quantization_config (LLM / serve
    #                               with quantization unset), so users rarely name it
    quantization: str | None = None
    source: str | None = None  # "gguf": the GGUF file; "checkpoint": the quantized folder (their codes)
    # The original float model's norm weights (its folder, or one safetensors file): on a checkpoint that
    # folded activation scales into its RMSNorm weights (AWQ, SmoothQuant), LoRA inputs at q/k/v and
    # gate/up are corrected from them exactly (openlora.model.folded_norms); without them adapters on
    # folded sites are refused.
    original_norms: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quantization == "gguf" and self.source is None:
            raise ValueError("quantization 'gguf' keeps a GGUF file's own codes: the model must be a .gguf file")
        if self.quantization == "checkpoint" and self.source is None:
            raise ValueError("quantization 'checkpoint' serves a quantized folder's own codes: give its path as source")
        if self.original_norms is not None and self.quantization != "checkpoint":
            raise ValueError("original_norms corrects LoRA inputs on a quantized checkpoint with folded scales "
                             "(AWQ, SmoothQuant); this model is not one")
        _check(self, num_threads=1, seed=0)


DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("w8a16", "w4a16", "w8a8", "gguf", "checkpoint")  # EngineConfig.quantization


def _check(cfg: object, **minimum: int) -> None:
    """Each named field must be an int >= its minimum (None allowed where the field's default is None)."""
    for name, low in minimum.items():
        v = getattr(cfg, name)
        if v is None and getattr(type(cfg), name, 0) is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{type(cfg).__name__}.{name} must be an integer >= {low}, got {v!r}")
