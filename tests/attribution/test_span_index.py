"""SpanIndex: span matching against a datanet's infini-gram index, checked against a brute-force search.

Datanets use the word-level tokenizer of tests/tiny_models.py (word "tN" is token N), so a text is
written as its token ids and every expected span can be worked out by hand.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import write_tokenizer
from transformers import PreTrainedTokenizerFast

from openlora.attribution import span_index as span_index_mod
from openlora.attribution.span_index import MARKER, SpanIndex, SpanIndexError, content_hash
from openlora.attribution.spans import blend, span_credits

A = "0xaaaa000000000000000000000000000000000001"
B = "0xbbbb000000000000000000000000000000000002"
C = "0xcccc000000000000000000000000000000000003"


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def load_tokenizer(path: Path, vocab: int = 256) -> PreTrainedTokenizerFast:
    write_tokenizer(path, vocab)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> PreTrainedTokenizerFast:
    return load_tokenizer(tmp_path_factory.mktemp("wordtok"))


# Three contributions over disjoint token ranges, plus one phrase (100..109) that both A and B hold.
SENT_A = list(range(10, 40))
SENT_B = list(range(40, 70))
SENT_C = list(range(70, 90))
SHARED = list(range(100, 110))
NOISE = list(range(200, 256))  # never in the datanet
DATANET = [(A, words(SENT_A + SHARED)), (B, words(SHARED + SENT_B)), (C, words(SENT_C))]


@pytest.fixture(scope="module")
def index(tok, tmp_path_factory) -> SpanIndex:
    # The path holds words the engine matches file names by ("table", "offset"): they must not confuse it.
    return SpanIndex.for_datanet(DATANET, tok, tmp_path_factory.mktemp("cache") / "table_offset")


def test_reproducing_a_contributors_sentence_credits_them_most(index):
    for sent, owner in ((SENT_A, A), (SENT_B, B), (SENT_C, C)):
        answer = NOISE[:3] + sent[2:14] + NOISE[3:5] + SENT_C[:5] + NOISE[5:7]
        spans = index.match(answer, min_span=4)
        credits = span_credits(spans)
        assert max(credits, key=credits.get) == owner
        assert (spans[0].start, spans[0].end, spans[0].contributors) == (3, 15, (owner,))


def test_an_answer_without_a_long_enough_span_gets_the_fixed_split(index):
    # Runs of 3 datanet tokens that never continue as in the datanet: no span of 4.
    answer = SENT_A[0:3] + SENT_B[5:8] + SENT_A[20:23] + NOISE[:4] + SENT_C[1:4]
    assert index.match(answer, min_span=4) == []
    assert len(index.match(answer, min_span=3)) == 4
    fixed = {A: 3, B: 1, C: 2}
    assert blend(fixed, span_credits(index.match(answer, min_span=4)), 900_000) == fixed
    assert index.match([], min_span=1) == [] and index.match(SENT_A[:3], min_span=4) == []


def test_a_span_in_two_contributors_texts_is_split_between_them(index):
    spans = index.match(NOISE[:2] + SHARED[:9] + NOISE[2:3], min_span=4)
    assert [(s.start, s.end, s.contributors, s.occurrences) for s in spans] == [(2, 11, (A, B), 2)]
    assert span_credits(spans) == {A: 5, B: 4}  # 9 tokens: the odd one to the smaller address


def test_spans_never_cross_two_contributions(index):
    # Canonical order puts A's text right before B's in the index: A ends with SHARED, B starts with it.
    answer = SHARED[-3:] + SHARED[:3]
    assert index.count(answer) == 0
    assert index.match(answer, min_span=4) == []
    assert [(s.start, s.end) for s in index.match(answer, min_span=2)] == [(0, 3), (3, 6)]
    # Ids that cannot be tokens (the u16 separator, negatives) match nothing and cut spans.
    cut = SENT_A[:5] + [0xFFFF] + SENT_A[5:10] + [-1] + SENT_A[10:12]
    assert [(s.start, s.end) for s in index.match(cut, min_span=2)] == [(0, 5), (6, 11), (12, 14)]


def test_content_hash_ignores_order_and_address_case():
    h = content_hash(DATANET)
    assert h.startswith("sha256:") and len(h) == 7 + 64
    assert content_hash(list(reversed(DATANET))) == h
    assert content_hash([(a.upper().replace("0X", "0x"), t) for a, t in DATANET]) == h
    assert content_hash(DATANET[:2] + [(C, words(SENT_C) + " ")]) != h
    assert content_hash([(A, "ab"), (B, "c")]) != content_hash([(A, "a"), (B, "bc")])


def test_the_index_is_reused_not_rebuilt(tok, tmp_path, monkeypatch):
    builds = []
    real = span_index_mod._run_builder
    monkeypatch.setattr(span_index_mod, "_run_builder", lambda *a: (builds.append(a), real(*a)))
    first = SpanIndex.for_datanet(DATANET, tok, tmp_path)
    stamp = {f.name: f.stat().st_mtime_ns for f in first.folder.iterdir()}
    again = SpanIndex.for_datanet(list(reversed(DATANET)), tok, tmp_path)
    assert len(builds) == 1 and again.folder == first.folder
    assert {f.name: f.stat().st_mtime_ns for f in again.folder.iterdir()} == stamp
    assert first.folder.parent.name == content_hash(DATANET).split(":")[1]
    assert not [p for p in first.folder.parent.iterdir() if ".build" in p.name or p.name.startswith(".")]
    info = json.loads((first.folder / MARKER).read_text())
    assert info["num_docs"] == 3 and info["num_tokens"] == 40 + 40 + 20 and info["token_width"] == 2
    assert 2 < first.bytes_per_token() < 100
    assert SpanIndex.open(first.folder).match(SENT_B[:6], min_span=4)[0].contributors == (B,)


def test_a_folder_of_another_datanet_or_of_other_files_is_refused(tok, tmp_path):
    SpanIndex.build(DATANET, tok, tmp_path / "x")
    with pytest.raises(SpanIndexError, match="another datanet"):
        SpanIndex.build(DATANET[:2], tok, tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(SpanIndexError, match="no complete span index"):
        SpanIndex.build(DATANET, tok, tmp_path / "y")
    with pytest.raises(ValueError):
        SpanIndex.build([], tok, tmp_path / "z")
    with pytest.raises(SpanIndexError):
        SpanIndex.open(tmp_path / "y")


_CONCURRENT = textwrap.dedent("""
    import sys
    import time
    from transformers import PreTrainedTokenizerFast
    from openlora.attribution import span_index as m
    real = m._run_builder
    m._run_builder = lambda *a: (print("BUILT", flush=True), time.sleep(1), real(*a))  # hold the lock a while
    tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
    texts = [" ".join(f"t{3 + (7 * i + j) % 250}" for j in range(2000)) for i in range(20)]
    idx = m.SpanIndex.for_datanet([(f"0x{i % 3:040x}", t) for i, t in enumerate(texts)], tok, sys.argv[2])
    print("FOLDER", idx.folder, idx.count([10, 11, 12]) > 0, flush=True)
""")


def test_concurrent_builds_of_one_datanet_end_with_one_valid_index(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    cmd = [sys.executable, "-c", _CONCURRENT, str(tmp_path / "tok"), str(tmp_path / "cache")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    stdout = "".join(o[0] for o in outs)
    assert stdout.count("BUILT") == 1
    folders = {line.split()[1] for line in stdout.splitlines() if line.startswith("FOLDER")}
    assert len(folders) == 1 and stdout.count("True") == 2
    folder = Path(folders.pop())
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]
    assert SpanIndex.open(folder).info.num_tokens == 20 * 2000


# -- against a brute-force reference -------------------------------------------------------------------

def reference_match(docs: list[tuple[str, list[int]]], answer: list[int], min_span: int):
    """The span definition in plain Python: substring search over each contribution's token bytes."""
    blobs = [(addr, bytes(ids)) for addr, ids in docs]  # every id < 256: one byte per token

    def holders(seq: list[int]) -> list[str]:
        b = bytes(seq) if all(0 <= t < 256 for t in seq) else None
        return [addr for addr, blob in blobs if b is not None and b in blob]

    def occurrences(seq: list[int]) -> int:
        b = bytes(seq)
        return sum(sum(blob.startswith(b, k) for k in range(len(blob))) for _, blob in blobs)

    out, i = [], 0
    while i < len(answer):
        j = i
        while j < len(answer) and holders(answer[i:j + 1]):
            j += 1
        if j - i >= min_span:
            out.append((i, j, tuple(sorted(set(holders(answer[i:j])))), occurrences(answer[i:j])))
            i = j
        else:
            i += 1
    return out


def random_datanet(rng: random.Random, vocab: range) -> list[tuple[str, list[int]]]:
    owners = [f"0x{rng.randrange(16 ** 40):040x}" for _ in range(rng.randint(1, 4))]
    docs = []
    for _ in range(rng.randint(1, 12)):
        ids = [rng.choice(vocab) for _ in range(rng.randint(0, 60))]
        if docs and rng.random() < 0.5:  # reuse a piece of an earlier text: spans with several holders
            src = rng.choice(docs)[1]
            k = rng.randrange(len(src) + 1)
            ids[k // 2:k // 2] = src[k:k + rng.randint(0, 15)]
        docs.append((rng.choice(owners), ids))
    return docs


def random_answer(rng: random.Random, docs, vocab: range) -> list[int]:
    ans: list[int] = []
    while len(ans) < rng.randint(0, 80):
        src = rng.choice(docs)[1]
        if src and rng.random() < 0.7:
            k = rng.randrange(len(src))
            ans += src[k:k + rng.randint(1, 20)]
        else:
            ans += [rng.choice([*vocab, 2, 250, 0xFFFF]) for _ in range(rng.randint(1, 4))]
    return ans


@pytest.mark.parametrize("vocab_size,seed", [(256, 0), (256, 1), (256, 2), (256, 3), (200, 4)])
def test_match_agrees_with_brute_force(vocab_size, seed, tmp_path):
    tok = load_tokenizer(tmp_path / "tok", vocab_size)
    rng = random.Random(seed)
    vocab = range(3, 3 + rng.choice([4, 8, 30]))  # few distinct words: many chance matches
    docs = random_datanet(rng, vocab)
    idx = SpanIndex.build([(a, words(ids)) for a, ids in docs], tok, tmp_path / "idx")
    assert idx.info.token_width == (1 if vocab_size <= 255 else 2)
    for _ in range(25):
        answer = random_answer(rng, docs, vocab)
        for min_span in (1, 2, 3, 5):
            got = [(s.start, s.end, s.contributors, s.occurrences)
                   for s in idx.match(answer, min_span=min_span, max_docs=10**6)]
            assert got == reference_match(docs, answer, min_span), (docs, answer, min_span)


def test_above_the_cap_a_sample_of_occurrences_is_inspected(tok, tmp_path):
    # The phrase occurs in 40 contributions of 40 owners; inspecting 8 occurrences names 8 of them.
    owners = [f"0x{i:040x}" for i in range(40)]
    idx = SpanIndex.build([(o, words([5, 6, 7, 8, 9 + i])) for i, o in enumerate(owners)], tok, tmp_path / "i")
    (full,) = idx.match([5, 6, 7, 8], min_span=2)
    (capped,) = idx.match([5, 6, 7, 8], min_span=2, max_docs=8)
    assert full.contributors == tuple(owners) and full.occurrences == capped.occurrences == 40
    assert len(capped.contributors) == 8 and set(capped.contributors) <= set(owners)
    assert idx.match([5, 6, 7, 8], min_span=2, max_docs=8) == [capped]  # deterministic
