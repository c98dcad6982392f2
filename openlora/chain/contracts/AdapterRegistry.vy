# pragma version ~=0.4.3
"""
@title AdapterRegistry
@notice An adapter's owner registers its id (keccak256 of the served name), content hash, base
        model hash, manifest hash, prices per 1,000 tokens, fee split in basis points
        (operator / owner / data), the datanets it was trained on with their weights, and who
        may use it (public, or an allow-list the owner edits).
        The economic terms (owner, prices, split, datanets) are immutable once registered:
        unsettled receipts were priced with them. New terms are a new adapter id (a new name or
        version). Access and the active flag stay editable.
"""

MAX_DATANETS: public(constant(uint256)) = 8
BPS: constant(uint256) = 10_000


struct DatanetUse:
    datanet_id: bytes32
    weight: uint32


struct Adapter:
    owner: address
    content_hash: bytes32
    base_model_hash: bytes32
    manifest_hash: bytes32
    price_prompt: uint256  # per 1,000 prompt tokens, token base units
    price_completion: uint256  # per 1,000 completion tokens
    operator_bps: uint16
    owner_bps: uint16
    data_bps: uint16
    datanets: DynArray[DatanetUse, MAX_DATANETS]
    is_public: bool
    active: bool


event AdapterRegistered:
    adapter_id: indexed(bytes32)
    owner: indexed(address)
    content_hash: bytes32
    manifest_hash: bytes32


event AccessChanged:
    adapter_id: indexed(bytes32)
    account: indexed(address)
    allowed: bool


event VisibilityChanged:
    adapter_id: indexed(bytes32)
    is_public: bool
    active: bool


datanet_registry: public(address)
adapters: HashMap[bytes32, Adapter]
allowed: HashMap[bytes32, HashMap[address, bool]]
ids: public(DynArray[bytes32, 65536])


interface IDatanets:
    def exists(datanet_id: bytes32) -> bool: view


@deploy
def __init__(datanet_registry: address):
    self.datanet_registry = datanet_registry


@external
def register(
    adapter_id: bytes32, content_hash: bytes32, base_model_hash: bytes32, manifest_hash: bytes32,
    price_prompt: uint256, price_completion: uint256, operator_bps: uint16, owner_bps: uint16,
    data_bps: uint16, datanets: DynArray[DatanetUse, MAX_DATANETS], is_public: bool,
):
    """
    @notice Register an adapter; the caller becomes its owner (the owner part of every fee).
            Basis points sum to 10,000; a data part needs at least one registered datanet.
    """
    assert adapter_id != empty(bytes32), "adapter: empty id"
    assert self.adapters[adapter_id].owner == empty(address), "adapter: id taken"
    assert convert(operator_bps, uint256) + convert(owner_bps, uint256) + convert(data_bps, uint256) == BPS, "adapter: split must sum to 10000"
    assert data_bps == 0 or len(datanets) > 0, "adapter: data share without datanets"
    for i: uint256 in range(MAX_DATANETS):
        if i >= len(datanets):
            break
        d: DatanetUse = datanets[i]
        assert d.weight > 0, "adapter: zero datanet weight"
        assert staticcall IDatanets(self.datanet_registry).exists(d.datanet_id), "adapter: unknown datanet"
        for j: uint256 in range(MAX_DATANETS):
            if j >= i:
                break
            assert datanets[j].datanet_id != d.datanet_id, "adapter: duplicate datanet"
    self.adapters[adapter_id] = Adapter(
        owner=msg.sender, content_hash=content_hash, base_model_hash=base_model_hash,
        manifest_hash=manifest_hash, price_prompt=price_prompt, price_completion=price_completion,
        operator_bps=operator_bps, owner_bps=owner_bps, data_bps=data_bps, datanets=datanets,
        is_public=is_public, active=True,
    )
    self.ids.append(adapter_id)
    log AdapterRegistered(adapter_id=adapter_id, owner=msg.sender, content_hash=content_hash, manifest_hash=manifest_hash)


@internal
def _only_owner(adapter_id: bytes32):
    assert self.adapters[adapter_id].owner == msg.sender, "adapter: not the owner"


@external
def set_allowed(adapter_id: bytes32, accounts: DynArray[address, 256], allowed: bool):
    """@notice The owner adds accounts to (or removes them from) a private adapter's allow-list."""
    self._only_owner(adapter_id)
    for a: address in accounts:
        self.allowed[adapter_id][a] = allowed
        log AccessChanged(adapter_id=adapter_id, account=a, allowed=allowed)


@external
def set_visibility(adapter_id: bytes32, is_public: bool, active: bool):
    """@notice The owner makes the adapter public or private, active or retired. A retired
            adapter is no longer served; receipts already signed for it still settle."""
    self._only_owner(adapter_id)
    self.adapters[adapter_id].is_public = is_public
    self.adapters[adapter_id].active = active
    log VisibilityChanged(adapter_id=adapter_id, is_public=is_public, active=active)


@view
@external
def can_use(adapter_id: bytes32, account: address) -> bool:
    """@notice True if `account` may pay for requests to the adapter (public, owner, or allowed)."""
    a: Adapter = self.adapters[adapter_id]
    return a.owner != empty(address) and (a.is_public or a.owner == account or self.allowed[adapter_id][account])


@view
@external
def get(adapter_id: bytes32) -> Adapter:
    """@notice Everything about an adapter (owner 0x0: not registered)."""
    return self.adapters[adapter_id]


@view
@external
def count() -> uint256:
    return len(self.ids)
