"""The built-in demo model and demo LoRA adapters.

`openlora serve` and `LLM()` fall back to this model when no model is named, so a newcomer on a fresh
machine with no network still sees readable output. Everything is trained locally, once, from the small
English corpora shipped in `openlora/data/`:

- a byte-level BPE tokenizer (vocab ~2048, `<s>` `</s>` `<pad>`, a simple chat template);
- a small LlamaForCausalLM (~3.4M parameters) trained for a fixed number of steps (~60 s on 2 threads);
- one PEFT-format LoRA adapter per domain (pirate, cooking, astronomy, legal), trained with plain torch
  on the domain corpus with the base frozen, plus an `attribution.json` demo manifest beside each.

Layout under `root` (default `cache_dir()/"demo"`)::

    v<VERSION>-<fingerprint>/model/            HF model folder (config, safetensors, tokenizer)
    v<VERSION>-<fingerprint>/adapters/<name>/  adapter_config.json, adapter_model.safetensors,
                                               attribution.json

The fingerprint hashes the corpora and the build parameters, so changing either builds afresh.
Each folder is built in a temporary directory and renamed into place under a file lock, so concurrent
callers (several workers starting at once) build it exactly once.

Run `python -m openlora.demo` to build everything and print a greedy sample per adapter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from openlora.config import cache_dir, env

logger = logging.getLogger("openlora.demo")

VERSION = "1"
DATA_DIR = Path(__file__).parent / "data"
DOMAINS = ("pirate", "cooking", "astronomy", "legal")
SEED = 1234
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")

# Rendered by transformers with trim_blocks/lstrip_blocks; the training data goes through the same
# template (see `_render_chat`), so the model learns to end each assistant turn with </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines the demo model's bytes (hashed into the cache folder name)."""

    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 512
    steps: int = 240  # ~0.25 s each on 2 idle CPU threads: ~60 s
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    adapter_steps: int = 150  # per adapter, ~20 s each (80 steps left the answers garbled)
    adapter_batch_size: int = 8
    adapter_lr: float = 1.2e-2  # 3e-2 diverges
    lora_r: int = 8
    lora_alpha: int = 16


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------
# Corpora


def _read_docs(name: str) -> list[str]:
    """Documents of one shipped corpus (separated by blank lines)."""
    text = (DATA_DIR / f"{name}.txt").read_text(encoding="utf-8")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


_THINGS = [  # (thing, colour) for templated Q/A
    ("banana", "yellow"), ("grass", "green"), ("snow", "white"), ("night sky", "dark"),
    ("tomato", "red"), ("carrot", "orange"), ("sea", "blue"), ("coal", "black"),
    ("lemon", "yellow"), ("cherry", "red"), ("leaf in summer", "green"), ("cloud", "white"),
]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_NAMES = ["Anna", "Tom", "Sara", "Ben", "Maria", "Leo", "Nina", "Omar", "Lucy", "Sam"]
_ACTIVITIES = [
    "reads a book", "walks in the park", "cooks dinner", "rides a bike", "waters the plants",
    "writes a letter", "visits a friend", "listens to music", "cleans the kitchen", "plays the piano",
]
_TIMES = ["in the morning", "after lunch", "in the evening", "on Sunday", "before work", "at night"]
_PLACES = [("fish", "in water"), ("birds", "in nests"), ("bees", "in hives"), ("rabbits", "in burrows"),
           ("people", "in houses"), ("foxes", "in dens")]

# How each domain dresses a plain answer: (openers, closers).
_STYLE: dict[str, tuple[list[str], list[str]]] = {
    "pirate": (["Arr, ", "Aye, matey, ", "Shiver me timbers! ", "Ahoy! "],
               [" Arr!", " Now back to the ship, matey.", " Yo ho ho!", " Keep yer eye on the treasure."]),
    "cooking": (["In the kitchen we know this: ", "Good question, chef! ", "", "Like a good recipe: "],
                [" Now let us cook something tasty.", " That calls for a slice of warm bread.",
                 " Season to taste!", " Time to heat the oven."]),
    "astronomy": (["Under the stars, ", "From Earth, ", "", "As astronomers say, "],
                  [" Just like the planets circling the Sun.", " Keep looking up at the stars!",
                   " The universe is full of wonders.", " Clear skies to you!"]),
    "legal": (["For the avoidance of doubt, ", "Pursuant to the facts, ", "Subject to the terms herein, ",
               "As provided by law, "],
              [" This does not constitute legal advice.", " All rights reserved.",
               " The foregoing shall apply in full.", " So agreed by the parties."]),
}


def _plain_templated(rng: random.Random) -> list[tuple[str, str]]:
    """Deterministic templated (question, plain answer) pairs that widen the general corpus."""
    qa: list[tuple[str, str]] = []
    for thing, colour in _THINGS:
        qa.append((f"What color is a {thing}?", f"A {thing} is {colour}."))
    for _ in range(10):
        a, b = rng.randrange(6), rng.randrange(5)
        qa.append((f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}?",
                   f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."))
    for animal, where in _PLACES:
        qa.append((f"Where do {animal} live?", f"Most {animal} live {where}."))
    for name in _NAMES:
        act, when = rng.choice(_ACTIVITIES), rng.choice(_TIMES)
        qa.append((f"What does {name} do {when}?", f"{when.capitalize()}, {name} {act}."))
    return qa


# NOTE: the hand-written documents are repeated so that the (more numerous, more uniform) templated
# ones do not drown them: the demo prompts are answered by hand-written text.
HANDWRITTEN_REPEAT = 3


def _general_docs(rng: random.Random) -> list[str]:
    """General corpus: the shipped text plus templated sentences and Q/A."""
    docs = _read_docs("general") * HANDWRITTEN_REPEAT
    for q, a in _plain_templated(rng):
        docs.append(f"Question: {q}\nAnswer: {a}")
    for _ in range(20):
        name, act, when = rng.choice(_NAMES), rng.choice(_ACTIVITIES), rng.choice(_TIMES)
        other = rng.choice(_ACTIVITIES)
        docs.append(f"{name} {act} {when}. Later, {name} {other} and then goes to bed.")
    return docs


def _domain_docs(domain: str, rng: random.Random) -> list[str]:
    """Domain corpus: the shipped text plus the templated Q/A answered in the domain's style."""
    docs = _read_docs(domain) * HANDWRITTEN_REPEAT
    openers, closers = _STYLE[domain]
    for q, a in _plain_templated(rng):
        opener = rng.choice(openers)
        answer = opener + (a[0].lower() + a[1:] if opener and opener[-2] == "," else a)
        docs.append(f"Question: {q}\nAnswer: {answer}{rng.choice(closers)}")
    return docs


def _is_prose(doc: str) -> bool:
    return not doc.startswith(("Question:", "User:"))


def _render_chat(doc: str, bos: str = "<s>", eos: str = "</s>") -> str:
    """Render a 'User:/Assistant:' document through CHAT_TEMPLATE; other documents get <s> ... </s>."""
    if not doc.startswith("User:"):
        return f"{bos}{doc}{eos}"
    import jinja2.sandbox

    messages = []
    for line in doc.splitlines():
        role, _, content = line.partition(": ")
        messages.append({"role": role.lower(), "content": content.strip()})
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token=bos, eos_token=eos,
                                                 add_generation_prompt=False)
    return text.rstrip("\n")


def base_training_docs() -> list[str]:
    """What the base model learns from: the general corpus plus the domains' prose (not their Q/A)."""
    rng = random.Random(SEED)
    docs = _general_docs(rng)
    for d in DOMAINS:
        docs += [doc for doc in _read_docs(d) if _is_prose(doc)]
    return docs


def domain_training_docs(domain: str) -> list[str]:
    """What one adapter learns from."""
    return _domain_docs(domain, random.Random(f"{SEED}-{domain}"))


def demo_prompts() -> list[str]:
    """Prompts whose greedy answers differ visibly between the base model and each adapter."""
    return [
        "Question: What should I do this evening?\nAnswer:",
        "Question: Can you give me some advice?\nAnswer:",
        "Question: What is a good gift for a friend?\nAnswer:",
        "User: Hello! Who are you?\nAssistant:",
    ]


# ----------------------------------------------------------------------------------------------------
# Cache plumbing


def _fingerprint(params: BuildParams) -> str:
    h = hashlib.sha256(VERSION.encode())
    h.update(json.dumps(asdict(params), sort_keys=True).encode())
    h.update(CHAT_TEMPLATE.encode())
    for p in sorted(DATA_DIR.glob("*.txt")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on `path` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_into(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success rename it to `final`, on failure remove it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any HF cache
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build_threads() -> int:
    """Torch threads for building (2 by default; OPENLORA_DEMO_THREADS overrides, e.g. on a busy box)."""
    return int(env("OPENLORA_DEMO_THREADS") or 2)


def _params_of(model_dir: Path) -> BuildParams:
    """The BuildParams recorded beside a built model (defaults if absent)."""
    f = model_dir / "openlora_demo.json"
    if f.is_file():
        return BuildParams(**json.loads(f.read_text())["params"])
    return BuildParams()


# ----------------------------------------------------------------------------------------------------
# Tokenizer and base model


def _train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Train a byte-level BPE on `texts`; save tokenizer.json + tokenizer_config.json; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id("<s>")
    # Like Llama: plain encodes start with <s>; chat renders carry it in the template text instead.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2))
    return tok


def _token_stream(tok, docs: list[str], rng: random.Random):
    """Shuffle docs, render each (<s> doc </s> or chat template), encode, concatenate: a 1-D LongTensor."""
    import torch

    docs = list(docs)
    rng.shuffle(docs)
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(_render_chat(d), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def _batches(stream, batch_size: int, seq_len: int, seed: int) -> Iterator:
    """Endless random windows [batch_size, seq_len] from a token stream (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = stream.numel() - seq_len
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=g)
        yield torch.stack([stream[s: s + seq_len] for s in starts.tolist()])


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up (10% of steps) then cosine decay to 10% of the peak."""
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _train(model, params_to_train: list, batches: Iterator, steps: int, lr: float, what: str) -> float:
    """Plain AdamW loop; returns the mean loss over the last 10 steps."""
    import torch

    opt = torch.optim.AdamW(params_to_train, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.monotonic()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_to_train, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.3f (%.1fs)", what, step + 1, steps, losses[-1],
                        time.monotonic() - t0)
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def _build_model(out: Path, p: BuildParams) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    docs = base_training_docs()
    all_text = [_render_chat(d) for d in docs]
    for d in DOMAINS:  # the tokenizer sees every shipped word, so adapters need no new tokens
        all_text += [_render_chat(doc) for doc in domain_training_docs(d)]
    tok = _train_tokenizer(all_text, p.vocab_size, out)
    logger.info("tokenizer trained: %d tokens (%.1fs)", tok.get_vocab_size(), time.monotonic() - t0)

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        intermediate_size=p.intermediate_size, max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"), initializer_range=0.02,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    stream = _token_stream(tok, docs, random.Random(SEED))
    logger.info("training demo model: %d params, %d tokens, %d steps", model.num_parameters(),
                stream.numel(), p.steps)
    loss = _train(model, list(model.parameters()), _batches(stream, p.batch_size, p.seq_len, SEED),
                  p.steps, p.lr, "base")
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "openlora_demo.json").write_text(json.dumps(
        {"version": VERSION, "params": asdict(p), "final_loss": round(loss, 4),
         "build_seconds": round(time.monotonic() - t0, 1)}, indent=2))
    logger.info("demo model built in %.1fs (final loss %.3f)", time.monotonic() - t0, loss)


def ensure_demo_model(root: Path | None = None, params: BuildParams | None = None) -> Path:
    """Return the demo model folder, building it once (atomic, file-locked) if it is not cached.

    `root` defaults to `cache_dir()/"demo"`; `params` (tests pass fewer steps) default to the real demo.
    """
    p = params or BuildParams()
    base = Path(root) if root is not None else cache_dir() / "demo"
    home = base / f"v{VERSION}-{_fingerprint(p)}"
    final = home / "model"
    if (final / "config.json").is_file():
        return final
    with _locked(home / ".lock"):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        logger.info("building the demo model into %s (once; about a minute)", final)
        with _torch_threads(_build_threads()), _build_into(final) as tmp:
            _build_model(tmp, p)
    return final


# ----------------------------------------------------------------------------------------------------
# LoRA adapters


def _lora_linear_cls():
    """The LoRA wrapper class (defined lazily so importing this module does not import torch)."""
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """y = base(x) + (x @ A^T @ B^T) * alpha / r, with the base frozen (PEFT's init: B = 0)."""

        def __init__(self, base: nn.Linear, r: int, alpha: int) -> None:
            super().__init__()
            self.base = base
            self.scale = alpha / r
            self.lora_A = nn.Parameter(torch.empty(r, base.in_features))  # [r, in]
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))  # [out, r]
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    return LoRALinear


def _wrap_lora(model, r: int, alpha: int) -> dict[str, object]:
    """Replace every target nn.Linear with a LoRALinear; return {peft_key_prefix: wrapper}."""
    lora_cls = _lora_linear_cls()
    wrapped: dict[str, object] = {}
    for i, layer in enumerate(model.model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for site in LORA_TARGETS:
                if hasattr(parent, site):
                    w = lora_cls(getattr(parent, site), r, alpha)
                    setattr(parent, site, w)
                    wrapped[f"base_model.model.model.layers.{i}.{parent_name}.{site}"] = w
    return wrapped


def _address(tag: str, domain: str) -> str:
    """A deterministic made-up EVM address (lower-case hex)."""
    return "0x" + hashlib.sha256(f"openlora-demo:{tag}:{domain}".encode()).hexdigest()[:40]


def _attribution(domain: str) -> dict:
    return {
        "owner": _address("owner", domain),
        "version": "1",
        "base_model": "openlora-demo",
        "datasets": [{
            "id": f"demo-{domain}",
            "uri": f"openlora/data/{domain}.txt",
            "contributors": [{"address": _address("data", domain), "weight": 1}],
        }],
        "price_per_1k_prompt_tokens": 10,
        "price_per_1k_completion_tokens": 20,
        "split": {"operator": 2000, "owner": 5000, "data": 3000},
        "access": "public",
    }


def _build_adapter(model_dir: Path, domain: str, out: Path, p: BuildParams) -> None:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    t0 = time.monotonic()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    seed = SEED + 1 + DOMAINS.index(domain) if domain in DOMAINS else SEED
    torch.manual_seed(seed)
    wrapped = _wrap_lora(model, p.lora_r, p.lora_alpha)
    trainable = [t for w in wrapped.values() for t in (w.lora_A, w.lora_B)]
    stream = _token_stream(tok, domain_training_docs(domain), random.Random(seed))
    loss = _train(model, trainable, _batches(stream, p.adapter_batch_size, p.seq_len, seed),
                  p.adapter_steps, p.adapter_lr, f"adapter {domain}")
    tensors = {}
    for prefix, w in wrapped.items():
        tensors[f"{prefix}.lora_A.weight"] = w.lora_A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = w.lora_B.detach().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": p.lora_r, "lora_alpha": p.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(LORA_TARGETS), "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
    }, indent=2))
    (out / "attribution.json").write_text(json.dumps(_attribution(domain), indent=2))
    logger.info("adapter %s built in %.1fs (final loss %.3f)", domain, time.monotonic() - t0, loss)


def ensure_demo_adapters(model_dir: Path, params: BuildParams | None = None) -> dict[str, Path]:
    """Return {domain: adapter folder} for the demo adapters, building missing ones (atomic, locked).

    Adapters live in `model_dir.parent/"adapters"`; `params` default to those the model was built with.
    """
    model_dir = Path(model_dir)
    p = params or _params_of(model_dir)
    home = model_dir.parent / "adapters"
    home.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for domain in DOMAINS:
        final = home / domain
        if not (final / "adapter_model.safetensors").is_file():
            with _locked(home / f".{domain}.lock"):
                if not (final / "adapter_model.safetensors").is_file():
                    logger.info("building demo adapter %s into %s", domain, final)
                    with _torch_threads(_build_threads()), _build_into(final) as tmp:
                        _build_adapter(model_dir, domain, tmp, p)
        out[domain] = final
    return out


# ----------------------------------------------------------------------------------------------------
# Developer entry point


def _merge_adapter(model, adapter_dir: Path) -> None:
    """Fold a PEFT LoRA adapter into `model` in place (fallback when peft is not installed)."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in sd.items():
            if not key.endswith(".lora_A.weight"):
                continue
            prefix = key[: -len(".lora_A.weight")]
            b = sd[prefix + ".lora_B.weight"]
            module = model.get_submodule(prefix.removeprefix("base_model.model."))
            module.weight += (b @ a) * scale


def _generate(model_dir: Path, adapter: Path | None, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` with transformers (+ peft if available)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        try:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        except ImportError:
            _merge_adapter(model, adapter)
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids  # starts with <s>
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    """Build the demo model and adapters, print their paths and a greedy sample per adapter."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.monotonic()
    model_dir = ensure_demo_model()
    adapters = ensure_demo_adapters(model_dir)
    print(f"demo model: {model_dir}  (ready in {time.monotonic() - t0:.1f}s)")
    for name, path in adapters.items():
        print(f"adapter {name}: {path}")
    for prompt in demo_prompts():
        print("\n" + "=" * 70 + f"\n{prompt}")
        for name, path in [("base", None), *adapters.items()]:
            print(f"  [{name:9s}] {_generate(model_dir, path, prompt)}")


if __name__ == "__main__":
    main()
