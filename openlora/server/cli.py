"""`openlora serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import signal

from openlora.config import (
    DTYPES,
    KERNEL_CHOICES,
    QUANTIZATIONS,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    SchedulerConfig,
)

log = logging.getLogger("openlora.server")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'1GiB', '512MiB', '2g', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _pair(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE, got {text!r}")
    return name, source


def _latlon(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LAT,LON, e.g. 48.9,2.4") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise argparse.ArgumentTypeError("latitude must be in [-90, 90] and longitude in [-180, 180]")
    return lat, lon


def api_key_id(key: str) -> str:
    """The id a bare API key is known by (payer / manifest access lists): a short hash, never the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                       description="OpenAI-compatible multi-LoRA server. With no --model, serves the built-in "
                                   "demo model with its demo adapters.")
    p.add_argument("--model", help="HF model folder, GGUF file (converted once, then cached) or hub id "
                                   "(default: the demo model, SmolLM2-135M-Instruct, with its four adapters)")
    p.add_argument("--adapter", action="append", type=_pair, default=[], metavar="NAME=SOURCE",
                   help="register an adapter (folder, hub id[@rev] or s3:// URI); repeatable")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="register every subfolder of DIR holding adapter_config.json; repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=EngineConfig.dtype, choices=DTYPES)
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="keep the base projections quantized: int8 weights (w8a16), int4 groups (w4a16), int8 "
                        "weights and activations (w8a8), or a GGUF file's own Q8_0/Q4_0/Q4_1 codes (gguf); "
                        "adapters stay exact on top; a GPTQ / AWQ / compressed-tensors folder is served from its own "
                        "codes (checkpoint) without asking")
    p.add_argument("--original-norms", default=None, metavar="PATH",
                   help="the original float model's folder (or a safetensors file with its norm weights): corrects "
                        "LoRA inputs on an AWQ / SmoothQuant checkpoint whose scales were folded into its norms")
    p.add_argument("--max-loras", type=int, default=LoRAConfig.max_loras,
                   help="adapters resident on the device at once")
    p.add_argument("--max-cpu-loras", type=int, default=LoRAConfig.max_cpu_loras, help="adapters cached in host memory")
    p.add_argument("--max-adapter-bytes", type=parse_bytes, default=LoRAConfig.max_adapter_bytes,
                   help="largest adapter weights file (or S3 download) accepted, e.g. 512MiB")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="local adapter folders registered at run time (admin API, chain) must lie under one of "
                        "these (symlinks resolved); the --adapter and --adapter-dir folders are always allowed")
    p.add_argument("--adapter-sources", default="local,hub,s3", metavar="KINDS",
                   help="which kinds of adapter source may be registered: local, hub, s3 (comma-separated)")
    p.add_argument("--max-lora-rank", type=int, default=LoRAConfig.max_lora_rank,
                   help="largest adapter rank accepted: a higher-rank adapter fails to load with a clear error")
    p.add_argument("--seed", type=int, default=EngineConfig.seed,
                   help="seeds sampling for requests that give no seed of their own (a run is reproducible)")
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=CacheConfig.kv_cache_memory_bytes,
                   help="e.g. 1GiB, 512MiB or bytes")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-scrub", action="store_true",
                   help="do not zero freed KV blocks and unloaded adapter slots (zeroing is on by default; "
                        "no measurable cost, see README)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--kernels", default="", metavar="PART=CHOICE,...",
                   help="force kernel choices (A/B runs, debugging), e.g. layer_loop=python,lora=torch; parts: "
                        + "; ".join(f"{k} ({'|'.join(v)})" for k, v in KERNEL_CHOICES.items())
                        + ". Default: auto for each; a forced choice that cannot run here is an error")
    p.add_argument("--max-waiting", type=int, default=SchedulerConfig.max_waiting,
                   help="queued requests beyond this get 429")
    p.add_argument("--api-key", action="append", default=[], metavar="[ID=]KEY",
                   help="require this bearer key on /v1 routes; repeatable. ID names the key as payer and in "
                        "adapter access lists (default: key-<sha256 prefix>)")
    p.add_argument("--share-prefix-cache", action="append", default=[], type=_group, metavar="GROUP=ID,ID,...",
                   help="let these API-key ids share one prefix cache (off by default: each tenant's cached "
                        "prompts are its own); repeatable")
    p.add_argument("--rate-limit", type=float, default=None, metavar="REQ_PER_S",
                   help="requests per second per tenant (API key or payer); beyond it 429 with Retry-After")
    p.add_argument("--rate-burst", type=int, default=None, metavar="N",
                   help="requests a tenant may send at once under --rate-limit (default: one second's worth)")
    p.add_argument("--token-quota", type=_quota, default=None, metavar="TOKENS[/SECONDS]",
                   help="prompt + completion tokens per tenant per window (default window 3600 s); "
                        "beyond it 429 with Retry-After until the window ends")
    p.add_argument("--admin-key", help="bearer key for POST/DELETE /v1/adapters (admin API off without it)")
    p.add_argument("--ledger", help="attribution ledger (default: <cache>/ledger.sqlite)")
    p.add_argument("--node-key", help="node keystore (default: <cache>/node_key.json; password from "
                                      "OPENLORA_NODE_KEY_PASSWORD)")
    p.add_argument("--no-attribution", action="store_true", help="no receipts, no access checks")
    p.add_argument("--chain", metavar="DEPLOYMENT", help="deployment file (openlora chain up/deploy): register "
                   "this node on chain, accept payer authorizations, settle receipts")
    p.add_argument("--epoch-seconds", type=float, default=300.0, help="chain mode: close and settle this often")
    p.add_argument("--region", default="ZZ",
                   help="ISO 3166 country or region code of this node (the registry and the network map)")
    p.add_argument("--location", type=_latlon, help="coarse LAT,LON of this node for the network map")
    p.add_argument("--public-url", help="chain mode: the endpoint others reach this node at "
                   "(default http://HOST:PORT)")
    p.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted")
    p.add_argument("--ray-replicas", type=int, default=None, metavar="N",
                   help="scale out on Ray Serve: N replicas, each running an engine; requests for an adapter go to "
                        "the replica that holds it (needs the extra: pip install 'openlora[ray]'; see README)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray-replicas: join this Ray cluster (e.g. auto, or HEAD_IP:6379) instead of "
                        "starting a one-machine cluster on 127.0.0.1")
    p.add_argument("--ray-gpus-per-replica", type=float, default=0.0, metavar="G",
                   help="with --ray-replicas: GPUs each replica reserves (0: CPU replicas)")
    p.set_defaults(func=run_serve)


def _group(text: str) -> tuple[str, list[str]]:
    name, sep, ids = text.partition("=")
    members = [i.strip() for i in ids.split(",") if i.strip()]
    if not sep or not name or not members:
        raise argparse.ArgumentTypeError(f"expected GROUP=KEYID,KEYID,..., got {text!r}")
    return name, members


def _quota(text: str) -> tuple[int, float]:
    tokens, _, period = text.partition("/")
    try:
        return int(tokens), float(period or 3600)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENS[/SECONDS], e.g. 100000/3600, got {text!r}") from None


def no_core_dumps() -> None:
    """A crash must not write the process's memory (prompts, outputs, KV) to disk: RLIMIT_CORE = 0."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def serve_options(args: argparse.Namespace):
    """The ServeOptions of parsed `serve` arguments."""
    from openlora.server.app import ServeOptions

    keys = {}
    for k in args.api_key:
        kid, sep, key = k.partition("=")
        keys[key if sep else kid] = kid if sep else api_key_id(kid)
    opts = ServeOptions(
        model=args.model, adapters=args.adapter, adapter_dirs=args.adapter_dir,
        engine=dict(dtype=args.dtype, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                    max_lora_rank=args.max_lora_rank, max_num_seqs=args.max_num_seqs, seed=args.seed,
                    max_adapter_bytes=args.max_adapter_bytes,
                    max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                    kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
                    scrub_freed_memory=not args.no_scrub,
                    num_threads=args.num_threads, max_waiting=args.max_waiting, kernels=args.kernels,
                    quantization=args.quantization, original_norms=args.original_norms),
        max_waiting=args.max_waiting, api_keys=keys, admin_key=args.admin_key,
        share_groups={kid: name for name, ids in args.share_prefix_cache for kid in ids},
        adapter_roots=args.adapter_root, adapter_kinds=tuple(k.strip() for k in args.adapter_sources.split(",")),
        limits=dict(rate=args.rate_limit, burst=args.rate_burst, quota=args.token_quota and args.token_quota[0],
                    **({"period_s": args.token_quota[1]} if args.token_quota else {})),
        attribution=not args.no_attribution, ledger=args.ledger, node_key=args.node_key,
        grace_period=args.grace_period, chain=args.chain, epoch_seconds=args.epoch_seconds, region=args.region,
        location=args.location, public_url=args.public_url or f"http://{args.host}:{args.port}")
    return opts


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from openlora.server.app import build_state, create_app

    no_core_dumps()
    opts = serve_options(args)
    if args.ray_replicas is not None:  # the same options, served by N replicas on Ray Serve
        from openlora.scale.deploy import run_on_ray

        return run_on_ray(opts, args)
    keys = opts.api_keys
    from openlora.chain.anvil import ChainError
    from openlora.errors import OpenLoRAError

    try:
        state = build_state(opts)
    # A bad model, adapter folder, chain or option (config validation raises ValueError naming the
    # field): the operator's to fix: say what and where, no traceback.
    except (OpenLoRAError, ChainError, ValueError) as e:
        log.error("cannot serve: %s", e)
        return 2
    app = create_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=args.grace_period + 5, log_config=None)
    server = _DrainingServer(config, state)
    log.info("listening on http://%s:%d (model %r, %d adapters%s)", args.host, args.port, state.model_id,
             len(state.lora.cards()), "" if keys else ", no API key")
    server.run()
    log.info("server stopped")
    return 0


class _DrainingServer:
    """uvicorn.Server whose exit signal also stops admission at once (keep-alive connections could
    otherwise still queue new requests while uvicorn waits for the in-flight ones)."""

    def __new__(cls, config, state):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                if not state.engine.draining:
                    log.info("signal %s: draining (grace period %.0fs)", sig, state.grace_period)
                    # Our own drain aborts what outlives the grace period with a clean error; uvicorn's
                    # timeout (a few seconds longer) is only the backstop that cuts connections.
                    loop = state.engine.loop
                    if loop is not None:
                        loop.call_soon_threadsafe(lambda: loop.create_task(state.engine.drain(state.grace_period)))
                state.engine.draining = True
                super().handle_exit(sig, frame)
                # uvicorn re-raises captured signals after shutdown (exit status -15); a SIGTERM that
                # drained cleanly is a normal stop for supervisors, so exit 0 instead.
                if sig == signal.SIGTERM:
                    self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

        return Server(config)
