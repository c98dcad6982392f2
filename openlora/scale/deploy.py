"""Start the Ray Serve application (used by `openlora serve --ray-replicas`, the tests and the bench).

With `--chain` the LedgerOwner joins the chain before any replica starts (one node, one key, the
endpoint --public-url: the Serve HTTP address clients reach), so a chain that cannot be joined stops
`openlora serve` with one line, as on a single node.

Placement (NOTE): the LedgerOwner runs on the driver's node (the ledger file, keystore and deployment file are there);
replicas and the ingress go wherever Ray has room. On a CPU-only machine every actor asks for 0 CPUs:
Ray's default of one CPU each leaves no room for two replicas next to the controller and proxy on two
cores, and each engine sizes its own threads (--num-threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openlora.scale import require_ray

log = logging.getLogger("openlora.scale")

APP_NAME = "openlora"
OWNER_NAME = "openlora-ledger"


@dataclass
class RayApp:
    """A running application: its URL, the node address its receipts are signed by, the owner actor."""

    url: str
    node: str | None
    owner: Any


def start_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a one-machine cluster whose ports serve 127.0.0.1 only."""
    import ray

    if address:
        ray.init(address=address, namespace=APP_NAME)
    else:  # NOTE: Ray binds some internal ports to every interface whatever the node IP (README)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, namespace=APP_NAME)


def replica_class(max_models: int) -> type:
    """EngineReplica with its `@serve.multiplexed` loader holding up to `max_models` adapter ids."""
    from ray import serve

    from openlora.scale.replica import AdapterLease, EngineReplica

    class OpenLoRAReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def adapter(self, adapter_id: str) -> AdapterLease:
            return await self._lease(adapter_id)

    return OpenLoRAReplica


def _owner(opts: Any, model_id: str) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from openlora.attribution.identity import PASSWORD_ENV
    from openlora.scale.owner import LedgerOwner

    env = {PASSWORD_ENV: os.environ[PASSWORD_ENV]} if os.environ.get(PASSWORD_ENV) else {}
    actor = ray.remote(LedgerOwner).options(
        name=OWNER_NAME, num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=8,
        runtime_env={"env_vars": env} if env else None,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))
    return actor.remote(opts, model_id)


def deploy(opts: Any, replicas: int, host: str, port: int, gpus_per_replica: float = 0.0) -> RayApp:
    """Start Serve on host:port and run the application (ray.init first); returns once replicas are up."""
    import ray
    from ray import serve

    from openlora.scale.ingress import Ingress
    from openlora.server.app import model_id_for

    model_id = model_id_for(opts.model)
    if opts.chain:  # the owner and the replicas open it by path, from whatever folder Ray starts them in
        opts = dataclasses.replace(opts, chain=str(Path(opts.chain).resolve()))
    owner = node = None
    if opts.attribution:
        from openlora.scale.remote_attribution import owner_call

        owner = _owner(opts, model_id)
        try:
            node = owner_call(owner.node.remote())  # raises what opening the key or the ledger raised
        except BaseException:
            ray.kill(owner)
            raise
    eng = opts.engine
    seqs = eng.get("max_num_seqs") or 64
    engines = serve.deployment(replica_class(eng.get("max_cpu_loras") or 8)).options(
        name="EngineReplica", num_replicas=replicas, max_ongoing_requests=2 * seqs,
        ray_actor_options={"num_cpus": 0, "num_gpus": gpus_per_replica},
        health_check_period_s=5, graceful_shutdown_timeout_s=opts.grace_period)
    ingress = serve.deployment(Ingress).options(name="Ingress", num_replicas=1, max_ongoing_requests=4096,
                                                ray_actor_options={"num_cpus": 0})
    serve.start(http_options={"host": host, "port": port})
    serve.run(ingress.bind(engines.bind(opts, owner, node), model_id), name=APP_NAME, route_prefix="/")
    return RayApp(url=f"http://{host}:{port}", node=node, owner=owner)


def stop(app: RayApp) -> None:
    """Delete the application (replicas drain), then close the ledger and stop its owner."""
    import ray
    from ray import serve

    serve.delete(APP_NAME)
    if app.owner is not None:
        ray.get(app.owner.close.remote())
        ray.kill(app.owner)


def run_on_ray(opts: Any, args: argparse.Namespace) -> int:
    """`openlora serve --ray-replicas N`: serve until SIGTERM/SIGINT, then stop everything it started."""
    from openlora.errors import OpenLoRAError

    try:
        require_ray()
        if args.ray_replicas < 1:
            raise OpenLoRAError("--ray-replicas must be at least 1")
    except OpenLoRAError as e:
        log.error("cannot serve: %s", e)
        return 2
    import ray
    from ray import serve

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    start_ray(args.ray_address)
    try:
        try:
            app = deploy(opts, args.ray_replicas, args.host, args.port, args.ray_gpus_per_replica)
        except (OpenLoRAError, ValueError) as e:  # a bad keystore, ledger or option: no traceback
            log.error("cannot serve: %s", e)
            return 2
        log.info("listening on %s: %d Ray Serve replicas, node %s", app.url, args.ray_replicas, app.node)
        stopping.wait()
        log.info("stopping the Ray Serve application")
        stop(app)
        if not args.ray_address:
            serve.shutdown()
    finally:
        ray.shutdown()
    log.info("server stopped")
    return 0
