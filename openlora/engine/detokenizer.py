"""Incremental detokenization with stop strings, cheap per token.

NOTE (prefix/read offsets, as in vLLM and TGI): each step decodes only a small window
`ids[prefix_offset:]` and subtracts the text of `ids[prefix_offset:read_offset]` (already emitted).
Decoding with a little left context keeps what decoders do at a sequence start (e.g. SentencePiece
dropping the leading space of the first token) out of the middle of the output. The window starts
with the last few prompt tokens, so the first output token keeps its leading space as a continuation
of the prompt: the deltas add up to `decode(prompt_tail + output) - decode(prompt_tail)`, which equals
`tokenizer.decode(output_ids)` for decoders without such start-of-text rules (ByteLevel BPE,
byte-fallback BPE without a Strip step).

Multi-byte characters split over tokens decode to a trailing U+FFFD until complete; that tail is held
back (never emitted) until the character is whole, while text before it is emitted at once. Decoding
uses `clean_up_tokenization_spaces=False` (the cleanup is not prefix-stable).

Stop strings: the decoded text is searched only where a new match can be (the last len(stop)-1 chars
plus the new text). While streaming, the longest suffix that is a prefix of a stop string is held back,
so a later match never has to retract emitted text; `finish()` flushes it.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Prompt tokens used as left context for the first output tokens.
INITIAL_CONTEXT_TOKENS = 5
# A window that still ends in U+FFFD after this many held tokens is garbage bytes, not a split
# character (UTF-8 needs at most 4 bytes): emit it as decode() would, to bound the window size.
MAX_HELD_TOKENS = 32
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text deltas as they arrive.

    `add(ids)` returns the newly finalized text; `finish()` returns what was held back. `output_text`
    is all text decoded so far (truncated at a stop string), `stop_hit` the stop string that matched.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes the same text (clean-up off) without the ~2 us of Python
        # argument handling per call in PreTrainedTokenizerFast.decode; two decodes per token per sequence.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_hit: str | None = None
        self.token_ids: list[int] = []  # output ids only
        self.finished = False

        # Window ids: a prompt tail then output ids. Only ids[prefix_offset:] are ever decoded, so the
        # list is trimmed as the offsets advance (see _advance) to keep memory O(window).
        tail = list(prompt_token_ids[max(0, len(prompt_token_ids) - INITIAL_CONTEXT_TOKENS) :])
        self._ids: list[int] = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)
        self._prefix_text = self._decode(tail)
        if self._prefix_text.endswith(_REPLACEMENT):
            # Prompt ends mid-character (prompt given as ids): its tail is no usable context.
            self._prefix_offset = self._read_offset
            self._prefix_text = ""
        self._window_emitted = 0  # chars of the current window's new text already appended to _text

        self._text = ""  # all finalized text (UTF-8-complete), truncated at a stop string
        self._sent = 0  # len of _text already returned as deltas

    # ---- public API -------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        """All text decoded so far (includes a tail still held back from streaming for stop strings)."""
        return self._text

    def add(self, new_token_ids: list[int]) -> str:
        """Append generated ids; return the text delta that is now final (may be "")."""
        if self.finished or self.stop_hit is not None:
            return ""
        self.token_ids.extend(new_token_ids)
        self._ids.extend(new_token_ids)
        return self._extend(self._step(flush=False), final=False)

    def finish(self) -> str:
        """End of sequence: flush incomplete bytes (as decode() would render them) and any stop-string
        hold-back. Afterwards the concatenation of all deltas equals `output_text`."""
        if self.finished:
            return ""
        self.finished = True
        new = "" if self.stop_hit is not None else self._step(flush=True)
        return self._extend(new, final=True)

    # ---- internals --------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _step(self, flush: bool) -> str:
        """Decode the window; return the newly stable text and move the offsets when the window is whole."""
        full = self._decode(self._ids[self._prefix_offset :])
        held = len(self._ids) - self._read_offset
        if full.endswith(_REPLACEMENT) and not flush and held <= MAX_HELD_TOKENS:
            # Trailing incomplete character: emit only what precedes the trailing U+FFFD run.
            stable = full.rstrip(_REPLACEMENT)[len(self._prefix_text) :]
            new = stable[self._window_emitted :]
            self._window_emitted += len(new)
            return new
        new_text = full[len(self._prefix_text) :]
        new = new_text[self._window_emitted :]
        if new_text:
            # Whole window is final: it becomes the next left context. (No text at all, e.g. skipped
            # special tokens, keeps the old context so a following token still decodes in context.)
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
            self._prefix_text = self._decode(self._ids[: self._read_offset])
            self._window_emitted = 0
        return new

    def _extend(self, new: str, final: bool) -> str:
        """Append `new` to the text, apply stop strings, return the delta safe to emit."""
        old_len = len(self._text)
        self._text += new
        if new and self.stop:
            self._check_stop(old_len)
        if self.stop_hit is not None or final or self.include_stop_str_in_output:
            # With include_stop_str_in_output a future match ends after today's text, so nothing
            # emitted now could be cut off: no hold-back needed.
            end = len(self._text)
        else:
            end = max(self._sent, len(self._text) - self._partial_stop_len())
        delta = self._text[self._sent : end]
        self._sent = end
        return delta

    def _check_stop(self, old_len: int) -> None:
        """Find the earliest stop string that ends in the new text; truncate the text there."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            # Before this step there was no match, so a new one must end beyond old_len.
            idx = self._text.find(s, max(0, old_len - len(s) + 1))
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return
        idx, s = best
        self.stop_hit = s
        self._text = self._text[: idx + len(s)] if self.include_stop_str_in_output else self._text[:idx]
        self._sent = min(self._sent, len(self._text))

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best
