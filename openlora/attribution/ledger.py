"""Append-only, hash-chained receipt ledger in SQLite.

Durability: WAL journal with `synchronous=FULL`: a transaction's commit returns only after its WAL
frames are fsync'd, so a receipt whose `append` returned survives `kill -9` and power loss. A
crash mid-transaction leaves no trace of it (SQLite atomicity), so the chain is never half-written.

Integrity, enforced in the database itself (not just in Python):
* triggers abort every UPDATE and DELETE on `receipts` (append-only);
* an INSERT trigger aborts unless `seq` is last seq + 1 and `prev_hash` is the last row's hash;
* `request_id` is UNIQUE: `append` of a request already recorded returns the stored receipt
  (idempotent) instead of inserting a second one.

`verify()` re-checks everything from scratch (sequence numbers, chain links, canonical encoding,
every EIP-712 hash and every signature) and returns the first bad receipt. What a hash chain cannot
show on its own is a truncated tail; epoch Merkle roots published elsewhere (epochs.py, chain/)
cover that.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from openlora.attribution.receipts import ZERO_HASH, Receipt, verify_receipt
from openlora.errors import OpenLoRAError

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS receipts (
    seq          INTEGER PRIMARY KEY,     -- 1, 2, 3, ... (equals the signed receipt.seq)
    request_id   TEXT NOT NULL UNIQUE,
    receipt_hash TEXT NOT NULL UNIQUE,    -- EIP-712 digest, 0x-hex (the receipt id)
    prev_hash    TEXT NOT NULL,           -- previous row's receipt_hash (ZERO_HASH for seq 1)
    body         TEXT NOT NULL,           -- canonical JSON of the signed fields
    signature    TEXT NOT NULL            -- 0x-hex r||s||v
);
CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: UPDATE forbidden'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: DELETE forbidden'); END;
CREATE TRIGGER IF NOT EXISTS receipts_chain BEFORE INSERT ON receipts
WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM receipts)
  OR NEW.prev_hash IS NOT COALESCE(
       (SELECT receipt_hash FROM receipts ORDER BY seq DESC LIMIT 1), '{ZERO_HASH}')
BEGIN SELECT RAISE(ABORT, 'hash chain broken: seq or prev_hash does not follow the last row'); END;
"""

_COLS = "seq, request_id, receipt_hash, prev_hash, body, signature"


class LedgerError(OpenLoRAError):
    """The ledger refused a write (chain mismatch) or is corrupt."""


@dataclass(frozen=True)
class BadReceipt:
    """The first receipt that fails verification, and why."""

    seq: int
    request_id: str
    receipt_hash: str
    reason: str

    def __str__(self) -> str:
        return f"receipt seq={self.seq} request_id={self.request_id} id={self.receipt_hash}: {self.reason}"


class Ledger:
    """SQLite ledger. Thread-safe: one write connection behind a lock, one read connection per
    thread (WAL lets readers run while a commit is being fsync'd)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._wlock = threading.RLock()
        self._w = self._connect()
        with self._wlock:
            self._w.executescript(SCHEMA)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one explicit transaction per batch).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def ensure_schema(self, script: str) -> None:
        """Run an idempotent schema script (CREATE ... IF NOT EXISTS) on the write connection."""
        with self._wlock:
            self._w.executescript(script)

    def read_conn(self) -> sqlite3.Connection:
        """This thread's read connection (sees committed data only)."""
        return self._r()

    def _r(self) -> sqlite3.Connection:
        """This thread's read connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._wlock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        """Close all connections (the ledger object is unusable afterwards)."""
        with self._wlock:
            for c in self._readers:
                try:
                    c.close()
                except sqlite3.ProgrammingError:  # created in another thread; it dies with it
                    pass
            self._readers.clear()
            self._w.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the write connection, under the write lock."""
        with self._wlock:
            self._w.execute("BEGIN IMMEDIATE")
            try:
                yield self._w
            except BaseException:
                self._w.execute("ROLLBACK")
                raise
            self._w.execute("COMMIT")

    # ----------------------------------------------------------------------------------- writes

    def append(self, receipt: Receipt) -> Receipt:
        """Append one receipt (one durable commit). Idempotent on request_id."""
        return self.append_many([receipt])[0]

    def append_many(self, receipts: list[Receipt]) -> list[Receipt]:
        """Append receipts in one transaction (group commit). For each input returns the stored
        receipt: itself, or the one already recorded for its request_id. Raises LedgerError (and
        writes nothing) if a new receipt does not extend the chain."""
        out: list[Receipt] = []
        with self.transaction() as conn:
            for r in receipts:
                row = conn.execute(
                    f"SELECT {_COLS} FROM receipts WHERE request_id = ?", (r.request_id,)
                ).fetchone()
                if row is not None:
                    out.append(_row_to_receipt(row))
                    continue
                try:
                    conn.execute(
                        f"INSERT INTO receipts ({_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                        (r.seq, r.request_id, r.receipt_hash, r.prev_hash, r.canonical_body(), r.signature),
                    )
                except sqlite3.IntegrityError as e:
                    raise LedgerError(f"cannot append receipt {r.request_id!r} (seq {r.seq}): {e}") from e
                out.append(r)
        return out

    # ------------------------------------------------------------------------------------ reads

    def head(self) -> tuple[int, str]:
        """(last seq, last receipt hash); (0, ZERO_HASH) for an empty ledger."""
        row = self._r().execute(
            "SELECT seq, receipt_hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, ZERO_HASH)

    def __len__(self) -> int:
        return self._r().execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def get(self, key: str) -> Receipt | None:
        """A receipt by receipt id (0x-hash) or by request id; None if absent."""
        conn = self._r()
        row = conn.execute(f"SELECT {_COLS} FROM receipts WHERE receipt_hash = ?", (key,)).fetchone()
        if row is None:
            row = conn.execute(f"SELECT {_COLS} FROM receipts WHERE request_id = ?", (key,)).fetchone()
        return _row_to_receipt(row) if row else None

    def get_by_request_id(self, request_id: str) -> Receipt | None:
        """The receipt recorded for `request_id` (one indexed lookup); None if absent."""
        row = self._r().execute(
            f"SELECT {_COLS} FROM receipts WHERE request_id = ?", (request_id,)).fetchone()
        return _row_to_receipt(row) if row else None

    def iter(self, start_seq: int = 1, end_seq: int | None = None) -> Iterator[Receipt]:
        """Receipts in chain order (stored hashes are trusted here; use verify() to check)."""
        for row in self._rows(start_seq, end_seq):
            yield _row_to_receipt(row)

    def _rows(self, start_seq: int = 1, end_seq: int | None = None) -> Iterator[tuple]:
        # A dedicated connection: a long scan must not hold this thread's shared read cursor.
        conn = self._connect()
        try:
            q = f"SELECT {_COLS} FROM receipts WHERE seq >= ?"
            args: list[Any] = [start_seq]
            if end_seq is not None:
                q += " AND seq <= ?"
                args.append(end_seq)
            yield from conn.execute(q + " ORDER BY seq", args)
        finally:
            conn.close()

    def balances(self) -> dict[str, int]:
        """Total amount credited to each address over the whole ledger."""
        totals: dict[str, int] = {}
        for row in self._rows():
            for p in json.loads(row[4])["payouts"]:
                totals[p["recipient"]] = totals.get(p["recipient"], 0) + p["amount"]
        return dict(sorted(totals.items()))

    def export_jsonl(self, out: IO[str]) -> int:
        """Write every receipt as one JSON line (public form, with receipt_id and signature)."""
        n = 0
        for r in self.iter():
            out.write(json.dumps(r.to_dict(), sort_keys=True) + "\n")
            n += 1
        return n

    def verify(self, node: str | None = None) -> BadReceipt | None:
        """Re-check the whole ledger; return the first bad receipt or None if all are good.

        Checks per row: seq continuity, stored columns vs signed body, canonical encoding,
        prev_hash link, recomputed EIP-712 hash, amounts sum to the fee, signature recovers the
        receipt's node (and equals `node` when given).
        """
        prev_hash, expect_seq = ZERO_HASH, 1
        for row in self._rows():
            bad = _check_row(row, expect_seq, prev_hash, node)
            if bad is not None:
                if row[0] != expect_seq:  # a gap: deleted, or renumbered to a later seq?
                    moved = self._find_signed_seq(expect_seq, row[0])
                    if moved is not None:
                        return moved
                return BadReceipt(row[0], row[1], row[2], bad)
            prev_hash, expect_seq = row[2], expect_seq + 1
        return None

    def _find_signed_seq(self, signed_seq: int, after: int) -> BadReceipt | None:
        """A row stored under a later seq whose signed body says `signed_seq` (renumbered)."""
        for row in self._rows(after):
            try:
                if json.loads(row[4]).get("seq") == signed_seq:
                    return BadReceipt(row[0], row[1], row[2],
                                      f"signed seq {signed_seq} stored as row seq {row[0]} (renumbered)")
            except (ValueError, AttributeError):
                continue
        return None


def _row_to_receipt(row: tuple) -> Receipt:
    seq, request_id, receipt_hash, prev_hash, body, signature = row
    return Receipt.from_dict({**json.loads(body), "signature": signature}, receipt_hash=receipt_hash)


def _check_row(row: tuple, expect_seq: int, prev_hash: str, node: str | None) -> str | None:
    """Why one row is bad, or None."""
    seq, request_id, receipt_hash, row_prev, body, signature = row
    if not (isinstance(receipt_hash, str) and len(receipt_hash) == 66 and receipt_hash.startswith("0x")):
        return f"malformed receipt hash {receipt_hash!r}"
    if seq != expect_seq:
        return f"sequence gap: expected seq {expect_seq}, found {seq}"
    if row_prev != prev_hash:
        return f"prev_hash column {row_prev} does not link to previous receipt {prev_hash}"
    try:
        # The stored hash is carried along; verify_receipt recomputes it and compares.
        r = Receipt.from_dict({**json.loads(body), "signature": signature}, receipt_hash=receipt_hash)
    except Exception as e:  # unparsable or mistyped body
        return f"body does not decode: {e}"
    if r.canonical_body() != body:
        return "body is not in canonical form"
    if r.seq != seq:
        return f"signed seq {r.seq} differs from row seq {seq}"
    if r.request_id != request_id:
        return f"signed request_id {r.request_id!r} differs from column {request_id!r}"
    if r.prev_hash != prev_hash:
        return f"signed prev_hash {r.prev_hash} does not link to previous receipt {prev_hash}"
    return verify_receipt(r, expected_node=node)
