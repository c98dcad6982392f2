"""Adapter sources: local folders, the Hugging Face hub (real huggingface_hub client against a local hub
stand-in) and S3 (real boto3 client against moto's server mode), plus the disk cache and content hash."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from openlora.errors import AdapterLoadError, AdapterNotFound, InvalidRequest
from openlora.lora.sources import (
    ADAPTER_FILES,
    S3_MANIFEST,
    AdapterSource,
    describe,
    fetch,
    files_hash,
    parse_source,
    scan_adapter_dir,
)

try:  # tests/ may or may not become a package
    from .hub_standin import HubStandIn
except ImportError:
    from hub_standin import HubStandIn


def adapter_bytes(rank: int, seed: int = 0) -> dict[str, bytes]:
    """The files of a small fake PEFT adapter (not a real model's shapes: sources never parse them)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((rank, 16), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, rank), np.float32),
    }
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save(tensors),
        "attribution.json": json.dumps({"contributors": [{"id": "alice", "share": 1}]}).encode(),
    }


def write_adapter(folder: Path, rank: int = 4, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_bytes(rank, seed).items():
        (folder / name).write_bytes(data)
    return folder


def read_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name in ADAPTER_FILES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# parse / describe / local


@pytest.mark.parametrize("spec, kind, location, prefix, revision", [
    ("s3://my-bucket/team/a1/", "s3", "my-bucket", "team/a1", None),
    ("s3://my-bucket", "s3", "my-bucket", "", None),
    ("hf://org/name", "hub", "org/name", "", None),
    ("org/name@v1.2", "hub", "org/name", "", "v1.2"),
    ("hf://org/name@0123456789abcdef0123456789abcdef01234567", "hub", "org/name", "",
     "0123456789abcdef0123456789abcdef01234567"),
    ("file:///srv/adapters/x", "local", "/srv/adapters/x", "", None),
    ("/srv/adapters/x", "local", "/srv/adapters/x", "", None),
])
def test_parse_source(spec: str, kind: str, location: str, prefix: str, revision: str | None) -> None:
    src = parse_source(spec)
    assert (src.kind, src.location, src.prefix, src.revision) == (kind, location, prefix, revision)


def test_parse_relative_path_wins_over_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_source("org/name").kind == "hub"  # nothing on disk: a hub repo id
    write_adapter(tmp_path / "org" / "name")
    src = parse_source("org/name")  # now an existing relative folder: local wins
    assert src.kind == "local" and src.location == str(tmp_path / "org" / "name")
    assert parse_source("hf://org/name").kind == "hub"  # hf:// forces the hub
    assert parse_source("./nothing/here").kind == "local"  # explicit path syntax is always local


def test_parse_errors_and_secrets() -> None:
    with pytest.raises(InvalidRequest, match="conflicting revisions"):
        parse_source("org/name@v1", revision="v2")
    assert parse_source("org/name@v1", revision="v1").revision == "v1"
    with pytest.raises(InvalidRequest, match="only supported for hub"):
        parse_source("s3://bucket/x", revision="v1")
    with pytest.raises(InvalidRequest, match="prefix"):
        parse_source("s3://bucket/a/../../etc")
    with pytest.raises(InvalidRequest, match="bucket"):
        parse_source("s3://Bad_Bucket!/x")
    with pytest.raises(InvalidRequest):
        parse_source("  ")
    src = parse_source("org/name", revision="main", token="hf_secret")
    assert "hf_secret" not in repr(src) and "hf_secret" not in json.dumps(describe(src))
    assert describe(src) == {"kind": "hub", "uri": "hf://org/name", "revision": "main"}
    assert src == parse_source("org/name", revision="main")  # the token is not part of identity
    assert describe(parse_source("s3://b1/p/q")) == {"kind": "s3", "uri": "s3://b1/p/q", "revision": None}
    assert describe(parse_source("/x/y"))["uri"] == "file:///x/y"


def test_fetch_local(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    assert fetch(parse_source(str(folder))) == folder
    assert fetch(parse_source(folder.as_uri()), expected_files_hash=files_hash(folder)) == folder
    with pytest.raises(AdapterLoadError, match="hash"):
        fetch(parse_source(str(folder)), expected_files_hash="0" * 64)
    with pytest.raises(AdapterNotFound, match="does not exist"):
        fetch(parse_source(str(tmp_path / "missing")))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="no adapter_model"):
        fetch(parse_source(str(folder)))


def test_files_hash(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=1)
    (b / "README.md").write_text("not part of the adapter")
    assert files_hash(a) == files_hash(b)  # only adapter files count
    (b / "attribution.json").write_text("{}")
    assert files_hash(a) != files_hash(b)  # any byte of any adapter file
    c = write_adapter(tmp_path / "c", seed=1)
    (c / "adapter_model.safetensors").rename(c / "adapter_model.bin")
    assert files_hash(a) != files_hash(c)  # and the names
    with pytest.raises(AdapterLoadError):
        files_hash(tmp_path / "empty_dir_that_is_missing")


def test_scan_adapter_dir(tmp_path: Path) -> None:
    write_adapter(tmp_path / "plain")
    write_adapter(tmp_path / "org" / "nested")
    write_adapter(tmp_path / "org" / "nested" / "inner")  # inside an adapter: not scanned
    write_adapter(tmp_path / ".tmp-download")  # hidden: a cache temp dir
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    write_adapter(tmp_path.parent / f"{tmp_path.name}-elsewhere")
    os.symlink(tmp_path.parent / f"{tmp_path.name}-elsewhere", tmp_path / "linked")
    found = scan_adapter_dir(tmp_path)
    assert found == {
        "linked": tmp_path / "linked", "org/nested": tmp_path / "org" / "nested", "plain": tmp_path / "plain",
    }
    with pytest.raises(AdapterNotFound):
        scan_adapter_dir(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------
# S3 against moto's server mode


@pytest.fixture(scope="module")
def moto_url() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Fake credentials and the moto endpoint in the environment (this test only); a boto3 client."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)  # fetch finds moto through the env
    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")


def upload(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


class MotoLog:
    """Counts the requests moto's server logged (werkzeug logs each one after answering it)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def gets(self, key_part: str) -> int:
        time.sleep(0.1)  # the log line is written just after the response is sent
        return sum(1 for r in self.caplog.records if f"GET /{key_part}" in r.getMessage())


@pytest.fixture
def moto_log(caplog: pytest.LogCaptureFixture) -> MotoLog:
    caplog.set_level(logging.INFO, logger="werkzeug")
    return MotoLog(caplog)


def test_s3_fetch_then_cache_hit(s3, moto_log: MotoLog, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="adapters-a")
    files = adapter_bytes(rank=4)
    upload(s3, "adapters-a", "team/a1", {**files, "README.md": b"not fetched"})
    upload(s3, "adapters-a", "team/a1/sub", adapter_bytes(rank=2))  # deeper keys are not this adapter
    src = parse_source("s3://adapters-a/team/a1")

    folder = fetch(src, tmp_path)
    assert folder == tmp_path / "s3" / "adapters-a" / "team" / "a1"
    assert read_files(folder) == files
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, S3_MANIFEST])
    local = write_adapter(tmp_path / "local", rank=4)
    assert files_hash(folder) == files_hash(local)
    assert moto_log.gets("adapters-a/team/a1/adapter_model.safetensors") == 1

    stat = (folder / "adapter_model.safetensors").stat()
    again = fetch(src, tmp_path, expected_files_hash=files_hash(local))
    assert again == folder
    after = (folder / "adapter_model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten
    assert moto_log.gets("adapters-a/team/a1/adapter_model.safetensors") == 1  # no second GetObject
    assert moto_log.gets("adapters-a/team/a1/adapter_config.json") == 1

    # A new version in the bucket (new ETags) is noticed and swapped in atomically.
    new_files = adapter_bytes(rank=8, seed=3)
    upload(s3, "adapters-a", "team/a1", new_files)
    assert read_files(fetch(src, tmp_path)) == new_files
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_s3_missing_bucket_prefix_and_weights(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="adapters-b")
    upload(s3, "adapters-b", "only-config", {"adapter_config.json": b"{}"})
    with pytest.raises(AdapterNotFound, match="s3://no-such-bucket/x.*NoSuchBucket"):
        fetch(parse_source("s3://no-such-bucket/x"), tmp_path)
    with pytest.raises(AdapterNotFound, match="s3://adapters-b/nothing-here: no adapter_config.json"):
        fetch(parse_source("s3://adapters-b/nothing-here"), tmp_path)
    with pytest.raises(AdapterLoadError, match="no adapter_model"):
        fetch(parse_source("s3://adapters-b/only-config"), tmp_path)


def test_s3_hash_mismatch_and_corrupt_cache(s3, moto_log: MotoLog, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="adapters-c")
    files = adapter_bytes(rank=4, seed=7)
    upload(s3, "adapters-c", "a", files)
    src = parse_source("s3://adapters-c/a")
    good = files_hash(write_adapter(tmp_path / "local", rank=4, seed=7))

    with pytest.raises(AdapterLoadError, match="s3://adapters-c/a: content hash differs"):
        fetch(src, tmp_path / "cache", expected_files_hash="0" * 64)
    assert not (tmp_path / "cache" / "s3" / "adapters-c" / "a").exists()  # a bad download is never cached

    folder = fetch(src, tmp_path / "cache", expected_files_hash=good)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # bit rot that keeps the size
    before = moto_log.gets("adapters-c/a/adapter_model.safetensors")
    assert read_files(fetch(src, tmp_path / "cache", expected_files_hash=good)) == files  # re-downloaded once
    assert moto_log.gets("adapters-c/a/adapter_model.safetensors") == before + 1

    weights.write_bytes(b"short")  # truncation is caught even without an expected hash (size check)
    assert read_files(fetch(src, tmp_path / "cache")) == files


def test_s3_concurrent_fetches(s3, moto_log: MotoLog, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="adapters-d")
    contents = {f"x{i}": adapter_bytes(rank=2 + i, seed=i) for i in range(3)}
    for name, files in contents.items():
        upload(s3, "adapters-d", name, files)
    results: list[tuple[str, Path | BaseException]] = []

    def work(name: str) -> None:
        try:
            results.append((name, fetch(parse_source(f"s3://adapters-d/{name}"), tmp_path)))
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append((name, e))

    threads = [threading.Thread(target=work, args=(f"x{i % 3}",)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 9
    for name, folder in results:
        assert isinstance(folder, Path), folder
        assert read_files(folder) == contents[name]
    for i in range(3):  # the same adapter was downloaded once despite three concurrent fetches
        assert moto_log.gets(f"adapters-d/x{i}/adapter_model.safetensors") == 1


def test_s3_unreachable(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="adapters-e")
    upload(s3, "adapters-e", "a", adapter_bytes(rank=4))
    cached = fetch(parse_source("s3://adapters-e/a"), tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert fetch(parse_source("s3://adapters-e/a"), tmp_path, s3_endpoint_url=dead) == cached  # cached copy
    with pytest.raises(AdapterLoadError, match="s3://adapters-e/b: S3 request failed"):
        fetch(parse_source("s3://adapters-e/b"), tmp_path, s3_endpoint_url=dead)


def test_s3_nested_prefixes_share_the_cache(s3, tmp_path: Path) -> None:
    """s3://b/p/x is cached inside s3://b/p's folder; replacing the outer one keeps the inner one."""
    s3.create_bucket(Bucket="adapters-f")
    inner, outer = adapter_bytes(rank=2, seed=1), adapter_bytes(rank=4, seed=2)
    upload(s3, "adapters-f", "p/x", inner)
    upload(s3, "adapters-f", "p", outer)
    inner_dir = fetch(parse_source("s3://adapters-f/p/x"), tmp_path)
    outer_dir = fetch(parse_source("s3://adapters-f/p"), tmp_path)
    upload(s3, "adapters-f", "p", adapter_bytes(rank=8, seed=3))  # new outer version: swapped in
    assert fetch(parse_source("s3://adapters-f/p"), tmp_path) == outer_dir
    assert read_files(outer_dir) == adapter_bytes(rank=8, seed=3)
    assert read_files(inner_dir) == inner
    assert scan_adapter_dir(tmp_path / "s3") == {"adapters-f/p": outer_dir}  # a folder's subfolders are its own


# ----------------------------------------------------------------------------------------------------
# Hugging Face hub against the local stand-in


@pytest.fixture(scope="module")
def hub_server():
    with HubStandIn(valid_tokens=("hf_reader", "hf_outsider")) as hub:
        hub.v1_files = adapter_bytes(rank=4, seed=11)
        hub.main_files = adapter_bytes(rank=8, seed=12)
        hub.v1 = hub.add_commit("org/public-ad", {**hub.v1_files, "README.md": b"# card"}, tags=("v1",))
        hub.main = hub.add_commit("org/public-ad", hub.main_files)
        hub.private_files = adapter_bytes(rank=2, seed=13)
        hub.add_commit("org/private-ad", hub.private_files, private=True, allowed_tokens=("hf_reader",))
        yield hub


@pytest.fixture
def hub(hub_server: HubStandIn, monkeypatch: pytest.MonkeyPatch) -> HubStandIn:
    """HF_ENDPOINT points at the stand-in (fetch reads it at call time); no ambient token.

    tests/conftest.py sets HF_HUB_OFFLINE=1 for the session, which huggingface_hub reads once at import
    into `constants.HF_HUB_OFFLINE`: these tests turn it off (the hub is local), for this test only.
    """
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return hub_server


def test_hub_public_revisions_and_cache(hub: HubStandIn, tmp_path: Path) -> None:
    v1 = fetch(parse_source("org/public-ad@v1"), tmp_path)
    assert read_files(v1) == hub.v1_files
    assert sorted(p.name for p in v1.iterdir()) == sorted(hub.v1_files)  # README.md not downloaded
    assert v1.is_relative_to(tmp_path / "hub") and v1.name == hub.v1
    assert read_files(fetch(parse_source("hf://org/public-ad"), tmp_path)) == hub.main_files
    assert read_files(fetch(parse_source("org/public-ad", revision=hub.v1), tmp_path)) == hub.v1_files

    resolves = hub.count("GET", "/org/public-ad/resolve/")
    blobs = hub.count("GET", "/blobs/")
    assert fetch(parse_source("org/public-ad@v1"), tmp_path, expected_files_hash=files_hash(v1)) == v1
    assert hub.count("GET", "/org/public-ad/resolve/") == resolves  # cached: no file downloads
    assert hub.count("GET", "/blobs/") == blobs


def test_hub_private_repo_tokens(hub: HubStandIn, tmp_path: Path) -> None:
    folder = fetch(parse_source("org/private-ad", token="hf_reader"), tmp_path / "ok")
    assert read_files(folder) == hub.private_files
    with pytest.raises(AdapterNotFound, match="'org/private-ad'.*not found.*token is needed"):
        fetch(parse_source("org/private-ad"), tmp_path / "anon")
    with pytest.raises(AdapterLoadError, match="'org/private-ad'.*refused the token"):
        fetch(parse_source("org/private-ad", token="hf_wrong"), tmp_path / "wrong")
    with pytest.raises(AdapterNotFound, match="token has no access"):
        fetch(parse_source("org/private-ad", token="hf_outsider"), tmp_path / "outsider")


def test_hub_unknown_repo_and_revision(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_commit("org/not-an-adapter", {"config.json": b"{}", "model.safetensors": b"0"})
    with pytest.raises(AdapterNotFound, match="hf://org/not-an-adapter has no adapter_config.json"):
        fetch(parse_source("org/not-an-adapter"), tmp_path)
    with pytest.raises(AdapterNotFound, match="'org/missing' at http://127.0.0.1:\\d+ not found"):
        fetch(parse_source("org/missing"), tmp_path)
    with pytest.raises(AdapterNotFound, match="revision 'v9' not found"):
        fetch(parse_source("org/public-ad@v9"), tmp_path)


def test_hub_hash_mismatch_and_corrupt_cache(hub: HubStandIn, tmp_path: Path) -> None:
    good = files_hash(write_adapter(tmp_path / "local", rank=4, seed=11))
    folder = fetch(parse_source("org/public-ad@v1"), tmp_path, expected_files_hash=good)
    weights = folder / "adapter_model.safetensors"  # a symlink into huggingface_hub's blobs/
    weights.resolve().write_bytes(b"\0" * weights.stat().st_size)
    blobs = hub.count("GET", "/blobs/")
    assert read_files(fetch(parse_source("org/public-ad@v1"), tmp_path, expected_files_hash=good)) == hub.v1_files
    assert hub.count("GET", "/blobs/") == blobs + 1  # the corrupt copy was re-downloaded once
    with pytest.raises(AdapterLoadError, match="hf://org/public-ad@v1: content hash differs"):
        fetch(parse_source("org/public-ad@v1"), tmp_path, expected_files_hash="0" * 64)


def test_hub_unreachable(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = fetch(parse_source("org/public-ad@v1"), tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert fetch(parse_source("org/public-ad@v1"), tmp_path) == cached  # offline: the cached snapshot
    with pytest.raises(AdapterLoadError, match="'org/public-ad'.*cannot reach the hub"):
        fetch(parse_source("org/public-ad@v1"), tmp_path / "empty-cache")


def test_hub_offline_mode(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    cached = fetch(parse_source("org/public-ad@v1"), tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as with HF_HUB_OFFLINE=1
    requests = len(hub.requests)
    assert fetch(parse_source("org/public-ad@v1"), tmp_path) == cached
    assert len(hub.requests) == requests  # not a single request
    with pytest.raises(AdapterLoadError, match="no cached copy.*HF_HUB_OFFLINE"):
        fetch(parse_source("org/public-ad@v1"), tmp_path / "empty-cache")


def test_default_cache_root(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENLORA_CACHE_DIR", str(tmp_path / "olc"))
    folder = fetch(parse_source("org/public-ad@v1"))
    assert folder.is_relative_to(tmp_path / "olc" / "adapters" / "hub")
    assert isinstance(parse_source("org/public-ad"), AdapterSource)


def test_hub_concurrent_fetches(hub: HubStandIn, tmp_path: Path) -> None:
    specs = ["org/public-ad@v1", "org/public-ad", "org/public-ad@v1", "org/public-ad"] * 2
    expected = {"org/public-ad@v1": hub.v1_files, "org/public-ad": hub.main_files}
    results: list[tuple[str, Path | BaseException]] = []

    def work(spec: str) -> None:
        try:
            results.append((spec, fetch(parse_source(spec), tmp_path)))
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append((spec, e))

    blobs = hub.count("GET", "/blobs/")
    threads = [threading.Thread(target=work, args=(spec,)) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == len(specs)
    for spec, folder in results:
        assert isinstance(folder, Path), folder
        assert read_files(folder) == expected[spec]
    assert hub.count("GET", "/blobs/") == blobs + 2  # one weights download per revision
