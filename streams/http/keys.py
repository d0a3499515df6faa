"""The sources' credentials, and the key they are sealed with: pure code, no I/O but the key file.

A source signs with a Standard Webhooks ``v1`` secret (``whsec_`` and the base64 of 32 random bytes, HMAC-SHA256)
or an ``v1a`` Ed25519 key pair (``whsk_``: the base64 of the 32-byte private seed, which only the producer holds;
``whpk_``: the base64 of the 32-byte public key, which the server keeps). What the server keeps is sealed with
AES-256-GCM under the sources key (``RUNLEDGER_SOURCES_KEY_FILE``), the row's (source id, secret number) as the
associated data, so a sealed secret copied to another row does not open.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from runledger.schemas.errors import PermanentError
from runledger.streams.settings import SecretMissing, Settings

__all__ = ["Credential", "Scheme", "SourcesKey", "SourcesKeyInvalid", "init_key", "load_key", "new_credential",
           "public_key_credential"]

Scheme = Literal["v1", "v1a"]
_NONCE = 12


class SourcesKeyInvalid(PermanentError):
    """The sources key cannot open a sealed secret, or is not a key at all: RUNLEDGER_SOURCES_KEY_FILE names another
    key than the one the secrets were sealed with. Point it at the same key on every replica and operator host."""

    code = "sources_key_invalid"


@dataclass(frozen=True, slots=True)
class Credential:
    """A new credential: ``shown`` is handed to the producer once (``whsec_...`` or ``whsk_...``; empty when the
    producer brought its own public key), ``kept`` is what the server seals and verifies with (``whsec_...`` or
    ``whpk_...``)."""

    scheme: Scheme
    shown: str
    kept: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def new_credential(scheme: Scheme) -> Credential:
    """A fresh random credential of ``scheme``."""
    if scheme == "v1":
        secret = "whsec_" + _b64(secrets.token_bytes(32))
        return Credential("v1", secret, secret)
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return Credential("v1a", "whsk_" + _b64(seed), "whpk_" + _b64(public))


def public_key_credential(public_key: str) -> Credential:
    """The ``v1a`` credential of a ``whpk_`` public key a producer made itself. Raises ValueError if it is none."""
    raw = public_key.removeprefix("whpk_")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not public_key.startswith("whpk_") or len(decoded) != 32:
        raise ValueError("a public key is whpk_ and the base64 of 32 bytes (a raw Ed25519 public key)")
    return Credential("v1a", "", public_key)


class SourcesKey:
    """The AES-256-GCM key the sources' secrets are sealed with."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SourcesKeyInvalid("the sources key must be 32 bytes")
        self._aead = AESGCM(key)

    @staticmethod
    def _aad(source_id: str, secret_no: int) -> bytes:
        return f"runledger-source-secret\x00{source_id}\x00{secret_no}".encode()

    def seal(self, source_id: str, secret_no: int, plaintext: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), self._aad(source_id, secret_no))

    def unseal(self, source_id: str, secret_no: int, sealed: bytes) -> str:
        """The secret sealed for (``source_id``, ``secret_no``). Raises SourcesKeyInvalid if this key did not seal
        it (or the row was altered)."""
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], self._aad(source_id, secret_no)).decode()
        except InvalidTag:
            raise SourcesKeyInvalid(f"the sources key (RUNLEDGER_SOURCES_KEY_FILE) cannot open secret {secret_no} of "
                                    f"source {source_id}: it was sealed with another key, or altered") from None


def _key_path(settings: Settings) -> Path:
    return settings.secret_path("sources_key_file")


def load_key(settings: Settings) -> SourcesKey:
    """The sources key of RUNLEDGER_SOURCES_KEY_FILE. Raises SecretMissing if there is none yet (``runledger
    sources init-key``), SourcesKeyInvalid if the file holds no key."""
    secret = settings.secret("sources_key_file") if _key_path(settings).exists() else None
    if secret is None:
        raise SecretMissing(f"RUNLEDGER_SOURCES_KEY_FILE: {_key_path(settings)} does not exist: run `runledger "
                            "sources init-key` (or `sources add`, which writes it) and give every serve replica the "
                            "same file")
    try:
        return SourcesKey(base64.b64decode(secret.get_secret_value().strip(), validate=True))
    except (binascii.Error, ValueError):
        raise SourcesKeyInvalid(f"RUNLEDGER_SOURCES_KEY_FILE: {_key_path(settings)} does not hold the base64 of a "
                                "32-byte key") from None


def init_key(settings: Settings) -> tuple[Path, bool]:
    """Write a new random sources key (base64, mode 0600) unless the file exists; (its path, whether written)."""
    path = _key_path(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path, False
    with os.fdopen(fd, "w") as out:
        out.write(_b64(secrets.token_bytes(32)) + "\n")
    return path, True
