"""Priced attribution manifests for the demo adapters, with demo addresses derived from fixed seeds.

Every demo response carries a real fee and real payouts: each adapter has a price per 1,000 tokens and a
split among the node operator, the adapter's owner and two or three data contributors. The addresses
belong to private keys derived from public seeds (`demo_key`), so anyone can reproduce them (and claim
with them on a local chain). They are demo keys: never send anything of value to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_utils import keccak

DEMO_MODEL_ID = "SmolLM2-135M-Instruct"
DESCRIPTION = ("OpenLoRA demo adapter. The owner and contributor addresses are DEMO KEYS derived from public "
               "seeds (openlora.demo.manifests.demo_key): never send real funds to them.")


@dataclass(frozen=True)
class DemoAdapter:
    """One shipped adapter: what it does, its dataset, its contributors (seed name, weight), its prices."""

    name: str
    summary: str
    contributors: tuple[tuple[str, int], ...]
    price_prompt: int  # per 1,000 prompt tokens, in the token's smallest unit
    price_completion: int  # per 1,000 completion tokens
    split: tuple[int, int, int]  # operator, owner, data (basis points)


ADAPTERS: tuple[DemoAdapter, ...] = (
    DemoAdapter("pirate", "answers in a pirate voice", (("ahab", 3), ("bonny", 2)), 2000, 6000, (2000, 5000, 3000)),
    DemoAdapter("french", "answers in French", (("colette", 2), ("hugo", 1), ("sand", 1)), 3000, 9000,
                (2500, 4000, 3500)),
    DemoAdapter("json", "terse JSON answers", (("ada", 1), ("grace", 1)), 1000, 3000, (3000, 4000, 3000)),
    DemoAdapter("legal", "legal-drafting tone", (("portia", 5), ("blackstone", 3)), 4000, 12000,
                (2000, 5500, 2500)),
)


def demo_key(seed: str) -> bytes:
    """The demo private key for `seed`: keccak256("openlora-demo:" + seed). Public, hence worthless."""
    return keccak(text=f"openlora-demo:{seed}")


def demo_address(seed: str) -> str:
    """The checksummed address of `demo_key(seed)`."""
    return Account.from_key(demo_key(seed)).address


def manifest_for(a: DemoAdapter) -> dict:
    """The attribution.json content shipped beside adapter `a`."""
    op, owner, data = a.split
    return {
        "description": DESCRIPTION,
        "owner": demo_address(f"owner/{a.name}"),
        "version": "1",
        "base_model": DEMO_MODEL_ID,
        "datasets": [{
            "id": f"openlora-demo-{a.name}",
            "contributors": [{"address": demo_address(f"contributor/{seed}"), "weight": w}
                             for seed, w in a.contributors],
            # the datanet's texts (span-level attribution): its hash becomes the dataset's content hash
            "contributions": CONTRIBUTIONS_FILE,
        }],
        "price_per_1k_prompt_tokens": a.price_prompt,
        "price_per_1k_completion_tokens": a.price_completion,
        "split": {"operator": op, "owner": owner, "data": data},
        "access": "public",
    }


CONTRIBUTIONS_FILE = "contributions.jsonl"


def contributions_for(a: DemoAdapter, data: Path) -> list[dict]:
    """The demo datanet's contributions: each assistant answer of the adapter's training file
    (openlora/demo/data/<name>.jsonl), given by its contributors in turn, as many per cycle as their
    weight (pirate: ahab, ahab, ahab, bonny, bonny, ahab, ...)."""
    turns = [demo_address(f"contributor/{seed}") for seed, w in a.contributors for _ in range(w)]
    lines = [json.loads(line) for line in (data / f"{a.name}.jsonl").read_text().splitlines() if line.strip()]
    return [{"contributor": turns[i % len(turns)], "text": ex["assistant"]} for i, ex in enumerate(lines)]


def write_attribution(a: DemoAdapter, adapter_dir: Path, data: Path) -> None:
    """Write attribution.json and contributions.jsonl beside adapter `a`'s PEFT files."""
    (adapter_dir / "attribution.json").write_text(json.dumps(manifest_for(a), indent=2) + "\n")
    rows = contributions_for(a, data)
    (adapter_dir / CONTRIBUTIONS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
