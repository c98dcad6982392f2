"""Helpers for the server tests: tiny model + PEFT adapters on disk, and a real server subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TARGET_MODULES = ["q_proj", "v_proj", "o_proj", "down_proj"]


def make_peft_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, targets: list[str] | None = None) -> Path:
    """A random (init_lora_weights=False) PEFT LoRA adapter for the model in `model_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or TARGET_MODULES, init_lora_weights=False,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # larger than PEFT's default init so adapters visibly change outputs
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


def write_manifest(adapter_dir: Path, base_model: str, *, allow: list[str] | None = None, price: int = 1000) -> None:
    """An attribution.json: one dataset with two contributors; optionally a private access list."""
    m = {"owner": "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4", "version": "1.0.0", "base_model": base_model,
         "datasets": [{"id": "ds", "hash": "sha256:" + "ab" * 32,
                       "contributors": [{"address": "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2", "weight": 3},
                                        {"address": "0x4B20993Bc481177ec7E8f571ceCaE8A9e22C02db", "weight": 1}]}],
         "price_per_1k_prompt_tokens": price, "price_per_1k_completion_tokens": 4 * price,
         "split": {"operator": 2000, "owner": 5000, "data": 3000},
         "access": {"allow": allow} if allow is not None else "public"}
    (adapter_dir / "attribution.json").write_text(json.dumps(m))


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll `url`/health until it answers 200 (True), the process exits or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Send `sig` by pid, wait up to `timeout` seconds, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m openlora.cli serve ...` on a free port; `url`, `base_url` (for openai), `stop()`."""

    def __init__(self, args: list[str], tmp: Path, env: dict | None = None, timeout: float = 120.0,
                 port: int | None = None, log_level: str = "INFO") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log_path = tmp / f"server-{self.port}.log"
        e = dict(os.environ)
        # NOTE: the default cache dir is kept: it holds the compiled SGMV extension (minutes to rebuild).
        e.update({"HF_HUB_OFFLINE": "1",
                  "OPENLORA_NODE_KEY_PASSWORD": "test-password", "PYTHONUNBUFFERED": "1"})
        e.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openlora.cli", "--log-level", log_level, "serve", "--port", str(self.port),
             "--num-threads", "1", "--ledger", str(tmp / f"ledger-{self.port}.sqlite"),
             "--node-key", str(tmp / "node_key.json"), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=e, cwd=ROOT)
        if not wait_healthy(self.url, self.proc, timeout):
            self.stop()
            raise RuntimeError(f"server did not come up in {timeout}s (exit code {self.proc.returncode}):\n"
                               f"{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of /metrics as {'name{labels}': value}."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        stop_process(self.proc, sig, timeout)
        self._log.close()
        return self.proc.returncode


class Gateway:
    """`python -m openlora.cli gateway --node ...` on a free port; `nodes()` maps url -> /v1/nodes row."""

    def __init__(self, nodes: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        args = [a for n in nodes for a in ("--node", n)]
        self.proc = subprocess.Popen([sys.executable, "-m", "openlora.cli", "gateway", "--port", str(self.port),
                                      "--poll-interval", "0.5", *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        if not wait_healthy(self.url, self.proc, 60):
            self.stop()
            raise RuntimeError(f"gateway did not come up: {log.read_text()}")

    def nodes(self) -> dict[str, dict]:
        return {n["url"]: n for n in httpx.get(self.url + "/v1/nodes", timeout=5).json()["data"]}

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)
        self._log.close()


class ChainUp:
    """`openlora chain up` (a local anvil with the contracts deployed) in its own session; `info` is the
    JSON line it prints (`deployment` is the deployment file); `stop()` ends it with SIGTERM."""

    def __init__(self, state: Path) -> None:
        from openlora.chain.anvil import free_port as chain_port

        self.proc = subprocess.Popen([sys.executable, "-m", "openlora.cli", "chain", "up", "--port", str(chain_port()),
                                      "--state", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.info = json.loads(line)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        assert self.proc.wait(30) == 0

