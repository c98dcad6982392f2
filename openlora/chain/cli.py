"""`openlora chain up|deploy|nodes|faucet|deposit|withdraw|authorize|balances|claim`.

Amounts are integers in base units (OPEN has 18 decimals). With `--json` the output is one JSON
document; addresses are keyed exactly as given. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from openlora.errors import OpenLoRAError


def _amount(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("amounts are integers >= 0 in base units")
    return v


def _chain(args: argparse.Namespace, need_key: bool = True):
    from openlora.chain.client import Chain, Deployment, load_key

    d = Deployment.load(args.deployment)
    if getattr(args, "rpc", None):
        d.rpc = args.rpc
    acct = None
    if need_key:
        acct = load_key(getattr(args, "key", None), getattr(args, "keystore", None))
    return Chain(d, acct)


def _print(args: argparse.Namespace, obj) -> None:
    print(json.dumps(obj) if getattr(args, "json", True) else json.dumps(obj, indent=1))


def _cmd_up(args: argparse.Namespace) -> int:
    from eth_account import Account

    from openlora.chain.anvil import DEV_KEYS, Anvil
    from openlora.chain.client import Chain, Deployment
    from openlora.chain.deploy import deploy

    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    dep_path = state / "deployment.json"
    node = Anvil(port=args.port, state=state / "anvil_state.json").start()
    try:
        dep = None
        if dep_path.is_file():
            dep = Deployment.load(dep_path)
            dep.rpc = node.rpc
            code = Chain(dep).w3.eth.get_code(dep.address("Settlement"))
            if not code:  # state was lost or belongs to another chain: deploy afresh
                dep = None
        if dep is None:
            dep = deploy(node.rpc, Account.from_key(DEV_KEYS[0]), local=True)
            dep.extra["faucet_key"] = DEV_KEYS[0]  # anvil's public dev key: local chains only
        dep.save(dep_path)
        print(json.dumps({"rpc": node.rpc, "chain_id": dep.chain_id, "deployment": str(dep_path.resolve())}),
              flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.is_set() and node.proc is not None and node.proc.poll() is None:
            stop.wait(0.5)
    finally:
        node.stop()
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from openlora.chain.client import load_key
    from openlora.chain.deploy import deploy

    dep = deploy(args.rpc, load_key(args.key, args.keystore), token=args.token)
    dep.save(args.out)
    _print(args, {"chain_id": dep.chain_id, "rpc": dep.rpc, "deployment": str(Path(args.out).resolve()),
                  "contracts": {k: v["address"] for k, v in dep.contracts.items()}})
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    _print(args, _chain(args, need_key=False).nodes())
    return 0


def faucet(chain, address: str, amount: int, gas_wei: int = 10**20) -> None:
    """Local chains only: mint `amount` test OPEN to `address` and give it gas."""
    from eth_account import Account

    from openlora.chain.anvil import ChainError
    from openlora.chain.client import Chain

    if not chain.d.local or "faucet_key" not in chain.d.extra:
        raise ChainError("the faucet works on local chains only (this deployment is not local)")
    chain.w3.provider.make_request("anvil_setBalance", [address, hex(gas_wei)])
    if amount:
        minter = Chain(chain.d, Account.from_key(chain.d.extra["faucet_key"]))
        minter.send(minter.c["OpenToken"].functions.mint(address, amount))


def _cmd_faucet(args: argparse.Namespace) -> int:
    from eth_utils import to_checksum_address

    chain = _chain(args, need_key=False)
    faucet(chain, to_checksum_address(args.address), args.amount)
    _print(args, {args.address: {"token": chain.token_balance(args.address)}})
    return 0


def _cmd_deposit(args: argparse.Namespace) -> int:
    chain = _chain(args)
    s = chain.c["Settlement"]
    chain.send(chain.c["OpenToken"].functions.approve(s.address, args.amount))
    rc = chain.send(s.functions.deposit(args.amount))
    _print(args, {"tx": rc["transactionHash"].hex(), "escrow": chain.escrow(chain.address)})
    return 0


def _cmd_withdraw(args: argparse.Namespace) -> int:
    """Announce a withdrawal of AMOUNT, or take it if one is due (delay: `withdrawal_delay`)."""
    chain = _chain(args)
    f = chain.c["Settlement"].functions
    me = chain.address
    pending, due = f.pending_withdrawal(me).call(), f.withdrawal_at(me).call()
    now = chain.w3.eth.get_block("latest")["timestamp"]
    if pending and due <= now and (args.amount is None or args.amount == pending):
        rc = chain.send(f.withdraw())
        _print(args, {"tx": rc["transactionHash"].hex(), "withdrawn": pending, "escrow": chain.escrow(me)})
        return 0
    if args.amount is None:
        raise OpenLoRAError("no withdrawal is due: give AMOUNT to announce one")
    chain.send(f.request_withdrawal(args.amount))
    if f.withdrawal_delay().call() == 0:
        rc = chain.send(f.withdraw())
        _print(args, {"tx": rc["transactionHash"].hex(), "withdrawn": args.amount, "escrow": chain.escrow(me)})
        return 0
    _print(args, {"requested": args.amount, "available_at": f.withdrawal_at(me).call(),
                  "hint": "run the same command again after available_at"})
    return 0


def _cmd_authorize(args: argparse.Namespace) -> int:
    from openlora.chain.authorization import sign_authorization

    chain = _chain(args)
    auth = sign_authorization(chain.account.key, args.node, args.cap, int(time.time()) + args.expires,
                              None, chain.d.chain_id, chain.d.address("Settlement"))
    print(json.dumps({"payer": auth.payer, "node": auth.node, "cap": auth.cap, "expiry": auth.expiry,
                      "nonce": auth.nonce}))
    print(auth.to_token())  # the bearer token, last line
    return 0


def _cmd_balances(args: argparse.Namespace) -> int:
    _print(args, _chain(args, need_key=False).balances(args.addresses))
    return 0


def _cmd_claim(args: argparse.Namespace) -> int:
    chain = _chain(args)
    amount = chain.claimable(chain.address)
    if amount == 0:
        raise OpenLoRAError(f"nothing to claim for {chain.address}")
    rc = chain.send(chain.c["Settlement"].functions.claim())
    _print(args, {"tx": rc["transactionHash"].hex(), "claimed": amount, "token": chain.token_balance(chain.address)})
    return 0


def _run(handler):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except OpenLoRAError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapped


def add_chain_commands(sub: argparse._SubParsersAction) -> None:
    chain = sub.add_parser("chain", help="local EVM chain, contracts, escrow, authorizations, claims")
    cs = chain.add_subparsers(dest="chain_command", required=True)

    def cmd(name: str, handler, help: str, key: bool = False, deployment: bool = True) -> argparse.ArgumentParser:
        p = cs.add_parser(name, help=help)
        if deployment:
            p.add_argument("--deployment", required=True, help="deployment JSON file")
            p.add_argument("--rpc", help="override the deployment's RPC URL")
        if key:
            g = p.add_mutually_exclusive_group(required=True)
            g.add_argument("--key", help="hex private key")
            g.add_argument("--keystore", help="encrypted V3 keystore (password from $OPENLORA_KEY_PASSWORD)")
        p.add_argument("--json", action="store_true", help="one JSON document on stdout")
        p.set_defaults(func=_run(handler))
        return p

    p = cmd("up", _cmd_up, "start anvil (state persisted), deploy once, print {rpc, chain_id, deployment}",
            deployment=False)
    p.add_argument("--port", type=int, default=8545)
    p.add_argument("--state", default=str(Path.home() / ".cache" / "openlora" / "chain"), help="state folder")
    p = cmd("deploy", _cmd_deploy, "deploy the contracts to any EVM RPC", key=True, deployment=False)
    p.add_argument("--rpc", required=True)
    p.add_argument("--out", required=True, help="deployment file to write")
    p.add_argument("--token", help="existing OPEN token address (default: deploy a test OpenToken)")
    cmd("nodes", _cmd_nodes, "list registered nodes (the GPU map)")
    p = cmd("faucet", _cmd_faucet, "local chains: test OPEN plus gas")
    p.add_argument("address")
    p.add_argument("amount", type=_amount)
    p = cmd("deposit", _cmd_deposit, "move OPEN into your escrow", key=True)
    p.add_argument("amount", type=_amount)
    p = cmd("withdraw", _cmd_withdraw, "announce, then take, a withdrawal from escrow", key=True)
    p.add_argument("amount", type=_amount, nargs="?")
    p = cmd("authorize", _cmd_authorize, "sign an authorization for a node; prints the bearer token last", key=True)
    p.add_argument("--node", required=True, help="the node's address")
    p.add_argument("--cap", type=_amount, required=True, help="most the node may charge, base units")
    p.add_argument("--expires", type=int, default=86_400, help="seconds from now (default 1 day)")
    p = cmd("balances", _cmd_balances, "token, escrow and claimable per address")
    p.add_argument("addresses", nargs="+")
    cmd("claim", _cmd_claim, "withdraw everything credited to you", key=True)
