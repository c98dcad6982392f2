"""The base model hash: every byte counts, and a file's bytes are read once, not at every start."""

from __future__ import annotations

import os

from openlora.engine import model_hash


def test_hash_covers_bytes_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"a": 1}')
    w = ckpt / "model.safetensors"
    w.write_bytes(b"\x00" * 1000)
    first = model_hash.base_model_hash(ckpt)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (reads.append(str(f)), real_open(f, *a, **k))[1])
    assert model_hash.base_model_hash(ckpt) == first
    assert str(w) not in reads, "the weights were read again although unchanged"
    monkeypatch.undo()
    monkeypatch.setenv("OPENLORA_CACHE_DIR", str(tmp_path / "cache"))
    w.write_bytes(b"\x00" * 999 + b"\x01")  # same size, one byte differs
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 1_000_000))
    assert model_hash.base_model_hash(ckpt) != first
    (ckpt / "config.json").write_text('{"a": 2}')
    assert len({first, model_hash.base_model_hash(ckpt)}) == 2
