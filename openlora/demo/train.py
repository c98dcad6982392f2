"""Train the demo LoRA adapters on SmolLM2-135M-Instruct: `python -m openlora.demo.train [NAME ...]`.

A developer's tool, not run at start-up: its output (PEFT files + attribution.json per adapter) ships in
`openlora/demo/adapters/`. Needs PEFT (`pip install -e '.[test]'`).

Each adapter learns one behaviour from `data/<name>.jsonl` ({"user", "assistant"} pairs): every pair is
rendered with the model's own chat template (its default system prompt included, as at serving time),
and the loss covers only the assistant's tokens and the closing <|im_end|>. LoRA r=8, alpha=16 on
q_proj and v_proj; AdamW with a cosine schedule; fixed seeds, 2 threads. Saved in bf16 (0.9 MB each).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

from openlora.demo import ADAPTERS_DIR, DATA_DIR, ensure_demo_model
from openlora.demo.manifests import ADAPTERS, DEMO_MODEL_ID, write_attribution

logger = logging.getLogger("openlora.demo.train")

SEED = 1234
RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")


def load_pairs(name: str) -> list[tuple[str, str]]:
    """The (user, assistant) pairs of one dataset."""
    rows = [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return [(r["user"], r["assistant"]) for r in rows]


def encode(tok, user: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 over the prompt, the ids over the answer and <|im_end|>."""
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                     tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, epochs: int, pad: int, rng):
    """Shuffled right-padded batches of (ids, labels, attention mask), `epochs` passes."""
    import torch

    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [examples[j] for j in order[i:i + batch_size]]
            n = max(len(x) for x, _ in chunk)
            ids = torch.tensor([x + [pad] * (n - len(x)) for x, _ in chunk])
            labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in chunk])
            yield ids, labels, mask


def train_one(model_dir: Path, name: str, out: Path, epochs: int, lr: float, batch_size: int) -> float:
    """Train adapter `name`; write it to `out` (PEFT files in bf16 + attribution.json); return last loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                            lora_dropout=0.05, task_type="CAUSAL_LM"))
    examples = [encode(tok, u, a) for u, a in load_pairs(name)]
    steps = epochs * math.ceil(len(examples) / batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0, loss_v = time.monotonic(), float("nan")
    for step, (ids, labels, mask) in enumerate(batches(examples, batch_size, epochs, tok.pad_token_id or 0,
                                                      random.Random(SEED))):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_v = float(loss.detach())
        if step % 10 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.3f (%.0f s)", name, step + 1, steps, loss_v, time.monotonic() - t0)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = DEMO_MODEL_ID  # not the converting machine's cache path
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template, empty here
    spec = next(a for a in ADAPTERS if a.name == name)
    write_attribution(spec, out, DATA_DIR)
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; these files ship in the wheel
    return loss_v


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=[a.name for a in ADAPTERS])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ADAPTERS_DIR)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model_dir = ensure_demo_model()
    for name in args.names:
        t0 = time.monotonic()
        loss = train_one(model_dir, name, args.out / name, args.epochs, args.lr, args.batch_size)
        logger.info("%s done: final loss %.3f in %.0f s -> %s", name, loss, time.monotonic() - t0, args.out / name)


if __name__ == "__main__":
    main()
