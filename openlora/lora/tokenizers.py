"""An adapter's own tokenizer, for adapters that add tokens (openlora.lora.heads).

Such an adapter ships the tokenizer it was trained with (tokenizer.json and friends beside
adapter_config.json). Its requests are encoded and decoded with it, so its new ids (special tokens, chat
markers) reach the model and come back as text; every other request keeps the model's tokenizer. A
tokenizer that renumbers the model's own tokens is refused: the adapter's base rows would not match.

NOTE: a hub or S3 adapter's files are on this node only once it was fetched; until then its text prompts
are encoded with the model's tokenizer (its added tokens stay plain text). Prefetch such an adapter
(register with load) before sending it prompts that use them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from openlora.engine.tokenizer import TOKENIZER_FILES, load_tokenizer
from openlora.errors import UnsupportedAdapter
from openlora.lora.entry import AdapterEntry
from openlora.lora.sources import parse_source

log = logging.getLogger("openlora.lora")

_UNKNOWN = object()


class AdapterTokenizers:
    """Adapter entry -> its tokenizer (None: it adds no tokens, use the model's), read once per entry."""

    def __init__(self, base_vocab: dict[str, int]) -> None:
        self.base_vocab = base_vocab  # the model tokenizer's token -> id
        self._known: dict[AdapterEntry, Any] = {}

    def get(self, e: AdapterEntry) -> Any:
        """The tokenizer for e's requests, or None for the model's. Raises UnsupportedAdapter when the
        adapter's tokenizer disagrees with the model's on the model's own tokens."""
        tok = self._known.get(e, _UNKNOWN)
        if tok is _UNKNOWN:
            folder = self._folder(e)
            if folder is None:
                return None  # not fetched yet (see the module NOTE)
            tok = self._known[e] = self._read(folder, e.adapter_id)
        return tok

    def forget(self, e: AdapterEntry) -> None:
        self._known.pop(e, None)

    @staticmethod
    def _folder(e: AdapterEntry) -> Path | None:
        if e.host is not None and e.host.path:
            return Path(e.host.path)
        if e.builder is not None:
            return None  # a merge: made of other adapters, which add no tokens (merges refuse them)
        src = parse_source(e.source)
        return Path(src.location) if src.kind == "local" else None

    def _read(self, folder: Path, adapter_id: str) -> Any:
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None
        tok = load_tokenizer(folder)
        vocab = tok.get_vocab()
        if len(vocab) <= len(self.base_vocab):
            return None  # the model's tokens only: the model's tokenizer serves it
        moved = [t for t, i in self.base_vocab.items() if vocab.get(t) != i]
        if moved:
            raise UnsupportedAdapter(f"adapter {adapter_id!r} ships a tokenizer that renumbers the model's tokens "
                                     f"(e.g. {moved[0]!r}): only tokens added after the model's are supported")
        log.info("adapter %s adds %d tokens: its requests use its own tokenizer", adapter_id,
                 len(vocab) - len(self.base_vocab))
        return tok
