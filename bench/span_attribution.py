"""Span-level attribution: time per answer against answer length and datanet size, index size and build
time, and the chance-match rates behind DEFAULT_MIN_SPAN.

Tokenizer: the demo model's (SmolLM2-135M-Instruct, 49,152 tokens). Datanets: the first N tokens of the
Python standard library's source files, then site-packages' (the stdlib holds 8.9M tokens), one
contribution per file, 16 contributors in turn, for N = 10^4, 10^5, 10^6 and 10^7 (a size is skipped
when the previous build predicts more than --max-build-s).
Answers of L = 16, 64, 256, 1024 tokens: half reproduced (copied from the datanet in pieces of up to 256
tokens from random files), half unrelated (windows of the demo chat data, openlora/demo/data). Every
round times every answer once (`match` + `span_credits`), the two kinds alternating which goes first;
medians over rounds and answers; `*_queries` counts the engine's `find` calls per answer (unlike time,
independent of what else runs on the machine); `*_covered` is the share of answer tokens in spans.
Build time is the whole `SpanIndex.build` (tokenize, write, suffix array by infini-gram's builder,
read-back check); `suffix_array_s` is the builder alone.

Chance matches: how often a random k-token window of unrelated English is found verbatim in a datanet.
Datanet: ~10^5 tokens of English prose (Python's reference docs, `pydoc_data.topics`). Probe sets: the
legal and pirate demo chat answers; docstrings of the first 600 stdlib files (same domain as the
datanet: an upper bound); the license texts of /usr/share/common-licenses where the system has them.
The stdlib datanets are probed with the chat answers too, to show how chance grows with size.

Run: python bench/span_attribution.py [--rounds 3] [--answers 4] [--max-build-s 120]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_root, emit  # noqa: E402

from openlora.attribution import span_index as span_index_mod  # noqa: E402
from openlora.attribution.span_index import DEFAULT_MAX_DOCS, SpanIndex  # noqa: E402
from openlora.attribution.spans import DEFAULT_LAMBDA_PPM, DEFAULT_MIN_SPAN, span_credits  # noqa: E402

SIZES = (10**4, 10**5, 10**6, 10**7)
LENGTHS = (16, 64, 256, 1024)
CONTRIBUTORS = [f"0x{i + 1:040x}" for i in range(16)]
CHANCE_KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16)


def demo_tokenizer():
    from transformers import AutoTokenizer

    from openlora.demo import ensure_demo_model

    return AutoTokenizer.from_pretrained(ensure_demo_model())


def stdlib_files() -> list[Path]:
    """The standard library's .py files in path order (no site-packages; pydoc_data is the prose set)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "pydoc_data" not in p.parts and p.is_file())


def corpus_files() -> list[Path]:
    """Datanet sources: the stdlib's files, then this environment's site-packages (past 8.9M stdlib tokens)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    return stdlib_files() + sorted(p for p in purelib.rglob("*.py") if p.is_file())


def tokenize_until(tok, files: list[Path], need: int) -> tuple[list[str], list[np.ndarray]]:
    """Texts and token ids of the first files whose tokens add up to at least `need`."""
    texts, ids, total = [], [], 0
    for k in range(0, len(files), 64):
        batch = [f.read_text(errors="replace") for f in files[k:k + 64]]
        for text, x in zip(batch, tok(batch, add_special_tokens=False)["input_ids"]):
            texts.append(text)
            ids.append(np.asarray(x, dtype=np.int64))
            total += len(x)
            if total >= need:
                return texts, ids
    return texts, ids


def demo_answers(tok, names: tuple[str, ...]) -> list[list[int]]:
    """Token ids of each assistant answer in the named demo chat files."""
    from openlora.demo import DATA_DIR

    texts = [json.loads(line)["assistant"] for n in names
             for line in (DATA_DIR / f"{n}.jsonl").read_text().splitlines() if line.strip()]
    return tok(texts, add_special_tokens=False)["input_ids"]


def docstrings(files: list[Path], min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings of at least `min_chars` characters."""
    out = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                d = ast.get_docstring(node)
                if d and len(d) >= min_chars:
                    out.append(d)
    return out


def probe_sets(tok) -> dict[str, list[list[int]]]:
    """Unrelated English, tokenized: name -> token ids per text."""
    same_domain = tok(docstrings(stdlib_files()[:600]), add_special_tokens=False)["input_ids"]
    sets = {"demo_chat_legal_pirate": demo_answers(tok, ("legal", "pirate")),
            "stdlib_docstrings_same_domain": same_domain}
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        texts = [p.read_text(errors="replace") for p in sorted(lic.iterdir()) if p.is_file() and not p.is_symlink()]
        sets["common_licenses"] = tok(texts, add_special_tokens=False)["input_ids"]
    return sets


def chance_rates(idx: SpanIndex, probes: list[list[int]], ks=CHANCE_KS, n: int = 2000, seed: int = 0) -> dict:
    """k -> share of `n` random k-token windows of `probes` that occur in the index."""
    rng = random.Random(seed)
    out = {}
    for k in ks:
        pool = [p for p in probes if len(p) >= k]
        hits = 0
        for _ in range(n):
            p = rng.choice(pool)
            s = rng.randrange(len(p) - k + 1)
            hits += idx.count(p[s:s + k]) > 0
        out[str(k)] = round(hits / n, 4)
    return out


def smallest_under(rates: dict, threshold: float = 0.01) -> int | None:
    return next((int(k) for k, r in rates.items() if r < threshold), None)


def build_timed(contribs, tok, folder: Path) -> tuple[SpanIndex, float, float]:
    """(index, whole build seconds, suffix-array builder seconds), always built afresh."""
    shutil.rmtree(folder, ignore_errors=True)
    real, took = span_index_mod._run_builder, []

    def timed(*a):
        t = time.perf_counter()
        real(*a)
        took.append(time.perf_counter() - t)

    span_index_mod._run_builder = timed
    try:
        t = time.perf_counter()
        idx = SpanIndex.build(contribs, tok, folder)
        return idx, time.perf_counter() - t, took[0]
    finally:
        span_index_mod._run_builder = real


def make_answers(rng: random.Random, docs: list[np.ndarray], unrelated: list[int], length: int, n: int):
    reproduced = []
    for _ in range(n):
        ans: list[int] = []
        while len(ans) < length:
            d = rng.choice([d for d in docs if len(d)])
            piece = min(256, length - len(ans), len(d))
            s = rng.randrange(len(d) - piece + 1)
            ans += d[s:s + piece].tolist()
        reproduced.append(ans)
    other = []
    for _ in range(n):
        s = rng.randrange(len(unrelated) - length + 1)
        other.append(unrelated[s:s + length])
    return {"reproduced": reproduced, "unrelated": other}


def time_answers(idx: SpanIndex, answers: dict, rounds: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in answers}
    covered: dict[str, list[float]] = {k: [] for k in answers}
    queries: dict[str, list[int]] = {k: [] for k in answers}  # engine calls: independent of machine load
    for r in range(rounds):
        for kind in (list(answers) if r % 2 == 0 else list(reversed(answers))):
            for ans in answers[kind]:
                q0, t = idx.queries, time.perf_counter()
                spans = idx.match(ans)
                span_credits(spans)
                times[kind].append(time.perf_counter() - t)
                if r == 0:
                    covered[kind].append(sum(s.length for s in spans) / len(ans))
                    queries[kind].append(idx.queries - q0)
    out = {f"{k}_ms": round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    out["all_ms"] = round(statistics.median([x for v in times.values() for x in v]) * 1e3, 2)
    out.update({f"{k}_queries": statistics.median(v) for k, v in queries.items()})
    out.update({f"{k}_covered": round(statistics.mean(v), 3) for k, v in covered.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answers", type=int, default=4, help="answers of each kind per length")
    ap.add_argument("--max-build-s", type=float, default=120.0)
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    work = bench_root() / "span_attribution"
    tok = demo_tokenizer()
    english = demo_answers(tok, ("legal", "pirate"))
    unrelated = [t for a in demo_answers(tok, ("legal", "pirate", "french", "json")) for t in a]
    result: dict = {
        "bench": "span_attribution",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "tokenizer": "SmolLM2-135M-Instruct (demo model), 49,152 tokens",
        "min_span": DEFAULT_MIN_SPAN, "max_docs": DEFAULT_MAX_DOCS, "lambda_ppm": DEFAULT_LAMBDA_PPM,
        "answers_per_kind": args.answers, "rounds": args.rounds, "datanets": [], "skipped": [],
    }

    # Chance matches on English prose (what DEFAULT_MIN_SPAN's comment quotes).
    import pydoc_data.topics as topics

    prose = [(CONTRIBUTORS[i % 16], topics.topics[k]) for i, k in enumerate(sorted(topics.topics))]
    idx, _, _ = build_timed(prose, tok, work / "prose")
    by_set = {}
    for name, probes in probe_sets(tok).items():
        rates = chance_rates(idx, probes)
        by_set[name] = {"tokens": sum(map(len, probes)), "rate_by_k": rates,
                        "smallest_k_under_1pct": smallest_under(rates)}
    result["chance_matches"] = {
        "datanet": f"pydoc_data.topics (English reference prose), {idx.info.num_tokens} tokens",
        "probes": "2000 random k-token windows per k and probe set", "by_probe_set": by_set,
    }

    t = time.perf_counter()
    texts, docs = tokenize_until(tok, corpus_files(), max(sizes))
    result["corpus_tokenize_s"] = round(time.perf_counter() - t, 1)
    rng = random.Random(0)
    for n in sizes:
        ends = np.cumsum([len(d) for d in docs])
        k = int(np.searchsorted(ends, n)) + 1
        if ends[-1] < n:
            result["skipped"].append({"tokens": n, "why": f"the corpus holds only {int(ends[-1])} tokens"})
            continue
        prev = result["datanets"][-1] if result["datanets"] else None
        if prev and prev["build_s"] * n / prev["tokens"] > args.max_build_s:
            result["skipped"].append({"tokens": n, "why": f"predicted build {prev['build_s'] * n / prev['tokens']:.0f}"
                                                          f" s > {args.max_build_s:.0f} s from the {prev['tokens']}"
                                                          "-token build"})
            continue
        contribs = [(CONTRIBUTORS[i % 16], texts[i]) for i in range(k)]
        idx, build_s, sa_s = build_timed(contribs, tok, work / f"stdlib_{n}")
        row = {"tokens": idx.info.num_tokens, "docs": idx.info.num_docs, "build_s": round(build_s, 2),
               "suffix_array_s": round(sa_s, 2), "index_bytes_per_token": round(idx.bytes_per_token(), 2),
               "chance_rate_by_k": chance_rates(idx, english, ks=(3, 4, 5, 6, 7, 8, 10, 12), n=2000),
               "attribution": {}}
        for length in LENGTHS:
            answers = make_answers(rng, docs[:k], unrelated, length, args.answers)
            row["attribution"][str(length)] = time_answers(idx, answers, args.rounds)
        result["datanets"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        shutil.rmtree(work / f"stdlib_{n}", ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
