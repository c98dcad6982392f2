"""Resuming a stream whose node died after its first byte.

The gateway relays server-sent events whole (never half an event), and keeps for choice 0 the text
sent so far and the number of events that carried text. When the node dies mid-stream, the rest of
the answer is asked of another node as a continuation: a completion's prompt becomes prompt + text;
a chat gets the text as an open final assistant message (`continue_final_message`, vLLM's name).
The continuation is drawn from the same conditional distribution, so a sampled answer stays a valid
sample and a greedy one the same text (up to how the joined text re-tokenizes).

Not resumed (the stream ends with an error event instead): several choices or prompts, echo,
logprobs, constrained output (`response_format`), a stream that had already finished.

The token budget: one event carries one token except when text is held back (a multi-byte character
split across tokens, a possible stop string), so `max_tokens - events` is at least what is left; the
continuation can overrun the original budget by as many tokens as were held back.
"""

from __future__ import annotations

import json
from typing import Any

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions (protocol.py agrees)


class EventSplitter:
    """Raw bytes in, whole SSE events (ending in a blank line) out."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while True:
            i = self.buf.find(b"\n\n")
            if i < 0:
                return out
            out.append(self.buf[:i + 2])
            self.buf = self.buf[i + 2:]

    def rest(self) -> bytes:
        """What is left when the stream ends cleanly (a server that omits the last blank line)."""
        rest, self.buf = self.buf, b""
        return rest


def event_json(event: bytes) -> Any:
    """The JSON of a `data:` event; None for [DONE], comments and anything unparsable."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return None
            try:
                return json.loads(payload)
            except ValueError:
                return None
    return None


class StreamText:
    """Choice 0's text so far, how many events carried it, and whether the answer is complete."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.parts: list[str] = []
        self.events = 0
        self.finished = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def see(self, event: bytes) -> None:
        if event.strip() == b"data: [DONE]":
            self.finished = True
            return
        d = event_json(event)
        for c in (d.get("choices") or []) if isinstance(d, dict) else []:
            if c.get("index", 0) != 0:
                continue
            piece = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            if piece:
                self.parts.append(piece)
                self.events += 1
            if c.get("finish_reason"):
                self.finished = True


def resume_body(req: dict, chat: bool, text: str, events: int) -> dict | None:
    """The request that continues `req` after `text` (sent in `events` events); None when it cannot
    be resumed soundly."""
    if not text or req.get("n", 1) != 1 or req.get("logprobs") or req.get("top_logprobs") or req.get("echo"):
        return None
    fmt = req.get("response_format")
    if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    out = dict(req)
    if chat:
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return None
        out["messages"] = [*msgs, {"role": "assistant", "content": text}]
        out["add_generation_prompt"] = False
        out["continue_final_message"] = True
        for key in ("max_completion_tokens", "max_tokens"):
            if isinstance(req.get(key), int):
                out[key] = req[key] - events
                if out[key] < 1:
                    return None
    else:
        if not isinstance(req.get("prompt"), str):
            return None
        out["prompt"] = req["prompt"] + text
        budget = req.get("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
        if isinstance(budget, int):
            out["max_tokens"] = budget - events
            if out["max_tokens"] < 1:
                return None
    return out


def is_role_only(event: bytes) -> bool:
    """A chat stream's opening event (role, no content): dropped from a continuation, whose client
    already had one."""
    d = event_json(event)
    if not isinstance(d, dict) or not d.get("choices"):
        return False
    c = d["choices"][0]
    delta = c.get("delta") or {}
    return not delta.get("content") and not c.get("finish_reason") and "role" in delta
