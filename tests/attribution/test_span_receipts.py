"""Span-level attribution through the attribution service, on a synthetic datanet (the tiny word-level
tokenizer: words t3..t255 are ids 3..255): an answer reproducing contributor A's sentence gives A the
largest data share, B's gives B's; an answer without a span of min_span tokens gets exactly the fixed
split; a span two contributions share is split; amounts sum exactly; receipts verify (the fast encoder
equals eth-account's); a request can opt out; no text reaches the ledger."""

from __future__ import annotations

from dataclasses import replace

import pytest
from attr_helpers import BASE, C1, C2, C3, OWNER, event
from eth_account.messages import encode_typed_data
from tiny_models import write_tokenizer
from transformers import AutoTokenizer

from openlora.attribution import eip712
from openlora.attribution.receipts import Receipt, verify_receipt
from openlora.attribution.span_service import SpanAttributor
from openlora.attribution.splits import split_exact

A_TEXT = "t10 t11 t12 t13 t14 t15 t16 t17 t18 t19 t20"
B_TEXT = "t40 t41 t42 t43 t44 t45 t46 t47 t48 t49"
SHARED = "t90 t91 t92 t93 t94 t95 t96 t97 t98"  # in both B's and C's second texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def _manifest(**spans) -> dict:
    contributions = [{"contributor": C1, "text": A_TEXT}, {"contributor": C2, "text": B_TEXT},
                     {"contributor": C2, "text": "t5 t6 " + SHARED}, {"contributor": C3, "text": SHARED + " t7"}]
    m = {"owner": OWNER, "version": "1", "base_model": BASE,
         "datasets": [{"id": "net", "contributors": [{"address": C1, "weight": 1}, {"address": C2, "weight": 1},
                                                      {"address": C3, "weight": 2}],
                       "contributions": contributions}],
         "price_per_1k_prompt_tokens": 1000, "price_per_1k_completion_tokens": 4000,
         "split": {"operator": 2000, "owner": 5000, "data": 3000}}
    if spans:
        m["span_attribution"] = spans
    return m


@pytest.fixture
def service(make_service, tokenizer, tmp_path):
    svc = make_service(manifests={})
    svc.spans = SpanAttributor(tokenizer, tmp_path / "idx")
    m = svc.register_manifest("ad1", _manifest(min_span=6))
    assert svc.spans.wait_ready(m, timeout=120)
    return svc


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _data(receipt: Receipt) -> dict[str, int]:
    return {p.recipient: p.amount for p in receipt.payouts if p.role == "data"}


def _answer(service, tokenizer, text: str, spans: bool = True) -> tuple[Receipt, list | None]:
    ev = replace(event(completion=4000), output_token_ids=(_ids(tokenizer, text),))
    receipt, outcome = service.record_attributed(ev, spans=spans)
    return receipt, (outcome.spans if outcome is not None else None)


def test_reproducing_a_contributors_text_gives_them_the_largest_share(service, tokenizer):
    ra, spans_a = _answer(service, tokenizer, "t3 t4 " + A_TEXT + " t5")
    rb, _ = _answer(service, tokenizer, B_TEXT + " t250")
    for r, top in ((ra, C1), (rb, C2)):
        data = _data(r)
        assert max(data, key=data.get) == top, data
        assert sum(p.amount for p in r.payouts) == r.fee
        assert r.span_method.startswith("infini-gram;ad1:min_span=6,lambda_ppm=")
        assert verify_receipt(r) is None
        assert eip712.encode(r.typed_data()) == encode_typed_data(full_message=r.typed_data())
    credits = {c.contributor: c.credit for c in ra.credits}
    assert credits == {C1: 11, C2: 0, C3: 0}  # every contributor of the dataset is recorded
    assert spans_a == [{"sample": 0, "start": 2, "end": 13, "adapter": "ad1", "dataset": "net",
                        "contributors": [C1.lower()]}]
    assert Receipt.from_dict(ra.to_dict()) == ra  # the credits round-trip through the JSON form


def test_no_span_gives_exactly_the_fixed_split(service, tokenizer):
    short, _ = _answer(service, tokenizer, "t10 t11 t12 t13 t14 t200 t40 t41")  # 5 tokens of A: under min_span
    fixed, none = _answer(service, tokenizer, "t10 t11 t12 t13 t14 t200 t40 t41", spans=False)
    assert none is None and fixed.span_method == "" and "credits" not in fixed.body()
    assert _data(short) == _data(fixed)
    assert {c.credit for c in short.credits} == {0}
    total = sum(_data(fixed).values())
    want = split_exact(total, [1, 1, 2], [C1.lower(), C2.lower(), C3.lower()])  # the manifest's weights
    assert _data(fixed) == dict(zip((C1, C2, C3), want))


def test_a_span_in_two_contributions_is_split(service, tokenizer):
    r, spans = _answer(service, tokenizer, SHARED)
    assert spans[0]["contributors"] == sorted([C2.lower(), C3.lower()])
    credits = {c.contributor: c.credit for c in r.credits}
    assert credits[C1] == 0 and credits[C2] + credits[C3] == 9 and abs(credits[C2] - credits[C3]) == 1


def test_lambda_zero_keeps_the_fixed_weights_and_one_follows_the_spans(make_service, tokenizer, tmp_path):
    svc = make_service(manifests={})
    svc.spans = SpanAttributor(tokenizer, tmp_path / "idx")
    for name, lam in (("zero", 0), ("one", 1)):
        m = svc.register_manifest(name, _manifest(min_span=6, **{"lambda": lam}))
        assert svc.spans.wait_ready(m, timeout=120)
    ev = event(adapters=(("zero", 1.0),), completion=4000)
    ids = (_ids(tokenizer, A_TEXT),)
    zero, _ = svc.record_attributed(replace(ev, output_token_ids=ids))
    fixed, _ = svc.record_attributed(replace(ev, request_id="fixed"), spans=False)
    assert _data(zero) == _data(fixed)
    one, _ = svc.record_attributed(replace(event(adapters=(("one", 1.0),), completion=4000), output_token_ids=ids))
    assert _data(one)[C1] == sum(_data(one).values())  # all of it follows the spans


def test_no_text_reaches_the_ledger(service, tokenizer, tmp_path):
    _answer(service, tokenizer, A_TEXT)
    service.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("ledger*"))
    for text in (A_TEXT, B_TEXT, SHARED, "t10 t11"):
        assert text.encode() not in raw


def test_explain_recomputes_the_credits_from_a_kept_answer(service, tokenizer, tmp_path, capsys):
    """`openlora ledger explain`: the answer the caller kept gives the receipt's credits and data payouts
    (exit 0); another answer does not (exit 1)."""
    import json

    from openlora.attribution.cli import main

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    folder = tmp_path / "ad1"
    folder.mkdir()
    (folder / "attribution.json").write_text(json.dumps(_manifest(min_span=6)))
    receipt, _ = _answer(service, tokenizer, "t3 t4 " + A_TEXT + " t5 " + SHARED)
    service.close()
    ledger = next(tmp_path.glob("ledger*"))
    for text, code in (("t3 t4 " + A_TEXT + " t5 " + SHARED, 0), (B_TEXT, 1)):
        (tmp_path / "answer.txt").write_text(text)
        rc = main(["ledger", "explain", "--ledger", str(ledger), receipt.receipt_hash, "--answer",
                   str(tmp_path / "answer.txt"), "--adapter", f"ad1={folder}", "--tokenizer", str(tmp_path / "tok")])
        out = json.loads(capsys.readouterr().out)
        assert rc == code and out["ok"] is (code == 0), out
    ids = {"token_ids": [list(_ids(tokenizer, "t3 t4 " + A_TEXT + " t5 " + SHARED))]}
    (tmp_path / "answer.json").write_text(json.dumps(ids))
    assert main(["ledger", "explain", "--ledger", str(ledger), receipt.receipt_hash, "--answer",
                 str(tmp_path / "answer.json"), "--adapter", f"ad1={folder}", "--tokenizer",
                 str(tmp_path / "tok")]) == 0
