"""Receipts: what one request cost, who gets paid, signed by the node (EIP-712).

A receipt holds identities and counts only, never prompt or output text: request id, node address,
payer (tenant), base model id + hash, adapters (id, content hash, manifest version, composition
weight in ppm, fee portion), datasets (id, hash/uri, weight, data amount), payouts (recipient, role,
ref, amount), token counts, status, fee, timestamp (ms), sequence number and the previous receipt's
hash (the ledger's hash chain); when the client asked for one, a commitment to the request's
input and output under a key only the client holds (`commitment.py`); and, when an adapter's datasets
hold their contributions, the span-level attribution method and each contributor's integer span
credit (`span_service.py`; the spans themselves go only to the caller).

Fee rule (integers only; prices are per 1,000 tokens in the token's smallest unit):

* Billable tokens: `P` = prompt_tokens (cached prompt tokens included: they are recorded, not
  discounted) and `C` = completion_tokens. Requests whose status is not "finished" (aborted or
  failed) are charged for the completion tokens actually produced only: `P = 0`.
* Base-only request: `fee = (P * default_prompt_price + C * default_completion_price) // 1000`,
  all of it to the node operator.
* Adapter request: composition weights become integer ppm shares `s_i` (`splits.weights_to_ppm`,
  proportional to |weight|, summing to 1,000,000). Each adapter charges its own manifest prices:
  `cost_i = s_i * (P * prompt_price_i + C * completion_price_i)`, and
  `fee = sum(cost_i) // (1,000,000 * 1000)` (one floor, at the very end). The fee is then split
  between adapters in proportion to `cost_i`, and each adapter's portion by its manifest split
  policy (operator / owner / data, basis points); the data portion goes to its datasets in
  proportion to their `weight` (default 1: equal shares) and within a dataset to contributors by
  weight, or, with span-level attribution, by `spans.blend` of those weights and the span credits.
  Every split uses the largest-remainder rule of `splits.py`, so amounts sum exactly.
  Remainder ties go to the lower on-chain id (`ids.name_id`: keccak256 of the adapter or dataset
  name), then the lower address, so the Settlement contract reproduces every amount.

Receipt hash = the EIP-712 digest `keccak256(0x19 0x01 || domainSeparator || hashStruct(Receipt))`,
i.e. exactly the 32 bytes the node signs; the receipt id is this hash in hex. Anyone can verify a
receipt with stock tooling: `Account.recover_message(encode_typed_data(full_message=typed), sig)`
must give `node` (`eip712.py` computes the same bytes faster; tests check they are identical). The
signed struct contains `prevHash` and `seq`, so the chain itself is signed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from eth_account import Account
from eth_account.messages import SignableMessage

from openlora.attribution import eip712
from openlora.attribution.ids import name_id
from openlora.attribution.manifest import Manifest
from openlora.attribution.splits import PPM, split_bps, split_exact, weights_to_ppm
from openlora.errors import InvalidRequest
from openlora.outputs import UsageEvent

ZERO_HASH = "0x" + "00" * 32
DOMAIN_NAME = "OpenLoRA Receipt"
DOMAIN_VERSION = "1"

# EIP-712 struct definitions (field order is part of the hash: never reorder, only version up).
EIP712_TYPES: dict[str, list[dict[str, str]]] = {
    "Receipt": [
        {"name": "seq", "type": "uint64"},
        {"name": "requestId", "type": "string"},
        {"name": "node", "type": "address"},
        {"name": "payer", "type": "string"},
        {"name": "baseModel", "type": "string"},
        {"name": "baseModelHash", "type": "string"},
        {"name": "adapters", "type": "AdapterUse[]"},
        {"name": "datasets", "type": "DatasetUse[]"},
        {"name": "payouts", "type": "Payout[]"},
        {"name": "promptTokens", "type": "uint64"},
        {"name": "cachedTokens", "type": "uint64"},
        {"name": "completionTokens", "type": "uint64"},
        {"name": "status", "type": "string"},
        {"name": "merge", "type": "string"},
        {"name": "fee", "type": "uint256"},
        {"name": "timestampMs", "type": "uint64"},
        {"name": "prevHash", "type": "bytes32"},
    ],
    "AdapterUse": [
        {"name": "adapterId", "type": "string"},
        {"name": "contentHash", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "weightPpm", "type": "uint32"},
        {"name": "fee", "type": "uint256"},
    ],
    "DatasetUse": [
        {"name": "adapterId", "type": "string"},
        {"name": "datasetId", "type": "string"},
        {"name": "ref", "type": "string"},
        {"name": "weight", "type": "uint32"},
        {"name": "amount", "type": "uint256"},
    ],
    "Payout": [
        {"name": "recipient", "type": "address"},
        {"name": "role", "type": "string"},  # "operator" | "owner" | "data"
        {"name": "ref", "type": "string"},  # adapter id, or "adapter/dataset" for data payouts
        {"name": "amount", "type": "uint256"},
    ],
}

# A receipt that carries a commitment (commitment.py) signs one more field; one with span-level
# attribution signs the method and the credits after it. Receipts without them keep the struct above,
# so their hashes (and every receipt already in a ledger) are unchanged.
_COMMITMENT_FIELD = [{"name": "commitment", "type": "bytes32"}]
_SPAN_FIELDS = [{"name": "spanMethod", "type": "string"}, {"name": "credits", "type": "SpanCredit[]"}]
_SPAN_CREDIT = [
    {"name": "adapterId", "type": "string"},
    {"name": "datasetId", "type": "string"},
    {"name": "contributor", "type": "address"},
    {"name": "credit", "type": "uint64"},  # answer tokens credited (spans.span_credits)
]
EIP712_TYPES_COMMITTED: dict[str, list[dict[str, str]]] = {
    **EIP712_TYPES, "Receipt": [*EIP712_TYPES["Receipt"], *_COMMITMENT_FIELD],
}

_DOMAIN_FIELDS = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"}]
_DOMAIN_WITH_CHAIN = [*_DOMAIN_FIELDS, {"name": "chainId", "type": "uint256"}]


def _schema_for(chain: bool, commitment: bool, spans: bool) -> dict[str, list[dict[str, str]]]:
    receipt = [*EIP712_TYPES["Receipt"], *(_COMMITMENT_FIELD if commitment else ()), *(_SPAN_FIELDS if spans else ())]
    types = {"EIP712Domain": _DOMAIN_WITH_CHAIN if chain else _DOMAIN_FIELDS, **EIP712_TYPES, "Receipt": receipt}
    if spans:
        types["SpanCredit"] = _SPAN_CREDIT
    return types


# Module-level schema objects (eip712 caches type hashes per schema object; never mutate them).
# Keyed by (has chain id, has commitment, has span attribution).
_SCHEMAS = {(c, m, s): _schema_for(c, m, s) for c in (False, True) for m in (False, True) for s in (False, True)}


@dataclass(frozen=True)
class AdapterLine:
    """One adapter's part: identity, manifest version, integer weight (ppm) and fee portion."""

    adapter_id: str
    content_hash: str
    version: str
    weight_ppm: int
    fee: int


@dataclass(frozen=True)
class DatasetLine:
    """One dataset credited by the request and the data amount it received."""

    adapter_id: str
    dataset_id: str
    ref: str
    weight: int
    amount: int


@dataclass(frozen=True)
class SpanCredit:
    """Answer tokens a contributor's text supplied within one dataset (span-level attribution)."""

    adapter_id: str
    dataset_id: str
    contributor: str
    credit: int


@dataclass(frozen=True)
class Payout:
    """One payment line. Lines with amount 0 are kept: they record who took part."""

    recipient: str
    role: str
    ref: str
    amount: int


@dataclass(frozen=True)
class Receipt:
    """A signed receipt. `receipt_hash` (= receipt id) and `signature` cover every other field."""

    seq: int
    request_id: str
    node: str
    payer: str
    base_model: str
    base_model_hash: str
    adapters: tuple[AdapterLine, ...]
    datasets: tuple[DatasetLine, ...]
    payouts: tuple[Payout, ...]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    status: str
    merge: str
    fee: int
    timestamp_ms: int
    prev_hash: str
    commitment: str = ""  # 0x + 64 hex: HMAC of input and output under the client's key; "" = none
    span_method: str = ""  # e.g. "infini-gram;min_span=8;lambda_ppm=500000"; "" = fixed weights only
    credits: tuple[SpanCredit, ...] = ()  # per (adapter, dataset, contributor) span credit
    chain_id: int = 0  # EIP-712 domain chainId; 0 = omitted
    signature: str = ""  # 0x + 130 hex
    receipt_hash: str = field(default="", compare=False)

    @property
    def receipt_id(self) -> str:
        return self.receipt_hash

    def body(self) -> dict[str, Any]:
        """Every signed field as plain JSON types (no signature, no hash)."""
        # Hand-written (dataclasses.asdict deep-copies recursively: ~10x slower on this path).
        d = {f: getattr(self, f) for f in _BODY_SCALARS}
        if not self.commitment:  # absent, not "": bodies of receipts without one stay as they were
            del d["commitment"]
        if self.span_method:
            d["credits"] = [c.__dict__.copy() for c in self.credits]
        else:
            del d["span_method"]
        d["adapters"] = [a.__dict__.copy() for a in self.adapters]
        d["datasets"] = [x.__dict__.copy() for x in self.datasets]
        d["payouts"] = [p.__dict__.copy() for p in self.payouts]
        return d

    def canonical_body(self) -> str:
        """The canonical JSON stored in the ledger (sorted keys, no spaces, ASCII)."""
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def to_dict(self) -> dict[str, Any]:
        """Body + `receipt_id` + `signature` (the public JSON form)."""
        d = self.body()
        d["receipt_id"] = self.receipt_hash
        d["signature"] = self.signature
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], receipt_hash: str | None = None) -> "Receipt":
        """Inverse of `to_dict`/`body`. The hash is recomputed unless the caller passes a
        `receipt_hash` it already trusts (e.g. a ledger row read back without verification)."""
        d = dict(d)
        d.pop("receipt_id", None)
        d.pop("receipt_hash", None)
        d["adapters"] = tuple(AdapterLine(**a) for a in d["adapters"])
        d["datasets"] = tuple(DatasetLine(**x) for x in d["datasets"])
        d["payouts"] = tuple(Payout(**p) for p in d["payouts"])
        d["credits"] = tuple(SpanCredit(**c) for c in d.get("credits", ()))
        r = cls(**d)
        return replace(r, receipt_hash=receipt_hash or r.compute_hash())

    def typed_data(self) -> dict[str, Any]:
        """The full EIP-712 message (types, primaryType, domain, message)."""
        domain: dict[str, Any] = {"name": DOMAIN_NAME, "version": DOMAIN_VERSION}
        if self.chain_id:
            domain["chainId"] = self.chain_id
        msg = {
            "seq": self.seq, "requestId": self.request_id, "node": self.node, "payer": self.payer,
            "baseModel": self.base_model, "baseModelHash": self.base_model_hash,
            "adapters": [
                {"adapterId": a.adapter_id, "contentHash": a.content_hash, "version": a.version,
                 "weightPpm": a.weight_ppm, "fee": a.fee} for a in self.adapters
            ],
            "datasets": [
                {"adapterId": x.adapter_id, "datasetId": x.dataset_id, "ref": x.ref,
                 "weight": x.weight, "amount": x.amount} for x in self.datasets
            ],
            "payouts": [
                {"recipient": p.recipient, "role": p.role, "ref": p.ref, "amount": p.amount}
                for p in self.payouts
            ],
            "promptTokens": self.prompt_tokens, "cachedTokens": self.cached_tokens,
            "completionTokens": self.completion_tokens, "status": self.status, "merge": self.merge,
            "fee": self.fee, "timestampMs": self.timestamp_ms,
            "prevHash": bytes.fromhex(self.prev_hash[2:]),
        }
        if self.commitment:
            msg["commitment"] = _bytes32(self.commitment)
        if self.span_method:
            msg["spanMethod"] = self.span_method
            msg["credits"] = [{"adapterId": c.adapter_id, "datasetId": c.dataset_id, "contributor": c.contributor,
                               "credit": c.credit} for c in self.credits]
        return {
            "types": _SCHEMAS[(bool(self.chain_id), bool(self.commitment), bool(self.span_method))],
            "primaryType": "Receipt", "domain": domain, "message": msg,
        }

    def signable(self) -> SignableMessage:
        """The EIP-712 signable message (raises InvalidRequest if a field does not fit its type)."""
        try:
            return eip712.encode(self.typed_data())
        except Exception as e:  # malformed field (e.g. bad address, out-of-range int)
            raise InvalidRequest(f"receipt {self.request_id!r} does not encode: {e}") from e

    def compute_hash(self) -> str:
        """EIP-712 digest of the receipt, 0x-hex: the receipt id and the chain link."""
        return "0x" + eip712.digest(self.signable()).hex()

    def recover_signer(self) -> str:
        """The address that produced `signature` over this receipt (checksummed)."""
        return Account.recover_message(self.signable(), signature=bytes.fromhex(self.signature[2:]))

    def amounts_by_recipient(self) -> dict[str, int]:
        """Total amount per recipient address (a recipient may appear in several roles)."""
        out: dict[str, int] = {}
        for p in self.payouts:
            out[p.recipient] = out.get(p.recipient, 0) + p.amount
        return out

    def summary(self) -> dict[str, Any]:
        """What the HTTP response carries: {receipt_id, fee, splits} (+ commitment when there is one)."""
        d = {"receipt_id": self.receipt_hash, "fee": self.fee, "splits": self.amounts_by_recipient()}
        if self.commitment:
            d["commitment"] = self.commitment
        return d


def _bytes32(text: str) -> bytes:
    """0x + 64 hex -> 32 bytes (ValueError otherwise: `signable` reports it as a bad field)."""
    raw = bytes.fromhex(text[2:]) if text.startswith("0x") else b""
    if len(raw) != 32:
        raise ValueError(f"commitment {text!r} is not 0x + 64 hex digits")
    return raw


_BODY_SCALARS = tuple(
    f.name for f in fields(Receipt)
    if f.name not in ("adapters", "datasets", "payouts", "credits", "signature", "receipt_hash")
)


def compute_fee_lines(
    event: UsageEvent, manifests: list[Manifest], base_manifest: Manifest, operator: str,
    data_weights: dict[tuple[str, str], dict[str, int]] | None = None,
) -> tuple[int, list[AdapterLine], list[DatasetLine], list[Payout]]:
    """Apply the fee rule (module docstring) to one event. `manifests[i]` belongs to
    `event.adapters[i]`; `base_manifest` prices base-only requests. `data_weights`: (adapter id,
    dataset id) -> lower-cased contributor address -> the integer weight its data amount is split by, in place of
    the manifest's (span-level attribution). Returns fee and lines."""
    for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        v = getattr(event, name)
        if not isinstance(v, int) or v < 0:
            raise InvalidRequest(f"usage event {event.request_id!r}: {name} must be an int >= 0")
    p_tok = event.prompt_tokens if event.status == "finished" else 0
    c_tok = event.completion_tokens
    if not event.adapters:
        fee = (p_tok * base_manifest.price_per_1k_prompt_tokens
               + c_tok * base_manifest.price_per_1k_completion_tokens) // 1000
        return fee, [], [], [Payout(operator, "operator", "", fee)]

    ids = [a.adapter_id for a in event.adapters]
    ppm = weights_to_ppm([a.weight for a in event.adapters], ids)
    costs = [
        s * (p_tok * m.price_per_1k_prompt_tokens + c_tok * m.price_per_1k_completion_tokens)
        for s, m in zip(ppm, manifests)
    ]
    fee = sum(costs) // (PPM * 1000)
    portions = split_exact(fee, costs, [name_id(i) for i in ids])  # ties: lower on-chain id
    adapters: list[AdapterLine] = []
    datasets: list[DatasetLine] = []
    payouts: list[Payout] = []
    for use, s, m, portion in zip(event.adapters, ppm, manifests, portions):
        adapters.append(AdapterLine(use.adapter_id, use.content_hash, m.version, s, portion))
        op_amt, owner_amt, data_amt = split_bps(portion, m.split.operator, m.split.owner, m.split.data)
        payouts.append(Payout(operator, "operator", use.adapter_id, op_amt))
        payouts.append(Payout(m.owner, "owner", use.adapter_id, owner_amt))
        if not m.datasets:
            continue  # manifest validation guarantees data_amt == 0 here
        ds_amts = split_exact(data_amt, [d.weight for d in m.datasets], [name_id(d.id) for d in m.datasets])
        for ds, ds_amt in zip(m.datasets, ds_amts):
            datasets.append(DatasetLine(use.adapter_id, ds.id, ds.ref, ds.weight, ds_amt))
            spanned = (data_weights or {}).get((use.adapter_id, ds.id))
            c_amts = split_exact(ds_amt, [spanned[c.address.lower()] if spanned else c.weight for c in ds.contributors],
                                 [c.address.lower() for c in ds.contributors])
            for c, amt in zip(ds.contributors, c_amts):
                payouts.append(Payout(c.address, "data", f"{use.adapter_id}/{ds.id}", amt))
    return fee, adapters, datasets, payouts


def build_receipt(
    event: UsageEvent, *, seq: int, node: str, operator: str, manifests: list[Manifest],
    base_manifest: Manifest, prev_hash: str, sign: Callable[[SignableMessage], bytes],
    base_model: str = "", base_model_hash: str = "", chain_id: int = 0, span_method: str = "",
    data_weights: dict[tuple[str, str], dict[str, int]] | None = None, credits: tuple[SpanCredit, ...] = (),
) -> Receipt:
    """Turn a usage event into a signed receipt (see the module docstring for the fee rule); with
    span-level attribution, its method, blended data weights and credits (span_service)."""
    fee, adapters, datasets, payouts = compute_fee_lines(event, manifests, base_manifest, operator, data_weights)
    assert sum(p.amount for p in payouts) == fee, "split does not sum to the fee"
    ts = event.finish_time or time.time()
    unsigned = Receipt(
        seq=seq, request_id=event.request_id, node=node, payer=event.tenant,
        # The served id (the node's name for the model) wins over the engine's, which is a local path.
        base_model=base_model or event.base_model, base_model_hash=event.base_model_hash or base_model_hash,
        adapters=tuple(adapters), datasets=tuple(datasets), payouts=tuple(payouts),
        prompt_tokens=event.prompt_tokens, cached_tokens=event.cached_tokens,
        completion_tokens=event.completion_tokens, status=event.status,
        merge=json.dumps(event.merge, sort_keys=True, separators=(",", ":")) if event.merge else "",
        fee=fee, timestamp_ms=int(round(ts * 1000)), prev_hash=prev_hash, commitment=event.commitment,
        span_method=span_method, credits=credits, chain_id=chain_id,
    )
    sm = unsigned.signable()
    digest = "0x" + eip712.digest(sm).hex()
    return replace(unsigned, signature="0x" + sign(sm).hex(), receipt_hash=digest)


def verify_receipt(receipt: Receipt, expected_node: str | None = None) -> str | None:
    """Check one receipt on its own: amounts, hash and signature. Returns a reason or None."""
    if any(p.amount < 0 for p in receipt.payouts):
        return "negative payout amount"
    if sum(p.amount for p in receipt.payouts) != receipt.fee:
        return "payouts do not sum to the fee"
    if sum(a.fee for a in receipt.adapters) != (receipt.fee if receipt.adapters else 0):
        return "adapter fee portions do not sum to the fee"
    try:
        sm = receipt.signable()  # encoded once, used for both the hash and the recovery
        digest = "0x" + eip712.digest(sm).hex()
        if receipt.receipt_hash and digest != receipt.receipt_hash:
            return f"hash mismatch: stored {receipt.receipt_hash}, recomputed {digest}"
        signer = Account.recover_message(sm, signature=bytes.fromhex(receipt.signature[2:]))
    except Exception as e:  # undecodable field or signature
        return f"cannot verify: {e}"
    if signer != receipt.node:
        return f"signature recovers {signer}, not node {receipt.node}"
    if expected_node is not None and signer != expected_node:
        return f"signed by {signer}, expected node {expected_node}"
    return None
