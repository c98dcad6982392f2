"""The layering DESIGN.md draws, checked in fresh interpreters: the torch-free layers load no torch,
and the engine loads none of the layers that consume its events."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded(imports: str, names: tuple[str, ...]) -> list[str]:
    code = f"import sys\nimport {imports}\nprint(','.join(n for n in {names!r} if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [n for n in out.stdout.strip().split(",") if n]


@pytest.mark.parametrize("module", ["openlora.core", "openlora.attribution"])
def test_torch_free_layers_load_no_torch(module):
    assert _loaded(module, ("torch",)) == []


def test_the_engine_loads_no_consumer_of_its_events():
    consumers = ("openlora.attribution", "openlora.server", "openlora.chain", "openlora.network", "openlora.web")
    assert _loaded("openlora.engine.llm_engine, openlora.engine.async_engine", consumers) == []


def test_nothing_outside_lora_touches_the_adapter_managers_internals():
    """The other layers (and the benchmarks) ask LoRAManager (cards, card, snapshot, pool_tensors,
    source_adapter, ...); its entries, lock, pool and tiers stay inside openlora/lora."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    reach = re.compile(r"\blora(?:_manager)?\.(entries|lock|pool|backend|registry|host_cache|slots|_\w+)\b")
    files = [*(root / "openlora").rglob("*.py"), *(root / "bench").rglob("*.py")]
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}"
            for p in files if p.relative_to(root).parts[:2] != ("openlora", "lora")
            for i, line in enumerate(p.read_text().splitlines(), 1) if reach.search(line)]
    assert not hits, hits
