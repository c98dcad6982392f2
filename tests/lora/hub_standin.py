"""A tiny local Hugging Face hub speaking the routes huggingface_hub's snapshot_download/hf_hub_download use.

Routes (as read from huggingface_hub 2.4: hf_api.model_info, list_repo_tree, file_download):

    GET  /api/models/{org}/{name}[/revision/{rev}]     repo info: {"id", "sha", "private", "siblings"}
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]  [{"type": "file", "path", "size", "oid", "lfs"?}]
    HEAD|GET /{org}/{name}/resolve/{rev}/{path}        regular files: 200, ETag = git blob sha1;
                                                       LFS files (*.safetensors, *.bin): 302 to the "CDN"
                                                       with X-Linked-Etag (sha256) and X-Linked-Size
    HEAD|GET {cdn}/blobs/{sha256}?sig=...              the LFS bytes (a second port = another origin, so
                                                       huggingface_hub drops the Authorization header)

Every resolve answer carries X-Repo-Commit. Errors carry X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound) like the real hub. Auth like the hub: an unknown token is a 401 "Invalid credentials in
Authorization header"; a private repo without a token is a 401 RepoNotFound, with a known token that
has no access a 404 RepoNotFound. Every request is logged in `requests` as (method, path).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class _Repo:
    private: bool = False
    allowed_tokens: set[str] = field(default_factory=set)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha

    def resolve(self, rev: str) -> str | None:
        """A branch/tag name or a full commit sha -> the commit sha."""
        return self.refs.get(rev) or (rev if rev in self.commits else None)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file (the hub's ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """Hub + CDN on two 127.0.0.1 ports. Use as a context manager; `url` is the HF endpoint."""

    def __init__(self, valid_tokens: tuple[str, ...] = ()) -> None:
        self.repos: dict[str, _Repo] = {}
        self.valid_tokens = set(valid_tokens)
        self.requests: list[tuple[str, str]] = []
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes (the CDN's content)
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=True))
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def add_commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tags: tuple[str, ...] = (),
        private: bool = False, allowed_tokens: tuple[str, ...] = (),
    ) -> str:
        """Create the repo if needed and push a commit holding exactly `files`; returns its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo(private=private, allowed_tokens=set(allowed_tokens)))
            parent = repo.refs.get(branch, "")
            h = hashlib.sha1(f"{repo_id}\0{parent}\0".encode())
            for path in sorted(files):
                h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
            sha = h.hexdigest()
            repo.commits[sha] = dict(files)
            for ref in (branch, *tags):
                repo.refs[ref] = sha
            for data in files.values():
                self.blobs[hashlib.sha256(data).hexdigest()] = data
            return sha

    def count(self, method: str, contains: str = "") -> int:
        """How many logged requests used `method` on a path containing `contains`."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and contains in p)

    def __enter__(self) -> "HubStandIn":
        for server in (self._hub, self._cdn):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    # -- request handling ----------------------------------------------------------------------------

    def _handler(self, cdn: bool) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._dispatch(head=False)

            def do_HEAD(self) -> None:
                self._dispatch(head=True)

            def _dispatch(self, head: bool) -> None:
                with hub._lock:
                    hub.requests.append(("HEAD" if head else "GET", self.path))
                try:
                    (hub._route_cdn if cdn else hub._route)(self, head)
                except BrokenPipeError:
                    pass

            def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      head: bool = False) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def error(self, status: int, code: str | None, message: str, head: bool = False,
                      extra: dict[str, str] | None = None) -> None:
                headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
                if code:
                    headers["X-Error-Code"] = code
                self.reply(status, json.dumps({"error": message}).encode(), headers, head)

        return Handler

    def _auth(self, h, repo: _Repo | None, head: bool) -> bool:
        """Answer the error and return False if the request may not see the repo."""
        auth = h.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        if token is not None and token not in self.valid_tokens:
            h.error(401, None, "Invalid credentials in Authorization header", head)
            return False
        if repo is None or (repo.private and token not in repo.allowed_tokens):
            h.error(401 if token is None else 404, "RepoNotFound", "Repository not found", head)
            return False
        return True

    def _route(self, h, head: bool) -> None:
        parts = urlsplit(h.path)
        segs = parts.path.strip("/").split("/")
        if len(segs) >= 3 and segs[:2] == ["api", "models"]:
            repo_id, rest = "/".join(segs[2:4]), segs[4:]
            repo = self.repos.get(repo_id)
            if not self._auth(h, repo, head):
                return
            if not rest or rest[0] == "revision":
                return self._info(h, repo_id, repo, unquote(rest[1]) if len(rest) > 1 else "main", head)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(h, repo, unquote(rest[1]), unquote("/".join(rest[2:])), head)
        elif len(segs) >= 5 and segs[2] == "resolve":
            repo_id = "/".join(segs[:2])
            repo = self.repos.get(repo_id)
            if not self._auth(h, repo, head):
                return
            return self._resolve(h, repo, unquote(segs[3]), unquote("/".join(segs[4:])), head)
        h.error(404, None, f"no route for {parts.path}", head)

    def _commit(self, h, repo: _Repo, rev: str, head: bool) -> str | None:
        sha = repo.resolve(rev)
        if sha is None:
            h.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return sha

    def _info(self, h, repo_id: str, repo: _Repo, rev: str, head: bool) -> None:
        if (sha := self._commit(h, repo, rev, head)) is None:
            return
        body = {
            "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
        }
        h.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _tree(self, h, repo: _Repo, rev: str, path: str, head: bool) -> None:
        if (sha := self._commit(h, repo, rev, head)) is None:
            return
        entries = []
        for p, data in sorted(repo.commits[sha].items()):
            if path and not p.startswith(path.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
            if p.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        h.reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

    def _resolve(self, h, repo: _Repo, rev: str, path: str, head: bool) -> None:
        if (sha := self._commit(h, repo, rev, head)) is None:
            return
        data = repo.commits[sha].get(path)
        if data is None:
            h.error(404, "EntryNotFound", f"{path} does not exist on {rev}", head, {"X-Repo-Commit": sha})
            return
        if path.endswith(LFS_SUFFIXES):  # LFS: the hub answers with a redirect to signed CDN storage
            digest = hashlib.sha256(data).hexdigest()
            h.reply(302, b"", {
                "Location": f"{self.cdn_url}/blobs/{digest}?sig={quote(sha)}",
                "X-Repo-Commit": sha, "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(data)}"',
            }, head)
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        h.reply(200, data, headers, head)

    def _route_cdn(self, h, head: bool) -> None:
        parts = urlsplit(h.path)
        segs = parts.path.strip("/").split("/")
        if h.headers.get("Authorization"):  # signed URLs never need (nor should get) the hub token
            h.error(400, None, "Authorization header sent to the CDN", head)
            return
        data = self.blobs.get(segs[1]) if len(segs) == 2 and segs[0] == "blobs" else None
        if data is None or "sig" not in parse_qs(parts.query):
            h.error(403, None, "AccessDenied", head)
            return
        start = 0
        rng = h.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():  # resume: "bytes=N-"
            start = int(rng[6:].split("-")[0])
        body = data[start:]
        headers = {"ETag": f'"{segs[1]}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        h.reply(206 if start else 200, body, headers, head)
