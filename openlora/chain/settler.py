"""Settlement worker: closed epochs of the node's ledger -> `Settlement.settle` transactions.

State, in the ledger's SQLite file beside the receipts (same durability):
* `chain_auths`: every payer authorization the node accepted (digest -> token);
* `chain_bindings`: request id -> authorization digest and the node's base price version,
  written *before* the request runs, so a crash between serving and settling loses nothing and a
  later price change never reprices it;
* `chain_settlements`: one row per settle transaction (epoch, tx hash, seq range, totals, skips).

Exactly-once: the contract keeps the node's last settled seq and refuses anything at or below it.
Each round reads that value from the chain and submits only the receipts after it, so a restart,
a timeout whose transaction did land, or a second `close` settles nothing twice. A chain that is
down or slow never blocks serving: rounds run on their own thread and retry with backoff
(1 s doubling to 60 s); receipts wait in the ledger meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from web3.logs import DISCARD as _DISCARD

from openlora.attribution.epochs import EpochManager
from openlora.attribution.ledger import Ledger
from openlora.chain.anvil import ChainError
from openlora.chain.authorization import TOKEN_PREFIX, Authorization, parse_token_unchecked
from openlora.chain.charges import charge_for, span_tuples
from openlora.chain.client import Chain

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS chain_auths (digest TEXT PRIMARY KEY, payer TEXT NOT NULL, token TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chain_bindings (request_id TEXT PRIMARY KEY, digest TEXT NOT NULL,
                                           price_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chain_settlements (
    id INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, tx TEXT NOT NULL, first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, charges INTEGER NOT NULL, settled INTEGER NOT NULL, total TEXT NOT NULL,
    skipped TEXT NOT NULL, gas INTEGER NOT NULL, at_ms INTEGER NOT NULL);
"""
MAX_CHARGES = 256  # Settlement.MAX_CHARGES (its calldata is copied to memory: the bound sets a fixed gas cost)
MAX_AUTHS = 64  # Settlement.MAX_AUTHS
HEARTBEAT_SECONDS = 900.0
SKIP_REASONS = {1: "expired", 2: "access", 3: "cap", 4: "escrow"}


@dataclass(frozen=True)
class BatchResult:
    """One settle transaction."""

    epoch: int
    tx: str
    first_seq: int
    last_seq: int
    charges: int
    settled: int
    total: int
    skipped: dict[int, str]  # seq -> reason
    gas: int

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "tx": self.tx, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "charges": self.charges, "settled": self.settled, "total": self.total,
                "skipped": {str(k): v for k, v in self.skipped.items()}, "gas": self.gas}


class Settler:
    """Binds requests to authorizations, closes epochs and settles them (see the module doc)."""

    def __init__(self, chain: Chain, ledger: Ledger, epochs: EpochManager) -> None:
        self.chain = chain
        self.ledger = ledger
        self.epochs = epochs
        ledger.ensure_schema(SCHEMA)
        # The NodeRegistry's current base price version: what this process's receipts are priced at.
        self.price_version = int(chain.c["NodeRegistry"].functions.get(chain.address).call()[9] or 1)
        self._round = threading.Lock()  # one settlement round at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------------------- bindings

    def bind(self, request_id: str, auth: Authorization) -> None:
        """Durably record that `request_id` is paid by `auth` (before the request runs)."""
        digest = "0x" + auth.digest().hex()
        with self.ledger.transaction() as c:
            c.execute("INSERT OR IGNORE INTO chain_auths VALUES (?, ?, ?)", (digest, auth.payer, auth.to_token()))
            c.execute("INSERT OR REPLACE INTO chain_bindings VALUES (?, ?, ?)",
                      (request_id, digest, self.price_version))

    def unsettled(self) -> list[tuple[Any, str, int]]:
        """(receipt, authorization digest, price version) for paid receipts after the chain's last
        settled seq."""
        last = self.chain.last_seq(self.chain.address)
        rows = self.ledger.read_conn().execute(
            "SELECT r.seq, b.digest, b.price_version FROM receipts r JOIN chain_bindings b "
            "ON b.request_id = r.request_id WHERE r.seq > ? ORDER BY r.seq", (last,)).fetchall()
        if not rows:
            return []
        bound = {seq: (d, v) for seq, d, v in rows}
        return [(r, *bound[r.seq]) for r in self.ledger.iter(rows[0][0], rows[-1][0]) if r.seq in bound]

    # ----------------------------------------------------------------------------- settlement

    def close_and_settle(self) -> dict[str, Any]:
        """Close the current epoch (if any receipt is waiting) and settle every paid receipt not
        yet on chain. Returns {"epoch", "batches": [...], "settled", "total", "pending"}."""
        with self._round:
            ep = self.epochs.close() or self.epochs.last()
            try:
                # Zero-fee receipts (free prices, failed requests) move no money: no gas for them.
                pending = [x for x in self.unsettled() if ep is not None and x[0].seq <= ep.last_seq
                           and x[0].fee > 0]
            except OSError as e:  # requests' ConnectionError and timeouts are OSErrors
                raise ChainError(f"chain unreachable at {self.chain.d.rpc}: {e}") from None
            batches = []
            while pending:
                batch, pending = _take_batch(pending)
                batches.append(self._settle(ep.epoch if ep else 0, ep.merkle_root if ep else "0x" + "00" * 32, batch))
            return {"epoch": ep.epoch if ep else None, "batches": [b.to_dict() for b in batches],
                    "settled": sum(b.settled for b in batches), "total": sum(b.total for b in batches)}

    def _settle(self, epoch: int, root: str, batch: list[tuple[Any, str, int]]) -> BatchResult:
        digests = list(dict.fromkeys(d for _, d, _ in batch))
        tokens = dict(self.ledger.read_conn().execute(
            f"SELECT digest, token FROM chain_auths WHERE digest IN ({','.join('?' * len(digests))})", digests))
        auths = [parse_token_unchecked(tokens[d].removeprefix(TOKEN_PREFIX)) for d in digests]
        index = {d: i for i, d in enumerate(digests)}
        charges = [charge_for(r, index[d], v) for r, d, v in batch]
        fn = self.chain.c["Settlement"].functions.settle(
            epoch, bytes.fromhex(root[2:]), [a.as_tuple() for a in auths], [c.as_tuple() for c in charges],
            span_tuples(charges))
        rc = self.chain.send(fn)
        s = self.chain.c["Settlement"].events
        settled = s.Settled().process_receipt(rc, errors=_DISCARD)[0]["args"]
        skipped = {e["args"]["seq"]: SKIP_REASONS.get(e["args"]["reason"], str(e["args"]["reason"]))
                   for e in s.ChargeSkipped().process_receipt(rc, errors=_DISCARD)}
        res = BatchResult(epoch, "0x" + bytes(rc["transactionHash"]).hex(), charges[0].seq, charges[-1].seq,
                          len(charges), settled["settled"], settled["total"], skipped, rc["gasUsed"])
        with self.ledger.transaction() as c:
            c.execute("INSERT INTO chain_settlements (epoch, tx, first_seq, last_seq, charges, settled, total, "
                      "skipped, gas, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (res.epoch, res.tx, res.first_seq, res.last_seq, res.charges, res.settled, str(res.total),
                       json.dumps(res.to_dict()["skipped"]), res.gas, int(time.time() * 1000)))
        log.info("settled epoch %d: %d/%d charges, %d base units, gas %d, tx %s", epoch, res.settled,
                 res.charges, res.total, res.gas, res.tx)
        return res

    def settlements(self) -> list[dict[str, Any]]:
        rows = self.ledger.read_conn().execute(
            "SELECT epoch, tx, first_seq, last_seq, charges, settled, total, skipped, gas FROM chain_settlements "
            "ORDER BY id").fetchall()
        return [{"epoch": e, "tx": t, "first_seq": f, "last_seq": last, "charges": c, "settled": s, "total": int(tot),
                 "skipped": json.loads(sk), "gas": g} for e, t, f, last, c, s, tot, sk, g in rows]

    # ------------------------------------------------------------------------------ the loop

    def start(self, epoch_seconds: float) -> None:
        """Close and settle every `epoch_seconds` on a daemon thread, retrying with backoff."""
        def loop() -> None:
            delay = epoch_seconds
            while not self._stop.wait(delay):
                try:
                    self.close_and_settle()
                    self.heartbeat()
                    self.last_error, delay = None, epoch_seconds
                except (ChainError, OSError, ValueError) as e:  # chain down or slow: try again soon
                    self.last_error = str(e)
                    delay = min(60.0, 1.0 if delay >= epoch_seconds else delay * 2)
                    log.warning("settlement failed (retrying in %.0f s): %s", delay, e)
                except Exception:
                    log.exception("settlement round failed")
                    delay = min(60.0, epoch_seconds)
        self._thread = threading.Thread(target=loop, name="settlement", daemon=True)
        self._thread.start()

    def heartbeat(self, every: float = HEARTBEAT_SECONDS) -> bool:
        """Tell the NodeRegistry this node is alive, at most once per `every` seconds of chain time
        (the gateway reads `last_heartbeat`). Returns True if a transaction was sent."""
        reg = self.chain.c["NodeRegistry"].functions
        last = reg.get(self.chain.address).call()[6]
        now = self.chain.w3.eth.get_block("latest")["timestamp"]
        if now - last < every:
            return False
        self.chain.send(reg.heartbeat(self.chain.address))
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _take_batch(pending: list) -> tuple[list, list]:
    """The longest prefix within the contract's limits on charges and distinct authorizations."""
    seen: set[str] = set()
    for i, (_, d, _) in enumerate(pending):
        if i == MAX_CHARGES or (d not in seen and len(seen) == MAX_AUTHS):
            return pending[:i], pending[i:]
        seen.add(d)
    return pending, []



