"""Running the offline engine with its logits captured (tests that compare logits with a reference)."""

from __future__ import annotations


def run_engine(llm, prompts: list[list[int]], adapters: list, max_tokens: int = 6):
    """Greedy-generate `prompts` in one batch; returns (outputs, rows) where rows[i] lists prompt i's fp32
    logits ([vocab] each) at every sampled position, as the engine's model runner captured them."""
    from openlora import SamplingParams

    cap: list = []
    llm.engine.runner.capture_logits = cap
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            adapters=adapters)
    finally:
        llm.engine.runner.capture_logits = None
    first = int(outs[0].request_id.split("-")[1])  # request ids are gen-<n>, consecutive within a call
    rows: dict[int, list] = {}
    for rid, row in cap:
        rows.setdefault(int(rid.split("-")[1]) - first, []).append(row)
    return outs, rows
