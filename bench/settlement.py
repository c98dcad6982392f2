"""Settlement cost on a real anvil: gas per settled inference and per epoch as the batch grows,
and settlement throughput, against the peer design measured in the same run: one `settle`
transaction per inference (what a contract that pays each inference as it happens costs).

The receipts are real: signed by the node from usage events priced by the demo adapters'
manifests (one adapter each, two or three data contributors), the payer's authorization is a real
EIP-712 signature, and the contract prices and splits every charge from the registries.
Rounds alternate batched and per-inference settlement. Prints one JSON document.

    python bench/settlement.py [--sizes 1,10,100,1000] [--rounds 2] [--single 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from eth_account import Account

from openlora.attribution.identity import NodeIdentity
from openlora.attribution.manifest import DefaultPolicy, parse_manifest
from openlora.attribution.receipts import ZERO_HASH, build_receipt
from openlora.chain.anvil import DEV_KEYS, Anvil
from openlora.chain.authorization import sign_authorization
from openlora.chain.charges import charge_for
from openlora.chain.client import Chain
from openlora.chain.deploy import deploy
from openlora.chain.registry_sync import NodeProfile, ensure_node, register_demo_adapters
from openlora.chain.settler import MAX_CHARGES
from openlora.demo.manifests import ADAPTERS, manifest_for
from openlora.outputs import AdapterUsage, UsageEvent


class Bench:
    """A deployed system with one registered node, the demo adapters and a funded payer."""

    def __init__(self, rpc: str) -> None:
        dep = deploy(rpc, Account.from_key(DEV_KEYS[0]), local=True)
        dep.extra["faucet_key"] = DEV_KEYS[0]
        self.ident = NodeIdentity.create()
        self.node = Chain(dep, self.ident._account)
        ensure_node(self.node, NodeProfile(endpoint="http://127.0.0.1:1", region="ZZ", price_prompt=100,
                                           price_completion=300))
        self.manifests = {a.name: parse_manifest(manifest_for(a)) for a in ADAPTERS}
        register_demo_adapters(self.node, self.manifests)
        payer = Account.create()
        self.payer = Chain(dep, payer)
        from openlora.chain.cli import faucet

        faucet(self.node, payer.address, 10**24)
        s = self.payer.c["Settlement"]
        self.payer.send(self.payer.c["OpenToken"].functions.approve(s.address, 10**24))
        self.payer.send(s.functions.deposit(10**24))
        self.auth = sign_authorization(payer.key, self.node.address, 10**24, int(time.time()) + 86_400, 1,
                                       dep.chain_id, s.address)
        self.seq, self.head = 0, ZERO_HASH
        self.base = DefaultPolicy(100, 300).manifest_for(self.node.address, "bench")

    def receipts(self, n: int) -> list:
        """`n` signed receipts, cycling through the demo adapters."""
        out = []
        for i in range(n):
            a = ADAPTERS[(self.seq + i) % len(ADAPTERS)].name
            ev = UsageEvent(request_id=f"r{self.seq + 1}", tenant=self.auth.payer, base_model="bench",
                            base_model_hash="", adapters=(AdapterUsage(a, "", 1.0),), prompt_tokens=40 + i % 7,
                            cached_tokens=0, completion_tokens=64 + i % 11, status="finished", finish_reason="length")
            r = build_receipt(ev, seq=self.seq + 1, node=self.node.address, operator=self.node.address,
                              manifests=[self.manifests[a]], base_manifest=self.base, prev_hash=self.head,
                              sign=self.ident.sign)
            self.seq, self.head = r.seq, r.receipt_hash
            out.append(r)
        return out

    def settle(self, receipts: list) -> tuple[int, float]:
        """Settle an epoch's receipts in transactions of at most MAX_CHARGES, as the node's
        settler does; (gas used, seconds from the first send to the last mined receipt)."""
        gas, t0 = 0, time.perf_counter()
        for i in range(0, len(receipts), MAX_CHARGES):
            fn = self.node.c["Settlement"].functions.settle(
                1, b"\0" * 32, [self.auth.as_tuple()],
                [charge_for(r, 0).as_tuple() for r in receipts[i:i + MAX_CHARGES]])
            gas += self.node.send(fn)["gasUsed"]
        return gas, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,10,100,1000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--single", type=int, default=20, help="per-inference transactions per round (the peer)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    with Anvil() as node:
        b = Bench(node.rpc)
        b.settle(b.receipts(1))  # warm: first writes to every payee's slot cost more (cold storage)
        batched: dict[int, list[tuple[int, float]]] = {n: [] for n in sizes}
        single: list[tuple[int, float]] = []
        for _ in range(args.rounds):
            for n in sizes:
                batched[n].append(b.settle(b.receipts(n)))
                for _ in range(max(1, args.single // len(sizes))):  # the peer, interleaved
                    single.append(b.settle(b.receipts(1)))
        single_gas = statistics.median(g for g, _ in single)
        single_s = statistics.median(t for _, t in single)
        out = {"bench": "settlement", "chain": "anvil", "receipts_per_round": sizes, "rounds": args.rounds,
               "peer": "one settle transaction per inference", "max_charges_per_tx": MAX_CHARGES,
               "peer_gas_per_inference": single_gas, "peer_inferences_per_s": round(1 / single_s, 1), "batched": {}}
        for n in sizes:
            gas = statistics.median(g for g, _ in batched[n])
            secs = statistics.median(t for _, t in batched[n])
            out["batched"][str(n)] = {
                "gas_per_epoch": gas, "gas_per_inference": round(gas / n), "seconds": round(secs, 3),
                "inferences_per_s": round(n / secs, 1),
                "gas_ratio_vs_peer": round(single_gas / (gas / n), 2),
                "throughput_ratio_vs_peer": round((n / secs) / (1 / single_s), 2)}
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
