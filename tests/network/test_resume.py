"""Resuming a cut stream: whole events, the text so far, and which requests can be continued."""

from __future__ import annotations

import json

from openlora.network.resume import EventSplitter, StreamText, is_role_only, resume_body


def _ev(d) -> bytes:
    return f"data: {json.dumps(d)}\n\n".encode()


def test_events_are_relayed_whole():
    raw = _ev({"choices": [{"index": 0, "text": "ab"}]}) + _ev({"choices": [{"index": 0, "text": "c"}]})
    split = EventSplitter()
    out = []
    for i in range(0, len(raw), 7):  # bytes arrive cut anywhere
        out += split.feed(raw[i:i + 7])
    assert b"".join(out) == raw and len(out) == 2 and split.rest() == b""


def test_the_text_so_far_counts_choice_zero_only():
    t = StreamText(chat=True)
    t.see(_ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    t.see(_ev({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}))
    t.see(_ev({"choices": [{"index": 1, "delta": {"content": "zzz"}}]}))
    t.see(_ev({"choices": [{"index": 0, "delta": {"content": "lo"}}]}))
    assert (t.text, t.events, t.finished) == ("Hello", 2, False)
    t.see(_ev({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    assert t.finished
    done = StreamText(chat=False)
    done.see(b"data: [DONE]\n\n")
    assert done.finished


def test_resume_bodies():
    comp = {"model": "m", "prompt": "Count:", "max_tokens": 10, "temperature": 0.7}
    assert resume_body(comp, False, " 1 2", 2) == {**comp, "prompt": "Count: 1 2", "max_tokens": 8}
    assert resume_body({"model": "m", "prompt": "x"}, False, "ab", 3)["max_tokens"] == 13  # default 16
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5}
    out = resume_body(chat, True, "Hel", 1)
    assert out["messages"][-1] == {"role": "assistant", "content": "Hel"} and out["max_completion_tokens"] == 4
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False
    assert "max_tokens" not in out  # no budget given: none invented
    # Not resumable: several choices, echo, logprobs, constrained output, token-id or batched prompts,
    # nothing sent yet, the budget used up.
    for req, chat_, text, n in (({**comp, "n": 2}, False, "a", 1), ({**comp, "echo": True}, False, "a", 1),
                                ({**comp, "logprobs": 2}, False, "a", 1), ({**chat, "logprobs": True}, True, "a", 1),
                                ({**chat, "response_format": {"type": "json_object"}}, True, "{", 1),
                                ({**comp, "prompt": [1, 2]}, False, "a", 1),
                                ({**comp, "prompt": ["a", "b"]}, False, "a", 1),
                                (comp, False, "", 0), (comp, False, "a" * 10, 10)):
        assert resume_body(req, chat_, text, n) is None, req
    assert resume_body({**chat, "response_format": {"type": "text"}}, True, "a", 1) is not None


def test_the_continuations_role_event_is_recognised():
    assert is_role_only(_ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    assert not is_role_only(_ev({"choices": [{"index": 0, "delta": {"content": "x"}}]}))
    assert not is_role_only(_ev({"choices": [], "usage": {}}))
    assert not is_role_only(b"data: [DONE]\n\n")
