"""Deploy the contracts with web3.py and write the deployment file."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3

from openlora.chain.anvil import LOCAL_CHAIN_IDS, ChainError
from openlora.chain.client import TX_TIMEOUT, Deployment
from openlora.chain.compile import artifacts

DAY = 86_400


def deploy(rpc: str, account: LocalAccount, *, token: str | None = None, min_stake: int = 10**18,
           unbonding_delay: int = 7 * DAY, withdrawal_delay: int = DAY, settlement_window: int = 7 * DAY,
           local: bool | None = None) -> Deployment:
    """Deploy OpenToken (unless `token` names the existing OPEN), the three registries and
    Settlement; return the deployment. `local` defaults to "chain id is a dev chain's"."""
    w3 = Web3(Web3.HTTPProvider(rpc, request_kwargs={"timeout": 30}))
    try:
        chain_id = w3.eth.chain_id
    except Exception as e:
        raise ChainError(f"chain unreachable at {rpc}: {e}") from None
    arts = artifacts()
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    contracts: dict[str, dict] = {}

    def create(name: str, *args) -> str:
        nonlocal nonce
        c = w3.eth.contract(abi=arts[name]["abi"], bytecode=arts[name]["bytecode"])
        tx = c.constructor(*args).build_transaction({"from": account.address, "nonce": nonce, "chainId": chain_id})
        h = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        nonce += 1
        rc = w3.eth.wait_for_transaction_receipt(h, timeout=TX_TIMEOUT)
        if rc["status"] != 1:
            raise ChainError(f"deploying {name} reverted")
        contracts[name] = {"address": rc["contractAddress"], "abi": arts[name]["abi"]}
        return rc["contractAddress"]

    token_addr = Web3.to_checksum_address(token) if token else create("OpenToken")
    if token:
        contracts["OpenToken"] = {"address": token_addr, "abi": arts["OpenToken"]["abi"]}
    datanets = create("DatanetRegistry")
    adapters = create("AdapterRegistry", datanets)
    nodes = create("NodeRegistry", token_addr, min_stake, unbonding_delay)
    create("Settlement", token_addr, nodes, adapters, datanets, withdrawal_delay, settlement_window)
    is_local = chain_id in LOCAL_CHAIN_IDS if local is None else local
    return Deployment(chain_id=chain_id, rpc=rpc, contracts=contracts, local=is_local)
