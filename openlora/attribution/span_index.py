"""One datanet's infini-gram index: which contributors' texts an answer reproduced, span by span.

A datanet's contributions are `(contributor_address, text)` pairs. Each text is tokenized with the base
model's tokenizer and becomes one infini-gram document whose metadata names its contributor.

Span definition (`SpanIndex.match`). Scan the answer's token ids left to right. At position i take the
longest run `ids[i:j]` that occurs in some contribution (occurrence is monotone: every prefix of an
occurring run occurs, so j is found by galloping and bisecting with the engine's `find`). If
`j - i >= min_span`, record `Span(i, j, contributors)` and continue at j; otherwise continue at i + 1.
`contributors` are the distinct contributor addresses (sorted, lower-cased) of the documents holding
`ids[i:j]`. Spans never cross two contributions: documents are separated by the token id that fills the
token width (0xFFFF for u16), which no answer token can equal (answer ids >= that value, or < 0, match
nothing). At most `max_docs` occurrences are inspected per span (default 64): above that, `max_docs`
occurrences evenly spaced in suffix-array order (ordered by the text that follows them, not by
document) are looked up, so a contributor holding only a few of very many occurrences of a common
phrase may go uncredited for that span; `Span.occurrences` keeps the full count.

On-disk format (infini-gram v4 layout, one shard, written here because infini-gram's own tokenizing
step only knows tokenizers from the Hugging Face hub):

    tokenized.0   for each document: the separator, then its token ids; little-endian u8 or u16
    offset.0      u64 byte offset of each document's separator in tokenized.0
    metadata.0    one JSON line per document: {"path", "linenum", "metadata": {"contributor"}}
    metaoff.0     u64 byte offset of each document's line in metadata.0
    table.0       the suffix array, written by infini-gram's Rust builder (`python -m
                  infini_gram.indexing`, whose tokenizing step skips itself when tokenized.0 and
                  offset.0 exist)
    span_index.json  ours, written last: content hash, tokenizer fingerprint, width, counts

Builds go to a temporary sibling folder that is renamed into place once complete and checked, under a
file lock, so concurrent builders of one datanet end with one valid index and readers never see a
partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from infini_gram.engine import InfiniGramEngine

from openlora.attribution.spans import DEFAULT_MIN_SPAN, Span
from openlora.cachefs import build_into, locked
from openlora.errors import OpenLoRAError

Contribution = tuple[str, str]  # (contributor_address, text)

FORMAT = 1
MARKER = "span_index.json"
DEFAULT_MAX_DOCS = 64
_HASH_DOMAIN = b"openlora.datanet-contributions.v1\x00"
# NOTE: the engine tells a folder's files apart by substrings of their *full path* ("tokenized", "table", ...),
# and the builder renames with str.replace on the full path: a folder whose path contains one of these
# words is reached through a neutral symlink instead (see _neutral_path).
_ENGINE_WORDS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")
# NOTE: the Rust builder fails ("concat: Something went wrong") on tiny inputs split over 2 jobs, and one
# job was as fast as two up to 10^7 tokens on this 2-core box; use more only for large datanets.
_ONE_CPU_BELOW_BYTES = 64 << 20
_DTYPES = {1: ("u8", "<u1"), 2: ("u16", "<u2")}  # little-endian, as the engine reads


class SpanIndexError(OpenLoRAError):
    """A span index could not be built or opened (bad folder, failed builder, mismatched index)."""


class Tokenizer(Protocol):
    """What we need of a Hugging Face tokenizer."""

    def __call__(self, text: Any, add_special_tokens: bool = ...) -> Any: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class IndexInfo:
    """The contents of span_index.json."""

    format: int
    content_hash: str  # content_hash(contributions)
    tokenizer: str  # tokenizer_fingerprint(tokenizer)
    token_width: int  # bytes per token: 1 (u8) or 2 (u16)
    num_docs: int
    num_tokens: int  # answer-comparable tokens, separators excluded
    infini_gram: str  # package version that built table.0


def canonical_contributions(contributions: Sequence[Contribution]) -> list[Contribution]:
    """Validated contributions with lower-cased addresses, sorted by (address, text).

    The order of a datanet's contributions changes no span and no credit, so it is not part of its
    identity: the hash and the index both use this order.
    """
    out = []
    for n, item in enumerate(contributions):
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"contributions[{n}]: expected (address, text)")
        addr, text = item
        if not isinstance(addr, str) or not addr.strip():
            raise ValueError(f"contributions[{n}]: the address must be a non-empty string")
        if not isinstance(text, str):
            raise ValueError(f"contributions[{n}]: the text must be a string")
        out.append((addr.strip().lower(), text))
    out.sort()
    return out


def content_hash(contributions: Sequence[Contribution]) -> str:
    """The datanet's identity, `sha256:<hex>`: a domain tag, then each canonical contribution's address and
    text as UTF-8, each prefixed by its byte length (8 bytes, big-endian). Independent of order and of
    address case; texts count byte for byte."""
    h = hashlib.sha256(_HASH_DOMAIN)
    for addr, text in canonical_contributions(contributions):
        for field in (addr, text):
            b = field.encode("utf-8")
            h.update(len(b).to_bytes(8, "big"))
            h.update(b)
    return "sha256:" + h.hexdigest()


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """16 hex digits identifying a tokenizer's behaviour (its serialized fast tokenizer, else its vocab).

    Part of the cache path: one datanet tokenized by two base models gives two indexes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))  # type: ignore[attr-defined]
    h = hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|".encode())
    h.update(payload.encode("utf-8"))
    return h.hexdigest()[:16]


def token_width(vocab_size: int) -> int:
    """Bytes per token: the all-ones id of the width is the document separator, so it must exceed every
    token id (u8 up to 255 tokens, u16 up to 65,535; SmolLM2's 49,152 fit u16).

    NOTE: u32 is refused: infini-gram 2.6.0's Rust builder tries to allocate 32 GiB (2^32 counters) for
    4-byte tokens, even for a two-document datanet (measured here)."""
    for width in (1, 2):
        if vocab_size < 1 << (8 * width):
            return width
    raise SpanIndexError(f"a vocabulary of {vocab_size} tokens needs 4-byte token ids, which infini-gram's "
                         "builder cannot index on an ordinary machine (it allocates 2^32 counters)")


def _tokenize(texts: list[str], tokenizer: Tokenizer, batch: int = 256) -> list[list[int]]:
    """`tokenizer(text, add_special_tokens=False)["input_ids"]` per text (called in batches: same ids)."""
    out: list[list[int]] = []
    for k in range(0, len(texts), batch):
        out.extend(tokenizer(texts[k:k + batch], add_special_tokens=False)["input_ids"])
    return out


@contextmanager
def _neutral_path(folder: Path) -> Iterator[Path]:
    """`folder`, or a symlink to it whose path holds none of the words the engine and builder match."""
    if not any(w in str(folder) for w in _ENGINE_WORDS):
        yield folder
        return
    tmp = Path(tempfile.mkdtemp(prefix="olspan-"))
    try:
        if any(w in str(tmp) for w in _ENGINE_WORDS):
            raise SpanIndexError(f"cannot find a neutral path for {folder} (temporary folder {tmp})")
        link = tmp / "d"
        link.symlink_to(folder, target_is_directory=True)
        yield link
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_documents(work: Path, canon: list[Contribution], ids: list[list[int]], width: int) -> int:
    """Write tokenized.0, offset.0, metadata.0 and metaoff.0 into `work`; returns the token count."""
    _, dtype = _DTYPES[width]
    sep = (1 << (8 * width)) - 1
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # [num_docs] token index of each separator
    data = np.empty(int(lengths.sum()), dtype=dtype)  # [num_tokens + num_docs]
    for n, (s, doc) in enumerate(zip(starts.tolist(), ids)):
        arr = np.asarray(doc, dtype=np.int64)
        if arr.size and not (arr.min() >= 0 and arr.max() < sep):
            raise SpanIndexError(f"contribution {n}: token ids outside [0, {sep}) for a {width}-byte width")
        data[s] = sep
        data[s + 1:s + 1 + arr.size] = arr
    (work / "tokenized.0").write_bytes(data.tobytes())
    (work / "offset.0").write_bytes((starts * width).astype("<u8").tobytes())
    lines = [(json.dumps({"path": "contributions", "linenum": n, "metadata": {"contributor": addr}}) + "\n")
             .encode() for n, (addr, _) in enumerate(canon)]
    line_offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])[:-1]]).astype("<u8")
    (work / "metadata.0").write_bytes(b"".join(lines))
    (work / "metaoff.0").write_bytes(line_offsets.tobytes())
    return int(lengths.sum()) - len(ids)


def _run_builder(work: Path, width: int) -> None:
    """Build table.0 with infini-gram's indexer (its tokenizing step finds our files and skips)."""
    nbytes = (work / "tokenized.0").stat().st_size
    cpus = 1 if nbytes < _ONE_CPU_BELOW_BYTES else max(1, min(8, os.cpu_count() or 1))
    avail_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 30
    mem_gib = max(1, min(16, avail_gib // 2))
    # NOTE: the indexer sets RLIMIT_NOFILE to --ulimit (default 1048576), which an unprivileged process
    # may not raise above its hard limit: pass the current soft limit.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with _neutral_path(work) as p:
        cmd = [sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(p), "--save_dir", str(p),
               "--temp_dir", str(p), "--token_dtype", _DTYPES[width][0], "--cpus", str(cpus),
               "--mem", str(mem_gib), "--ulimit", str(nofile)]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or "went wrong" in res.stdout or not (work / "table.0").is_file():
        tail = (res.stdout + res.stderr)[-2000:]
        raise SpanIndexError(f"infini-gram's builder failed (exit {res.returncode}): {tail}")
    tokens_and_seps = nbytes // width
    table = (work / "table.0").stat().st_size
    if table % tokens_and_seps or not 1 <= table // tokens_and_seps <= 8:
        raise SpanIndexError(f"suffix array of {table} bytes does not fit {tokens_and_seps} tokens")


def _read_info(folder: Path) -> IndexInfo | None:
    try:
        raw = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SpanIndexError(f"{folder / MARKER}: unreadable ({e})") from e
    try:
        return IndexInfo(**raw)
    except TypeError as e:
        raise SpanIndexError(f"{folder / MARKER}: not a span index description ({e})") from e


class SpanIndex:
    """An opened index: answers `match` queries. Build or open with the class methods.

    Queries may run from several threads at once (the engine is read-only and releases the GIL)."""

    def __init__(self, folder: Path, info: IndexInfo) -> None:
        self.folder = folder
        self.info = info
        self._sep = (1 << (8 * info.token_width)) - 1
        dtype = _DTYPES[info.token_width][0]
        # The engine checks eos_token_id < vocab_size; eos only matters for next-token queries we never make.
        with _neutral_path(folder) as p:
            self._engine = InfiniGramEngine(index_dir=str(p), eos_token_id=0, vocab_size=self._sep, token_dtype=dtype)
        self._doc_owner: dict[int, str] = {}  # doc_ix -> contributor, filled as documents are looked up
        self.queries = 0  # engine `find` calls so far (a statistic: benchmarks, metrics)

    # -- building and opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path) -> SpanIndex:
        """Open a complete index folder (one that holds span_index.json)."""
        folder = Path(folder).absolute()
        info = _read_info(folder)
        if info is None:
            raise SpanIndexError(f"{folder} holds no complete span index ({MARKER} is missing)")
        if info.format != FORMAT:
            raise SpanIndexError(f"{folder}: index format {info.format}, this code reads {FORMAT}")
        return cls(folder, info)

    @classmethod
    def build(cls, contributions: Sequence[Contribution], tokenizer: Tokenizer, folder: Path) -> SpanIndex:
        """Build the datanet's index into `folder` (atomically), or open it if it is already there.

        Raises SpanIndexError if `folder` holds another datanet's index or unrelated files, ValueError on
        malformed or empty contributions."""
        canon = canonical_contributions(contributions)
        return cls._build(canon, tokenizer, tokenizer_fingerprint(tokenizer), Path(folder).absolute())

    @classmethod
    def for_datanet(cls, contributions: Sequence[Contribution], tokenizer: Tokenizer, cache_root: Path) -> SpanIndex:
        """Build or open the index under `cache_root/<content hash hex>/<tokenizer fingerprint>`."""
        canon = canonical_contributions(contributions)
        tok_fp = tokenizer_fingerprint(tokenizer)
        folder = Path(cache_root).absolute() / content_hash(canon).split(":", 1)[1] / tok_fp
        return cls._build(canon, tokenizer, tok_fp, folder)

    @classmethod
    def _build(cls, canon: list[Contribution], tokenizer: Tokenizer, tok_fp: str, folder: Path) -> SpanIndex:
        if not canon:
            raise ValueError("a datanet needs at least one contribution to index")
        chash = content_hash(canon)
        found = cls._reuse(folder, chash, tok_fp)
        if found is not None:
            return found
        with locked(folder.parent / f"{folder.name}.lock"):
            found = cls._reuse(folder, chash, tok_fp)  # another process may have finished meanwhile
            if found is not None:
                return found
            with build_into(folder) as work:  # a temp sibling, renamed into place only on success
                width = token_width(len(tokenizer))
                ids = _tokenize([text for _, text in canon], tokenizer)
                num_tokens = _write_documents(work, canon, ids, width)
                _run_builder(work, width)
                info = IndexInfo(FORMAT, chash, tok_fp, width, len(canon), num_tokens, _pkg_version("infini-gram"))
                _check(cls(work, info), canon, ids)
                (work / MARKER).write_text(json.dumps(asdict(info), indent=1) + "\n")  # written last
        return cls.open(folder)

    @classmethod
    def _reuse(cls, folder: Path, chash: str, tok_fp: str) -> SpanIndex | None:
        if not folder.exists():
            return None
        info = _read_info(folder)
        if info is None:
            if folder.is_dir() and not any(folder.iterdir()):
                return None
            raise SpanIndexError(f"{folder} exists but holds no complete span index; remove it to rebuild")
        if (info.content_hash, info.tokenizer) != (chash, tok_fp):
            raise SpanIndexError(f"{folder} holds the index of another datanet or tokenizer "
                                 f"({info.content_hash[:19]}/{info.tokenizer}, wanted {chash[:19]}/{tok_fp})")
        return cls.open(folder)

    # -- queries ---------------------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], min_span: int = DEFAULT_MIN_SPAN,
              max_docs: int = DEFAULT_MAX_DOCS) -> list[Span]:
        """The spans of `token_ids` found in the datanet (see the module docstring for the definition)."""
        if min_span < 1 or max_docs < 1:
            raise ValueError("min_span and max_docs must be >= 1")
        ids = [int(t) for t in token_ids]
        spans: list[Span] = []
        run_start = 0
        for k in range(len(ids) + 1):  # runs of ids that can occur; anything else breaks a span
            if k == len(ids) or not 0 <= ids[k] < self._sep:
                self._match_run(ids, run_start, k, min_span, max_docs, spans)
                run_start = k + 1
        return spans

    def _match_run(self, ids: list[int], lo: int, hi: int, min_span: int, max_docs: int, out: list[Span]) -> None:
        # NOTE: each engine query costs ~0.1-0.2 ms here (it starts two threads), so queries are counted.
        # Cheap rejection first: if the window's last `tail` tokens never occur, no span of min_span
        # tokens can start anywhere in [i, i + min_span - tail] (each would contain them): skip them all.
        tail = _tail(min_span)
        i = lo
        while i + min_span <= hi:
            if tail < min_span and self._find(ids[i + min_span - tail:i + min_span])[0] == 0:
                i += min_span - tail + 1
                continue
            found = self._find(ids[i:i + min_span])
            if found[0] == 0:  # the longest run at i is shorter than min_span
                i += 1
                continue
            # Gallop then bisect for the largest j with ids[i:j] occurring; `good` always occurs.
            good, step, bad = i + min_span, 1, None
            while good < hi:
                probe = min(good + step, hi)
                f = self._find(ids[i:probe])
                if f[0] == 0:
                    bad = probe
                    break
                good, found, step = probe, f, step * 2
            while bad is not None and bad - good > 1:
                mid = (good + bad) // 2
                f = self._find(ids[i:mid])
                if f[0]:
                    good, found = mid, f
                else:
                    bad = mid
            out.append(Span(i, good, self._contributors(found[1], max_docs), found[0]))
            i = good

    def _find(self, ids: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """(occurrence count, suffix-array rank range per shard)."""
        self.queries += 1
        res = self._engine.find(input_ids=ids)
        if "error" in res:
            raise SpanIndexError(res["error"])
        return res["cnt"], res["segment_by_shard"]

    def _contributors(self, segments: list[tuple[int, int]], max_docs: int) -> tuple[str, ...]:
        """Contributors of the occurrences in `segments` (at most `max_docs`, evenly spaced, inspected)."""
        total = sum(b - a for a, b in segments)
        picks = range(total) if total <= max_docs else (k * total // max_docs for k in range(max_docs))
        owners = set()
        for p in picks:  # p indexes the shards' rank ranges laid end to end
            for s, (a, b) in enumerate(segments):
                if p < b - a:
                    owners.add(self._owner(s, a + p))
                    break
                p -= b - a
        return tuple(sorted(owners))

    def _owner(self, shard: int, rank: int) -> str:
        doc = self._engine.get_doc_by_rank(s=shard, rank=rank, max_disp_len=1)
        if "error" in doc:
            raise SpanIndexError(doc["error"])
        owner = self._doc_owner.get(doc["doc_ix"])
        if owner is None:
            owner = json.loads(doc["metadata"])["metadata"]["contributor"]
            self._doc_owner[doc["doc_ix"]] = owner
        return owner

    def count(self, token_ids: Sequence[int]) -> int:
        """How many times `token_ids` occurs in the datanet (never across two contributions)."""
        ids = [int(t) for t in token_ids]
        if any(not 0 <= t < self._sep for t in ids):
            return 0
        return self._find(ids)[0]

    def bytes_on_disk(self) -> int:
        """Size of the index files (tokens, offsets, metadata, suffix array, description)."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())

    def bytes_per_token(self) -> float:
        """Index bytes on disk per datanet token."""
        return self.bytes_on_disk() / max(1, self.info.num_tokens)


def _tail(min_span: int) -> int:
    """Length of the rejection probe at the end of each min_span window (see _match_run).

    Measured: engine queries per 1024-token unrelated answer (demo chat text) against 10^5 / 10^7-token
    datanets (stdlib source), min_span 6, by tail 1..6: 515/1198, 290/440, 269/315, 342/361, 511/514,
    1018/1014 (6 = no probe); min_span 8: tail 3 or 4 both ~180-220, against 1017 without the probe."""
    return (min_span + 1) // 2


def _check(index: SpanIndex, canon: list[Contribution], ids: list[list[int]]) -> None:
    """Before publishing: the first and last documents read back with their contributors, and the suffix
    array finds them."""
    for n in sorted({0, len(ids) - 1}):
        doc = index._engine.get_doc_by_ix(doc_ix=n, max_disp_len=16)
        owner = json.loads(doc["metadata"])["metadata"]["contributor"] if "metadata" in doc else None
        if owner != canon[n][0] or doc["token_ids"] != ids[n][:16] or (ids[n] and index.count(ids[n][:16]) < 1):
            raise SpanIndexError(f"the built index does not read back contribution {n}")


__all__ = ["Contribution", "DEFAULT_MAX_DOCS", "IndexInfo", "SpanIndex", "SpanIndexError", "canonical_contributions",
           "content_hash", "token_width", "tokenizer_fingerprint"]
