"""No trace left: a canary string sent in prompts (completions, chat, streaming, failing requests) is found
nowhere on disk after the server stops (cache dir, ledger, node key, its log at DEBUG level), nor is a
commitment's key, and the serving process may not write core dumps."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest
from conftest import API_KEY
from helpers import ServerProcess

from openlora.config import cache_dir

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

CANARY = "zqxcanary7f3a9c"


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            try:
                if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:  # a file that vanished or cannot be read: not ours to judge
                pass
    return hits


def test_a_canary_in_prompts_is_found_nowhere_after_the_server_stops(assets, tmp_path):
    tmp = tmp_path / "run"
    tmp.mkdir()
    srv = ServerProcess(["--model", str(assets["model"]), "--adapter-dir", str(assets["adapter_dir"]),
                         "--api-key", f"alice={API_KEY}", "--max-model-len", "64"], tmp, log_level="DEBUG")
    try:
        limits = Path(f"/proc/{srv.proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core  # soft and hard limits
        c = openai.OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0)
        prompt = f"t5 t6 {CANARY} t7"
        assert c.completions.create(model="a1", prompt=prompt, max_tokens=3).choices
        list(c.completions.create(model="a2", prompt=prompt, max_tokens=3, stream=True))
        msgs = [{"role": "user", "content": prompt}]
        chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, extra_body={"commit": True})
        key = chat.model_extra["attribution"]["commitment_key"]  # the client's alone: never written down
        failing = [  # each fails alone, with its prompt in the request
            lambda: c.completions.create(model="a1", prompt=" ".join([CANARY] * 200), max_tokens=3),  # too long
            lambda: c.completions.create(model="nosuch", prompt=prompt, max_tokens=3),  # unknown adapter
            lambda: c.completions.create(model="a1", prompt=prompt, max_tokens=3, extra_body={"top_k": CANARY}),
        ]
        for call in failing:
            with pytest.raises(openai.APIStatusError) as ei:
                call()
            assert ei.value.status_code < 500
        bad_json = httpx.post(srv.base_url + "/completions", content=b'{"model": "a1", "prompt": "' + CANARY.encode(),
                              headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
        assert bad_json.status_code == 400
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "DEBUG" in log  # the level was on
    needle = CANARY.encode()
    assert _files_holding(tmp, needle) == []  # the log, the ledger (+ WAL), the node key
    assert _files_holding(cache_dir(), needle) == []
    for form in (key.encode(), bytes.fromhex(key[2:])):  # a commitment's key, as hex or raw bytes
        assert _files_holding(tmp, form) == [] and _files_holding(cache_dir(), form) == []
