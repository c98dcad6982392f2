"""The FastAPI app: OpenAI routes, admin routes, receipts, health and metrics; `build_state` wires
engine, adapters and attribution from command-line options."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from openlora.engine.async_engine import AsyncEngine
from openlora.errors import InvalidRequest, OpenLoRAError
from openlora.lora.sources import scan_adapter_dir
from openlora.server.adapter_routes import install_adapter_routes, register_adapter
from openlora.server.chain_routes import install_chain_routes
from openlora.server.errors import error_body, install_error_handlers
from openlora.server.explorer import install_explorer_routes
from openlora.server.limits import TenantLimits
from openlora.server.metrics import Metrics, snapshot
from openlora.server.node_state import ADAPTER_STATE_HEADER, node_state
from openlora.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from openlora.server.serving import create_chat_completion, create_completion, may_use
from openlora.server.state import ReceiptHook, ServerState
from openlora.server.tenancy import Tenancy
from openlora.web import mount_web

log = logging.getLogger("openlora.server")


@dataclass
class ServeOptions:
    """What `openlora serve` was asked for (see openlora.server.cli for the flags)."""

    model: str | None = None
    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, source)
    adapter_dirs: list[str] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # build_engine_config keyword options
    max_waiting: int | None = None
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> key id
    share_groups: dict[str, str] = field(default_factory=dict)  # key id -> prefix-cache sharing group
    limits: dict = field(default_factory=dict)  # TenantLimits keyword options (rate, burst, quota, period_s)
    adapter_roots: list[str] = field(default_factory=list)  # where run-time local registrations may point
    adapter_kinds: tuple[str, ...] = ("local", "hub", "s3")  # source kinds that may be registered
    admin_key: str | None = None
    attribution: bool = True
    ledger: str | None = None
    node_key: str | None = None
    grace_period: float = 30.0
    chain: str | None = None  # deployment file: register on chain, take payer authorizations, settle
    epoch_seconds: float = 300.0
    region: str = "ZZ"  # ISO 3166 code of where the node runs (ZZ: unknown)
    location: tuple[float, float] | None = None  # coarse (lat, lon)
    public_url: str = "http://127.0.0.1:8000"


def model_id_for(model: str | None) -> str:
    """The id clients put in `model` for the base model: folder name, GGUF file stem, hub id, or the
    demo's (SmolLM2-135M-Instruct)."""
    from openlora.demo import DEMO_MODEL_ID

    if model is None:
        return DEMO_MODEL_ID
    p = Path(model)
    if p.is_dir():
        return p.name
    return p.stem if p.is_file() else model


def build_state(opts: ServeOptions, attribution_factory: Callable[[ServeOptions, str, str], Any] | None = None,
                chain_joiner: Callable[[ServerState, ServeOptions, list[tuple[str, str]]], None] | None = None
                ) -> ServerState:
    """Load the model, register adapters (and their manifests), open the attribution ledger.
    `attribution_factory(opts, model id, base model hash)` builds the AttributionService (default: this
    process owns the key and the ledger; openlora.scale's replicas pass one that commits elsewhere);
    `chain_joiner(state, opts, adapters)` wires chain mode (default `_join_chain`; replicas pass proxies)."""
    from openlora.engine.llm_engine import LLMEngine
    from openlora.llm import build_engine_config
    from openlora.lora.manager import LoRAManager

    limits = TenantLimits(**opts.limits)  # bad options fail here, before the model loads
    adapters = served_adapters(opts)
    model = opts.model
    if model is None:
        from openlora.demo import ensure_demo_model

        model = str(ensure_demo_model())
    model_id = model_id_for(opts.model)

    config = build_engine_config(model, **opts.engine)
    # The model and the adapter pool are built on the engine thread (see AsyncEngine.build).
    async_engine = AsyncEngine.build(lambda: LLMEngine(config, lora_manager=LoRAManager(config)),
                                     max_waiting=opts.max_waiting)
    engine = async_engine.engine
    lora = engine.lora
    log.info("model %s (served as %r) on %s, dtype %s, kernels %s", config.model.path, model_id,
             config.device, config.dtype, engine.runner.plan.describe())
    metrics = Metrics()
    state = ServerState(engine=async_engine, lora=lora, model_id=model_id,
                        metrics=metrics, api_keys=dict(opts.api_keys), admin_key=opts.admin_key,
                        tenancy=Tenancy(opts.share_groups), limits=limits, adapter_kinds=tuple(opts.adapter_kinds),
                        adapter_roots=[Path(r) for r in (*opts.adapter_roots, *opts.adapter_dirs)]
                        + [Path(src) for _, src in adapters if Path(src).is_dir()],
                        grace_period=opts.grace_period)
    if limits.quota is not None:  # each request's real cost, failed and aborted ones included
        engine.usage_listeners.append(lambda ev: limits.charge(ev.tenant, ev.prompt_tokens + ev.completion_tokens))
    if opts.attribution:
        state.attribution = (attribution_factory or open_attribution)(opts, model_id, engine.base_model_hash)
        from openlora.attribution.span_service import SpanAttributor
        from openlora.config import cache_dir

        state.attribution.spans = SpanAttributor(engine.tokenizer, cache_dir() / "span_index")
        state.receipts = ReceiptHook(state.attribution, metrics)
        engine.usage_listeners.append(state.receipts)
        base = state.attribution.manifest_for_base()
        state.declared["price"] = {"per_1k_prompt_tokens": base.price_per_1k_prompt_tokens,
                                   "per_1k_completion_tokens": base.price_per_1k_completion_tokens}
        if opts.chain:
            (chain_joiner or _join_chain)(state, opts, adapters)
    state.declared.update(region=opts.region, location=list(opts.location) if opts.location else None,
                          hardware=declared_hardware())
    for name, source in adapters:
        try:
            register_adapter(state, name, source, trusted=True)
        except OpenLoRAError as e:  # one bad adapter must not keep the node down
            log.error("adapter %s (%s) not registered: %s", name, source, e)
            continue
        log.info("adapter %s <- %s", name, source)
    return state


def served_adapters(opts: ServeOptions) -> list[tuple[str, str]]:
    """(name, source) of every adapter registered at start: the demo's (no --model), --adapter, and
    each --adapter-dir's folders."""
    adapters = list(opts.adapters)
    if opts.model is None:
        from openlora.demo import demo_adapters

        adapters = [(n, str(p)) for n, p in demo_adapters().items()] + adapters
    for d in opts.adapter_dirs:  # the same scan as LoRAManager.register_dir: nested org/name folders too
        found = scan_adapter_dir(d)
        if not found:
            log.warning("--adapter-dir %s holds no adapter (no folder with adapter_config.json)", d)
        adapters += [(name, str(p)) for name, p in found.items()]
    return adapters


def _join_chain(state: ServerState, opts: ServeOptions, adapters: list[tuple[str, str]]) -> None:
    """Chain mode: join (`join_chain`), then let the routes gate payments and show settlements."""
    state.settler, state.payments = join_chain(state.attribution, opts, state.model_id, adapters)
    state.receipts.on_recorded.append(state.payments.release)
    state.chain_deployment = opts.chain


def join_chain(att: Any, opts: ServeOptions, model_id: str, adapters: list[tuple[str, str]]) -> tuple[Any, Any]:
    """Register or update the node on chain, register the demo adapters on a local chain, check
    every adapter's manifest against the registry from now on, start settling. `att` owns the node
    key and the ledger. Returns (Settler, Payments); raises ChainError when the chain is unreachable."""
    from web3.exceptions import Web3Exception

    from openlora.chain.anvil import ChainError

    try:
        return _join(att, opts, model_id, adapters)
    except (OSError, Web3Exception) as e:  # unreachable RPC, or no contracts at those addresses
        raise ChainError(f"cannot join the chain in {opts.chain}: {type(e).__name__}: {e}") from None


def _join(att: Any, opts: ServeOptions, model_id: str, adapters: list[tuple[str, str]]) -> tuple[Any, Any]:
    from openlora.attribution.manifest import load_manifest
    from openlora.chain.client import Chain, Deployment
    from openlora.chain.payments import Payments
    from openlora.chain.registry_sync import (
        NodeProfile,
        check_adapter,
        detect_hardware,
        ensure_node,
        register_demo_adapters,
    )
    from openlora.chain.settler import Settler

    dep = Deployment.load(opts.chain)
    chain = Chain(dep, att.identity._account)
    if att.chain_id != dep.chain_id:  # receipts carry the chain id in their EIP-712 domain
        att.chain_id = dep.chain_id
    base = att.manifest_for_base()
    lat, lon = opts.location or (None, None)
    profile = NodeProfile(endpoint=opts.public_url, region=opts.region, lat=lat, lon=lon,
                          models=(att.base_model_hash or model_id,),
                          price_prompt=base.price_per_1k_prompt_tokens,
                          price_completion=base.price_per_1k_completion_tokens, **detect_hardware())
    log.info("chain %d: node %s %s", dep.chain_id, chain.address, ensure_node(chain, profile))
    if dep.local:
        manifests = {n: m for n, src in adapters if Path(src).is_dir() and (m := load_manifest(src)) is not None}
        done = register_demo_adapters(chain, manifests)
        if done:
            log.info("chain %d: registered demo adapters %s", dep.chain_id, ", ".join(done))
    att.manifest_check = lambda name, m: check_adapter(chain, name, m)
    settler = Settler(chain, att.ledger, att.epochs)
    payments = Payments(chain, settler, att)
    settler.start(opts.epoch_seconds)
    return settler, payments


def declared_hardware() -> dict:
    """This machine's hardware in the registry's shape (accelerator kind, model, memory, count, cores)."""
    from openlora.chain.registry_sync import detect_hardware

    hw = detect_hardware()
    return {"accelerator": hw["accelerator_kind"], "model": hw["accelerator_model"],
            "memory_mb": hw["accelerator_memory_mb"], "count": hw["accelerator_count"], "cpu_cores": hw["cpu_cores"]}


def open_attribution(opts: ServeOptions, model_id: str, base_hash: str) -> Any:
    """The AttributionService this process owns: the node key (keystore or ephemeral) and the ledger."""
    from openlora.attribution import AttributionService, NodeIdentity
    from openlora.attribution.identity import PASSWORD_ENV
    from openlora.config import cache_dir, env

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    if env(PASSWORD_ENV):
        ident = NodeIdentity.load_or_create(opts.node_key or root / "node_key.json")
    else:  # NOTE: a newcomer's first `openlora serve` must work; say loudly what that costs
        log.warning("%s is not set: using an ephemeral node key (receipts stay verifiable, but this node id "
                    "changes at every start); set it to keep the key in %s", PASSWORD_ENV,
                    opts.node_key or root / "node_key.json")
        ident = NodeIdentity.create()
    ledger = opts.ledger or root / "ledger.sqlite"
    log.info("attribution: node %s, ledger %s", ident.address, ledger)
    return AttributionService(ledger, ident, base_model_id=model_id, base_model_hash=base_hash)


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app for `state` (the engine thread starts with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        # uvicorn already waited (up to the grace period) for open requests; abort what is left.
        await state.engine.shutdown(0.0)
        if state.receipts is not None:
            await asyncio.to_thread(state.receipts.shutdown)
        if state.settler is not None:  # unsettled receipts stay in the ledger for the next start
            await asyncio.to_thread(state.settler.stop)
        if state.attribution is not None:
            state.attribution.close()
        state.lora.shutdown()

    app = FastAPI(title="OpenLoRA", version="0.1", lifespan=lifespan,
                  description="OpenAI-compatible multi-LoRA serving with proof of attribution.")
    app.state.openlora = state
    install_error_handlers(app)
    app.add_middleware(_StatusCounter, metrics=state.metrics,
                       node_id=state.attribution.identity.address if state.attribution is not None else None)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, raw: Request):
        return await create_completion(body, raw, state)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(body, raw, state)

    @app.get("/v1/models", response_model=ModelList)
    async def models(raw: Request) -> ModelList:
        """The base model and every adapter this caller may use (private adapters of other tenants are
        absent, as if they did not exist)."""
        caller, _ = state.who(raw)
        cards = [ModelCard(id=state.model_id, created=state.created)]
        cards += [ModelCard(id=c["id"], created=state.created, parent=state.model_id, state=c["state"],
                            pinned=c["pinned"]) for c in state.lora.cards() if may_use(state, c["id"], caller)]
        return ModelList(data=cards)

    install_adapter_routes(app, state)

    @app.get("/v1/receipts/{receipt_id}")
    async def receipt(receipt_id: str, raw: Request) -> dict:
        """The signed receipt, for the tenant that paid for it (or the admin key): anyone else gets the
        same 404 as for an unknown id."""
        caller, _ = state.who(raw)
        return await asyncio.to_thread(state.receipt, caller, receipt_id)

    @app.post("/v1/epochs/close")
    async def close_epoch(raw: Request) -> dict:
        """Admin: close the current epoch now, and on a chain settle it."""
        state.require_admin(raw)
        if state.settler is not None:
            return await asyncio.to_thread(state.settler.close_and_settle)
        if state.attribution is None:
            raise InvalidRequest("attribution is disabled on this server (--no-attribution): there are no epochs")
        ep = await asyncio.to_thread(state.attribution.close_epoch)
        return {"epoch": ep.epoch if ep else None, "batches": [], "settled": 0, "total": 0}

    @app.get("/health")
    async def health() -> Response:
        if state.engine.draining:
            return JSONResponse(error_body("shutting down", 503), status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_id})

    @app.get("/v1/state")
    async def node_state_route(raw: Request) -> dict:
        """What a router needs: residency of every adapter the caller may use, free slots, queue, KV
        use, node id."""
        caller = state.viewer(raw)
        return node_state(state, await state.engine.call(snapshot), lambda a: may_use(state, a, caller))

    install_explorer_routes(app, state, state.chain_deployment)
    if state.settler is not None:
        install_chain_routes(app, state)
    mount_web(app, network_map=state.chain_deployment is not None, wallet=state.settler is not None)

    @app.get("/metrics")
    async def metrics(raw: Request) -> Response:
        """Prometheus exposition. Series of private adapters appear only for callers who may use them
        (scrape with the admin key as bearer to see every adapter)."""
        caller = state.viewer(raw)
        snap = await state.engine.call(snapshot)
        snap["step_errors"] = state.engine.step_errors
        hidden = frozenset(a for a in snap["adapters"] if not may_use(state, a, caller))
        return Response(state.metrics.render(snap, hidden), media_type=CONTENT_TYPE_LATEST)

    return app


class _StatusCounter:
    """Pure ASGI middleware counting responses by route and status (streaming-safe)."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/v1/receipts")

    def __init__(self, app, metrics: Metrics, node_id: str | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.node_header = [(b"x-openlora-node", node_id.encode())] if node_id else []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in self.ROUTES if path.startswith(r)), "other")

        async def counting_send(msg) -> None:
            if msg["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(msg["status"])).inc()
                st = scope.get("state") or {}
                if "adapter_state" in st:  # set by the route at arrival (node_state.note_adapter_state)
                    msg = {**msg, "headers": [*msg.get("headers", []), *self.node_header,
                                              (ADAPTER_STATE_HEADER.encode(), st["adapter_state"].encode())]}
            await send(msg)

        await self.app(scope, receive, counting_send)
