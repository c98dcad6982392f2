"""Helpers for the contract tests: compile once, deploy the five contracts in titanoboa's
in-process EVM, register nodes/manifests and sign what the contracts check.

(A uniquely named module, not conftest: `from conftest import` is ambiguous across test folders.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import boa
import eth_abi
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak, to_checksum_address

from openlora.attribution.ids import name_id_bytes
from openlora.attribution.manifest import Manifest
from openlora.attribution.receipts import Payout
from openlora.chain.authorization import Authorization, sign_authorization
from openlora.chain.charges import hash32, manifest_hash
from openlora.chain.compile import CONTRACTS, CONTRACTS_DIR

ONE = 10**18  # one OPEN in base units
MIN_STAKE = 100 * ONE
UNBONDING_DELAY = 7 * 86_400
WITHDRAWAL_DELAY = 3_600
SETTLEMENT_WINDOW = 86_400
FAR_FUTURE = 2**40  # an expiry no test travels past

# Skip reasons (Settlement.vy SKIP_*).
EXPIRED, ACCESS, CAP, ESCROW = 1, 2, 3, 4


@lru_cache(maxsize=1)
def partials() -> dict[str, Any]:
    """Every contract compiled once per process (~3 s): {name: deployer}."""
    return {n: boa.load_partial(str(CONTRACTS_DIR / f"{n}.vy")) for n in CONTRACTS}


@dataclass
class System:
    """One deployment: token, registries and settlement, plus the chain id they sign for."""

    token: Any
    datanets: Any
    adapters: Any
    nodes: Any
    settlement: Any
    chain_id: int


def deploy(token: Any = None, min_stake: int = MIN_STAKE) -> System:
    """Deploy the registries and Settlement (and OpenToken unless `token` is given)."""
    p = partials()
    token = token if token is not None else p["OpenToken"].deploy()
    dn = p["DatanetRegistry"].deploy()
    ad = p["AdapterRegistry"].deploy(dn.address)
    nr = p["NodeRegistry"].deploy(token.address, min_stake, UNBONDING_DELAY)
    st = p["Settlement"].deploy(token.address, nr.address, ad.address, dn.address,
                                WITHDRAWAL_DELAY, SETTLEMENT_WINDOW)
    return System(token, dn, ad, nr, st, boa.env.evm.patch.chain_id)


def now() -> int:
    """The chain's block timestamp (not the wall clock: tests time-travel)."""
    return boa.env.evm.patch.timestamp


def node_info(price_prompt: int, price_completion: int, endpoint: str = "http://127.0.0.1:8000") -> tuple:
    """A NodeInfo tuple in the contract's field order."""
    return (endpoint, "FR", True, 4885, 235, "gpu", "H100", 81_920, 1, 16, [b"\x11" * 32],
            price_prompt, price_completion)


def consent(signer_key: bytes, registry: str, chain_id: int, operator: str) -> bytes:
    """The signer's EIP-191 consent to be registered by `operator` (NodeRegistry.register)."""
    payload = keccak(eth_abi.encode(["address", "uint256", "address"], [registry, chain_id, operator]))
    return bytes(Account.sign_message(encode_defunct(primitive=payload), signer_key).signature)


def register_node(s: System, signer: Any, operator: str, price_prompt: int, price_completion: int,
                  stake: int = MIN_STAKE) -> None:
    """Mint `stake` to `operator` and register `signer` (an eth_account account) under it."""
    if stake:
        s.token.mint(operator, stake)
        s.token.approve(s.nodes.address, stake, sender=operator)
    sig = b"" if signer.address == operator else consent(signer.key, s.nodes.address, s.chain_id, operator)
    s.nodes.register(signer.address, node_info(price_prompt, price_completion), stake, sig, sender=operator)


def fund(s: System, payer: str, amount: int) -> None:
    """Mint `amount` to `payer` and deposit all of it into its escrow."""
    s.token.mint(payer, amount)
    s.token.approve(s.settlement.address, amount, sender=payer)
    s.settlement.deposit(amount, sender=payer)


def authorize(s: System, payer: Any, node: str, cap: int, expiry: int = FAR_FUTURE,
              nonce: int = 1) -> Authorization:
    return sign_authorization(payer.key, node, cap, expiry, nonce, s.chain_id, s.settlement.address)


def register_manifest(s: System, name: str, m: Manifest, is_public: bool = True) -> None:
    """Register `m`'s datasets (once each) and the adapter `name` with `m`'s terms, as m.owner."""
    uses = []
    for d in m.datasets:
        did = name_id_bytes(d.id)
        if not s.datanets.exists(did):
            s.datanets.register(did, hash32(d.ref), [(c.address, c.weight) for c in d.contributors])
        uses.append((did, d.weight))
    s.adapters.register(name_id_bytes(name), hash32(f"sha256:{name}"), hash32(m.base_model),
                        manifest_hash(m), m.price_per_1k_prompt_tokens,
                        m.price_per_1k_completion_tokens, m.split.operator, m.split.owner,
                        m.split.data, uses, is_public, sender=m.owner)


def charge(seq: int, auth_index: int = 0, prompt: int = 1000, completion: int = 1000,
           adapters: Sequence[tuple[str, int]] = (), price_version: int = 1) -> tuple:
    """A Charge tuple; `adapters` is (adapter name, weight ppm); receipt id derived from seq."""
    return (seq, keccak(seq.to_bytes(8, "big")), auth_index, prompt, completion,
            [(name_id_bytes(a), w) for a, w in adapters], price_version)


def settle(s: System, node: str, auths: Iterable[Authorization], charges: Sequence[tuple],
           epoch: int = 1, spans: Sequence[tuple] = ()) -> tuple[int, int]:
    """Send one batch from `node` (`spans`: charges.span_tuples); returns (charges settled, total charged)."""
    return s.settlement.settle(epoch, b"\x07" * 32, [a.as_tuple() for a in auths], list(charges), list(spans),
                               sender=node)


def skipped(contract: Any) -> list[tuple[int, int]]:
    """(seq, reason) of every ChargeSkipped in the contract's last call."""
    return [(e.seq, e.reason) for e in contract.get_logs() if type(e).__name__ == "ChargeSkipped"]


@contextmanager
def reverts_raw(contract: Any, reason: str) -> Iterator[None]:
    """`boa.reverts(reason)` read from the revert data itself. boa's error report decodes the
    failing frame's locals and can crash on one not yet assigned (NodeRegistry.withdraw_unbonded's
    `n: Node` holds garbage Strings when an earlier assert fails), hiding a correct revert."""
    with pytest.raises(Exception):
        yield
    out = bytes(contract._computation.output)
    assert out[:4] == bytes.fromhex("08c379a0"), out  # Error(string)
    assert eth_abi.decode(["string"], out[4:])[0] == reason


def totals_by_recipient(payouts: Iterable[Payout]) -> Counter:
    """Sum of payout amounts per checksummed recipient."""
    out: Counter = Counter()
    for p in payouts:
        out[to_checksum_address(p.recipient)] += p.amount
    return out
