"""The adapter registry: which ids are registered, and what a request's adapter spec names.

Holds no weights: the host cache and the device slots do. Called with the adapter manager's lock held.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from openlora.errors import AdapterNotFound, InvalidRequest
from openlora.lora.entry import AdapterEntry

# What a request may name: None (base model), one adapter id, or (id, weight) pairs.
AdapterSpec = Any


class AdapterRegistry:
    """adapter id -> its current AdapterEntry."""

    def __init__(self) -> None:
        self._entries: dict[str, AdapterEntry] = {}

    def add(self, e: AdapterEntry) -> AdapterEntry | None:
        """Register `e` under its id; returns the entry it replaces (if any)."""
        old = self._entries.get(e.adapter_id)
        self._entries[e.adapter_id] = e
        return old

    def remove(self, e: AdapterEntry) -> None:
        """Forget `e` if it is still the entry registered under its id."""
        if self._entries.get(e.adapter_id) is e:
            del self._entries[e.adapter_id]

    def current(self, adapter_id: str) -> AdapterEntry | None:
        """The entry under this id, unregistered ones included (they may still serve their requests)."""
        return self._entries.get(adapter_id)

    def find(self, adapter_id: str) -> AdapterEntry | None:
        """The registered entry under this id, or None."""
        e = self._entries.get(adapter_id)
        return None if e is None or e.unregistered else e

    def get(self, adapter_id: str) -> AdapterEntry:
        e = self.find(adapter_id)
        if e is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return e

    def live(self) -> Iterator[AdapterEntry]:
        """Registered entries, in registration order."""
        return (e for e in self._entries.values() if not e.unregistered)

    def all(self) -> Iterator[AdapterEntry]:
        return iter(self._entries.values())

    def resolve(self, spec: AdapterSpec) -> list[tuple[AdapterEntry, float]]:
        """A request's adapter spec -> [(entry, weight)]. Raises AdapterNotFound / InvalidRequest."""
        if spec is None or spec == "" or spec == []:
            return []
        pairs = [(spec, 1.0)] if isinstance(spec, str) else list(spec)
        seen: set[str] = set()
        out = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InvalidRequest("adapters must be a name or a list of (name, weight) pairs")
            name, w = item
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise InvalidRequest(f"adapter weight for {name!r} must be a finite number")
            if name in seen:
                raise InvalidRequest(f"adapter {name!r} is listed twice")
            seen.add(name)
            out.append((self.get(name), float(w)))
        return out
