"""`openlora gateway --node URL[@ADDRESS] ... | --chain DEPLOYMENT [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("openlora.gateway")


def add_gateway_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="route OpenAI requests to the best node (adapter residency, load, "
                                       "latency, region, price), with health checks and failover")
    p.add_argument("--node", action="append", default=[], metavar="URL[@ADDRESS]",
                   help="a node (repeatable); @ADDRESS: the key its receipts must be signed with")
    p.add_argument("--chain", metavar="DEPLOYMENT", help="find nodes in the NodeRegistry of this deployment")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--policy", default="ours", choices=["ours", "round-robin", "least-loaded"],
                   help="ranking policy (the others are peers for bench/routing.py)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between node state polls (max 5)")
    p.add_argument("--seed", type=int, default=None, help="tie-break randomness (tests, benchmarks)")
    p.set_defaults(func=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from openlora.network.fleet import Fleet, parse_node_spec
    from openlora.network.gateway import create_gateway
    from openlora.network.policy import POLICIES

    if not args.node and not args.chain:
        print("error: give --node URL (repeatable) or --chain DEPLOYMENT", file=sys.stderr)
        return 2
    try:
        nodes = [parse_node_spec(s) for s in args.node]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied call and poll
    fleet = Fleet(nodes, chain=args.chain, poll_s=args.poll_interval)
    app = create_gateway(fleet, POLICIES[args.policy](args.seed))
    log.info("gateway on http://%s:%d, policy %s, %d static node(s)%s", args.host, args.port, args.policy,
             len(nodes), f", registry {args.chain}" if args.chain else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, log_config=None)
    return 0
