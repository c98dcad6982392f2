"""Node identity: one secp256k1 key (eth-account); the node id is its checksummed EVM address.

The key is kept in a standard Ethereum V3 keystore (the same JSON geth and MetaMask use),
encrypted with a password given as a string or read from an environment variable
(`OPENLORA_NODE_KEY_PASSWORD` by default). On first run the key is created and written atomically
with mode 0600 (temp file + fsync + rename), so a crash never leaves a half-written keystore.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from eth_account import Account
from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount

from openlora.config import env
from openlora.errors import InvalidRequest

log = logging.getLogger(__name__)

PASSWORD_ENV = "OPENLORA_NODE_KEY_PASSWORD"


class NodeIdentity:
    """The node's signing key. `address` is the node id; `sign(msg)` returns 65-byte signatures."""

    def __init__(self, account: LocalAccount) -> None:
        self._account = account
        self.address: str = account.address

    @classmethod
    def create(cls) -> "NodeIdentity":
        """A fresh random key held in memory only (tests, benchmarks)."""
        return cls(Account.create())

    @classmethod
    def from_key(cls, private_key: str | bytes) -> "NodeIdentity":
        """Wrap an existing private key (hex string or 32 bytes)."""
        return cls(Account.from_key(private_key))

    @classmethod
    def load_or_create(
        cls, path: str | os.PathLike, password: str | None = None,
        password_env: str = PASSWORD_ENV, kdf: str = "scrypt", iterations: int | None = None,
    ) -> "NodeIdentity":
        """Decrypt the keystore at `path`, or create a new key there on first run.

        The password is `password`, else the env var `password_env`; an empty or missing password
        is an error (an unencrypted node key is never written). `kdf`/`iterations` only apply when
        creating (eth-account defaults: scrypt, n=262144).
        """
        pw = password if password is not None else env(password_env)
        if not pw:
            raise InvalidRequest(f"node key password missing: pass one or set {password_env}")
        p = Path(path)
        if p.exists():
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o077:
                log.warning("node keystore %s is readable by others (mode %o); chmod 600 it", p, mode)
            try:
                keyfile = json.loads(p.read_text())
                key = Account.decrypt(keyfile, pw)
            except ValueError as e:  # wrong password (MAC mismatch) or malformed file
                raise InvalidRequest(f"cannot decrypt node keystore {p}: {e}") from e
            return cls(Account.from_key(key))
        acct = Account.create()
        keyfile = Account.encrypt(acct.key, pw, kdf=kdf, iterations=iterations)
        _write_private(p, json.dumps(keyfile).encode())
        log.info("created node key %s at %s", acct.address, p)
        return cls(acct)

    def sign(self, message: SignableMessage) -> bytes:
        """Sign an EIP-191/EIP-712 signable message; returns r || s || v (65 bytes)."""
        return bytes(self._account.sign_message(message).signature)


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 atomically (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # in case the umask was odd
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename durable
    finally:
        os.close(dfd)
