"""The Vyper contracts in titanoboa's in-process EVM: exact fee splits against the off-chain rule,
escrow conservation, replay/authorization/cap/access checks, staking, registries, reentrancy and
gas. Contracts are compiled once per session; every test and hypothesis example runs inside
`boa.env.anchor()`, so state never leaks between them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import boa
import pytest
from boa_system import (
    ACCESS,
    CAP,
    ESCROW,
    EXPIRED,
    MIN_STAKE,
    SETTLEMENT_WINDOW,
    UNBONDING_DELAY,
    WITHDRAWAL_DELAY,
    System,
    authorize,
    charge,
    consent,
    deploy,
    fund,
    node_info,
    now,
    register_manifest,
    register_node,
    reverts_raw,
    settle,
    skipped,
    totals_by_recipient,
)
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora.attribution.ids import name_id_bytes
from openlora.attribution.manifest import DefaultPolicy, Manifest, parse_manifest
from openlora.attribution.receipts import ZERO_HASH, Receipt, build_receipt, compute_fee_lines
from openlora.chain.charges import charge_for, span_tuples
from openlora.outputs import UsageEvent
from openlora.request import AdapterUse

BASE = "tiny-llama"
NODE_PP, NODE_PC = 1234, 5678  # the node's base-model prices per 1k tokens
RICH = 10**30  # escrow of the well-funded payers: never the limiting factor unless a test says so
PPM = 1_000_000


@dataclass
class World:
    """A deployment with one staked node, four adapters over three datanets and funded payers."""

    s: System
    node: LocalAccount  # the node's signing key (sends `settle`)
    operator: str  # registered the node (with the signer's consent); paid the operator parts
    payers: list[LocalAccount]  # funded with RICH each
    thin: list[LocalAccount]  # no escrow until a test deposits
    owners: list[str]
    contributors: list[str]
    manifests: dict[str, Manifest]
    base: Manifest  # the node's default policy as a manifest (base-only and unknown adapters)
    deposited: int  # deposited by the fixture itself

    @property
    def payees(self) -> list[str]:
        return [self.operator, self.node.address, *self.owners, *self.contributors]

    @property
    def accounts(self) -> list[str]:
        return [*self.payees, *(p.address for p in self.payers + self.thin)]

    def manifest_for(self, adapter: str) -> Manifest:
        """The manifest that prices `adapter` off-chain: the node's default when unregistered."""
        return self.manifests.get(adapter, self.base)


def manifest(owner: str, pp: int, pc: int, split: tuple[int, int, int],
             datasets: list[dict[str, Any]], version: str = "1.0.0") -> Manifest:
    return parse_manifest({
        "owner": owner, "version": version, "base_model": BASE, "datasets": datasets,
        "price_per_1k_prompt_tokens": pp, "price_per_1k_completion_tokens": pc,
        "split": dict(zip(("operator", "owner", "data"), split)),
    })


def dataset(ds_id: str, contributors: list[tuple[str, int]], weight: int = 1) -> dict[str, Any]:
    return {"id": ds_id, "hash": f"sha256:{ds_id}", "weight": weight,
            "contributors": [{"address": a, "weight": cw} for a, cw in contributors]}


def build_world() -> World:
    """Deploy everything into the current boa env and set up the node, adapters and payers."""
    s = deploy()
    node = Account.create()
    operator = boa.env.generate_address("operator")
    register_node(s, node, operator, NODE_PP, NODE_PC)
    owners = [boa.env.generate_address(f"owner{i}") for i in range(3)]
    c = [boa.env.generate_address(f"contributor{i}") for i in range(6)]
    # Equal contributor and datanet weights, so remainders tie and the tie-break rules matter.
    legal = dataset("legal", [(c[0], 1), (c[1], 1), (c[2], 1)])
    med = dataset("med", [(c[3], 2), (c[4], 2)])
    code = dataset("code", [(c[0], 3), (c[5], 1)], weight=2)
    manifests = {
        "pirate": manifest(owners[0], 1000, 4000, (2000, 5000, 3000), [legal, med]),
        # Same prices as pirate: equal costs at equal weights, so the adapter portions tie.
        "poet": manifest(owners[1], 1000, 4000, (3333, 3333, 3334), [code, legal]),
        "chef": manifest(owners[0], 7, 13, (10000, 0, 0), []),
        "scribe": manifest(owners[2], 333, 777, (0, 1, 9999), [{**med, "weight": 3}]),
    }
    for name, m in manifests.items():
        register_manifest(s, name, m)
    payers = [Account.create() for _ in range(3)]
    for p in payers:
        fund(s, p.address, RICH)
    return World(s, node, operator, payers, [Account.create() for _ in range(3)], owners, c, manifests,
                 DefaultPolicy(NODE_PP, NODE_PC).manifest_for(operator, BASE), deposited=RICH * len(payers))


@pytest.fixture(scope="module")
def world() -> World:
    with boa.env.anchor():
        yield build_world()


@pytest.fixture
def w(world: World) -> World:
    """The module's world, with every change of the test reverted afterwards."""
    with boa.env.anchor():
        yield world


def usage(adapters: list[tuple[str, float]], prompt: int, completion: int, payer: str,
          status: str = "finished") -> UsageEvent:
    return UsageEvent(
        request_id=f"req-{prompt}-{completion}-{len(adapters)}", tenant=payer, base_model=BASE,
        base_model_hash="0xbase", adapters=tuple(AdapterUse(a, f"sha256:{a}", x) for a, x in adapters),
        prompt_tokens=prompt, cached_tokens=0, completion_tokens=completion, status=status,
        finish_reason="stop" if status == "finished" else "abort", finish_time=1_700_000_000.0)


def receipts_for(w: World, events: list[UsageEvent], first_seq: int = 1,
                 signed: bool = True) -> list[Receipt]:
    """Receipts as the node builds them (the hash chain included); unsigned ones get a dummy
    signature, since the contract never sees it."""
    def sign(sm) -> bytes:
        return bytes(Account.sign_message(sm, w.node.key).signature) if signed else b"\0" * 65

    out, prev = [], ZERO_HASH
    for i, ev in enumerate(events):
        r = build_receipt(ev, seq=first_seq + i, node=w.node.address, operator=w.operator,
                          manifests=[w.manifest_for(a.adapter_id) for a in ev.adapters],
                          base_manifest=w.base, prev_hash=prev, sign=sign, chain_id=w.s.chain_id)
        out.append(r)
        prev = r.receipt_hash
    return out


def claimables(w: World, accounts: list[str]) -> dict[str, int]:
    return {a: w.s.settlement.claimable(a) for a in accounts}


def base_fee(prompt: int, completion: int) -> int:
    return (prompt * NODE_PP + completion * NODE_PC) // 1000


# ------------------------------------------------------------------------------- 1. exact splits

def test_span_weighted_receipts_settle_to_their_exact_payouts(w: World) -> None:
    """Span-level attribution: receipts whose data amounts follow blend(fixed weights, span credits) (as the
    span service builds them) settle on chain to exactly their payouts, for several lambdas, credit
    patterns (one contributor, ties, all zero) and a composition; the charge carries the credits."""
    from openlora.attribution.receipts import SpanCredit
    from openlora.attribution.spans import blend

    payer = w.payers[0].address

    cases = [
        (usage([("pirate", 1.0)], 4000, 3001, payer), {("pirate", "legal"): [11, 0, 0], ("pirate", "med"): [0, 7]},
         500_000),
        (usage([("pirate", 1.0)], 2000, 999, payer), {("pirate", "legal"): [3, 3, 0]}, 1_000_000),
        (usage([("poet", 1.0)], 5000, 4321, payer), {("poet", "code"): [0, 9], ("poet", "legal"): [0, 0, 0]}, 250_000),
        (usage([("pirate", 0.5), ("poet", 0.5)], 3000, 2000, payer),
         {("pirate", "legal"): [1, 2, 3], ("poet", "code"): [5, 5]}, 700_000),
    ]
    receipts, prev = [], ZERO_HASH
    for i, (ev, credits, lam) in enumerate(cases):
        ev = replace(ev, request_id=f"span-{i}")
        weights, lines = {}, []
        for (adapter, ds_id), got in credits.items():
            ds = next(d for d in w.manifests[adapter].datasets if d.id == ds_id)
            fixed = {c.address.lower(): c.weight for c in ds.contributors}
            weights[(adapter, ds_id)] = blend(fixed, {c.address.lower(): n for c, n in zip(ds.contributors, got)}, lam)
            lines += [SpanCredit(adapter, ds_id, c.address, n) for c, n in zip(ds.contributors, got)]
        method = "infini-gram;" + ";".join(f"{a.adapter_id}:min_span=6,lambda_ppm={lam}" for a in ev.adapters)
        r = build_receipt(ev, seq=1 + i, node=w.node.address, operator=w.operator,
                          manifests=[w.manifest_for(a.adapter_id) for a in ev.adapters], base_manifest=w.base,
                          prev_hash=prev, sign=lambda sm: b"\0" * 65, chain_id=w.s.chain_id, span_method=method,
                          data_weights=weights, credits=tuple(lines))
        receipts.append(r)
        prev = r.receipt_hash
    fixed_only = receipts_for(w, [replace(c[0], request_id=f"span-{i}") for i, c in enumerate(cases)], signed=False)
    assert any(a.amounts_by_recipient() != b.amounts_by_recipient() for a, b in zip(receipts, fixed_only))
    total = sum(r.fee for r in receipts)
    charges = [charge_for(r, 0) for r in receipts]
    assert settle(w.s, w.node.address, [authorize(w.s, w.payers[0], w.node.address, RICH)],
                  [c.as_tuple() for c in charges], spans=span_tuples(charges)) == (len(receipts), total)
    expected = totals_by_recipient(p for r in receipts for p in r.payouts)
    assert claimables(w, w.accounts) == {a: expected.get(a, 0) for a in w.accounts}


def test_settlement_credits_exactly_the_receipt_payouts(w: World) -> None:
    payer = w.payers[0].address
    events = [
        usage([], 1001, 333, payer),  # base only
        usage([], 5000, 7, payer, status="aborted"),  # prompt tokens not billed
        usage([("pirate", 1.0)], 1234, 567, payer),
        usage([("pirate", 0.5), ("poet", 0.5)], 999, 1, payer),  # equal costs: adapter tie,
        usage([("poet", 0.5), ("pirate", 0.5)], 999, 1, payer),  # broken by id, not by position
        usage([("pirate", 0.5), ("poet", 0.3), ("chef", 0.2)], 4321, 1234, payer),
        usage([("pirate", -1.0), ("scribe", 1.0)], 100, 101, payer),  # task arithmetic
        usage([("ghost", 1.0)], 777, 333, payer),  # not registered: node prices, all to operator
        usage([("ghost", 0.5), ("scribe", 0.5)], 2500, 1500, payer),
        usage([("pirate", 1.0)], 10**6, 12345, payer, status="aborted"),
        usage([("poet", 0.25), ("scribe", 0.25), ("chef", 0.25), ("pirate", 0.25)], 3001, 2999, payer),
    ]
    receipts = receipts_for(w, events)
    # Worked values of the rule, by hand: base fee floors once; aborted bills completions only.
    assert receipts[0].fee == (1001 * 1234 + 333 * 5678) // 1000 == 3126
    assert receipts[1].fee == 7 * 5678 // 1000 == 39
    assert receipts[3].fee == (999 * 1000 + 1 * 4000) // 1000 == 1003
    assert sorted(a.fee for a in receipts[3].adapters) == [501, 502]  # the odd unit: a tie broken by id
    assert receipts[3].amounts_by_recipient() == receipts[4].amounts_by_recipient()
    assert receipts[7].fee == base_fee(777, 333)
    assert receipts[7].amounts_by_recipient() == {w.operator: receipts[7].fee}
    assert receipts[9].fee == 12345 * 4000 // 1000
    # The example must exercise contributor ties: equal-weight contributors of "legal" that got
    # different amounts somewhere (the tie-break rule decided who got the odd unit).
    legal = [[p.amount for p in r.payouts if p.ref.endswith("/legal")] for r in receipts]
    assert any(len(set(a[i:i + 3])) > 1 for a in legal for i in range(0, len(a), 3))

    escrow0 = w.s.settlement.escrowOf(payer)
    total = sum(r.fee for r in receipts)
    assert settle(w.s, w.node.address, [authorize(w.s, w.payers[0], w.node.address, RICH)],
                  [charge_for(r, 0).as_tuple() for r in receipts]) == (len(receipts), total)

    expected = totals_by_recipient(p for r in receipts for p in r.payouts)
    assert claimables(w, w.accounts) == {a: expected.get(a, 0) for a in w.accounts}
    assert set(expected) <= set(w.accounts)
    assert w.s.settlement.escrowOf(payer) == escrow0 - total
    assert w.s.settlement.total_claimable() == total
    assert w.s.settlement.last_seq(w.node.address) == len(receipts)


@st.composite
def fee_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """Random datanets, adapters (prices, splits, datanet weights, owners) and usage events.
    Accounts are indices into the world's payees, resolved inside the test."""
    n_payees = 10  # the operator, 3 owners and 6 contributors; roles may overlap
    small = st.integers(1, 4)  # small weights: remainder ties are frequent
    datanets = []
    for _ in range(draw(st.integers(1, 3))):
        who = draw(st.lists(st.integers(0, n_payees - 1), min_size=1, max_size=4, unique=True))
        datanets.append([(i, draw(small)) for i in who])
    adapters = []
    for _ in range(draw(st.integers(1, 4))):
        price = st.one_of(st.integers(0, 1000), st.integers(0, 10**15))
        op = draw(st.integers(0, 10_000))
        own = draw(st.integers(0, 10_000 - op))
        uses = draw(st.lists(st.tuples(st.integers(0, len(datanets) - 1), small),
                             max_size=len(datanets), unique_by=lambda t: t[0]))
        data = 10_000 - op - own if uses else 0
        adapters.append({"owner": draw(st.integers(0, n_payees - 1)), "pp": draw(price), "pc": draw(price),
                         "split": (op, 10_000 - op - data, data), "uses": uses})
    weight = st.one_of(st.sampled_from([1.0, 0.5, 0.3, 0.2, 0.25, -1.0, 0.0]),
                       st.floats(-3, 3, allow_nan=False))
    events = []
    for _ in range(draw(st.integers(1, 4))):
        # len(adapters) stands for an adapter with no on-chain entry.
        picked = draw(st.lists(st.integers(0, len(adapters)), max_size=4, unique=True))
        events.append({"adapters": [(i, draw(weight)) for i in picked],
                       "prompt": draw(st.integers(0, 100_000)), "completion": draw(st.integers(0, 100_000)),
                       "status": draw(st.sampled_from(["finished", "finished", "aborted", "failed"]))})
    return {"node_prices": (draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))),
            "datanets": datanets, "adapters": adapters, "events": events}


@settings(max_examples=40, deadline=None)
@given(sc=fee_scenarios())
def test_settlement_matches_fee_rule_property(world: World, sc: dict[str, Any]) -> None:
    with boa.env.anchor():
        w, s = world, world.s
        pool = [a for a in w.payees if a != w.node.address]
        pp, pc = sc["node_prices"]
        s.nodes.update(w.node.address, node_info(pp, pc), sender=w.operator)
        base = DefaultPolicy(pp, pc).manifest_for(w.operator, BASE)
        ds = [dataset(f"p-ds{i}", [(pool[j], cw) for j, cw in d]) for i, d in enumerate(sc["datanets"])]
        manifests = {}
        for j, a in enumerate(sc["adapters"]):
            uses = [{**ds[i], "weight": dw} for i, dw in a["uses"]]
            manifests[f"p-ad{j}"] = m = manifest(pool[a["owner"]], a["pp"], a["pc"], a["split"], uses)
            register_manifest(s, f"p-ad{j}", m)
        names = [*manifests, "p-ghost"]
        payer = w.payers[1].address
        events = [usage([(names[i], x) for i, x in e["adapters"]], e["prompt"], e["completion"], payer,
                        e["status"]) for e in sc["events"]]

        expected: Counter = Counter()
        fees = []
        for ev in events:
            fee, _, _, payouts = compute_fee_lines(
                ev, [manifests.get(a.adapter_id, base) for a in ev.adapters], base, w.operator)
            fees.append(fee)
            expected += totals_by_recipient(payouts)
        # Charges straight from a real receipt chain (dummy signatures: the contract never sees them).
        wp = replace(w, manifests=manifests, base=base)
        version = s.nodes.get(w.node.address)[9]  # the price version `update` just made current
        charges = [charge_for(r, 0, version).as_tuple() for r in receipts_for(wp, events, signed=False)]
        auth = authorize(s, w.payers[1], w.node.address, RICH)
        assert settle(s, w.node.address, [auth], charges) == (len(events), sum(fees))
        assert claimables(w, pool) == {a: expected.get(a, 0) for a in pool}
        assert s.settlement.spent(auth.digest()) == sum(fees)


# --------------------------------------------------------------------------- 2. conservation

settle_op = st.tuples(
    st.just("settle"), st.integers(0, 1),
    st.lists(st.tuples(st.sampled_from(["", "pirate", "poet", "scribe", "chef", "ghost"]),
                       st.integers(0, 3000), st.integers(0, 3000)), min_size=1, max_size=3))
# The operator is credited by every charge: claim it half the time, so claims find credit.
claim_op = st.tuples(st.just("claim"), st.one_of(st.just(0), st.integers(0, 9)))
ops = st.lists(st.one_of(
    st.tuples(st.just("deposit"), st.integers(0, 1), st.integers(1, 50_000)),
    st.tuples(st.just("request"), st.integers(0, 1), st.integers(1, 60_000)),
    st.tuples(st.just("travel"), st.sampled_from([600, WITHDRAWAL_DELAY, WITHDRAWAL_DELAY + 1])),
    st.tuples(st.just("withdraw"), st.integers(0, 1)),
    settle_op, settle_op, claim_op, claim_op,
), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(initial=st.tuples(st.integers(1, 50_000), st.integers(1, 50_000)), steps=ops)
def test_escrow_and_credits_are_conserved(world: World, initial: tuple[int, int], steps: list[tuple]) -> None:
    with boa.env.anchor():
        w, s = world, world.s
        stl = s.settlement
        payers = w.thin[:2]
        auths = [authorize(s, p, w.node.address, RICH) for p in payers]
        payees = [a for a in w.payees if a != w.node.address]
        for p, amount in zip(payers, initial):
            fund(s, p.address, amount)
        escrow = list(initial)  # the model of the thin payers' escrow
        pending, unlock = [0, 0], [0, 0]
        deposited, withdrawn, seq = w.deposited + sum(initial), 0, 0
        for op, *args in steps:
            if op == "deposit":
                i, amount = args
                fund(s, payers[i].address, amount)
                escrow[i] += amount
                deposited += amount
            elif op == "request":
                i, amount = args
                if amount > escrow[i]:
                    with boa.reverts("settlement: amount exceeds escrow"):
                        stl.request_withdrawal(amount, sender=payers[i].address)
                    continue
                stl.request_withdrawal(amount, sender=payers[i].address)
                pending[i], unlock[i] = amount, now() + WITHDRAWAL_DELAY
            elif op == "travel":
                boa.env.time_travel(seconds=args[0])
            elif op == "withdraw":
                (i,) = args
                who = payers[i].address
                if pending[i] == 0:
                    with boa.reverts("settlement: no withdrawal requested"):
                        stl.withdraw(sender=who)
                    continue
                if now() < unlock[i]:
                    with boa.reverts("settlement: withdrawal still locked"):
                        stl.withdraw(sender=who)
                    continue
                before = s.token.balanceOf(who)
                amount = min(pending[i], escrow[i])  # charges meanwhile shrink the withdrawal
                assert stl.withdraw(sender=who) == amount
                assert s.token.balanceOf(who) - before == amount
                escrow[i] -= amount
                withdrawn += amount
                pending[i] = 0
            elif op == "settle":
                i, lines = args
                batch = []
                for name, p, c in lines:
                    seq += 1
                    batch.append(charge(seq, 0, p, c, [(name, PPM)] if name else []))
                n, total = settle(s, w.node.address, [auths[i]], batch)
                fees = _fees(w, lines)
                # Charges settle in order while the escrow lasts; the rest are skipped (reason 4).
                left, charged = escrow[i], 0
                for f in fees:
                    if f <= left:
                        left, charged = left - f, charged + f
                assert total == charged
                assert sorted(r for _, r in skipped(stl)) == [ESCROW] * (len(fees) - n)
                escrow[i] -= total
            else:
                who = payees[args[0]]
                owed = stl.claimable(who)
                if owed == 0:
                    with boa.reverts("settlement: nothing to claim"):
                        stl.claim(sender=who)
                    continue
                before = s.token.balanceOf(who)
                assert stl.claim(sender=who) == owed
                assert s.token.balanceOf(who) - before == owed and stl.claimable(who) == 0
            # Invariants, after every step.
            assert [stl.escrowOf(p.address) for p in payers] == escrow
            assert s.token.balanceOf(stl.address) == stl.total_escrow() + stl.total_claimable()
            # Payers are never payees here, so escrow is summed over payers, credits over payees.
            held = sum(stl.escrowOf(p.address) for p in w.payers + w.thin)
            credited = sum(stl.claimable(a) + stl.claimed(a) for a in payees)
            assert deposited - withdrawn == held + credited


def test_withdrawal_waits_and_shrinks_with_charges(w: World) -> None:
    s, stl, payer = w.s, w.s.settlement, w.thin[0]
    who = payer.address
    fund(s, who, 10_000)
    with boa.reverts("settlement: no withdrawal requested"):
        stl.withdraw(sender=who)
    with boa.reverts("settlement: amount exceeds escrow"):
        stl.request_withdrawal(10_001, sender=who)
    stl.request_withdrawal(8_000, sender=who)
    assert (stl.pending_withdrawal(who), stl.withdrawal_at(who)) == (8_000, now() + WITHDRAWAL_DELAY)
    assert stl.available(who) == 2_000 and stl.escrowOf(who) == 10_000
    boa.env.time_travel(seconds=WITHDRAWAL_DELAY - 1)
    with boa.reverts("settlement: withdrawal still locked"):
        stl.withdraw(sender=who)
    # The announced amount still backs charges until it is taken.
    assert settle(s, w.node.address, [authorize(s, payer, w.node.address, RICH)], [charge(1)]) == (1, 6912)
    boa.env.time_travel(seconds=1)
    before = s.token.balanceOf(who)
    assert stl.withdraw(sender=who) == 10_000 - 6912
    assert s.token.balanceOf(who) == before + 3088
    assert (stl.escrowOf(who), stl.pending_withdrawal(who)) == (0, 0)
    assert stl.total_escrow() == w.deposited
    with boa.reverts("settlement: no withdrawal requested"):
        stl.withdraw(sender=who)


def _fees(w: World, lines: list[tuple[str, int, int]]) -> list[int]:
    """The off-chain fee of each (adapter or "", prompt, completion) line."""
    out = []
    for name, p, c in lines:
        ev = usage([(name, 1.0)] if name else [], p, c, w.thin[0].address)
        out.append(compute_fee_lines(ev, [w.manifest_for(name)] if name else [], w.base, w.operator)[0])
    return out


# ---------------------------------------------------------------------- 3. no double settlement

def test_receipts_cannot_settle_twice(w: World) -> None:
    s, node = w.s, w.node.address
    auth = authorize(s, w.payers[0], node, RICH)
    first = [charge(1, prompt=1000, completion=1000), charge(2, prompt=2000, completion=0)]
    assert settle(s, node, [auth], first) == (2, 6912 + 2468)  # 1234 + 5678, then 2 * 1234
    owed = s.settlement.claimable(w.operator)
    assert owed == 6912 + 2468
    for batch, why in [(first, "replay"), ([charge(2)], "equal seq"), ([charge(1)], "lower seq"),
                       ([charge(4), charge(3)], "out of order"), ([charge(3), charge(3)], "duplicate")]:
        with boa.reverts("settlement: receipt already settled or out of order"):
            settle(s, node, [auth], batch)
        assert s.settlement.claimable(w.operator) == owed, why
    assert s.settlement.last_seq(node) == 2
    assert settle(s, node, [auth], [charge(3, prompt=0, completion=1000)]) == (1, 5678)
    assert s.settlement.claimable(w.operator) == owed + 5678


# ------------------------------------------------------------------------ 4. only active nodes

def test_inactive_nodes_cannot_settle(w: World) -> None:
    s, node = w.s, w.node.address
    stranger = Account.create()
    auth_stranger = authorize(s, w.payers[0], stranger.address, RICH)
    with boa.reverts("settlement: not an active node"):
        settle(s, stranger.address, [auth_stranger], [charge(1)])

    auth = authorize(s, w.payers[0], node, RICH)
    s.nodes.set_active(node, False, sender=w.operator)
    with boa.reverts("settlement: not an active node"):
        settle(s, node, [auth], [charge(1)])
    s.nodes.set_active(node, True, sender=w.operator)
    assert settle(s, node, [auth], [charge(1)]) == (1, 6912)

    s.nodes.unbond(node, 1, sender=w.operator)  # one base unit below min_stake
    assert not s.nodes.is_active(node)
    with boa.reverts("settlement: not an active node"):
        settle(s, node, [auth], [charge(2)])
    assert s.settlement.claimable(w.operator) == 6912


# -------------------------------------------------------------------------- 5. authorizations

def test_forged_or_misdirected_authorizations_revert(w: World) -> None:
    s, node = w.s, w.node.address
    payer, other = w.payers[0], Account.create()
    good = authorize(s, payer, node, 10**6)
    by_other = replace(authorize(s, other, node, 10**6), payer=payer.address)  # other key signed
    for forged in (by_other, replace(good, cap=10**9), replace(good, expiry=good.expiry + 1),
                   replace(good, nonce=2)):
        with boa.reverts("settlement: bad authorization signature"):
            settle(s, node, [forged], [charge(1)])
    elsewhere = authorize(s, payer, w.payers[1].address, 10**6)  # names another node
    with boa.reverts("settlement: authorization names another node"):
        settle(s, node, [elsewhere], [charge(1)])
    # A bad authorization fails the batch even when no charge uses it.
    with boa.reverts("settlement: bad authorization signature"):
        settle(s, node, [good, by_other], [charge(1)])
    assert settle(s, node, [good], [charge(1)]) == (1, 6912)


def test_expired_authorization_is_skipped_after_the_window(w: World) -> None:
    s, node, payer = w.s, w.node.address, w.payers[0]
    auth = authorize(s, payer, node, 10**6, expiry=now() + 100)
    escrow = s.settlement.escrowOf(payer.address)
    boa.env.time_travel(seconds=100 + SETTLEMENT_WINDOW)  # the last second of the window
    assert settle(s, node, [auth], [charge(1)]) == (1, 6912)
    boa.env.time_travel(seconds=1)
    assert settle(s, node, [auth], [charge(2), charge(3)]) == (0, 0)
    assert skipped(s.settlement) == [(2, EXPIRED), (3, EXPIRED)]
    assert s.settlement.escrowOf(payer.address) == escrow - 6912
    assert s.settlement.claimable(w.operator) == 6912
    assert s.settlement.spent(auth.digest()) == 6912
    assert s.settlement.last_seq(node) == 3  # skipped receipts are consumed, not retried


# ------------------------------------------------------------------------------ 6. cap, escrow

def test_cap_and_escrow_limits_skip_charges(w: World) -> None:
    s, node = w.s, w.node.address
    fee = 6912  # base-only, 1000 + 1000 tokens at 1234 / 5678
    auth = authorize(s, w.payers[0], node, fee * 5 // 2)
    assert settle(s, node, [auth], [charge(1), charge(2), charge(3)]) == (2, 2 * fee)
    assert skipped(s.settlement) == [(3, CAP)]
    assert s.settlement.spent(auth.digest()) == 2 * fee
    # What is left of the cap (fee / 2 = 3456) still pays a smaller charge: 0 + 608 tokens.
    assert settle(s, node, [auth], [charge(4, prompt=0, completion=608), charge(5, prompt=0, completion=1)]) \
        == (1, 608 * 5678 // 1000)
    assert skipped(s.settlement) == [(5, CAP)]
    assert s.settlement.spent(auth.digest()) == 2 * fee + 3452
    # A charge that fills the cap exactly (4 prompt tokens: 4936 // 1000 = 4) still settles.
    assert settle(s, node, [auth], [charge(6, prompt=4, completion=0)]) == (1, 4)
    assert s.settlement.spent(auth.digest()) == fee * 5 // 2

    thin = w.thin[0]
    fund(s, thin.address, fee - 1)
    auth_thin = authorize(s, thin, node, RICH)
    owed = s.settlement.claimable(w.operator)
    assert settle(s, node, [auth_thin], [charge(7), charge(8, prompt=1, completion=0)]) == (1, 1)
    assert skipped(s.settlement) == [(7, ESCROW)]
    assert s.settlement.escrowOf(thin.address) == fee - 2
    assert s.settlement.claimable(w.operator) == owed + 1
    assert s.settlement.spent(auth_thin.digest()) == 1


# ------------------------------------------------------------------------ 7. private adapters

def test_private_adapter_needs_the_allow_list(w: World) -> None:
    s, node, payer = w.s, w.node.address, w.payers[0]
    owner = Account.create()
    register_manifest(s, "secret", manifest(owner.address, 1000, 1000, (5000, 5000, 0), []))
    sid = name_id_bytes("secret")
    for call in (lambda who: s.adapters.set_visibility(sid, False, True, sender=who),
                 lambda who: s.adapters.set_allowed(sid, [payer.address], True, sender=who)):
        with boa.reverts("adapter: not the owner"):
            call(w.operator)
    s.adapters.set_visibility(sid, False, True, sender=owner.address)
    assert not s.adapters.can_use(sid, payer.address) and s.adapters.can_use(sid, owner.address)

    auth = authorize(s, payer, node, RICH)
    escrow = s.settlement.escrowOf(payer.address)
    mixed = [("secret", 500_000), ("pirate", 500_000)]  # one private adapter denies the whole charge
    batch = [charge(1, adapters=[("secret", PPM)]), charge(2, adapters=mixed)]
    assert settle(s, node, [auth], batch) == (0, 0)
    assert skipped(s.settlement) == [(1, ACCESS), (2, ACCESS)]
    assert s.settlement.escrowOf(payer.address) == escrow
    assert s.settlement.claimable(owner.address) == 0

    # The owner may always use its own adapter (2000 tokens at 1000 per 1k: 2000, split 50/50).
    fund(s, owner.address, 10**6)
    auth_owner = authorize(s, owner, node, RICH)
    assert settle(s, node, [auth_owner], [charge(3, adapters=[("secret", PPM)])]) == (1, 2000)
    assert s.settlement.claimable(owner.address) == 1000

    s.adapters.set_allowed(sid, [payer.address], True, sender=owner.address)
    assert settle(s, node, [auth], [charge(4, adapters=[("secret", PPM)])]) == (1, 2000)
    assert skipped(s.settlement) == []
    assert s.settlement.escrowOf(payer.address) == escrow - 2000
    assert s.settlement.claimable(owner.address) == 2000
    assert s.settlement.claimable(w.operator) == 2000

    s.adapters.set_allowed(sid, [payer.address], False, sender=owner.address)
    assert settle(s, node, [auth], [charge(5, adapters=[("secret", PPM)])]) == (0, 0)
    assert skipped(s.settlement) == [(5, ACCESS)]


# --------------------------------------------------------------------------- 8. stake, consent

def test_stake_unbonding_and_deregistration(w: World) -> None:
    s = w.s
    signer = Account.create()  # registers itself: no consent needed
    s.token.mint(signer.address, 3 * MIN_STAKE)
    s.token.approve(s.nodes.address, 2 * MIN_STAKE, sender=signer.address)
    held = s.token.balanceOf(s.nodes.address)
    s.nodes.register(signer.address, node_info(1, 2), 2 * MIN_STAKE, b"", sender=signer.address)
    assert s.token.balanceOf(s.nodes.address) == held + 2 * MIN_STAKE
    assert s.token.balanceOf(signer.address) == MIN_STAKE
    assert s.nodes.is_active(signer.address)

    s.nodes.unbond(signer.address, MIN_STAKE, sender=signer.address)
    assert s.nodes.is_active(signer.address)  # exactly min_stake left
    s.nodes.unbond(signer.address, 1, sender=signer.address)
    assert not s.nodes.is_active(signer.address)
    n = s.nodes.get(signer.address)
    assert (n.stake, n.unbonding, n.unbond_at) == (MIN_STAKE - 1, MIN_STAKE + 1, now() + UNBONDING_DELAY)
    boa.env.time_travel(seconds=UNBONDING_DELAY - 1)
    with reverts_raw(s.nodes, "node: still unbonding"):
        s.nodes.withdraw_unbonded(signer.address, sender=signer.address)
    with reverts_raw(s.nodes, "node: not the operator"):
        s.nodes.withdraw_unbonded(signer.address, sender=w.operator)
    boa.env.time_travel(seconds=1)
    s.nodes.withdraw_unbonded(signer.address, sender=signer.address)
    assert s.token.balanceOf(signer.address) == 2 * MIN_STAKE + 1
    with reverts_raw(s.nodes, "node: nothing unbonding"):
        s.nodes.withdraw_unbonded(signer.address, sender=signer.address)

    s.nodes.deregister(signer.address, sender=signer.address)
    n = s.nodes.get(signer.address)
    assert (n.stake, n.unbonding, n.active) == (0, MIN_STAKE - 1, False)
    assert not s.nodes.is_active(signer.address)
    boa.env.time_travel(seconds=UNBONDING_DELAY)
    s.nodes.withdraw_unbonded(signer.address, sender=signer.address)
    assert s.token.balanceOf(signer.address) == 3 * MIN_STAKE
    assert s.token.balanceOf(s.nodes.address) == held
    with reverts_raw(s.nodes, "node: deregistered"):  # deregistration is for good
        s.nodes.set_active(signer.address, True, sender=signer.address)


def test_price_changes_never_reprice_signed_receipts(w: World) -> None:
    """Receipts carry the node's base price version; `update` makes a new one."""
    s, node = w.s, w.node.address
    auth = authorize(s, w.payers[0], node, RICH)
    s.nodes.update(node, node_info(10**6, 10**6), sender=w.operator)  # version 2, 1000x dearer
    assert s.nodes.get(node)[9] == 2 and s.nodes.terms(node, 1)[1:] == (NODE_PP, NODE_PC)
    owed = s.settlement.claimable(w.operator)
    # Served at version 1 before the change: settles at version 1 prices, to the unit.
    assert settle(s, node, [auth], [charge(1, price_version=1), charge(2, price_version=2)]) == (
        2, base_fee(1000, 1000) + 2 * 10**6)
    assert s.settlement.claimable(w.operator) == owed + base_fee(1000, 1000) + 2 * 10**6
    with boa.reverts("node: no such price version"):
        settle(s, node, [auth], [charge(3, price_version=3)])
    s.nodes.update(node, node_info(10**6, 10**6, endpoint="http://10.0.0.1:1"), sender=w.operator)
    assert s.nodes.get(node)[9] == 2  # same prices: no new version


def test_an_authorization_that_never_expires(w: World) -> None:
    s, node = w.s, w.node.address
    auth = authorize(s, w.payers[0], node, RICH, expiry=2**256 - 1)
    boa.env.time_travel(seconds=10**9)
    assert settle(s, node, [auth], [charge(1)]) == (1, base_fee(1000, 1000))


def test_registering_another_signer_needs_its_consent(w: World) -> None:
    s, operator = w.s, boa.env.generate_address()
    signer, impostor = Account.create(), Account.create()
    info = node_info(10, 20)
    with boa.reverts("node: no consent from signer"):
        s.nodes.register(signer.address, info, 0, b"", sender=operator)
    for bad in (consent(impostor.key, s.nodes.address, s.chain_id, operator),  # wrong key
                consent(signer.key, s.nodes.address, s.chain_id, w.operator),  # another operator
                consent(signer.key, s.settlement.address, s.chain_id, operator)):  # another registry
        with boa.reverts("node: no consent from signer"):
            s.nodes.register(signer.address, info, 0, bad, sender=operator)
    s.nodes.register(signer.address, info, 0, consent(signer.key, s.nodes.address, s.chain_id, operator),
                     sender=operator)
    assert s.nodes.terms(signer.address, 1) == (operator, 10, 20)
    assert not s.nodes.is_active(signer.address)  # no stake yet
    with boa.reverts("node: already registered"):
        s.nodes.register(signer.address, info, 0, b"", sender=signer.address)

    registered = s.nodes.get(signer.address).last_heartbeat
    boa.env.time_travel(seconds=500)
    s.nodes.heartbeat(signer.address, sender=signer.address)
    assert s.nodes.get(signer.address).last_heartbeat == now() == registered + 500
    boa.env.time_travel(seconds=60)
    s.nodes.heartbeat(signer.address, sender=operator)
    assert s.nodes.get(signer.address).last_heartbeat == registered + 560
    with boa.reverts("node: not the node or operator"):
        s.nodes.heartbeat(signer.address, sender=w.operator)


# ------------------------------------------------------------------------------ 9. registries

def test_datanet_registry_rejects_bad_entries(w: World) -> None:
    dn, a, b = w.s.datanets, *w.contributors[:2]
    new = name_id_bytes("fresh")
    for contributors, msg in [([(a, 1), (b, 2), (a, 3)], "datanet: duplicate contributor"),
                              ([(a, 1), (b, 0)], "datanet: zero weight"),
                              ([], "datanet: no contributors"),
                              ([("0x" + "00" * 20, 1)], "datanet: zero contributor")]:
        with boa.reverts(msg):
            dn.register(new, b"\1" * 32, contributors)
    with boa.reverts("datanet: id taken"):
        dn.register(name_id_bytes("legal"), b"\1" * 32, [(a, 1)])
    with boa.reverts("datanet: empty id"):
        dn.register(b"\0" * 32, b"\1" * 32, [(a, 1)])
    count = dn.count()
    dn.register(new, b"\1" * 32, [(a, 1), (b, 2)])
    assert dn.count() == count + 1 and dn.contributors(new) == [(a, 1), (b, 2)]
    with boa.reverts("datanet: unknown"):
        dn.contributors(name_id_bytes("nowhere"))


def test_adapter_registry_rejects_bad_entries(w: World) -> None:
    ad = w.s.adapters
    legal, med = name_id_bytes("legal"), name_id_bytes("med")

    def register(split: tuple[int, int, int], datanets: list[tuple[bytes, int]], name: str = "fresh") -> None:
        ad.register(name_id_bytes(name), b"\1" * 32, b"\2" * 32, b"\3" * 32, 10, 20, *split, datanets, True,
                    sender=w.owners[0])

    for split, datanets, msg in [((2000, 5000, 2999), [(legal, 1)], "adapter: split must sum to 10000"),
                                 ((5000, 5000, 1), [(legal, 1)], "adapter: split must sum to 10000"),
                                 ((5000, 4000, 1000), [], "adapter: data share without datanets"),
                                 ((0, 0, 10000), [(name_id_bytes("nowhere"), 1)], "adapter: unknown datanet"),
                                 ((0, 0, 10000), [(legal, 1), (med, 0)], "adapter: zero datanet weight"),
                                 ((0, 0, 10000), [(legal, 1), (legal, 2)], "adapter: duplicate datanet")]:
        with boa.reverts(msg):
            register(split, datanets)
    with boa.reverts("adapter: id taken"):
        register((10000, 0, 0), [], name="pirate")
    register((10000, 0, 0), [])  # no data share: no datanets needed
    got = ad.get(name_id_bytes("fresh"))
    assert (got.owner, got.price_prompt, got.operator_bps, got.is_public, got.active) == \
        (w.owners[0], 10, 10000, True, True)


# ------------------------------------------------------------------------------- 10. claiming

EVIL_TOKEN = """
# pragma version ~=0.4.3
# An ERC-20-like token whose transfer() calls Settlement.claim() again, as the token itself.

interface ISettlement:
    def claim() -> uint256: nonpayable

balanceOf: public(HashMap[address, uint256])
settlement: public(address)
armed: bool
strict: bool
reentered: public(bool)

@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount

@external
def set_settlement(s: address):
    self.settlement = s

@external
def approve(spender: address, amount: uint256) -> bool:
    return True

@external
def transferFrom(src: address, dst: address, amount: uint256) -> bool:
    self.balanceOf[src] -= amount
    self.balanceOf[dst] += amount
    return True

@external
def transfer(dst: address, amount: uint256) -> bool:
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[dst] += amount
    if self.armed:
        self.armed = False
        if self.strict:
            extcall ISettlement(self.settlement).claim()  # a failure reverts the outer claim
        else:
            self.reentered = raw_call(self.settlement, method_id("claim()"), revert_on_failure=False)
    return True

@external
def attack(strict: bool) -> uint256:
    self.armed = True
    self.strict = strict
    return extcall ISettlement(self.settlement).claim()
"""


def test_reentrant_claim_pays_once(w: World) -> None:
    evil = boa.loads(EVIL_TOKEN)
    s = deploy(token=evil, min_stake=0)  # a second deployment, wired to the malicious token
    evil.set_settlement(s.settlement.address)
    node, payer = Account.create(), Account.create()
    register_node(s, node, node.address, 0, 0, stake=0)
    # The token contract is the only contributor of the only datanet of a 100%-data adapter.
    register_manifest(s, "bait", manifest(w.owners[0], 1000, 1000, (0, 0, 10000),
                                          [dataset("bait-ds", [(evil.address, 1)])]))
    fund(s, payer.address, 10**6)
    credit = 2000  # 1000 + 1000 tokens at 1000 per 1k, all of it data
    auth = authorize(s, payer, node.address, RICH)
    assert settle(s, node.address, [auth], [charge(1, adapters=[("bait", PPM)])]) == (1, credit)
    assert s.settlement.claimable(evil.address) == credit

    with boa.reverts():  # the nested claim fails; the strict token lets that failure revert it all
        evil.attack(True)
    assert s.settlement.claimable(evil.address) == credit
    assert evil.balanceOf(evil.address) == 0

    assert evil.attack(False) == credit  # the nested claim fails quietly; the outer one pays once
    assert not evil.reentered()
    assert evil.balanceOf(evil.address) == credit
    assert s.settlement.claimable(evil.address) == 0 and s.settlement.claimed(evil.address) == credit
    assert evil.balanceOf(s.settlement.address) == 10**6 - credit
    assert s.settlement.total_escrow() + s.settlement.total_claimable() == 10**6 - credit


def test_claim_moves_exactly_the_credit(w: World) -> None:
    s, node = w.s, w.node.address
    settle(s, node, [authorize(s, w.payers[0], node, RICH)], [charge(1, prompt=3000, completion=700)])
    owed = base_fee(3000, 700)
    assert owed == 7676
    before = s.token.balanceOf(w.operator)
    assert s.settlement.claim(sender=w.operator) == owed
    assert s.token.balanceOf(w.operator) == before + owed
    assert s.settlement.claimable(w.operator) == 0 and s.settlement.claimed(w.operator) == owed
    assert s.settlement.total_claimable() == 0
    with boa.reverts("settlement: nothing to claim"):
        s.settlement.claim(sender=w.operator)
    with boa.reverts("settlement: nothing to claim"):
        s.settlement.claim(sender=w.node.address)  # the signer earns nothing: the operator does


# ------------------------------------------------------------------------------------ 11. gas

def _settle_gas(n: int) -> int:
    """Gas of one `settle` with `n` three-adapter charges: execution plus intrinsic (21,000 and
    calldata). Each size gets its own fresh chain, so both start from the same state with cold
    storage (resetting the access counters inside an anchor would break the anchor)."""
    with boa.swap_env(boa.Env()):
        w = build_world()
        s, node = w.s, w.node.address
        mix = [("pirate", 500_000), ("poet", 300_000), ("scribe", 200_000)]
        args = (1, b"\7" * 32, [authorize(s, w.payers[0], node, RICH).as_tuple()],
                [charge(i + 1, prompt=1000 + i, completion=500 + i, adapters=mix) for i in range(n)], [])
        boa.env.reset_gas_used()
        assert s.settlement.settle(*args, sender=node)[0] == n
        execution = s.settlement._computation.get_gas_used()
        calldata = s.settlement.settle.prepare_calldata(*args)
    return execution + 21_000 + sum(16 if b else 4 for b in calldata)


def test_settlement_gas_per_charge_falls_with_batch_size() -> None:
    one, fifty = _settle_gas(1), _settle_gas(50)
    print(f"\nsettle gas: 1 charge {one}, 50 charges {fifty} ({fifty // 50} per charge)")
    assert fifty // 50 < one
    assert fifty < 30_000_000  # fits a block with room to spare
