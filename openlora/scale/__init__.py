"""Scale-out past one machine on Ray Serve: `openlora serve --ray-replicas N [--ray-address ADDR]`.

One Ray Serve application, three kinds of process (a Ray actor each):

```
client -> Serve HTTP proxy -> Ingress (ingress.py): reads `model`, sets it as the multiplexed model id
                                  | DeploymentHandle, stream=True; retries before the first byte
                                  v
          EngineReplica x N (replica.py): the single-node FastAPI app (routes, streaming, metrics) and
          its engine; each adapter id is a Serve multiplexed model id, so Serve routes an adapter's
          requests to the replica whose LoRA manager holds it
                                  | finished request: UsageEvent + manifests (+ span outcome)
                                  v
          LedgerOwner (owner.py): the one process holding the node key and writing the SQLite ledger;
          with --chain also the node on chain: registration, Settler, payer reservations
          (replicas reach these through remote_attribution.py and remote_chain.py)
```

Ray is an optional extra (`pip install 'openlora[ray]'`): nothing here imports it at module level
except the modules that only run inside Ray; `require_ray()` is the one place that checks for it.
"""

from __future__ import annotations

from openlora.errors import OpenLoRAError

RAY_EXTRA = "pip install 'openlora[ray]'"


class RayMissing(OpenLoRAError):
    """--ray-replicas was asked for, but Ray Serve is not installed."""


def require_ray() -> None:
    """Raise RayMissing naming the extra unless `ray[serve]` imports."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise RayMissing(f"--ray-replicas needs Ray Serve, an optional extra: {RAY_EXTRA} ({e})") from None
