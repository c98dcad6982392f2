"""One registered adapter's record, shared by the registry, the host cache and the device slots.

Every field is read and written under the adapter manager's lock (openlora.lora.manager), loader threads
included.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from openlora.lora.adapter import LoRAAdapter
from openlora.lora.pool import PackedAdapter


class AdapterState(str, enum.Enum):
    """Where an adapter's weights are. `LoRAManager.card()` reports these values."""

    REGISTERED = "registered"  # known, nothing loaded
    DOWNLOADING = "downloading"  # a loader thread fetches it from the hub / S3 into the disk cache
    ON_DISK = "disk"  # files on local disk (folder or disk cache), not in host memory
    LOADING = "loading"  # a loader thread parses and packs it
    HOST = "host"  # packed in host memory
    RESIDENT = "resident"  # in the device pool
    FAILED = "failed"  # the last load failed; a new request retries


@dataclass(eq=False)
class AdapterEntry:
    """Everything known about one registered adapter (hashable by identity: a re-registered id gets a
    new entry, and requests queued on the old one keep it)."""

    adapter_id: str
    source: str
    pinned: bool = False
    state: AdapterState = AdapterState.REGISTERED
    host: LoRAAdapter | None = None  # parsed fp32 weights in host memory (merges read them)
    packed: PackedAdapter | None = None  # the same in pool layout, ready to copy to the device
    fresh: bool = False  # loaded into host memory and not yet copied to the device (a cold start)
    content_hash: str = ""
    expected_hash: str | None = None  # files hash the fetched files must match (sources.files_hash)
    error: str | None = None
    exc: Exception | None = None  # the load failure: failure() hands it to the request
    rows: dict[str, list[int]] | None = None  # device rows per site while resident
    holders: set[str] = field(default_factory=set)  # running request ids
    waiting: set[str] = field(default_factory=set)  # queued request ids
    last_used: float = 0.0
    loading: bool = False
    load_seconds: float | None = None  # last background load (fetch + parse + pack)
    copy_seconds: float | None = None  # last host -> pool copy
    resident_since: float = 0.0  # start of the current residency (time slices count from here)
    unregistered: bool = False  # unregistered or superseded by an update: serves its requests, then goes
    builder: Callable[[], LoRAAdapter] | None = None  # returns the adapter (merges); None: load from source
    serial: int = 0  # this registration's number in its manager (never reused: merge keys name it)

    @property
    def resident(self) -> bool:
        return self.rows is not None

    @property
    def busy(self) -> bool:
        """Requests run on it or wait for it."""
        return bool(self.holders or self.waiting)

    def public_state(self) -> str:
        """registered, downloading, disk, loading, host, resident or failed."""
        if self.state == AdapterState.FAILED:
            return "failed"
        return "resident" if self.resident else self.state.value

    def rest_state(self) -> AdapterState:
        """State once neither resident nor in host memory."""
        if self.builder is not None:
            return AdapterState.REGISTERED
        return AdapterState.ON_DISK if self.load_seconds is not None else AdapterState.REGISTERED


@dataclass(frozen=True)
class StagedVersion:
    """A new version of an adapter, loaded and checked but not serving yet (LoRAManager.stage); the
    manager's install() makes it current. Other layers read `adapter_id` and `content_hash` only."""

    adapter_id: str
    content_hash: str
    pinned: bool | None  # None: keep the replaced version's
    entry: AdapterEntry = field(repr=False)
