"""Signed checkpoints of the transparency log: the C2SP ``tlog-checkpoint`` in a C2SP ``signed-note``.

A checkpoint is three lines (origin, tree size, base64 root hash) and a blank line, then one signature line
per signer: ``— <key name> <base64(4-byte key id || Ed25519 signature)>``. The key id is the first four bytes
of SHA-256(key name || 0x0A || 0x01 || public key). A verifier key is written
``<key name>+<key id, 8 hex>+<base64(0x01 || public key)>``, as Go's ``golang.org/x/mod/sumdb/note`` does,
so an auditor can check a checkpoint with that package, or with a few lines of their own. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["Checkpoint", "CheckpointError", "Signer", "Verifier"]

_ED25519 = b"\x01"  # the signed-note signature type of Ed25519
_DASH = "\u2014 "
_NAME = re.compile(r"[^\s+]+")


class CheckpointError(ValueError):
    """A checkpoint or a key that cannot be read, or a signature that does not verify: the message says which."""


def _key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public).digest()[:4]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The transparency log at one size: what a signature commits to."""

    origin: str
    size: int
    root: bytes

    @classmethod
    def parse(cls, note: str) -> Checkpoint:
        """The origin, size and root a checkpoint note's text states; its signatures are not looked at here
        (``Verifier.open`` checks them)."""
        lines = note.partition("\n\n")[0].split("\n")
        if len(lines) < 3:
            raise CheckpointError("a checkpoint has an origin, a size and a root hash, one per line")
        try:
            root = base64.b64decode(lines[2], validate=True)
        except binascii.Error:
            raise CheckpointError("the checkpoint's root hash cannot be read") from None
        if not lines[1].isdigit() or len(root) != 32:
            raise CheckpointError("the checkpoint's size must be a decimal number and its root 32 bytes")
        return cls(lines[0], int(lines[1]), root)

    def body(self) -> bytes:
        """The signed text: origin, size and root, one per line."""
        if not self.origin or "\n" in self.origin:
            raise CheckpointError(f"origin {self.origin!r} must be one non-empty line")
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()


class Signer:
    """An Ed25519 key that signs checkpoints under ``name`` (the log's name, as verifiers will see it)."""

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        if not _NAME.fullmatch(name):
            raise CheckpointError(f"key name {name!r} must be non-empty, without spaces or '+'")
        self.name, self._key = name, key
        self.public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls, name: str) -> Signer:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Signer:
        return cls(name, Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_private_key(cls, text: str) -> Signer:
        """Read a signer key written as ``private_key`` (``PRIVATE+KEY+<name>+<key id>+<base64(0x01 || seed)>``,
        the form of Go's ``sumdb/note``)."""
        try:
            private, key, name, key_id, encoded = text.strip().split("+", 4)  # base64 may hold a '+'
            raw = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            raise CheckpointError("a signer key is PRIVATE+KEY+<name>+<8 hex digits>+<base64 key>") from None
        if (private, key) != ("PRIVATE", "KEY") or raw[:1] != _ED25519 or len(raw) != 33:
            raise CheckpointError("the signer key is not an Ed25519 key in the PRIVATE+KEY+... form")
        signer = cls.from_seed(name, raw[1:])
        if _key_id(name, signer.public).hex() != key_id.lower():
            raise CheckpointError(f"the signer key's id {key_id} does not match its name and key")
        return signer

    @property
    def private_key(self) -> str:
        """The signer key as a key file keeps it: keep it secret."""
        seed = self._key.private_bytes_raw()
        return (f"PRIVATE+KEY+{self.name}+{_key_id(self.name, self.public).hex()}+"
                f"{base64.b64encode(_ED25519 + seed).decode()}")

    @property
    def verifier_key(self) -> str:
        """The public key as verifiers are given it: ``<name>+<key id hex>+<base64(0x01 || key)>``."""
        return (f"{self.name}+{_key_id(self.name, self.public).hex()}+"
                f"{base64.b64encode(_ED25519 + self.public).decode()}")

    def sign_note(self, text: str) -> str:
        """``text`` (lines, each ending in a newline) as a signed note: the text, a blank line, this key's
        signature line."""
        if not text.endswith("\n") or "\n\n" in text:
            raise CheckpointError("a note's text is lines without blank ones, ending in a newline")
        signature = _key_id(self.name, self.public) + self._key.sign(text.encode())
        return f"{text}\n{_DASH}{self.name} {base64.b64encode(signature).decode()}\n"

    def sign(self, checkpoint: Checkpoint) -> str:
        """The checkpoint as a signed note."""
        return self.sign_note(checkpoint.body().decode())


class Verifier:
    """Checks signed checkpoints against one verifier key (``Signer.verifier_key``), with nothing else."""

    def __init__(self, verifier_key: str) -> None:
        try:
            name, key_id, encoded = verifier_key.strip().split("+", 2)
            raw = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            raise CheckpointError("a verifier key is <name>+<8 hex digits>+<base64 key>") from None
        if raw[:1] != _ED25519 or len(raw) != 33:
            raise CheckpointError("the verifier key is not an Ed25519 key (type 0x01, 32 bytes)")
        if _key_id(name, raw[1:]).hex() != key_id.lower():
            raise CheckpointError(f"the verifier key's id {key_id} does not match its name and key")
        self.name, self._id, self._key = name, bytes.fromhex(key_id), Ed25519PublicKey.from_public_bytes(raw[1:])

    def open_note(self, note: str) -> str:
        """The text of ``note`` if this key signed it; else CheckpointError."""
        body, sep, signatures = note.partition("\n\n")
        if not sep:
            raise CheckpointError("not a signed note: no blank line between the text and the signatures")
        text = (body + "\n").encode()
        for line in signatures.splitlines():
            if not line.startswith(_DASH):
                continue
            name, _, encoded = line[len(_DASH):].partition(" ")
            try:
                signature = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                continue
            if name != self.name or signature[:4] != self._id:
                continue
            try:
                self._key.verify(signature[4:], text)
            except InvalidSignature:
                raise CheckpointError(f"the signature of {name} does not match the note: it was changed after "
                                      "it was signed") from None
            return text.decode()
        raise CheckpointError(f"no signature by {self.name} (key id {self._id.hex()}) on the note")

    def open(self, note: str, origin: str | None = None) -> Checkpoint:
        """The checkpoint ``note`` holds, if this key signed it (and its origin is ``origin``, when given)."""
        checkpoint = Checkpoint.parse(self.open_note(note))
        if origin is not None and checkpoint.origin != origin:
            raise CheckpointError(f"the checkpoint is of log {checkpoint.origin!r}, not {origin!r}")
        return checkpoint
