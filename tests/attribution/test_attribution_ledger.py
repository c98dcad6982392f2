"""Ledger: append-only triggers, chain enforcement, idempotency, and tamper detection of every
field of every kind of stored receipt (triggers dropped with raw sqlite to let the tamper in)."""

from __future__ import annotations

import io
import json
import sqlite3

import pytest
from attr_helpers import ADDRS, event, manifest_dict

from openlora.attribution.ledger import Ledger, LedgerError
from openlora.attribution.receipts import ZERO_HASH


@pytest.fixture
def filled(make_service):
    """A service whose ledger holds 5 receipts of different shapes."""
    svc = make_service(manifests={"ad1": manifest_dict(), "ad2": manifest_dict(version="2")})
    svc.record(event(adapters=()))  # base only
    svc.record(event())  # one adapter with datasets
    svc.record(event(adapters=[("ad1", 0.3), ("ad2", 0.7)]))  # composition
    svc.record(event(status="aborted"))
    svc.record(event(adapters=[("unknown-adapter", 1.0)]))  # default policy
    assert svc.ledger.verify() is None
    return svc


def test_append_only_triggers(filled):
    conn = sqlite3.connect(filled.ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE receipts SET body = body WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM receipts WHERE seq = 5")
    conn.close()


def test_chain_enforced_by_database(filled):
    last = filled.ledger.get(filled.ledger.head()[1])
    conn = sqlite3.connect(filled.ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="chain"):
        conn.execute("INSERT INTO receipts VALUES (6, 'x', '0xab', ?, '{}', '0x')", (ZERO_HASH,))
    with pytest.raises(sqlite3.IntegrityError, match="chain"):
        conn.execute("INSERT INTO receipts VALUES (9, 'x', '0xab', ?, '{}', '0x')", (last.receipt_hash,))
    conn.close()


def test_append_idempotent_and_rejects_broken_link(filled, identity):
    ledger = filled.ledger
    first = ledger.get("req-" + ledger.get(ledger.head()[1]).request_id.split("-")[1])
    assert ledger.append(first) == first  # same request again: existing receipt, no new row
    assert len(ledger) == 5
    # Recording the same event again through the service returns the stored receipt.
    ev = event(request_id=first.request_id)
    assert filled.record(ev).receipt_hash == first.receipt_hash
    from dataclasses import replace
    stale = replace(first, request_id="new-one", seq=6, prev_hash=ZERO_HASH)
    with pytest.raises(LedgerError):
        ledger.append(stale)
    assert len(ledger) == 5


def _leaf_paths(obj, prefix=()):
    """Every scalar path inside a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaf_paths(v, prefix + (i,))
    else:
        yield prefix


def _mutate(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str) and len(value) == 42 and value.startswith("0x"):
        return ADDRS[7] if value != ADDRS[7] else ADDRS[6]  # another valid address
    if isinstance(value, str) and len(value) == 66 and value.startswith("0x"):
        return value[:-1] + ("0" if value[-1] != "0" else "1")  # another valid bytes32
    return value + "x"


def _tamper(path: str, sql: str, args: tuple) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER receipts_no_update")
    conn.execute("DROP TRIGGER receipts_chain")
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def _fresh_copy(src: Ledger, dst_path) -> Ledger:
    """A byte copy of the ledger (sqlite backup), so each tamper starts from a clean state."""
    dst = sqlite3.connect(dst_path)
    s = sqlite3.connect(src.path)
    s.backup(dst)
    s.close()
    dst.close()
    return Ledger(dst_path)


def test_tampering_any_body_field_is_detected_and_named(filled, tmp_path):
    copy_path = tmp_path / "t.db"
    led = _fresh_copy(filled.ledger, copy_path)
    raw = sqlite3.connect(copy_path)
    raw.execute("DROP TRIGGER receipts_no_update")
    rows = raw.execute("SELECT seq, request_id, body FROM receipts").fetchall()
    n = 0
    for seq, request_id, body in rows:
        for path in _leaf_paths(json.loads(body)):
            bad_doc = json.loads(body)
            obj = bad_doc
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = _mutate(obj[path[-1]])
            new_body = json.dumps(bad_doc, sort_keys=True, separators=(",", ":"))
            raw.execute("UPDATE receipts SET body = ? WHERE seq = ?", (new_body, seq))
            raw.commit()
            bad = led.verify()
            assert bad is not None, f"tampering {path} of seq {seq} went unnoticed"
            assert bad.seq == seq and bad.request_id == request_id, (path, bad)
            raw.execute("UPDATE receipts SET body = ? WHERE seq = ?", (body, seq))  # restore
            raw.commit()
            n += 1
    assert led.verify() is None  # restored: clean again
    raw.close()
    led.close()
    assert n > 60  # every field of every receipt shape was exercised


@pytest.mark.parametrize("column", ["request_id", "receipt_hash", "prev_hash", "body", "signature", "seq"])
@pytest.mark.parametrize("seq", [1, 3, 5])
def test_tampering_any_column_is_detected_and_named(filled, tmp_path, column, seq):
    copy_path = tmp_path / "c.db"
    _fresh_copy(filled.ledger, copy_path).close()
    conn = sqlite3.connect(copy_path)
    value = conn.execute(f"SELECT {column} FROM receipts WHERE seq = ?", (seq,)).fetchone()[0]
    conn.close()
    if column == "body":
        new = value.replace('"status":"', '"status":"X')
        if new == value:
            new = value + " "
    elif column == "signature":
        new = value[:10] + ("0" if value[10] != "0" else "1") + value[11:]
    elif column == "seq":
        new = value + 100
    else:
        new = _mutate(value)
    _tamper(str(copy_path), f"UPDATE receipts SET {column} = ? WHERE seq = ?", (new, seq))
    led = Ledger(copy_path)
    bad = led.verify()
    led.close()
    assert bad is not None and bad.seq in (seq, seq + 100), bad
    assert str(bad).startswith(f"receipt seq={bad.seq} request_id=")


def test_deleted_row_breaks_chain(filled, tmp_path):
    copy_path = tmp_path / "d.db"
    _fresh_copy(filled.ledger, copy_path).close()
    conn = sqlite3.connect(copy_path)
    conn.execute("DROP TRIGGER receipts_no_delete")
    conn.execute("DELETE FROM receipts WHERE seq = 2")
    conn.commit()
    conn.close()
    led = Ledger(copy_path)
    assert led.verify().seq == 3
    led.close()


def test_verify_rejects_foreign_signer(filled):
    assert filled.ledger.verify(node=ADDRS[5]).seq == 1
    assert filled.ledger.verify(node=filled.identity.address) is None


def test_balances_and_export(filled):
    receipts = list(filled.ledger.iter())
    assert [r.seq for r in receipts] == [1, 2, 3, 4, 5]
    bal = filled.ledger.balances()
    assert sum(bal.values()) == sum(r.fee for r in receipts)
    buf = io.StringIO()
    assert filled.ledger.export_jsonl(buf) == 5
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["receipt_id"] for x in lines] == [r.receipt_hash for r in receipts]
    assert lines[1]["prev_hash"] == lines[0]["receipt_id"]
