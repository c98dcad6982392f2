# pragma version ~=0.4.3
"""
@title NodeRegistry
@notice The GPU map. An operator registers a node under the node's signing address: endpoint
        URL, region (ISO 3166 country or region code) and optional coarse location, hardware
        (accelerator kind, model, memory, count; CPU cores), served base models (content hashes),
        prices per 1,000 tokens for base-model requests, and a stake in OPEN. Stake leaves only
        through unbonding, after `unbonding_delay` seconds. A node is active when it is
        registered, not deactivated, and holds at least `min_stake`.
        The operator receives the operator part of every fee the node earns.
        Base prices are versioned: every price change is a new version, and a receipt is settled
        at the version it was priced with (`terms(signer, version)`), so changing prices never
        reprices receipts already signed. A deregistered node cannot come back under that signer.
        Registering a signer that is not the caller needs the signer's consent signature
        (EIP-191 over keccak256(registry, chain id, operator)), so nobody can squat another
        node's key.
"""

from ethereum.ercs import IERC20
from snekmate.utils import ecdsa
from snekmate.utils import message_hash_utils

MAX_MODELS: public(constant(uint256)) = 8


struct NodeInfo:
    endpoint: String[256]
    region: String[16]
    has_location: bool
    lat_e2: int32  # latitude in hundredths of a degree (coarse: operators round it)
    lon_e2: int32
    accelerator_kind: String[16]  # "gpu", "cpu", "tpu", ...
    accelerator_model: String[64]
    accelerator_memory_mb: uint32
    accelerator_count: uint16
    cpu_cores: uint16
    models: DynArray[bytes32, MAX_MODELS]
    price_prompt: uint256
    price_completion: uint256


struct Node:
    operator: address
    info: NodeInfo
    stake: uint256
    unbonding: uint256
    unbond_at: uint256
    active: bool
    last_heartbeat: uint256
    registered_at: uint256
    deregistered: bool
    price_version: uint256  # current version of (price_prompt, price_completion), from 1


struct Prices:
    prompt: uint256
    completion: uint256


event NodeRegistered:
    signer: indexed(address)
    operator: indexed(address)
    endpoint: String[256]


event NodeUpdated:
    signer: indexed(address)
    endpoint: String[256]


event StakeChanged:
    signer: indexed(address)
    stake: uint256
    unbonding: uint256
    unbond_at: uint256


event Heartbeat:
    signer: indexed(address)
    at: uint256


event NodeStatus:
    signer: indexed(address)
    active: bool
    deregistered: bool


token: public(IERC20)
min_stake: public(uint256)
unbonding_delay: public(uint256)
nodes: HashMap[address, Node]
prices: HashMap[address, HashMap[uint256, Prices]]  # signer -> version -> prices
signers: public(DynArray[address, 65536])


@deploy
def __init__(token: IERC20, min_stake: uint256, unbonding_delay: uint256):
    self.token = token
    self.min_stake = min_stake
    self.unbonding_delay = unbonding_delay


@internal
def _only_operator(signer: address):
    assert self.nodes[signer].operator == msg.sender, "node: not the operator"


@internal
def _check_info(info: NodeInfo):
    assert len(info.endpoint) > 0, "node: empty endpoint"
    assert len(info.region) > 0, "node: empty region"
    if info.has_location:
        assert info.lat_e2 >= -9000 and info.lat_e2 <= 9000, "node: latitude out of range"
        assert info.lon_e2 >= -18000 and info.lon_e2 <= 18000, "node: longitude out of range"


@external
@nonreentrant
def register(signer: address, info: NodeInfo, stake: uint256, consent: Bytes[65]):
    """
    @notice Register a node; the caller is its operator and stakes `stake` OPEN (approve it
            first). `consent` is empty when the caller is the signer itself.
    """
    assert signer != empty(address), "node: zero signer"
    assert self.nodes[signer].operator == empty(address), "node: already registered"
    if signer != msg.sender:
        digest: bytes32 = message_hash_utils._to_eth_signed_message_hash(
            keccak256(abi_encode(self, chain.id, msg.sender)))
        assert ecdsa._recover_sig(digest, consent) == signer, "node: no consent from signer"
    self._check_info(info)
    self.nodes[signer] = Node(
        operator=msg.sender, info=info, stake=stake, unbonding=0, unbond_at=0, active=True,
        last_heartbeat=block.timestamp, registered_at=block.timestamp, deregistered=False, price_version=1,
    )
    self.prices[signer][1] = Prices(prompt=info.price_prompt, completion=info.price_completion)
    self.signers.append(signer)
    if stake > 0:
        assert extcall self.token.transferFrom(msg.sender, self, stake, default_return_value=True), "node: stake transfer failed"
    log NodeRegistered(signer=signer, operator=msg.sender, endpoint=info.endpoint)
    log StakeChanged(signer=signer, stake=stake, unbonding=0, unbond_at=0)


@external
def update(signer: address, info: NodeInfo):
    """@notice The operator updates the node's endpoint, location, hardware, models or prices."""
    self._only_operator(signer)
    self._check_info(info)
    old: NodeInfo = self.nodes[signer].info
    if info.price_prompt != old.price_prompt or info.price_completion != old.price_completion:
        v: uint256 = self.nodes[signer].price_version + 1
        self.nodes[signer].price_version = v
        self.prices[signer][v] = Prices(prompt=info.price_prompt, completion=info.price_completion)
    self.nodes[signer].info = info
    self.nodes[signer].last_heartbeat = block.timestamp
    log NodeUpdated(signer=signer, endpoint=info.endpoint)


@external
def heartbeat(signer: address):
    """@notice The node (or its operator) says it is alive."""
    assert self.nodes[signer].operator != empty(address), "node: unknown"
    assert msg.sender == signer or msg.sender == self.nodes[signer].operator, "node: not the node or operator"
    self.nodes[signer].last_heartbeat = block.timestamp
    log Heartbeat(signer=signer, at=block.timestamp)


@external
def set_active(signer: address, active: bool):
    """@notice The operator deactivates (or reactivates) the node: inactive nodes cannot settle."""
    self._only_operator(signer)
    assert not (active and self.nodes[signer].deregistered), "node: deregistered"
    self.nodes[signer].active = active
    log NodeStatus(signer=signer, active=active, deregistered=False)


@external
@nonreentrant
def add_stake(signer: address, amount: uint256):
    self._only_operator(signer)
    self.nodes[signer].stake += amount
    assert extcall self.token.transferFrom(msg.sender, self, amount, default_return_value=True), "node: stake transfer failed"
    n: Node = self.nodes[signer]
    log StakeChanged(signer=signer, stake=n.stake, unbonding=n.unbonding, unbond_at=n.unbond_at)


@internal
def _unbond(signer: address, amount: uint256):
    assert amount <= self.nodes[signer].stake, "node: unbonding more than the stake"
    self.nodes[signer].stake -= amount
    self.nodes[signer].unbonding += amount
    self.nodes[signer].unbond_at = block.timestamp + self.unbonding_delay  # a new unbond restarts the clock
    n: Node = self.nodes[signer]
    log StakeChanged(signer=signer, stake=n.stake, unbonding=n.unbonding, unbond_at=n.unbond_at)


@external
def unbond(signer: address, amount: uint256):
    """@notice Start unbonding `amount` of stake; it can be withdrawn after `unbonding_delay`."""
    self._only_operator(signer)
    self._unbond(signer, amount)


@external
def deregister(signer: address):
    """@notice Deactivate the node for good and unbond all its stake."""
    self._only_operator(signer)
    self.nodes[signer].active = False
    self.nodes[signer].deregistered = True
    self._unbond(signer, self.nodes[signer].stake)
    log NodeStatus(signer=signer, active=False, deregistered=True)


@external
@nonreentrant
def withdraw_unbonded(signer: address):
    """@notice Send unbonded stake back to the operator once the delay has passed."""
    self._only_operator(signer)
    amount: uint256 = self.nodes[signer].unbonding
    assert amount > 0, "node: nothing unbonding"
    assert block.timestamp >= self.nodes[signer].unbond_at, "node: still unbonding"
    self.nodes[signer].unbonding = 0  # effects before the transfer
    assert extcall self.token.transfer(msg.sender, amount, default_return_value=True), "node: transfer failed"
    n: Node = self.nodes[signer]
    log StakeChanged(signer=signer, stake=n.stake, unbonding=0, unbond_at=n.unbond_at)


@view
@external
def is_active(signer: address) -> bool:
    """@notice Registered, not deactivated, and staked at least `min_stake`."""
    n: Node = self.nodes[signer]
    return n.operator != empty(address) and n.active and n.stake >= self.min_stake


@view
@external
def get(signer: address) -> Node:
    return self.nodes[signer]


@view
@external
def terms(signer: address, version: uint256) -> (address, uint256, uint256):
    """@notice (operator, price per 1k prompt tokens, price per 1k completion tokens) at a price
            version (1 .. the current one)."""
    n: Node = self.nodes[signer]
    assert version >= 1 and version <= n.price_version, "node: no such price version"
    p: Prices = self.prices[signer][version]
    return n.operator, p.prompt, p.completion


@view
@external
def count() -> uint256:
    return len(self.signers)
