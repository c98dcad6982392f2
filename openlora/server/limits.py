"""Per-tenant request rate and token quota (`serve --rate-limit`, `--token-quota`): 429 with Retry-After.

- Rate: a token bucket per tenant, `rate` requests per second refilled continuously, holding at most
  `burst` requests (default: one second's worth, at least 1).
- Quota: prompt + completion tokens per tenant in fixed windows of `period_s` seconds, charged from each
  finished request's usage (what it really cost, failed and aborted ones included). A tenant at or
  over its quota is refused until its window ends.

The admin key is exempt. Tenants are what openlora.server.tenancy authenticated; on a server without
keys everyone is one tenant, so the limits apply to the server as a whole.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from openlora.errors import Overloaded


class RateLimited(Overloaded):
    """This tenant's rate or quota is spent; `retry_after` seconds until it is not."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Bucket:
    level: float
    at: float


class TenantLimits:
    """Both limits for every tenant (thread-safe: routes run on the event loop, usage arrives from the
    engine thread)."""

    def __init__(self, rate: float | None = None, burst: int | None = None, quota: int | None = None,
                 period_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"--rate-limit must be > 0 requests/s, got {rate!r}")
        if quota is not None and quota < 1:
            raise ValueError(f"--token-quota must be >= 1 token, got {quota!r}")
        if not period_s > 0:
            raise ValueError(f"the token-quota period must be > 0 s, got {period_s!r}")
        self.rate = rate
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate or 1)))
        self.quota = quota
        self.period_s = period_s
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, tuple[float, int]] = {}  # tenant -> (window start, tokens used)

    @property
    def active(self) -> bool:
        return self.rate is not None or self.quota is not None

    def admit(self, tenant: str) -> None:
        """Take one request from the tenant's bucket; raises RateLimited (429) instead."""
        now = self.clock()
        with self._lock:
            if self.quota is not None:
                start, used = self._window(tenant, now)
                if used >= self.quota:
                    wait = start + self.period_s - now
                    raise RateLimited(f"token quota of {self.quota} tokens per {self.period_s:g} s is used up; "
                                      f"retry in {math.ceil(wait)} s", wait)
            if self.rate is not None:
                b = self._buckets.get(tenant)
                if b is None:
                    b = self._buckets[tenant] = _Bucket(self.burst, now)
                b.level = min(self.burst, b.level + (now - b.at) * self.rate)
                b.at = now
                if b.level < 1.0:
                    wait = (1.0 - b.level) / self.rate
                    raise RateLimited(f"rate limit of {self.rate:g} requests/s exceeded; retry in "
                                      f"{wait:.2f} s", wait)
                b.level -= 1.0

    def charge(self, tenant: str, tokens: int) -> None:
        """Count a finished request's tokens against its tenant's window."""
        if self.quota is None:
            return
        now = self.clock()
        with self._lock:
            start, used = self._window(tenant, now)
            self._used[tenant] = (start, used + max(0, tokens))

    def _window(self, tenant: str, now: float) -> tuple[float, int]:
        start, used = self._used.get(tenant, (now, 0))
        if now - start >= self.period_s:
            start, used = now, 0
        self._used[tenant] = (start, used)
        return start, used
