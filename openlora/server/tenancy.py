"""Who a request is from, and the fences that follow from it: prefix-cache scopes, receipt ownership,
adapter visibility.

The tenant is what the server authenticated, never what the client claims:
- a chain payer's authorization token -> the payer's address;
- an API key -> its key id (the admin key -> "admin", who sees and may use everything);
- a server started without keys (and without a chain) authenticates nobody: everyone is one tenant,
  and the body's `user` field is the only label there is (it names the tenant, for receipts and access
  lists, only on such a server; with keys it is ignored for both).

The prefix cache is scoped to the tenant (plus, in Request.cache_salt, the adapters' content hashes and
weights; the KV manager is per engine, so per base model). A client `cache_salt` only narrows the scope.
Operators may opt groups of keys into one shared scope (`serve --share-prefix-cache GROUP=ID,ID`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from openlora.errors import AdapterNotFound

ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    """The authenticated sender of one request."""

    key_id: str | None = None  # API-key id; None for payer tokens and on servers without keys
    payer: str | None = None  # chain payer address (authorization token)
    user: str | None = None  # the body's `user` field, trusted only where nothing is authenticated
    authenticated: bool = False  # the server checks keys (or payer tokens)

    @property
    def tenant(self) -> str:
        """Who pays and whose cache this is: payer, key id, or (open server) the `user` label."""
        if self.payer:
            return self.payer
        if self.key_id:
            return self.key_id
        return "" if self.authenticated else (self.user or "")

    @property
    def admin(self) -> bool:
        return self.key_id == ADMIN


class Tenancy:
    """The server's isolation policy (one per server)."""

    def __init__(self, share_groups: dict[str, str] | None = None) -> None:
        self.share_groups = dict(share_groups or {})  # key id -> group name

    def cache_scope(self, caller: Caller, salt: str | None) -> str:
        """The prefix-cache namespace of a request: the tenant (or its sharing group), narrowed by the
        client's salt. Prefixes keep tenants and groups apart ("t:" vs "g:")."""
        group = self.share_groups.get(caller.tenant)
        scope = f"g:{group}" if group is not None else f"t:{caller.tenant}"
        if salt:
            scope += "/" + hashlib.sha256(salt.encode()).hexdigest()
        return scope

    @staticmethod
    def owns(caller: Caller, payer: str) -> bool:
        """Whether the caller may read a receipt paid by `payer`: its payer, or the admin. On a server
        without keys nothing is authenticated, so the receipt id (unguessable) is the only fence."""
        if not caller.authenticated:
            return True
        if caller.admin:
            return True
        tenant = caller.tenant
        return bool(tenant) and (tenant == payer or tenant.lower() == payer.lower() and tenant.startswith("0x"))


def not_registered(adapter_id: str) -> AdapterNotFound:
    """The one 404 for an adapter that does not exist and for one the caller may not see."""
    return AdapterNotFound(f"adapter {adapter_id!r} is not registered")
