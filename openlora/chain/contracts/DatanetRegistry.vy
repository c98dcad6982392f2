# pragma version ~=0.4.3
"""
@title DatanetRegistry
@notice A datanet (a dataset behind adapters) is registered once by its owner with its
        contributors and their integer weights. The entry is immutable: the weights decide how
        the data part of every fee is split, so changing them would change unsettled payouts.
        A new version of a dataset is a new datanet id.
        Ids are keccak256 of the dataset's name as the manifests write it.
"""

MAX_CONTRIBUTORS: public(constant(uint256)) = 32


struct Contributor:
    account: address
    weight: uint32


struct Datanet:
    owner: address
    content_hash: bytes32
    contributors: DynArray[Contributor, MAX_CONTRIBUTORS]


event DatanetRegistered:
    datanet_id: indexed(bytes32)
    owner: indexed(address)
    content_hash: bytes32
    contributors: uint256


datanets: HashMap[bytes32, Datanet]
ids: public(DynArray[bytes32, 65536])


@external
def register(datanet_id: bytes32, content_hash: bytes32, contributors: DynArray[Contributor, MAX_CONTRIBUTORS]):
    """
    @notice Register a datanet; the caller becomes its owner. Contributors must be distinct,
            non-zero addresses with weights > 0.
    """
    assert datanet_id != empty(bytes32), "datanet: empty id"
    assert self.datanets[datanet_id].owner == empty(address), "datanet: id taken"
    assert len(contributors) > 0, "datanet: no contributors"
    for i: uint256 in range(MAX_CONTRIBUTORS):
        if i >= len(contributors):
            break
        c: Contributor = contributors[i]
        assert c.account != empty(address), "datanet: zero contributor"
        assert c.weight > 0, "datanet: zero weight"
        for j: uint256 in range(MAX_CONTRIBUTORS):
            if j >= i:
                break
            assert contributors[j].account != c.account, "datanet: duplicate contributor"
    self.datanets[datanet_id] = Datanet(owner=msg.sender, content_hash=content_hash, contributors=contributors)
    self.ids.append(datanet_id)
    log DatanetRegistered(datanet_id=datanet_id, owner=msg.sender, content_hash=content_hash, contributors=len(contributors))


@view
@external
def get(datanet_id: bytes32) -> Datanet:
    """@notice The datanet's owner, content hash and contributors (owner 0x0: not registered)."""
    return self.datanets[datanet_id]


@view
@external
def contributors(datanet_id: bytes32) -> DynArray[Contributor, MAX_CONTRIBUTORS]:
    """@notice Contributors and weights; reverts for an unknown datanet."""
    assert self.datanets[datanet_id].owner != empty(address), "datanet: unknown"
    return self.datanets[datanet_id].contributors


@view
@external
def exists(datanet_id: bytes32) -> bool:
    return self.datanets[datanet_id].owner != empty(address)


@view
@external
def count() -> uint256:
    return len(self.ids)
