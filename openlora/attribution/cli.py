"""`openlora ledger verify|balances|export|prove REQUEST_ID --ledger PATH`, and
`openlora ledger check-commitment RECEIPT.json --key KEY --exchange EXCHANGE.json` (no ledger needed:
anyone the client shows a receipt to can run it), and `openlora ledger explain RECEIPT_ID --answer FILE`
(span-level attribution re-run on an answer the caller kept: explain.py).

The main CLI wires these in with `add_ledger_commands(subparsers)`; each subcommand stores its
handler as `args.func`, which returns the process exit code. Output is JSON on stdout; `verify`
names the first bad receipt on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openlora.errors import InvalidRequest, OpenLoRAError


def _open(path: str):
    from openlora.attribution.ledger import Ledger

    if not Path(path).is_file():
        raise SystemExit(f"error: no ledger at {path}")
    return Ledger(path)


def _cmd_verify(args: argparse.Namespace) -> int:
    ledger = _open(args.ledger)
    try:
        bad = ledger.verify(node=args.node)
        if bad is not None:
            print(f"ledger verification FAILED at {bad}", file=sys.stderr)
            print(json.dumps({"ok": False, "seq": bad.seq, "request_id": bad.request_id,
                              "receipt_id": bad.receipt_hash, "reason": bad.reason}))
            return 1
        print(json.dumps({"ok": True, "receipts": len(ledger), "head": ledger.head()[1]}))
        return 0
    finally:
        ledger.close()


def _cmd_balances(args: argparse.Namespace) -> int:
    ledger = _open(args.ledger)
    try:
        print(json.dumps(ledger.balances(), indent=2))
        return 0
    finally:
        ledger.close()


def _cmd_export(args: argparse.Namespace) -> int:
    ledger = _open(args.ledger)
    try:
        if args.out in (None, "-"):
            ledger.export_jsonl(sys.stdout)
        else:
            with open(args.out, "w") as f:
                n = ledger.export_jsonl(f)
            print(json.dumps({"exported": n, "path": args.out}))
        return 0
    finally:
        ledger.close()


def _cmd_prove(args: argparse.Namespace) -> int:
    from openlora.attribution.epochs import EpochManager, verify_proof

    ledger = _open(args.ledger)
    try:
        try:
            proof = EpochManager(ledger).prove(args.request_id)
        except InvalidRequest as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        proof["verified"] = verify_proof(proof["receipt_id"], proof["proof"], proof["root"])
        print(json.dumps(proof, indent=2))
        return 0 if proof["verified"] else 1
    finally:
        ledger.close()


def check_commitment(receipt: dict, key: bytes, exchange: dict, node: str | None = None) -> str | None:
    """Whether a receipt (its public JSON) is signed and commits to `exchange` = {"input", "output"}
    under `key`. Returns the reason it does not, or None."""
    from openlora.attribution import commitment
    from openlora.attribution.receipts import Receipt, verify_receipt

    try:
        r = Receipt.from_dict(receipt)
    except Exception as e:  # missing or mistyped fields
        return f"not a receipt: {type(e).__name__}: {e}"
    if receipt.get("receipt_id") and receipt["receipt_id"] != r.receipt_hash:
        return f"receipt_id {receipt['receipt_id']} does not match its fields ({r.receipt_hash})"
    bad = verify_receipt(r, expected_node=node)
    if bad is not None:
        return bad
    if not r.commitment:
        return "the receipt carries no commitment (the request did not ask for one)"
    if not isinstance(exchange, dict) or "input" not in exchange or not isinstance(exchange.get("output"), list):
        return 'the exchange must be a JSON object {"input": ..., "output": [text, ...]}'
    if not commitment.verify(r.commitment, key, exchange["input"], exchange["output"]):
        return "the commitment does not match this key, input and output"
    return None


def _cmd_check_commitment(args: argparse.Namespace) -> int:
    from openlora.attribution import commitment

    try:
        receipt = json.loads(Path(args.receipt).read_text())
        exchange = json.loads(Path(args.exchange).read_text())
        key = commitment.parse_key(args.key)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reason = check_commitment(receipt, key, exchange, node=args.node)
    print(json.dumps({"ok": reason is None, "receipt_id": receipt.get("receipt_id"), "node": receipt.get("node"),
                      **({"reason": reason} if reason else {})}))
    return 0 if reason is None else 1


def _cmd_explain(args: argparse.Namespace) -> int:
    from openlora.attribution.explain import explain, read_answer
    from openlora.attribution.manifest import load_manifest

    ledger = _open(args.ledger)
    try:
        receipt = ledger.get(args.receipt) or ledger.get_by_request_id(args.receipt)
    finally:
        ledger.close()
    if receipt is None:
        print(f"error: no receipt {args.receipt} in {args.ledger}", file=sys.stderr)
        return 2
    from openlora.engine.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        manifests = {}
        for spec in args.adapter:
            name, _, folder = spec.partition("=")
            m = load_manifest(folder)
            if m is None:
                raise ValueError(f"{folder} holds no attribution.json")
            manifests[name] = m
        answer = read_answer(Path(args.answer), tokenizer)
    except (OSError, ValueError, OpenLoRAError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = explain(receipt, answer, manifests, tokenizer)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def add_ledger_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `ledger` command group to an argparse subparsers object; returns its parser."""
    ledger = subparsers.add_parser("ledger", help="inspect and verify the attribution ledger")
    sub = ledger.add_subparsers(dest="ledger_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ledger", required=True, metavar="PATH", help="SQLite ledger file")

    p = sub.add_parser("verify", help="re-check chain, hashes and signatures; exit 1 on the first bad receipt")
    common(p)
    p.add_argument("--node", default=None, help="require every receipt to be signed by this address")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("balances", help="total amount credited per address (JSON)")
    common(p)
    p.set_defaults(func=_cmd_balances)
    p = sub.add_parser("export", help="write every receipt as JSON lines")
    common(p)
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("prove", help="Merkle inclusion proof of a request's receipt in its epoch")
    common(p)
    p.add_argument("request_id")
    p.set_defaults(func=_cmd_prove)
    p = sub.add_parser("check-commitment",
                       help="check a receipt's signature and that it commits to an input and output (exit 1 if not)")
    p.add_argument("receipt", help="the receipt JSON (as GET /v1/receipts/ID returns it)")
    p.add_argument("--key", required=True, help="the commitment key from the response (0x + 64 hex)")
    p.add_argument("--exchange", required=True, metavar="FILE",
                   help='JSON {"input": prompt or messages as sent, "output": [generated text, ...]}')
    p.add_argument("--node", default=None, help="also require the receipt to be signed by this address")
    p.set_defaults(func=_cmd_check_commitment)
    p = sub.add_parser("explain", help="re-run span-level attribution on an answer you kept and check the "
                                       "receipt's credits and data payouts follow from it (exit 1 if not)")
    common(p)
    p.add_argument("receipt", help="receipt id (or request id)")
    p.add_argument("--answer", required=True, metavar="FILE",
                   help='the answer: its text, or JSON {"token_ids": [[...], ...]} per sample')
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter of the receipt and its folder (attribution.json + contributions); repeat")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="the base model's folder: its tokenizer indexes the datanets (and a text answer)")
    p.set_defaults(func=_cmd_explain)
    return ledger


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m openlora.attribution.cli ledger verify --ledger X`."""
    parser = argparse.ArgumentParser(prog="openlora")
    add_ledger_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
