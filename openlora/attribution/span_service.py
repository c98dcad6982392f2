"""Span-level attribution of finished answers: which contributors' texts an answer reproduced, and the
data weights that follow (issue: "rewards follow actual usage").

- At registration (`prepare`), every dataset of a manifest that holds its contributions gets its
  infini-gram index (openlora.attribution.span_index) built by a background worker, one at a time,
  cached under the cache folder by the contributions' content hash and the tokenizer.
- After a request finished (`attribute`, on the receipt recorder's thread: off the engine's path, before
  the receipt is signed), each sample's output token ids are matched against the index of every dataset
  of the request's adapters; `spans.span_credits` gives each contributor an integer credit, and
  `spans.blend` mixes it with the manifest's fixed weights (lambda and min_span from the manifest's
  `span_attribution`). A dataset whose index is not built yet (or failed) keeps its fixed weights.

Nothing of the text is kept: the receipt records the method, and per dataset every contributor's credit
(zero included, so a dataset that was matched and found nothing is told apart from one that was not
matched). The spans themselves (token offsets, per sample) go only to the caller, in the response.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openlora.attribution.manifest import Dataset, Manifest
from openlora.attribution.receipts import SpanCredit
from openlora.attribution.span_index import SpanIndex
from openlora.attribution.spans import blend, span_credits

log = logging.getLogger(__name__)

METHOD = "infini-gram"
# Datasets matched per request at most (the Settlement contract's MAX_CHARGE_SPANS): past it, a request's
# further datasets keep their fixed weights, so every receipt stays settleable on chain.
MAX_DATASETS = 8


@dataclass(frozen=True)
class SpanOutcome:
    """What span-level attribution decided for one request."""

    method: str  # recorded in the receipt, e.g. "infini-gram;legal:min_span=8,lambda_ppm=500000"
    weights: dict[tuple[str, str], dict[str, int]]  # (adapter, dataset) -> lower-cased address -> weight
    credits: tuple[SpanCredit, ...]
    spans: list[dict[str, Any]] = field(default_factory=list)  # for the caller only (module docstring)
    seconds: float = 0.0  # time spent matching (metrics)


class SpanAttributor:
    """Datanet indexes (built in the background) and the attribution of finished answers."""

    def __init__(self, tokenizer: Any, cache_root: Path) -> None:
        self.tokenizer = tokenizer
        self.cache_root = Path(cache_root)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-index")
        self._lock = threading.Lock()
        self._builds: dict[str, Future] = {}  # dataset content hash -> its index build

    def prepare(self, manifest: Manifest) -> None:
        """Start building the index of each dataset of `manifest` that holds contributions (once per
        content hash; a build already done or running is reused)."""
        for ds in manifest.datasets:
            if not ds.contributions:
                continue
            with self._lock:
                if ds.ref not in self._builds:
                    self._builds[ds.ref] = self._pool.submit(self._build, ds)

    def _build(self, ds: Dataset) -> SpanIndex:
        try:
            return SpanIndex.for_datanet(ds.contributions, self.tokenizer, self.cache_root)
        except Exception:
            log.exception("span index of dataset %s (%s) failed to build; it keeps its fixed weights", ds.id, ds.ref)
            raise

    def index(self, ds: Dataset, wait: float | None = 0.0) -> SpanIndex | None:
        """The dataset's index if it is built (waiting up to `wait` seconds, None: forever), else None."""
        with self._lock:
            fut = self._builds.get(ds.ref)
        if fut is None:
            return None
        try:
            return fut.result(timeout=wait)
        except Exception:  # still building (timeout) or failed (logged by _build)
            return None

    def wait_ready(self, manifest: Manifest, timeout: float | None = None) -> bool:
        """Block until every contribution-holding dataset of `manifest` has its index (tests, the CLI)."""
        self.prepare(manifest)
        return all(self.index(ds, timeout) is not None for ds in manifest.datasets if ds.contributions)

    def attribute(self, adapter_ids: list[str], manifests: list[Manifest],
                  outputs: list[list[int]]) -> SpanOutcome | None:
        """Match each sample's output token ids against the datasets of each adapter; None when no
        dataset of these adapters has a built index."""
        t0 = time.perf_counter()
        weights: dict[tuple[str, str], dict[str, int]] = {}
        credits: list[SpanCredit] = []
        spans: list[dict[str, Any]] = []
        policies: list[str] = []
        for adapter_id, m in zip(adapter_ids, manifests):
            used = False
            for ds in m.datasets:
                idx = self.index(ds) if ds.contributions and len(weights) < MAX_DATASETS else None
                if idx is None:
                    continue
                used = True
                found = []
                for sample, ids in enumerate(outputs):
                    for sp in idx.match(ids, m.spans.min_span):
                        found.append(sp)
                        spans.append({"sample": sample, "start": sp.start, "end": sp.end, "adapter": adapter_id,
                                      "dataset": ds.id, "contributors": list(sp.contributors)})
                got = span_credits(found)
                fixed = {c.address.lower(): c.weight for c in ds.contributors}
                weights[(adapter_id, ds.id)] = blend(fixed, got, m.spans.lambda_ppm)
                credits += [SpanCredit(adapter_id, ds.id, c.address, got.get(c.address.lower(), 0))
                            for c in ds.contributors]
            if used:
                policies.append(f"{adapter_id}:min_span={m.spans.min_span},lambda_ppm={m.spans.lambda_ppm}")
        if not policies:
            return None
        return SpanOutcome(";".join([METHOD, *policies]), weights, tuple(credits), spans,
                           time.perf_counter() - t0)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
