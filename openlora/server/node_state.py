"""What a router needs from a node: `GET /v1/state` (a JSON snapshot) and the adapter's state when
a request arrived (the `x-openlora-adapter-state` response header).

NOTE: vLLM's `vllm:lora_requests_info` lists only adapters with requests in flight; a router needs
residency itself, so the snapshot lists every adapter with its tier (resident / host / disk /
loading / ...) and the number of free device slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

ADAPTER_STATE_HEADER = "x-openlora-adapter-state"


def node_state(state: Any, snap: dict[str, Any], visible: Callable[[str], bool]) -> dict[str, Any]:
    """The `/v1/state` document from a metrics `snapshot()` taken on the engine thread. Adapters the
    caller may not use (`visible` false) are left out: a private adapter's name and residency are not
    published, so a gateway routes it by load and price only (free_slots still counts its slot)."""
    all_states = {a: s for a, (s, _) in snap["adapters"].items()}
    adapters = {a: s for a, s in all_states.items() if visible(a)}
    resident = sorted(a for a, s in adapters.items() if s == "resident")
    n_resident = sum(1 for s in all_states.values() if s == "resident")
    lora = state.lora
    att = state.attribution
    sched = state.engine.engine.config.scheduler
    return {
        "object": "node.state",
        "time": time.time(),
        "node": att.identity.address if att is not None else None,
        "model": state.model_id,
        "model_hash": state.engine.engine.base_model_hash,
        "adapters": adapters,
        "resident_adapters": resident,
        "max_loras": lora.max_loras,
        "free_slots": max(0, lora.max_loras - n_resident),
        "running": snap["num_running"],
        "waiting": snap["num_waiting"],
        "max_num_seqs": sched.max_num_seqs,
        "kv_usage": snap["kv_usage"],
        "chain": state.settler is not None,
        **state.declared,  # region, location, hardware, price: declared, not measured
    }


def note_adapter_state(request: Request, state: Any, names: list[str]) -> None:
    """Remember the (first) adapter's state at arrival; the middleware puts it in a header."""
    if not names:
        request.state.adapter_state = "base"
        return
    card = state.lora.card(names[0])
    request.state.adapter_state = card["state"] if card is not None else "unknown"
