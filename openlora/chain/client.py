"""web3.py client for the deployed contracts: the deployment file, transactions signed locally,
and the reads the CLI, the node and the tests need.

Deployment file (JSON): {"chain_id", "rpc", "contracts": {name: {"address", "abi"}}, "local"},
where "local" marks a development chain whose faucet may mint test OPEN and set gas balances.
On a real chain "OpenToken" is the existing OPEN token's address with the ERC-20 ABI.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError

from openlora.chain.anvil import ChainError

TX_TIMEOUT = 120.0  # seconds to wait for a receipt


@dataclass
class Deployment:
    """Where the contracts live and their ABIs."""

    chain_id: int
    rpc: str
    contracts: dict[str, dict[str, Any]]
    local: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return self.contracts[name]["address"]

    def to_json(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id, "rpc": self.rpc, "local": self.local, "contracts": self.contracts,
                **self.extra}

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> "Deployment":
        try:
            d = json.loads(Path(path).read_text())
            return cls(chain_id=int(d["chain_id"]), rpc=d["rpc"], contracts=d["contracts"],
                       local=bool(d.get("local", False)),
                       extra={k: v for k, v in d.items() if k not in ("chain_id", "rpc", "contracts", "local")})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ChainError(f"cannot read deployment file {path}: {e}") from e


def load_key(key: str | None = None, keystore: str | None = None, password: str | None = None) -> LocalAccount:
    """An account from a hex private key or an encrypted V3 keystore (password given or from
    $OPENLORA_KEY_PASSWORD)."""
    from openlora.config import env

    if keystore:
        pw = password if password is not None else env("OPENLORA_KEY_PASSWORD")
        if not pw:
            raise ChainError("keystore password missing: set OPENLORA_KEY_PASSWORD")
        try:
            return Account.from_key(Account.decrypt(json.loads(Path(keystore).read_text()), pw))
        except (OSError, ValueError) as e:
            raise ChainError(f"cannot decrypt keystore {keystore}: {e}") from e
    if not key:
        raise ChainError("a key is needed: --key HEX or --keystore FILE")
    try:
        return Account.from_key(key)
    except (ValueError, TypeError) as e:
        raise ChainError(f"bad private key: {e}") from None


class Chain:
    """Contracts of one deployment, with an optional signing account for transactions."""

    def __init__(self, deployment: Deployment, account: LocalAccount | None = None, timeout: float = 10.0) -> None:
        self.d = deployment
        self.w3 = Web3(Web3.HTTPProvider(deployment.rpc, request_kwargs={"timeout": timeout}))
        self.account = account
        self._nonce_lock = threading.Lock()
        self._nonce: int | None = None
        self.c = {name: self.w3.eth.contract(address=to_checksum_address(v["address"]), abi=v["abi"])
                  for name, v in deployment.contracts.items()}

    @property
    def address(self) -> str:
        if self.account is None:
            raise ChainError("this command needs a key")
        return self.account.address

    # -------------------------------------------------------------------------------- sending

    def send(self, fn, *, gas: int | None = None, value: int = 0) -> dict[str, Any]:
        """Sign and send a contract call; wait for its receipt. Raises ChainError with the
        revert reason (checked by a dry run first, so a failing call costs no gas)."""
        acct = self.account
        if acct is None:
            raise ChainError("this command needs a key")
        try:
            est = fn.estimate_gas({"from": acct.address, "value": value})
        except ContractLogicError as e:
            raise ChainError(f"reverted: {_reason(e)}") from None
        except Exception as e:
            raise ChainError(f"chain unreachable at {self.d.rpc}: {e}") from None
        try:
            with self._nonce_lock:
                if self._nonce is None:
                    self._nonce = self.w3.eth.get_transaction_count(acct.address, "pending")
                tx = fn.build_transaction({
                    "from": acct.address, "nonce": self._nonce, "chainId": self.d.chain_id, "value": value,
                    "gas": gas or int(est * 1.25) + 10_000,
                })
                signed = acct.sign_transaction(tx)
                h = self.w3.eth.send_raw_transaction(signed.raw_transaction)
                self._nonce += 1
        except Exception as e:
            self._nonce = None  # re-read it next time (the tx may or may not have gone out)
            raise ChainError(f"sending the transaction failed: {e}") from None
        rc = self.w3.eth.wait_for_transaction_receipt(h, timeout=TX_TIMEOUT)
        if rc["status"] != 1:
            raise ChainError(f"transaction {h.hex()} reverted")
        return dict(rc)

    # ---------------------------------------------------------------------------------- reads

    def token_balance(self, who: str) -> int:
        return self.c["OpenToken"].functions.balanceOf(to_checksum_address(who)).call()

    def escrow(self, who: str) -> int:
        return self.c["Settlement"].functions.escrowOf(to_checksum_address(who)).call()

    def available(self, who: str) -> int:
        return self.c["Settlement"].functions.available(to_checksum_address(who)).call()

    def claimable(self, who: str) -> int:
        return self.c["Settlement"].functions.claimable(to_checksum_address(who)).call()

    def spent(self, digest: bytes) -> int:
        return self.c["Settlement"].functions.spent(digest).call()

    def last_seq(self, node: str) -> int:
        return self.c["Settlement"].functions.last_seq(to_checksum_address(node)).call()

    def balances(self, addresses: list[str]) -> dict[str, dict[str, int]]:
        """{address as given: {"token", "escrow", "claimable"}}."""
        return {a: {"token": self.token_balance(a), "escrow": self.escrow(a), "claimable": self.claimable(a)}
                for a in addresses}

    def nodes(self) -> list[dict[str, Any]]:
        """Every registered node, as the GPU map shows it."""
        reg = self.c["NodeRegistry"].functions
        out = []
        for i in range(reg.count().call()):
            signer = reg.signers(i).call()
            n = reg.get(signer).call()
            operator, info, stake, unbonding, unbond_at, active, heartbeat, _at, deregistered, _version = n
            (endpoint, region, has_loc, lat, lon, kind, model, mem, count, cores, models, pp, pc) = info
            out.append({
                "address": signer, "operator": operator, "endpoint": endpoint,
                "region": {"code": region, **({"lat": lat / 100, "lon": lon / 100} if has_loc else {})},
                "hardware": {"accelerator": kind, "model": model, "memory_mb": mem, "count": count,
                             "cpu_cores": cores},
                "models": ["0x" + m.hex() for m in models],
                "price": {"per_1k_prompt_tokens": pp, "per_1k_completion_tokens": pc},
                "stake": stake, "unbonding": unbonding, "deregistered": deregistered,
                "active": reg.is_active(signer).call() and active, "last_heartbeat": heartbeat,
            })
        return out


def _reason(e: ContractLogicError) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.removeprefix("execution reverted: ")
