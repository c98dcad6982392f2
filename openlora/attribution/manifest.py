"""Attribution manifests: who owns an adapter, which data trained it, what it costs, who may use it.

A manifest lives in `attribution.json` beside the PEFT files, or is given as a dict at registration:

```json
{
  "owner": "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4",
  "version": "1.2.0",
  "base_model": "HuggingFaceTB/SmolLM2-135M",
  "datasets": [
    {"id": "legal-qa", "hash": "sha256:...",             // or "uri": "s3://..."
     "weight": 1,                                        // optional, default 1
     "contributors": [{"address": "0xAb8...", "weight": 3}, {"address": "0x4B2...", "weight": 1}]}
  ],
  "price_per_1k_prompt_tokens": 1000,                    // integers, token's smallest unit
  "price_per_1k_completion_tokens": 4000,
  "split": {"operator": 2000, "owner": 5000, "data": 3000},   // basis points, sum 10000
  "access": "public",                                    // or {"allow": ["0xPayer...", "key-id"]}
  "span_attribution": {"lambda": 0.5, "min_span": 8}     // optional (spans.py's defaults)
}
```

A dataset may also hold its contributions, the texts its contributors gave (span-level attribution,
openlora.attribution.span_service): `"contributions": "contributions.jsonl"` (a JSON-lines file of
`{"contributor": "0x...", "text": "..."}`, its path relative to the manifest's folder) or the same
objects inline as a list. Each contributor of a contribution must be one of the dataset's contributors.
The dataset's content hash then covers the contributions (`span_index.content_hash`): a given `hash`
must equal it, and without one it is computed.

Rules: addresses must be valid EVM addresses (a mixed-case address must carry a valid EIP-55
checksum; they are stored checksummed); prices are integers >= 0; weights are integers > 0;
`split.data > 0` requires at least one dataset (the data portion must have someone to go to).
Every validation error is an `openlora.errors.InvalidRequest` whose message starts with the field
path, e.g. `datasets[0].contributors[1].weight: must be an integer > 0`.

Default policy (adapters without a manifest, and base-only requests): the node-level
`DefaultPolicy` applies: its prices (by default 0), owner = the node operator, no datasets, the
whole fee to the operator, access public. Operators set a non-zero default price to charge for
base-model use and for adapters whose authors published no manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_utils import is_checksum_address, is_hex_address, to_checksum_address

from openlora.attribution.span_index import content_hash
from openlora.attribution.spans import DEFAULT_LAMBDA_PPM, DEFAULT_MIN_SPAN
from openlora.attribution.splits import BPS, PPM
from openlora.errors import InvalidRequest

MANIFEST_FILENAME = "attribution.json"
_ALLOWED_KEYS = {
    "owner", "version", "base_model", "datasets", "price_per_1k_prompt_tokens",
    "price_per_1k_completion_tokens", "split", "access", "span_attribution",
    "description",  # free text for people (e.g. "demo keys"); not part of any payout
}


def is_address(v: Any) -> bool:
    """A 0x-prefixed 40-hex-digit address; a mixed-case one must carry a valid EIP-55 checksum
    (eth-utils 6's own `is_address` no longer checks it)."""
    if not (isinstance(v, str) and len(v) == 42 and v.startswith("0x") and is_hex_address(v)):
        return False
    body = v[2:]
    return body == body.lower() or body == body.upper() or is_checksum_address(v)


@dataclass(frozen=True)
class Contributor:
    """A data contributor and their integer weight within one dataset."""

    address: str  # checksummed
    weight: int  # > 0


@dataclass(frozen=True)
class Dataset:
    """A dataset that trained the adapter; `ref` is its content hash or URI."""

    id: str
    ref: str
    contributors: tuple[Contributor, ...]
    weight: int = 1  # share of the data portion relative to the adapter's other datasets
    # (contributor address, text) pairs: what span-level attribution matches answers against
    contributions: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class SpanPolicy:
    """How much of a dataset's data amount follows the spans an answer reproduced (ppm) and the
    shortest span that counts, in tokens."""

    lambda_ppm: int = DEFAULT_LAMBDA_PPM
    min_span: int = DEFAULT_MIN_SPAN


@dataclass(frozen=True)
class SplitPolicy:
    """Basis points of an adapter's fee for the node operator, adapter owner and data contributors."""

    operator: int
    owner: int
    data: int


@dataclass(frozen=True)
class AccessPolicy:
    """`public`, or an allow-list of payer addresses (stored lower-case) and API-key ids."""

    public: bool = True
    allow: frozenset[str] = frozenset()

    def permits(self, payer: str | None, api_key_id: str | None) -> bool:
        """True if either the payer or the API-key id is allowed."""
        if self.public:
            return True
        cands = {c for c in (payer, api_key_id) if c}
        cands |= {c.lower() for c in cands if is_address(c)}
        return bool(cands & self.allow)


@dataclass(frozen=True)
class Manifest:
    """A validated attribution manifest (see the module docstring for the JSON form)."""

    owner: str
    version: str
    base_model: str
    datasets: tuple[Dataset, ...]
    price_per_1k_prompt_tokens: int
    price_per_1k_completion_tokens: int
    split: SplitPolicy
    access: AccessPolicy = field(default_factory=AccessPolicy)
    spans: SpanPolicy = field(default_factory=SpanPolicy)

    @classmethod
    def from_dict(cls, raw: Any) -> "Manifest":
        """Validate a manifest dict; errors name the offending field."""
        return parse_manifest(raw)


@dataclass(frozen=True)
class DefaultPolicy:
    """Node-level policy for base-only requests and adapters without a manifest.

    `operator` is the payout address of the node operator (default: the node's own address).
    """

    price_per_1k_prompt_tokens: int = 0
    price_per_1k_completion_tokens: int = 0
    operator: str | None = None

    def __post_init__(self) -> None:
        _int(self.price_per_1k_prompt_tokens, "default.price_per_1k_prompt_tokens", minimum=0)
        _int(self.price_per_1k_completion_tokens, "default.price_per_1k_completion_tokens", minimum=0)
        if self.operator is not None:
            object.__setattr__(self, "operator", _address(self.operator, "default.operator"))

    def manifest_for(self, operator: str, base_model: str) -> Manifest:
        """The implicit manifest: owner = operator, no datasets, 100% to the operator, public."""
        return Manifest(
            owner=self.operator or operator, version="", base_model=base_model, datasets=(),
            price_per_1k_prompt_tokens=self.price_per_1k_prompt_tokens,
            price_per_1k_completion_tokens=self.price_per_1k_completion_tokens,
            split=SplitPolicy(operator=BPS, owner=0, data=0),
        )


def _fail(path: str, msg: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: {msg}")


def _int(v: Any, path: str, minimum: int) -> int:
    # bool is an int subclass; "true" as a price is a mistake, not 1.
    if not isinstance(v, int) or isinstance(v, bool):
        raise _fail(path, f"must be an integer, got {type(v).__name__}")
    if v < minimum:
        raise _fail(path, f"must be an integer >= {minimum}, got {v}")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _fail(path, "must be a non-empty string")
    return v


def _address(v: Any, path: str) -> str:
    if not isinstance(v, str) or not is_address(v):
        raise _fail(path, "must be an EVM address (0x + 40 hex digits, valid EIP-55 checksum if mixed-case), "
                          f"got {v!r}")
    return to_checksum_address(v)


def _dataset(raw: Any, path: str, base_dir: Path | None) -> Dataset:
    if not isinstance(raw, dict):
        raise _fail(path, "must be an object")
    unknown = set(raw) - {"id", "hash", "uri", "weight", "contributors", "contributions"}
    if unknown:
        raise _fail(f"{path}.{sorted(unknown)[0]}", "unknown field")
    ds_id = _str(raw.get("id"), f"{path}.id")
    if "hash" in raw:
        ref = _str(raw["hash"], f"{path}.hash")
    elif "uri" in raw:
        ref = _str(raw["uri"], f"{path}.uri")
    elif "contributions" in raw:
        ref = ""  # the contributions' hash, below
    else:
        raise _fail(f"{path}.hash", "a dataset needs a content hash, a uri or its contributions")
    weight = _int(raw.get("weight", 1), f"{path}.weight", minimum=1)
    contribs = raw.get("contributors")
    if not isinstance(contribs, list) or not contribs:
        raise _fail(f"{path}.contributors", "must be a non-empty list")
    out: list[Contributor] = []
    seen: set[str] = set()
    for j, c in enumerate(contribs):
        cp = f"{path}.contributors[{j}]"
        if not isinstance(c, dict):
            raise _fail(cp, "must be an object")
        addr = _address(c.get("address"), f"{cp}.address")
        if addr in seen:
            raise _fail(f"{cp}.address", f"duplicate contributor {addr}")
        seen.add(addr)
        out.append(Contributor(addr, _int(c.get("weight"), f"{cp}.weight", minimum=1)))
    texts: tuple[tuple[str, str], ...] = ()
    if "contributions" in raw:
        texts = _contributions(raw["contributions"], f"{path}.contributions", base_dir, seen)
        digest = content_hash(texts)
        if "hash" in raw and ref != digest:
            raise _fail(f"{path}.hash", f"is {ref} but the contributions hash to {digest}")
        ref = digest
    return Dataset(id=ds_id, ref=ref, contributors=tuple(out), weight=weight, contributions=texts)


def _contributions(raw: Any, path: str, base_dir: Path | None, listed: set[str]) -> tuple[tuple[str, str], ...]:
    """A dataset's contributions: inline objects or a JSON-lines file, each {"contributor", "text"}."""
    where = path
    if isinstance(raw, str):
        file = Path(raw)
        if not file.is_absolute():
            if base_dir is None:
                raise _fail(path, "a relative path needs the manifest's folder (give an absolute path)")
            file = base_dir / file
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
            raw = [json.loads(line) for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(path, f"cannot read {file}: {e}") from e
        where = str(file)
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "must be a non-empty list or a JSON-lines file of {contributor, text}")
    out = []
    for j, c in enumerate(raw):
        cp = f"{where}[{j}]"
        if not isinstance(c, dict) or set(c) - {"contributor", "text"}:
            raise _fail(cp, "must be an object {contributor, text}")
        addr = _address(c.get("contributor"), f"{cp}.contributor")
        if addr not in listed:
            raise _fail(f"{cp}.contributor", f"{addr} is not one of the dataset's contributors")
        out.append((addr, _str(c.get("text"), f"{cp}.text")))
    return tuple(out)


def _span_policy(raw: Any) -> SpanPolicy:
    if raw is None:
        return SpanPolicy()
    if not isinstance(raw, dict) or set(raw) - {"lambda", "min_span"}:
        raise _fail("span_attribution", "must be an object {lambda, min_span}")
    lam = raw.get("lambda", DEFAULT_LAMBDA_PPM / PPM)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        raise _fail("span_attribution.lambda", f"must be a number in [0, 1], got {lam!r}")
    return SpanPolicy(lambda_ppm=round(lam * PPM),
                      min_span=_int(raw.get("min_span", DEFAULT_MIN_SPAN), "span_attribution.min_span", minimum=1))


def parse_manifest(raw: Any, base_dir: str | Path | None = None) -> Manifest:
    """Validate a raw manifest (dict, e.g. parsed JSON) into a Manifest. Errors name the field.
    `base_dir`: the manifest's folder (relative contribution files are read from there)."""
    if isinstance(raw, Manifest):
        return raw
    if not isinstance(raw, dict):
        raise _fail("manifest", "must be a JSON object")
    unknown = set(raw) - _ALLOWED_KEYS
    if unknown:
        raise _fail(sorted(unknown)[0], "unknown field")
    owner = _address(raw.get("owner"), "owner")
    if "description" in raw:
        _str(raw["description"], "description")
    version = raw.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    version = _str(version, "version")
    base_model = _str(raw.get("base_model"), "base_model")
    ds_raw = raw.get("datasets", [])
    if not isinstance(ds_raw, list):
        raise _fail("datasets", "must be a list")
    base = Path(base_dir) if base_dir is not None else None
    datasets = tuple(_dataset(d, f"datasets[{i}]", base) for i, d in enumerate(ds_raw))
    ids = [d.id for d in datasets]
    for i, d in enumerate(ids):
        if d in ids[:i]:
            raise _fail(f"datasets[{i}].id", f"duplicate dataset id {d!r}")
    pp = _int(raw.get("price_per_1k_prompt_tokens"), "price_per_1k_prompt_tokens", minimum=0)
    pc = _int(raw.get("price_per_1k_completion_tokens"), "price_per_1k_completion_tokens", minimum=0)
    split_raw = raw.get("split")
    if not isinstance(split_raw, dict):
        raise _fail("split", "must be an object {operator, owner, data} in basis points")
    extra = set(split_raw) - {"operator", "owner", "data"}
    if extra:
        raise _fail(f"split.{sorted(extra)[0]}", "unknown field")
    bps = {k: _int(split_raw.get(k), f"split.{k}", minimum=0) for k in ("operator", "owner", "data")}
    if sum(bps.values()) != BPS:
        raise _fail("split", f"basis points must sum to {BPS}, got {sum(bps.values())}")
    if bps["data"] > 0 and not datasets:
        raise _fail("split.data", "is > 0 but the manifest lists no datasets")
    return Manifest(
        owner=owner, version=version, base_model=base_model, datasets=datasets,
        price_per_1k_prompt_tokens=pp, price_per_1k_completion_tokens=pc,
        split=SplitPolicy(**bps), access=_access(raw.get("access", "public")),
        spans=_span_policy(raw.get("span_attribution")),
    )


def _access(raw: Any) -> AccessPolicy:
    if raw == "public":
        return AccessPolicy(public=True)
    if isinstance(raw, dict) and set(raw) == {"allow"} and isinstance(raw["allow"], list):
        allow: set[str] = set()
        for i, a in enumerate(raw["allow"]):
            a = _str(a, f"access.allow[{i}]")
            allow.add(a.lower() if is_address(a) else a)
        return AccessPolicy(public=False, allow=frozenset(allow))
    raise _fail("access", 'must be "public" or {"allow": [payer addresses or API-key ids]}')


def load_manifest(adapter_dir: str | Path) -> Manifest | None:
    """Read `attribution.json` beside an adapter's PEFT files; None if the file does not exist."""
    path = Path(adapter_dir) / MANIFEST_FILENAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _fail("manifest", f"{path} is not valid JSON: {e}") from e
    return parse_manifest(raw, path.parent)
