"""Stepping an offline engine by hand (tests that interleave steps with registrations and updates)."""

from __future__ import annotations

import time


def drain(llm, timeout: float = 120.0) -> dict:
    """Step until every request finished; returns request id -> final output. A step with nothing to run
    (adapters still loading in the background) returns at once, so idle steps sleep a little and the
    bound is time, not step count."""
    final, deadline = {}, time.monotonic() + timeout
    while llm.engine.has_unfinished_requests():
        outs = llm.engine.step()
        for o in outs:
            if o.finished:
                final[o.request_id] = o
        if not outs:
            time.sleep(0.002)
        assert time.monotonic() < deadline, "requests did not finish"
    return final
