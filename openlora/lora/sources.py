"""Where adapters come from: a local folder, the Hugging Face hub, or S3; and the disk cache for remote ones.

A source spec is parsed once into an `AdapterSource`; `fetch` turns it into a local folder holding the
PEFT files (`adapter_config.json` + `adapter_model.safetensors` or `.bin`, optional `attribution.json`).

Spec grammar (`parse_source`):

    file:///abs/path | /abs/path | ./rel | ../rel | ~/path | any path that exists   -> local folder
    s3://bucket[/prefix]                                                            -> S3 objects
    hf://org/name[@revision] | org/name[@revision]                                  -> hub repo

NOTE (ambiguity): `org/name` is both a valid relative path and a hub repo id. A relative path that exists
on disk (relative to the current directory) wins; otherwise the spec is a hub repo id. Use `./org/name`
or `file://` to force a local folder and `hf://` to force the hub.

Disk cache layout under `cache_root` (default `config.cache_dir() / "adapters"`):

    hub/            huggingface_hub's own cache (models--org--name/{blobs,refs,snapshots}, .locks)
    s3/bucket/prefix/   the adapter files + `.openlora-source.json` (ETags and sizes of the objects)
    .locks/         one file lock per remote adapter (cross-process safety)

Integrity: `files_hash` is the adapter's content hash. When `expected_files_hash` is given, a fetched
folder must match it; a cached copy that does not is re-downloaded once, then it is an
`AdapterLoadError`. S3 downloads are verified in a temp dir before they are renamed into the cache.

Offline: when the hub or S3 cannot be reached (or HF_HUB_OFFLINE=1), a complete cached copy is served.
NOTE: like huggingface_hub, a hub answer of 401/403 also falls back to a cached snapshot when one exists;
sources are admin configuration, per-caller access control belongs to the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from filelock import FileLock  # a dependency of huggingface_hub

from openlora.config import cache_dir, env
from openlora.errors import AdapterLoadError, AdapterNotFound, InvalidRequest

logger = logging.getLogger(__name__)

SourceKind = Literal["local", "hub", "s3"]

# The files that make an adapter (the content hash covers exactly these, when present).
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ATTRIBUTION_FILE = "attribution.json"
ADAPTER_FILES = (CONFIG_FILE, *WEIGHT_FILES, ATTRIBUTION_FILE)

S3_MANIFEST = ".openlora-source.json"  # written next to cached S3 files: ETag + size per object
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterSource:
    """Where one adapter lives. Build it with `parse_source`.

    `location` is the absolute folder (local), the repo id `org/name` (hub) or the bucket (s3);
    `prefix` is the S3 key prefix without trailing slash; `revision` is a hub branch, tag or commit.
    The token is never printed nor compared (two sources differing only by token are the same adapter).
    """

    kind: SourceKind
    location: str
    prefix: str = ""
    revision: str | None = None
    token: str | None = field(default=None, repr=False, compare=False)

    @property
    def uri(self) -> str:
        """Canonical URI (no secrets): `file:///abs`, `hf://org/name`, `s3://bucket/prefix`."""
        if self.kind == "local":
            return Path(self.location).as_uri()
        if self.kind == "hub":
            return f"hf://{self.location}"
        return f"s3://{self.location}/{self.prefix}" if self.prefix else f"s3://{self.location}"


def parse_source(spec: str, *, revision: str | None = None, token: str | None = None) -> AdapterSource:
    """Parse a source spec (see the module docstring). `revision` and `token` apply to hub sources only;
    a revision given both in the spec (`org/name@rev`) and as an argument must agree."""
    spec = spec.strip()
    if not spec:
        raise InvalidRequest("empty adapter source")
    if spec.startswith("file://"):
        parts = urlsplit(spec)
        if parts.netloc not in ("", "localhost"):
            raise InvalidRequest(f"file URI with a remote host is not supported: {spec!r}")
        return _local(unquote(parts.path), revision, token, spec)
    if spec.startswith("s3://"):
        _no_revision(spec, revision)
        bucket, _, prefix = spec[len("s3://"):].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.match(bucket):
            raise InvalidRequest(f"invalid S3 bucket name in {spec!r}")
        if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
            raise InvalidRequest(f"invalid S3 prefix in {spec!r} (empty, '.' or '..' segment)")
        return AdapterSource("s3", bucket, prefix=prefix, token=token)
    if spec.startswith("hf://"):
        return _hub(spec[len("hf://"):], revision, token, spec)
    path = Path(spec).expanduser()
    # NOTE: an existing path wins over a hub id; explicit path syntax is always local.
    if path.exists() or path.is_absolute() or spec.startswith((".", "~")):
        return _local(spec, revision, token, spec)
    if _HUB_ID.match(spec.split("@", 1)[0]):
        return _hub(spec, revision, token, spec)
    return _local(spec, revision, token, spec)  # a bare name: a (missing) relative folder


def _no_revision(spec: str, revision: str | None) -> None:
    if revision is not None:
        raise InvalidRequest(f"a revision is only supported for hub sources, not {spec!r}")


def _local(path: str, revision: str | None, token: str | None, spec: str) -> AdapterSource:
    _no_revision(spec, revision)
    return AdapterSource("local", str(Path(path).expanduser().resolve()), token=token)


def _hub(body: str, revision: str | None, token: str | None, spec: str) -> AdapterSource:
    repo_id, sep, rev = body.partition("@")
    repo_id = repo_id.strip("/")
    if sep and not rev:
        raise InvalidRequest(f"empty revision in {spec!r}")
    if sep and revision is not None and rev != revision:
        raise InvalidRequest(f"conflicting revisions for {spec!r}: {rev!r} in the spec, {revision!r} given")
    if not _HUB_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise InvalidRequest(f"invalid hub repo id in {spec!r} (expected 'org/name')")
    return AdapterSource("hub", repo_id, revision=rev or revision, token=token)


def describe(source: AdapterSource) -> dict[str, Any]:
    """What the server shows for an adapter in /v1/models (never the token)."""
    return {"kind": source.kind, "uri": source.uri, "revision": source.revision}


# ----------------------------------------------------------------------------------------------------
# Content hash and local folders


def check_allowed(source: AdapterSource, kinds: tuple[str, ...], roots: list[Path] | None) -> None:
    """Refuse (InvalidRequest) a source of a kind not in `kinds`, and, when `roots` is given, a local folder
    that is not under one of them, or holds an adapter file whose symlinks lead out of them."""
    from openlora.lora.file_checks import inside

    if source.kind not in kinds:
        raise InvalidRequest(f"adapter sources of kind {source.kind!r} are not allowed on this server "
                             f"(allowed: {', '.join(kinds) or 'none'})")
    if source.kind != "local" or roots is None:
        return
    folder = Path(source.location)
    if not inside(folder, roots):
        raise InvalidRequest(f"adapter folder {source.location} is outside the allowed adapter roots (--adapter-root)")
    for name in ADAPTER_FILES:
        if (folder / name).exists() and not inside(folder / name, roots):
            raise InvalidRequest(f"adapter file {name} in {source.location} links outside the allowed adapter roots")


def adapter_files(folder: str | os.PathLike) -> list[str]:
    """Names of the adapter files present in `folder`, sorted."""
    root = Path(folder)
    return sorted(name for name in ADAPTER_FILES if (root / name).is_file())


def files_hash(folder: str | os.PathLike) -> str:
    """sha256 (hex) over the sorted adapter file names and their bytes.

    Each file contributes `name \\0 size(8 bytes, little endian) bytes`, so no two different folders
    can produce the same byte stream. Other files in the folder are ignored.
    """
    names = adapter_files(folder)
    if not names:
        raise AdapterLoadError(f"{folder} holds none of the adapter files {', '.join(ADAPTER_FILES)}")
    h = hashlib.sha256()
    for name in names:
        path = Path(folder) / name
        h.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _check_adapter_folder(folder: Path, source: AdapterSource) -> None:
    """The folder must hold a config and one weights file."""
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterNotFound(f"adapter source {source.uri} has no {CONFIG_FILE}")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise AdapterLoadError(f"adapter source {source.uri} has {CONFIG_FILE} but no {' or '.join(WEIGHT_FILES)}")


def scan_adapter_dir(root: str | os.PathLike, max_depth: int = 4) -> dict[str, Path]:
    """Every folder under `root` holding `adapter_config.json` becomes an adapter named after its path
    relative to `root` (`org/name` for nested folders). Hidden folders (cache temp dirs) are skipped;
    symlinked folders are followed, each real folder once."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise AdapterNotFound(f"adapter directory {root} does not exist")
    found: dict[str, Path] = {}
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        rel = Path(dirpath).relative_to(base)
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink loop or the same folder twice
            dirnames[:] = []
            continue
        seen.add(real)
        if rel.parts and CONFIG_FILE in filenames:
            found[rel.as_posix()] = Path(dirpath)
            dirnames[:] = []  # an adapter folder's subfolders are not adapters
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if len(rel.parts) < max_depth else []
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------------------------------
# fetch


_locks_guard = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}


def _locked(cache_root: Path, key: str) -> tuple[threading.Lock, FileLock]:
    """A per-key thread lock (this process) and file lock (other processes) for one remote adapter."""
    digest = hashlib.sha256(f"{cache_root}|{key}".encode()).hexdigest()[:32]
    with _locks_guard:
        tlock = _key_locks.setdefault(digest, threading.Lock())
    (cache_root / ".locks").mkdir(parents=True, exist_ok=True)
    return tlock, FileLock(str(cache_root / ".locks" / f"{digest}.lock"))


def fetch(
    source: AdapterSource,
    cache_root: Path | None = None,
    *,
    expected_files_hash: str | None = None,
    hub_endpoint: str | None = None,
    s3_endpoint_url: str | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Return a local folder holding the adapter's files, downloading remote ones into the disk cache.

    `hub_endpoint` defaults to `HF_ENDPOINT` (read at call time), then huggingface_hub's default.
    `s3_endpoint_url` defaults to `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, then AWS.
    Raises AdapterNotFound (no such folder/repo/bucket/prefix) or AdapterLoadError (network, auth,
    hash mismatch, more than `max_bytes` in one file: checked against S3's listing before any download,
    and against the hub snapshot's files before they are read). Safe to call from many threads and
    processes at once.
    """
    if source.kind == "local":
        folder = Path(source.location)
        if not folder.is_dir():
            raise AdapterNotFound(f"local adapter folder {source.location} does not exist")
        _check_adapter_folder(folder, source)
        if expected_files_hash is not None and files_hash(folder) != expected_files_hash:
            raise AdapterLoadError(f"adapter {source.uri}: content hash differs from the expected one")
        return folder
    root = Path(cache_root) if cache_root is not None else cache_dir() / "adapters"
    key = f"{source.kind}|{source.location}|{source.prefix}|{source.revision}"
    endpoint = (hub_endpoint or env("HF_ENDPOINT") or "").rstrip("/") or None
    try:
        tlock, flock = _locked(root, key)
        with tlock, flock:
            if source.kind == "hub":
                folder = _fetch_hub(source, root / "hub", expected_files_hash, endpoint)
                for name in adapter_files(folder):
                    _check_bytes(source, name, (folder / name).stat().st_size, max_bytes)
                return folder
            return _fetch_s3(source, root / "s3", expected_files_hash, s3_endpoint_url, max_bytes)
    except OSError as e:  # the cache itself: permissions, disk full, lock file...
        raise AdapterLoadError(f"adapter {source.uri}: cache error under {root}: {e}") from e


def _verify(folder: Path, source: AdapterSource, expected: str | None) -> bool:
    """True if the folder is a complete adapter whose hash matches `expected` (when given)."""
    _check_adapter_folder(folder, source)
    return expected is None or files_hash(folder) == expected


# ----------------------------------------------------------------------------------------------------
# Hugging Face hub


def _fetch_hub(source: AdapterSource, hub_cache: Path, expected: str | None, endpoint: str | None) -> Path:
    """snapshot_download of the adapter files only; a cached copy failing the hash is re-downloaded once."""
    folder = _hub_download(source, hub_cache, endpoint, force=False)
    if _verify(folder, source, expected):
        return folder
    folder = _hub_download(source, hub_cache, endpoint, force=True)
    if _verify(folder, source, expected):
        return folder
    raise AdapterLoadError(
        f"adapter {source.uri}@{source.revision or 'main'}: content hash differs from the expected one "
        "after a fresh download"
    )


def _hub_download(source: AdapterSource, hub_cache: Path, endpoint: str | None, *, force: bool) -> Path:
    """One snapshot_download call, with huggingface_hub's errors turned into OpenLoRA's."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hub repo {source.location!r}" + (f" at {endpoint}" if endpoint else "")
    try:
        path = snapshot_download(
            source.location,
            revision=source.revision,
            token=source.token,
            allow_patterns=list(ADAPTER_FILES),
            cache_dir=str(hub_cache),
            endpoint=endpoint,
            force_download=force,
            max_workers=4,
            tqdm_class=_quiet_tqdm(),  # a server logs; it does not draw progress bars
        )
    except GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
        raise AdapterLoadError(f"{where} is gated: accept its terms and pass a token with access") from e
    except RevisionNotFoundError as e:
        raise AdapterNotFound(f"revision {source.revision!r} not found in {where}") from e
    except RepositoryNotFoundError as e:
        hint = "or the token has no access to it" if source.token else "or private: a token is needed"
        raise AdapterNotFound(f"{where} not found ({hint})") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise AdapterLoadError(f"{where}: the hub refused the token (HTTP {status}); check the token") from e
        raise AdapterLoadError(f"{where}: hub error (HTTP {status}): {_first_line(e)}") from e
    except LocalEntryNotFoundError as e:  # hub unreachable and nothing cached
        raise AdapterLoadError(f"{where}: cannot reach the hub and no cached copy: {_first_line(e)}") from e
    except HFValidationError as e:
        raise InvalidRequest(f"{where}: {e}") from e
    except Exception as e:  # network errors (httpx2), disk errors...
        raise AdapterLoadError(f"{where}: download failed: {type(e).__name__}: {_first_line(e)}") from e
    return Path(path)


def _quiet_tqdm() -> type:
    """A tqdm class that never draws (snapshot_download passes it to all its progress bars)."""
    from tqdm.auto import tqdm

    class _Quiet(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Quiet


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# ----------------------------------------------------------------------------------------------------
# S3


class _ObjectChanged(Exception):
    """An object changed between listing and download (GetObject IfMatch failed)."""


_clients_guard = threading.Lock()
_clients: dict[tuple, Any] = {}


def _s3_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client, cached per endpoint and credential environment (creating one costs ~150 ms).

    Public buckets work without credentials: with none configured, requests go unsigned.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    endpoint_url = endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
    env_key = tuple(env(n) for n in ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"))
    secret = hashlib.sha256((env("AWS_SECRET_ACCESS_KEY") or "").encode()).hexdigest()
    key = (endpoint_url, env_key, secret)
    with _clients_guard:  # boto3 sessions are not thread-safe; clients are
        client = _clients.get(key)
        if client is None:
            session = boto3.session.Session()
            config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
            if session.get_credentials() is None:
                config = config.merge(Config(signature_version=UNSIGNED))
            client = session.client(
                "s3", endpoint_url=endpoint_url, region_name=session.region_name or "us-east-1", config=config
            )
            _clients[key] = client
    return client


def _check_bytes(source: AdapterSource, name: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise AdapterLoadError(f"adapter {source.uri}: {name} is {size} bytes, above the limit of {max_bytes} "
                               "bytes (--max-adapter-bytes)")


def _fetch_s3(source: AdapterSource, s3_cache: Path, expected: str | None, endpoint_url: str | None,
              max_bytes: int | None = None) -> Path:
    """List the adapter objects; reuse the cached copy if ETags and sizes match, else download atomically
    (refused before any GetObject when an object is larger than `max_bytes`)."""
    from botocore.exceptions import BotoCoreError, ClientError

    target = s3_cache / source.location / source.prefix if source.prefix else s3_cache / source.location
    try:
        client = _s3_client(endpoint_url)
        for attempt in range(2):  # a second round only if an object changed under us
            remote = _s3_list(client, source)
            for name, obj in remote.items():
                _check_bytes(source, name, obj["size"], max_bytes)
            if _s3_cache_valid(target, remote) and _verify(target, source, expected):
                return target  # cache hit: no GetObject
            try:
                _s3_download(client, source, remote, target, expected)
                return target
            except _ObjectChanged:
                if attempt == 1:
                    raise AdapterLoadError(f"adapter {source.uri} kept changing during download; retry later")
    except ClientError as e:
        err = e.response.get("Error", {})
        code, status = err.get("Code", ""), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "NoSuchKey") or status == 404:
            raise AdapterNotFound(f"adapter {source.uri}: S3 says {code or status} ({err.get('Message', '')})") from e
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status in (401, 403):
            raise AdapterLoadError(f"adapter {source.uri}: S3 access denied ({code}); check credentials") from e
        raise AdapterLoadError(f"adapter {source.uri}: S3 error {code or status}: {err.get('Message', e)}") from e
    except BotoCoreError as e:  # endpoint unreachable, no region, timeouts...
        # Like huggingface_hub offline: a complete cached copy is still served when S3 cannot be reached.
        if _s3_cached_copy_ok(target, source, expected):
            logger.warning("S3 unreachable for %s (%s): serving the cached copy %s", source.uri, e, target)
            return target
        raise AdapterLoadError(f"adapter {source.uri}: S3 request failed: {e}") from e
    raise AssertionError("unreachable")


def _s3_list(client: Any, source: AdapterSource) -> dict[str, dict[str, Any]]:
    """{file name: {"etag", "size"}} of the adapter files directly under the prefix."""
    prefix = f"{source.prefix}/" if source.prefix else ""
    remote: dict[str, dict[str, Any]] = {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=source.location, Prefix=prefix, Delimiter="/")
    for page in pages:
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix):]
            if name in ADAPTER_FILES:
                remote[name] = {"etag": obj["ETag"], "size": obj["Size"]}
    if CONFIG_FILE not in remote:
        raise AdapterNotFound(f"adapter {source.uri}: no {CONFIG_FILE} under this S3 prefix")
    if not any(w in remote for w in WEIGHT_FILES):
        raise AdapterLoadError(f"adapter {source.uri}: {CONFIG_FILE} but no {' or '.join(WEIGHT_FILES)} in S3")
    return remote


def _s3_cache_valid(target: Path, remote: dict[str, dict[str, Any]]) -> bool:
    """The cached folder was downloaded from exactly these objects (ETags) and no file lost bytes."""
    try:
        manifest = json.loads((target / S3_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("objects") != remote:
        return False
    return all((target / n).is_file() and (target / n).stat().st_size == o["size"] for n, o in remote.items())


def _s3_cached_copy_ok(target: Path, source: AdapterSource, expected: str | None) -> bool:
    """A previous download is complete (manifest sizes) and passes the hash check when one is given."""
    try:
        objects = json.loads((target / S3_MANIFEST).read_text())["objects"]
        return _s3_cache_valid(target, objects) and _verify(target, source, expected)
    except (OSError, ValueError, KeyError, AdapterLoadError):
        return False


def _s3_download(
    client: Any, source: AdapterSource, remote: dict[str, dict[str, Any]], target: Path, expected: str | None
) -> None:
    """Download into a temp dir beside `target`, verify, then swap it in with renames."""
    from botocore.exceptions import ClientError

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, obj in remote.items():
            key = f"{source.prefix}/{name}" if source.prefix else name
            try:  # IfMatch: the object we download is the one we listed
                resp = client.get_object(Bucket=source.location, Key=key, IfMatch=obj["etag"])
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    raise _ObjectChanged(key) from e
                raise
            with open(tmp / name, "wb") as f:
                written = 0
                for chunk in resp["Body"].iter_chunks(_CHUNK):
                    written += len(chunk)
                    if written > obj["size"]:  # more than the listing promised (and the limit checked)
                        raise AdapterLoadError(f"adapter {source.uri}: {name} is larger than S3 listed it")
                    f.write(chunk)
            if (tmp / name).stat().st_size != obj["size"]:
                raise AdapterLoadError(f"adapter {source.uri}: truncated download of {name}")
        if not _verify(tmp, source, expected):
            raise AdapterLoadError(f"adapter {source.uri}: content hash differs from the expected one")
        manifest = {"uri": source.uri, "objects": remote, "files_hash": files_hash(tmp)}
        (tmp / S3_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _swap_in(tmp, target)
        logger.info("downloaded %s (%d files) into %s", source.uri, len(remote), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    """Replace `target` by `new` with two renames. Subfolders of the old target (adapters cached under a
    longer prefix, e.g. s3://b/a/x inside s3://b/a) are moved into the new folder first."""
    if not target.exists():
        os.rename(new, target)
        return
    for child in target.iterdir():
        if child.is_dir() and not child.name.startswith("."):
            os.rename(child, new / child.name)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
