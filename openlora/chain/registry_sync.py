"""The node on chain: register or update it in the NodeRegistry (the GPU map), and check each
adapter's manifest against its on-chain entries (adapter and datanets).

On a local chain the node funds itself from the dev faucet and registers the demo adapters and
datanets with their (public, worthless) demo owner keys.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass

from eth_account import Account

from openlora.attribution.ids import name_id, name_id_bytes
from openlora.attribution.manifest import Manifest
from openlora.chain.anvil import ChainError
from openlora.chain.charges import hash32, manifest_hash
from openlora.chain.client import Chain
from openlora.errors import InvalidRequest

log = logging.getLogger(__name__)
ZERO = "0x0000000000000000000000000000000000000000"


@dataclass(frozen=True)
class NodeProfile:
    """What the node tells the GPU map about itself."""

    endpoint: str
    region: str
    lat: float | None = None
    lon: float | None = None
    accelerator_kind: str = "cpu"
    accelerator_model: str = ""
    accelerator_memory_mb: int = 0
    accelerator_count: int = 0
    cpu_cores: int = 0
    models: tuple[str, ...] = ()  # content hashes of served base models
    price_prompt: int = 0
    price_completion: int = 0

    def as_tuple(self) -> tuple:
        has_loc = self.lat is not None and self.lon is not None
        return (self.endpoint, self.region, has_loc, round((self.lat or 0) * 100), round((self.lon or 0) * 100),
                self.accelerator_kind, self.accelerator_model[:64], self.accelerator_memory_mb,
                self.accelerator_count, self.cpu_cores, [hash32(m) for m in self.models][:8],
                self.price_prompt, self.price_completion)


def detect_hardware() -> dict:
    """Accelerator kind/model/memory/count and CPU cores of this machine (CUDA if torch sees it)."""
    hw = {"accelerator_kind": "cpu", "accelerator_model": _cpu_model(), "accelerator_memory_mb": 0,
          "accelerator_count": 0, "cpu_cores": os.cpu_count() or 1}
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            hw.update(accelerator_kind="gpu", accelerator_model=p.name,
                      accelerator_memory_mb=p.total_memory >> 20, accelerator_count=torch.cuda.device_count())
    except ImportError:
        pass
    return hw


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ensure_node(chain: Chain, profile: NodeProfile, stake: int | None = None) -> str:
    """Register this node (the chain's account is its signer and operator) or update its entry.
    Returns "registered", "updated" or "unchanged"."""
    reg = chain.c["NodeRegistry"].functions
    me = chain.address
    stake = reg.min_stake().call() if stake is None else stake
    if chain.d.local:
        from openlora.chain.cli import faucet

        need = max(0, stake - chain.token_balance(me))
        faucet(chain, me, need)
    operator = reg.get(me).call()[0]
    if operator == ZERO:
        if stake:
            chain.send(chain.c["OpenToken"].functions.approve(chain.c["NodeRegistry"].address, stake))
        chain.send(reg.register(me, profile.as_tuple(), stake, b""))
        log.info("node %s registered on chain %d (%s, %s)", me, chain.d.chain_id, profile.endpoint, profile.region)
        return "registered"
    if operator != me:
        raise ChainError(f"node {me} is registered with operator {operator}; this node can only settle, "
                         "its operator must update the entry")
    current = tuple(reg.get(me).call()[1])
    want = profile.as_tuple()
    if _norm(current) != _norm(want):
        chain.send(reg.update(me, want))
        log.info("node %s: registry entry updated", me)
        return "updated"
    return "unchanged"


def _norm(t: tuple) -> tuple:
    return tuple(tuple(bytes(x) for x in v) if isinstance(v, list) else v for v in t)


def check_adapter(chain: Chain, name: str, m: Manifest | None) -> None:
    """Raise InvalidRequest naming the adapter unless its on-chain terms equal its manifest's.
    An adapter without a manifest must not be on chain (both sides then price it as the base)."""
    a = chain.c["AdapterRegistry"].functions.get(name_id_bytes(name)).call()
    owner, _content, _base, mhash, pp, pc, op, ow, da, datanets, _public, active = a
    if m is None:
        if owner != ZERO:
            raise InvalidRequest(f"adapter {name!r}: registered on chain by {owner} but served here without a "
                                 "manifest (attribution.json)")
        return
    if owner == ZERO:
        raise InvalidRequest(f"adapter {name!r}: its manifest is not registered on chain (id {name_id(name)}); "
                             "its owner registers it with `openlora chain register-adapter`")
    diffs = []
    if owner != m.owner:
        diffs.append(f"owner {owner} != {m.owner}")
    if (pp, pc) != (m.price_per_1k_prompt_tokens, m.price_per_1k_completion_tokens):
        diffs.append(f"prices {pp}/{pc} != {m.price_per_1k_prompt_tokens}/{m.price_per_1k_completion_tokens}")
    if (op, ow, da) != (m.split.operator, m.split.owner, m.split.data):
        diffs.append(f"split {op}/{ow}/{da} != {m.split.operator}/{m.split.owner}/{m.split.data}")
    want_ds = [(name_id_bytes(d.id), d.weight) for d in m.datasets]
    if [(bytes(i), w) for i, w in datanets] != want_ds:
        diffs.append("datanets or their weights differ")
    else:
        dreg = chain.c["DatanetRegistry"].functions
        for d in m.datasets:
            cs = dreg.contributors(name_id_bytes(d.id)).call()
            if [(c, w) for c, w in cs] != [(c.address, c.weight) for c in d.contributors]:
                diffs.append(f"contributors of dataset {d.id!r} differ")
    if bytes(mhash) != manifest_hash(m):
        diffs.append("manifest hash differs")
    if not active:
        diffs.append("retired by its owner")
    if diffs:
        raise InvalidRequest(f"adapter {name!r}: manifest does not match its on-chain entry: {'; '.join(diffs)}")


def register_adapter(chain: Chain, name: str, m: Manifest, content_hash: str = "", base_model_hash: str = "") -> None:
    """Register `m`'s datanets (those missing) and the adapter, from the owner's account
    (`chain.account` must be the manifest's owner)."""
    if chain.address != m.owner:
        raise ChainError(f"adapter {name!r}: only its owner {m.owner} can register it (key is {chain.address})")
    dreg = chain.c["DatanetRegistry"].functions
    for d in m.datasets:
        if not dreg.exists(name_id_bytes(d.id)).call():
            chain.send(dreg.register(name_id_bytes(d.id), hash32(d.ref),
                                     [(c.address, c.weight) for c in d.contributors]))
    chain.send(chain.c["AdapterRegistry"].functions.register(
        name_id_bytes(name), hash32(content_hash or name), hash32(base_model_hash or m.base_model), manifest_hash(m),
        m.price_per_1k_prompt_tokens, m.price_per_1k_completion_tokens, m.split.operator, m.split.owner,
        m.split.data, [(name_id_bytes(d.id), d.weight) for d in m.datasets], m.access.public))
    if not m.access.public:
        allow = [a for a in m.access.allow if a.startswith("0x") and len(a) == 42]
        if allow:
            from eth_utils import to_checksum_address

            chain.send(chain.c["AdapterRegistry"].functions.set_allowed(
                name_id_bytes(name), [to_checksum_address(a) for a in allow], True))


def register_demo_adapters(chain: Chain, manifests: dict[str, Manifest]) -> list[str]:
    """Local chains: register the demo adapters (and datanets) with their demo owner keys."""
    from openlora.chain.cli import faucet
    from openlora.demo.manifests import ADAPTERS, demo_key

    done = []
    for a in ADAPTERS:
        m = manifests.get(a.name)
        if m is None:
            continue
        if chain.c["AdapterRegistry"].functions.get(name_id_bytes(a.name)).call()[0] != ZERO:
            continue
        owner = Chain(chain.d, Account.from_key(demo_key(f"owner/{a.name}")))
        faucet(chain, owner.address, 0)
        register_adapter(owner, a.name, m)
        done.append(a.name)
    return done
