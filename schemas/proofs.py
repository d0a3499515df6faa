"""Proof files an auditor checks offline, with the log's verifier key and nothing else.

An inclusion proof shows one event is in the log under a signed checkpoint; a consistency proof shows a
newer checkpoint's log extends an older one's (nothing before the older size changed). Both are JSON
objects; the format is documented in ``docs/proofs.md``. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import msgspec

from runledger.schemas.chain import stored_event
from runledger.schemas.checkpoint import Checkpoint, CheckpointError, Verifier
from runledger.schemas.errors import DuplicateMember
from runledger.schemas.logtrees import partition_of
from runledger.schemas.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion

__all__ = ["CONSISTENCY", "INCLUSION", "INCLUSION_V1", "Proven", "check_proof", "consistency_document",
           "inclusion_document"]

INCLUSION = "runledger-inclusion-proof/2"
CONSISTENCY = "runledger-consistency-proof/1"
INCLUSION_V1 = "runledger-inclusion-proof/1"
"""Proofs in the single tree PostgreSQL kept before migration 012 (leaf: the event's hash); still checked."""


@dataclass(frozen=True, slots=True)
class Proven:
    """What a proof file proved."""

    kind: str
    checkpoint: Checkpoint
    older: Checkpoint | None = None
    event_id: str | None = None
    leaf_index: int | None = None


def _b64(items: list[bytes]) -> list[str]:
    return [base64.b64encode(item).decode() for item in items]


def inclusion_document(note: str, raw: bytes, partition: int, offset: int, leaf_index: int,
                       proof: list[bytes]) -> dict[str, Any]:
    """An inclusion proof of the record ``raw`` (the event's bytes as the log holds them, at ``partition`` and
    ``offset``), leaf ``leaf_index`` of its partition's tree under ``note``."""
    return {"format": INCLUSION, "checkpoint": note, "partition": partition, "offset": offset,
            "leaf_index": leaf_index, "event": base64.b64encode(raw).decode(), "proof": _b64(proof)}


def consistency_document(old: str, new: str, proof: list[bytes]) -> dict[str, Any]:
    return {"format": CONSISTENCY, "old_checkpoint": old, "new_checkpoint": new, "proof": _b64(proof)}


def check_proof(document: dict[str, Any], verifier_key: str, origin: str | None = None) -> Proven:
    """Check a proof document against the verifier key; raise ProofError or CheckpointError saying why not.

    ``origin``: the log whose checkpoints count (default: the key's name). A checkpoint of a partition's tree
    must have the origin ``<origin>/<topic>/<partition>``, and an inclusion proof's partition must be its own.
    """
    verifier = Verifier(verifier_key)
    base = origin or verifier.name
    try:
        proof = [base64.b64decode(p, validate=True) for p in document["proof"]]
        if document.get("format") in (INCLUSION, INCLUSION_V1):
            return _inclusion(document, verifier, proof, base)
        if document.get("format") == CONSISTENCY:
            old = verifier.open(document["old_checkpoint"])
            _check_origin(old, base)
            new = verifier.open(document["new_checkpoint"], origin=old.origin)
            verify_consistency(old.size, new.size, old.root, new.root, proof)
            return Proven(CONSISTENCY, new, older=old)
    except (KeyError, TypeError, binascii.Error) as e:
        raise ProofError(f"not a runledger proof document: {type(e).__name__}: {e}") from None
    raise ProofError(f"unknown proof format {document.get('format')!r}; known: {INCLUSION}, {CONSISTENCY}, "
                     f"{INCLUSION_V1}")


def _check_origin(checkpoint: Checkpoint, base: str, partition: int | None = None) -> None:
    """A partition's checkpoint is of ``<base>/<topic>/<partition>``; one of the retired single tree, of ``base``."""
    if checkpoint.origin == base and partition is None:
        return
    try:
        _, of = partition_of(checkpoint.origin, base)
    except CheckpointError:
        raise ProofError(f"the checkpoint is of log {checkpoint.origin!r}, not of {base!r}") from None
    if partition is not None and of != partition:
        raise ProofError(f"the checkpoint is of partition {of}'s log, the proof says partition {partition}")


def _inclusion(document: dict[str, Any], verifier: Verifier, proof: list[bytes], base: str) -> Proven:
    checkpoint = verifier.open(document["checkpoint"])
    v1 = document["format"] == INCLUSION_V1
    if v1 and checkpoint.origin != base:
        raise ProofError(f"the checkpoint is of log {checkpoint.origin!r}, not {base!r}")
    if not v1:
        if not isinstance(document["partition"], int):
            raise ProofError("partition must be an integer")
        _check_origin(checkpoint, base, document["partition"])
    raw = base64.b64decode(document["event"], validate=True)
    try:
        event, carried, computed = stored_event(raw)
    except DuplicateMember as e:
        raise ProofError(f"the event in the proof is not I-JSON (invalid_event): {e}") from None
    except (msgspec.DecodeError, ValueError, TypeError) as e:
        raise ProofError(f"the event in the proof cannot be read: {e}") from None
    if carried != computed:
        raise ProofError(f"the event carries hash {carried}, its content hashes to {computed}")
    index = document["leaf_index"]
    if not isinstance(index, int):
        raise ProofError("leaf_index must be an integer")
    leaf = leaf_hash(bytes.fromhex(computed)) if v1 else leaf_hash(raw)
    verify_inclusion(index, checkpoint.size, leaf, proof, checkpoint.root)
    return Proven(INCLUSION, checkpoint, event_id=str(event.get("id")), leaf_index=index)

