"""Server test fixtures: one tiny model with PEFT adapters, and one real server process per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ServerProcess, make_peft_adapter, write_manifest  # noqa: E402

API_KEY = "sk-test-alice"  # registered as --api-key alice=sk-test-alice: key id "alice"
OTHER_KEY = "sk-test-bob"  # registered bare: key id key-<hash>
ADMIN_KEY = "adm-secret"
ADAPTERS = ("a1", "a2", "a3")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """tiny llama model 'tiny'; adapters a1 (manifest, public), a2, a3 (no manifest), secret (private:
    only payer/key 'alice'); 'late' is built but not registered (admin route test)."""
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("srv")
    model = root / "tiny"
    model.mkdir()
    make_tiny_model(model)
    adir = root / "adapters"
    for i, name in enumerate((*ADAPTERS, "secret")):
        make_peft_adapter(model, adir / name, seed=10 + i, r=4 + 2 * i)
    write_manifest(adir / "a1", "tiny")
    write_manifest(adir / "secret", "tiny", allow=["alice"])
    bad = adir / "bad"  # a valid config over corrupt weights: registers, then fails to load (503)
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adir / "a1" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    late = make_peft_adapter(model, root / "late", seed=99, r=8, targets=["q_proj", "v_proj"])
    return {"root": root, "model": model, "adapter_dir": adir, "late": late}


SERVER_OPTS = ["--max-num-seqs", "16", "--kv-cache-memory", "32MiB", "--max-loras", "4"]


@pytest.fixture(scope="session")
def server(assets):
    srv = ServerProcess(["--model", str(assets["model"]), "--adapter-dir", str(assets["adapter_dir"]),
                         "--api-key", f"alice={API_KEY}", "--api-key", OTHER_KEY, "--admin-key", ADMIN_KEY,
                         "--adapter-root", str(assets["root"]), *SERVER_OPTS], assets["root"])
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log()[-3000:]


@pytest.fixture(scope="session")
def offline(assets):
    """openlora.LLM with the server's engine options and adapters: the parity oracle."""
    from openlora import LLM

    llm = LLM(str(assets["model"]), max_num_seqs=16, kv_cache_memory=32 << 20, max_loras=4, num_threads=1)
    for name in (*ADAPTERS, "secret"):
        llm.register_adapter(name, str(assets["adapter_dir"] / name))
    llm.register_adapter("late", str(assets["late"]))
    return llm
