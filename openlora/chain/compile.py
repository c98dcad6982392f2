"""Compile the Vyper contracts once per source version; results are cached by content.

Compiling all five takes ~8 s on this machine, so the ABI and bytecode are kept in
`cache_dir()/vyper/<sha16>.json`, keyed by the sources, vyper's and snekmate's versions. snekmate
modules resolve from site-packages (vyper searches sys.path).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from openlora.cachefs import locked
from openlora.config import cache_dir

CONTRACTS_DIR = Path(__file__).with_name("contracts")
# Deployment order (each may take the addresses of those before it).
CONTRACTS = ("OpenToken", "DatanetRegistry", "AdapterRegistry", "NodeRegistry", "Settlement")


def _fingerprint() -> str:
    h = hashlib.sha256()
    for name in CONTRACTS:
        h.update(name.encode() + b"\0" + (CONTRACTS_DIR / f"{name}.vy").read_bytes() + b"\0")
    for pkg in ("vyper", "snekmate"):
        h.update(f"{pkg}=={metadata.version(pkg)}\0".encode())
    return h.hexdigest()[:16]


def _compile_one(name: str) -> dict[str, Any]:
    import vyper  # imported here: compiling is rare, the import costs ~1 s

    src = CONTRACTS_DIR / f"{name}.vy"
    out = vyper.compile_from_file_input(
        vyper.compiler.input_bundle.FileInput(0, src, src.resolve(), src.read_text()),
        input_bundle=vyper.compiler.input_bundle.FilesystemInputBundle([CONTRACTS_DIR, *_sys_paths()]),
        output_formats=["abi", "bytecode"],
    )
    return {"abi": out["abi"], "bytecode": out["bytecode"]}


def _sys_paths() -> list[Path]:
    import sys

    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


@lru_cache(maxsize=1)
def artifacts() -> dict[str, dict[str, Any]]:
    """{contract name: {"abi": [...], "bytecode": "0x..."}} for every contract."""
    path = cache_dir() / "vyper" / f"{_fingerprint()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):
        if path.is_file():
            return json.loads(path.read_text())
        arts = {name: _compile_one(name) for name in CONTRACTS}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(arts))
        tmp.replace(path)
    return arts
