"""The base model's identity: what receipts and the node registry name as `base_model_hash`.

sha256 over config.json, the safetensors index and, for every safetensors file, its name and the
sha256 of its bytes. Hashing a large checkpoint takes minutes, so each file's digest is cached under
cache_dir()/model_hashes, keyed by its real path, size and modification time: the bytes are read once
per checkpoint file, not at every start, and any rewrite of a file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from openlora.config import cache_dir

_CHUNK = 1 << 24


def file_digest(path: Path) -> str:
    """sha256 of `path`'s bytes, from the cache when its real path, size and mtime are unchanged."""
    st = path.stat()
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    entry = cache_dir() / "model_hashes" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:  # a read-only cache only costs the next start a re-hash
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sha256": digest}))
        os.replace(tmp, entry)
    except OSError:
        pass
    return digest


def base_model_hash(path: str | Path) -> str:
    """Identity of the checkpoint folder `path` (see the module docstring)."""
    h = hashlib.sha256()
    p = Path(path)
    for name in sorted(x.name for x in p.iterdir() if x.suffix == ".json" or x.name.endswith(".safetensors")):
        f = p / name
        if name.endswith(".safetensors"):
            h.update(name.encode())
            h.update(bytes.fromhex(file_digest(f)))
        elif name in ("config.json", "model.safetensors.index.json"):
            h.update(f.read_bytes())
    return h.hexdigest()
