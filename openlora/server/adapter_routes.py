"""Admin adapter routes: register (POST), update in place (PUT; a POST of a registered id does the same)
and unregister (DELETE), and the registration of the operator's adapters at startup.

An update swaps versions atomically. The new files load and are checked on a worker thread while the
old version keeps serving (a bad version fails the update and changes nothing); then, on the engine
thread between two steps, the new version becomes current and the old one's manifest is pinned to its
content hash. Every request is bound to the version current when the engine accepted it: requests
already queued or running finish on the old version (their receipts name its content hash and its
manifest's terms), later ones run on the new. The prefix cache and merges are keyed by content hash,
so nothing computed for the old content is reused for the new.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI, Request

from openlora.errors import AdapterLoadError, AdapterNotFound, InvalidRequest, OpenLoRAError
from openlora.lora.sources import check_allowed, parse_source
from openlora.server.protocol import ModelCard, RegisterAdapterRequest, UpdateAdapterRequest
from openlora.server.state import ServerState

log = logging.getLogger("openlora.server")


class BadAdapterVersion(OpenLoRAError):
    """PUT /v1/adapters/{id}: the new version's files cannot be served (missing, corrupt, NaN weights,
    wrong shapes); the old version keeps serving."""

    status = 422
    code = "adapter_load_error"


def _check_source(state: ServerState, name: str, source: str, trusted: bool) -> None:
    if name == state.model_id:
        raise InvalidRequest(f"adapter id {name!r} is the base model's id")
    check_allowed(parse_source(source), state.adapter_kinds, None if trusted else state.adapter_roots)


def register_adapter(state: ServerState, name: str, source: str, *, pinned: bool = False,
                     manifest: dict | None = None, trusted: bool = False) -> None:
    """Register an adapter (not loaded) and its attribution manifest (given, or attribution.json beside
    it), before the engine runs (startup). Sources from the operator's command line are `trusted`;
    others must be of an allowed kind and, when local, lie under the adapter roots with every symlink
    resolved."""
    _check_source(state, name, source, trusted)
    if state.attribution is not None:  # validate the manifest before the adapter becomes usable
        if manifest is not None:
            state.attribution.register_manifest(name, manifest)
        elif Path(source).is_dir():
            state.attribution.register_manifest(name, source)
    state.lora.register(name, source, pinned=pinned)


async def put_version(state: ServerState, name: str, source: str, *, pinned: bool | None,
                      manifest: dict | None, replace_only: bool) -> ModelCard:
    """Register `name`, or replace its current version, atomically (module docstring). Raises what the
    loader raises; with `replace_only`, AdapterNotFound for an id that is not registered."""
    _check_source(state, name, source, trusted=False)
    if replace_only and state.lora.card(name) is None:
        raise AdapterNotFound(f"adapter {name!r} is not registered")
    att = state.attribution
    terms = before = None  # the new manifest (checked now, in chain mode against the registry) and the old
    if att is not None:
        raw = manifest if manifest is not None else (source if Path(source).is_dir() else None)
        terms = await asyncio.to_thread(att.check_manifest, name, raw)
        before = await asyncio.to_thread(att.manifest, name)
    # Blocking disk/network and parsing: a worker thread; the old version serves meanwhile.
    staged = await asyncio.to_thread(state.lora.stage, name, source, pinned=pinned)

    def swap(_engine) -> str:  # on the engine thread, between steps: no request sees half an update
        old = state.lora.install(staged, replace_only=replace_only)  # 404: the staged copy is dropped
        if att is not None:
            if old and old != staged.content_hash:
                att.pin_version(name, old, before)
            if terms is not None:
                att.set_manifest(name, terms)
        return old

    old = await state.engine.call(swap)  # posted at once: a client that hangs up does not undo it
    log.info("adapter %s %s <- %s (content %s%s)", name, "updated" if old else "registered at runtime", source,
             staged.content_hash[:16], f", was {old[:16]}" if old else "")
    return card(state, name)


def card(state: ServerState, name: str) -> ModelCard:
    """The admin routes' answer: the adapter's card with its current content hash and manifest version."""
    c = state.lora.card(name)
    if c is None:  # unregistered again by a concurrent DELETE
        raise AdapterNotFound(f"adapter {name!r} is not registered")
    version = (state.attribution.manifest(name).version or None) if state.attribution is not None else None
    return ModelCard(id=name, created=state.created, parent=state.model_id, state=c["state"], pinned=c["pinned"],
                     content_hash=c["content_hash"] or None, version=version)


def install_adapter_routes(app: FastAPI, state: ServerState) -> None:
    """POST /v1/adapters, PUT and DELETE /v1/adapters/{id}: admin key only (401 otherwise)."""

    @app.post("/v1/adapters", response_model=ModelCard)
    async def add_adapter(body: RegisterAdapterRequest, raw: Request) -> ModelCard:
        """Register an adapter (its files are loaded and checked now: a bad adapter is a 4xx/503 here),
        or, for an id already registered, replace its version as PUT does."""
        state.require_admin(raw)
        return await put_version(state, body.id, body.source, pinned=body.pinned, manifest=body.manifest,
                                 replace_only=False)

    @app.put("/v1/adapters/{adapter_id}", response_model=ModelCard)
    async def update_adapter(adapter_id: str, body: UpdateAdapterRequest, raw: Request) -> ModelCard:
        """Replace a registered adapter's version atomically: requests already accepted finish on the old
        one, new ones get the new one. 404 for an unknown id; 422 if the new files cannot be served (the
        old version keeps serving)."""
        state.require_admin(raw)
        try:
            return await put_version(state, adapter_id, body.source, pinned=body.pinned, manifest=body.manifest,
                                     replace_only=True)
        except (AdapterLoadError, AdapterNotFound) as e:
            if isinstance(e, AdapterNotFound) and state.lora.card(adapter_id) is None:
                raise  # the id itself (or it was unregistered meanwhile)
            raise BadAdapterVersion(f"the new version of adapter {adapter_id!r} was not installed: {e}") from e

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str, raw: Request) -> dict:
        state.require_admin(raw)
        # On the engine thread: the step must not see an entry vanish halfway.
        await state.engine.call(lambda e: state.lora.unregister(adapter_id))
        log.info("adapter %s unregistered", adapter_id)
        return {"id": adapter_id, "object": "adapter", "deleted": True}
