"""Tokenizer loading, chat templates and the incremental detokenizer, on small tokenizers built offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from openlora.engine.detokenizer import IncrementalDetokenizer
from openlora.engine.tokenizer import apply_chat_template, load_tokenizer
from openlora.errors import InvalidRequest, ModelLoadError

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Character pool for the corpus and for random strings: ASCII, accents, CJK, emoji (4-byte and ZWJ).
WORDS = (
    "the quick brown fox jumps over lazy dog serving many adapters at once with one base model "
    "café naïve résumé façade über Größe straße crème brûlée señor jalapeño "
    "東京 日本語 中文 世界 你好 漢字 카페 한국어 "
    "😀 🚀 👍🏽 👨‍👩‍👧 🇫🇷 ✨ ❤️ Ω π ∑ →"
).split()
RARE = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 鬱 龘 🦜 🧬 ß ñ Ж ж ﷺ"  # mostly absent from the corpus: exercises byte pieces


def _corpus(n_lines: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines)]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: every multi-byte char not merged is split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return _wrap(tok)


def _byte_fallback(strip_leading_space: bool = False) -> PreTrainedTokenizerFast:
    """SentencePiece/Llama style BPE: chars outside the vocab fall back to <0xNN> byte tokens.

    With strip_leading_space the decoder drops the first token's leading space, like Llama-2's.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, limit_alphabet=60, special_tokens=SPECIALS))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte pieces live in the model vocab, as in Llama's tokenizer.json
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    steps = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if strip_leading_space:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    spec["decoder"] = {"type": "Sequence", "decoders": steps}
    return _wrap(Tokenizer.from_str(json.dumps(spec)))


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return _byte_level()


@pytest.fixture(scope="module")
def byte_fallback() -> PreTrainedTokenizerFast:
    return _byte_fallback()


def _random_text(rng: random.Random, n_words: int) -> str:
    pool = WORDS + RARE.split()
    return " ".join(rng.choice(pool) for _ in range(n_words))


def _stream(det: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None) -> list[str]:
    """Feed ids in chunks of 1 (or random 1-3 sizes); returns all deltas including finish()."""
    deltas, i = [], 0
    while i < len(ids):
        step = rng.randint(1, 3) if rng else 1
        deltas.append(det.add(ids[i : i + step]))
        i += step
    deltas.append(det.finish())
    return deltas


def _decode(tok: PreTrainedTokenizerFast, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


# ---- the test tokenizers really split characters across tokens ---------------------------------


def test_fixture_tokenizers_split_multibyte_chars(byte_level, byte_fallback) -> None:
    for tok in (byte_level, byte_fallback):
        ids = tok.encode(RARE, add_special_tokens=False)
        assert _decode(tok, ids) .strip() == RARE.strip()
        partial = [_decode(tok, [i]) for i in ids]
        assert any("\ufffd" in p for p in partial), "no char is split over tokens: test would be vacuous"
    assert any(t.startswith("<0x") for t in byte_fallback.convert_ids_to_tokens(byte_fallback.encode(RARE)))


# ---- incremental detokenizer: concatenation of deltas == decode -------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_concat_equals_decode_byte_level(byte_level, skip: bool) -> None:
    # Arbitrary id sequences (invalid UTF-8 included, special tokens included), random chunking.
    rng = random.Random(1)
    vocab = len(byte_level)
    for _ in range(150):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        out = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        det = IncrementalDetokenizer(byte_level, prompt, skip_special_tokens=skip)
        deltas = _stream(det, out, rng)
        expected = _decode(byte_level, out, skip)
        assert "".join(deltas) == expected
        assert det.output_text == expected and det.token_ids == out and det.stop_hit is None


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_valid_text_never_emits_replacement_char(name: str, request) -> None:
    tok = request.getfixturevalue(name)
    rng = random.Random(2)
    for _ in range(80):
        prompt = tok.encode(_random_text(rng, 3), add_special_tokens=False)
        out = tok.encode(_random_text(rng, rng.randint(1, 10)), add_special_tokens=False)
        det = IncrementalDetokenizer(tok, prompt)
        deltas = _stream(det, out)
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) == _decode(tok, out)


def test_split_emoji_is_held_until_complete(byte_level) -> None:
    ids = byte_level.encode("a🦜", add_special_tokens=False)
    assert len(ids) >= 3  # 'a' + the 4 bytes of the parrot in >= 2 tokens
    det = IncrementalDetokenizer(byte_level, [])
    deltas = [det.add([i]) for i in ids]
    assert deltas[0] == "a" and all(d == "" for d in deltas[1:-1]) and deltas[-1] == "🦜"


def test_finish_flushes_incomplete_bytes_like_decode(byte_level) -> None:
    ids = byte_level.encode("ok🦜", add_special_tokens=False)[:-1]  # cut the emoji short
    det = IncrementalDetokenizer(byte_level, [])
    streamed = "".join(det.add([i]) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + det.finish() == _decode(byte_level, ids)
    assert det.output_text.endswith("\ufffd")


def test_leading_space_kept_as_continuation_with_strip_decoder() -> None:
    tok = _byte_fallback(strip_leading_space=True)
    prompt = tok.encode("the cat", add_special_tokens=False)
    out = tok.encode(" over the café", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt)
    text = "".join(_stream(det, out))
    # The first output token keeps its space ("the cat over ..."), unlike decode(out) alone.
    assert text == _decode(tok, prompt + out)[len(_decode(tok, prompt)) :]
    assert text.startswith(" ") and not _decode(tok, out).startswith(" ")


def test_decodes_only_a_small_window(byte_level) -> None:
    rng = random.Random(3)
    out = byte_level.encode(_random_text(rng, 400), add_special_tokens=False)
    seen: list[int] = []
    real_decode = byte_level.decode
    backend = byte_level.backend_tokenizer

    class BackendSpy:  # the Rust tokenizer, which the detokenizer calls directly for fast tokenizers
        def decode(self, ids, **kw):
            seen.append(len(ids))
            return backend.decode(ids, **kw)

    class Spy:
        backend_tokenizer = BackendSpy()

        def __getattr__(self, name):
            return getattr(byte_level, name)

        def decode(self, ids, **kw):
            seen.append(len(ids))
            return real_decode(ids, **kw)

    det = IncrementalDetokenizer(Spy(), byte_level.encode("hello there", add_special_tokens=False))
    assert "".join(_stream(det, out)) == _decode(byte_level, out)
    assert len(out) > 400 and max(seen) <= 12  # windows stay tiny however long the output
    assert len(seen) <= 2 * len(out) + 4  # at most two decodes per token


# ---- stop strings -------------------------------------------------------------------------------


def _run_with_stops(tok, text: str, stop: list[str], include: bool) -> tuple[list[str], IncrementalDetokenizer]:
    det = IncrementalDetokenizer(tok, [], stop=stop, include_stop_str_in_output=include)
    ids = tok.encode(text, add_special_tokens=False)
    deltas = []
    for i in ids:
        deltas.append(det.add([i]))
        if det.stop_hit is not None:
            break
    deltas.append(det.finish())
    return deltas, det


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates(byte_level, include: bool) -> None:
    text = "the quick brown fox jumps over lazy dog"
    deltas, det = _run_with_stops(byte_level, text, ["fox j", "zzz"], include)
    assert det.stop_hit == "fox j"
    expected = "the quick brown fox j" if include else "the quick brown "
    assert "".join(deltas) == det.output_text == expected


def test_stop_string_spanning_multibyte_chars(byte_level) -> None:
    deltas, det = _run_with_stops(byte_level, "café 世界 🚀 done", ["界 🚀"], False)
    assert det.stop_hit == "界 🚀" and "".join(deltas) == "café 世"
    assert all("\ufffd" not in d for d in deltas)


def test_earliest_stop_wins(byte_level) -> None:
    deltas, det = _run_with_stops(byte_level, "one two three four", ["four", "two"], False)
    assert det.stop_hit == "two" and "".join(deltas) == "one "


def test_streaming_never_retracts_text(byte_level) -> None:
    # Random texts and stop strings drawn from the text itself: every prefix of the stream must be a
    # prefix of the final text (nothing emitted is ever cut off by a later match).
    rng = random.Random(4)
    for _ in range(60):
        text = _random_text(rng, 12)
        a = rng.randrange(len(text) - 3)
        stop = [text[a : a + rng.randint(2, 6)], "zq"]
        include = rng.random() < 0.5
        deltas, det = _run_with_stops(byte_level, text, stop, include)
        final = "".join(deltas)
        assert final == det.output_text
        assert det.stop_hit is not None
        cut = text.find(det.stop_hit)
        assert final == (text[: cut + len(det.stop_hit)] if include else text[:cut])


def test_partial_stop_is_held_back_then_flushed(byte_level) -> None:
    det = IncrementalDetokenizer(byte_level, [], stop=["abc"])
    assert det.add(byte_level.encode("xab", add_special_tokens=False)) == "x"
    assert det.add(byte_level.encode("d", add_special_tokens=False)) == "abd"
    assert det.add(byte_level.encode(" ab", add_special_tokens=False)) == " "
    assert det.finish() == "ab"  # no match at the end: the held tail is released
    assert det.output_text == "xabd ab" and det.stop_hit is None


# ---- tokenizer loading and chat templates ----------------------------------------------------


def test_load_tokenizer_round_trip_and_chat_template(byte_level, tmp_path: Path) -> None:
    byte_level.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("café 🚀", add_special_tokens=False) == byte_level.encode("café 🚀", add_special_tokens=False)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi 😀"}]
    assert apply_chat_template(tok, msgs) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi 😀<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not apply_chat_template(tok, msgs, add_generation_prompt=False).endswith("assistant\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "user\na\nb<|im_end|>" in apply_chat_template(tok, parts)
    # An open final assistant message (how the gateway resumes a cut stream) ends at its text.
    cont = [*msgs, {"role": "assistant", "content": "Once upon"}]
    assert apply_chat_template(tok, cont, add_generation_prompt=False, continue_final_message=True) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi 😀<|im_end|>\n<|im_start|>assistant\nOnce upon"
    )
    for bad in ({"add_generation_prompt": True}, ):
        with pytest.raises(InvalidRequest, match="continue_final_message"):
            apply_chat_template(tok, cont, continue_final_message=True, **bad)
    with pytest.raises(InvalidRequest, match="continue_final_message"):
        apply_chat_template(tok, msgs, add_generation_prompt=False, continue_final_message=True)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_chat_template_errors(byte_level) -> None:
    with pytest.raises(InvalidRequest, match="unknown role"):
        apply_chat_template(byte_level, [{"role": "robot", "content": "x"}])
    for bad in ([], [{"content": "x"}], ["hello"], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]):
        with pytest.raises(InvalidRequest):
            apply_chat_template(byte_level, bad)
    no_template = PreTrainedTokenizerFast(tokenizer_object=byte_level.backend_tokenizer)
    with pytest.raises(InvalidRequest, match="no chat template"):
        apply_chat_template(no_template, [{"role": "user", "content": "x"}])


def test_text_before_a_split_char_is_emitted_at_once(byte_level) -> None:
    # A byte-level token such as " " + the first byte of a CJK char decodes to " \ufffd": the space is
    # final and must stream immediately, only the partial character waits.
    mixed = [i for i in range(len(byte_level))
             if (t := _decode(byte_level, [i])).endswith("\ufffd") and t.rstrip("\ufffd")]
    assert mixed, "fixture has no token mixing text and a partial char"
    rng = random.Random(5)
    for tid in rng.sample(mixed, min(10, len(mixed))):
        text = _decode(byte_level, [tid])
        stable = text.rstrip("\ufffd")
        det = IncrementalDetokenizer(byte_level, byte_level.encode("hi", add_special_tokens=False))
        assert det.add([tid]) == stable
        assert det.finish() == text[len(stable) :]
