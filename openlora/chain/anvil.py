"""A real local EVM node: anvil (Foundry), from the npm package `@foundry-rs/anvil`.

The npm package ships the static binary for each platform as an optional dependency
(`@foundry-rs/anvil-linux-amd64`, ...). We install it once into `cache_dir()/evm` (`make setup`
does it; otherwise on first use), or use `$OPENLORA_ANVIL` / an `anvil` already on PATH. The node
is started on 127.0.0.1 with its state persisted to a file (`--state`), and stopped by pid.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from openlora.cachefs import locked
from openlora.config import cache_dir, env
from openlora.errors import OpenLoRAError

ANVIL_NPM = "@foundry-rs/anvil@1.7.1"
# anvil's well-known development accounts (mnemonic "test test ... junk"): local chains only.
DEV_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
)
LOCAL_CHAIN_IDS = frozenset({31337, 1337})


class ChainError(OpenLoRAError):
    """The chain could not be reached, refused a transaction, or a tool is missing."""

    status = 503
    code = "chain_error"


def _platform_package() -> str:
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system())
    if not arch or not system:
        raise ChainError(f"anvil has no npm build for {platform.system()}/{platform.machine()}; put anvil on PATH "
                         "or set OPENLORA_ANVIL")
    return f"@foundry-rs/anvil-{system}-{arch}"


def _installed(root: Path) -> Path:
    return root / "node_modules" / _platform_package() / "bin" / "anvil"


def find_anvil(install: bool = True) -> Path:
    """The anvil binary: $OPENLORA_ANVIL, PATH, or our npm install (installed now if allowed)."""
    explicit = env("OPENLORA_ANVIL")
    if explicit:
        return Path(explicit)
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    root = cache_dir() / "evm"
    binary = _installed(root)
    if binary.is_file() or not install:
        if not binary.is_file():
            raise ChainError("anvil is not installed: run `make setup` (or `openlora chain install`)")
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise ChainError("anvil is not installed and npm is missing: install Node.js and npm "
                         "(e.g. `apt-get install npm`), or put anvil on PATH, or set OPENLORA_ANVIL")
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".install.lock"):
        if not binary.is_file():
            proc = subprocess.run(
                [npm, "install", "--prefix", str(root), "--no-audit", "--no-fund", "--loglevel=error", ANVIL_NPM],
                capture_output=True, text=True, timeout=600)
            if proc.returncode != 0 or not binary.is_file():
                raise ChainError(f"npm install {ANVIL_NPM} failed: {proc.stderr.strip()[-500:]}")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rpc_ready(url: str, timeout: float = 1.0) -> int | None:
    """The chain id if `url` answers eth_chainId, else None."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(json.loads(r.read())["result"], 16)
    except Exception:
        return None


class Anvil:
    """One anvil process on 127.0.0.1 (`with Anvil(...) as node:` or start()/stop())."""

    def __init__(self, port: int | None = None, state: str | Path | None = None, chain_id: int = 31337,
                 block_time: float | None = None) -> None:
        self.port = port or free_port()
        self.state = Path(state) if state else None
        self.chain_id = chain_id
        self.block_time = block_time
        self.proc: subprocess.Popen | None = None

    @property
    def rpc(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Anvil":
        cmd = [str(find_anvil()), "--host", "127.0.0.1", "--port", str(self.port), "--chain-id",
               str(self.chain_id), "--silent"]
        if self.state is not None:
            self.state.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--state", str(self.state)]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ChainError(f"anvil exited with {self.proc.returncode}: {err.strip()[-500:]}")
            if rpc_ready(self.rpc, 0.5) is not None:
                return self
            time.sleep(0.05)
        self.stop()
        raise ChainError(f"anvil did not answer on {self.rpc} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid (anvil writes its --state file on the way out), SIGKILL if it hangs."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()

    def __enter__(self) -> "Anvil":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """`python -m openlora.chain.anvil`: install anvil now (make setup) and print its path."""
    print(find_anvil())


if __name__ == "__main__":
    main()
