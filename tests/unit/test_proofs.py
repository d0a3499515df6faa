"""Proof documents checked offline: what they prove, and documents that prove nothing."""

from __future__ import annotations

import base64

import orjson
import pytest

from runledger.schemas.checkpoint import Checkpoint, CheckpointError, Signer
from runledger.schemas.merkle import ProofError, consistency_proof, inclusion_proof, leaf_hash, root_of
from runledger.schemas.proofs import check_proof, consistency_document, inclusion_document
from tests.conftest import VECTOR_EVENTS

RAWS = [orjson.dumps(e) for e in VECTOR_EVENTS]
LEAVES = [leaf_hash(bytes.fromhex(e["hash"])) for e in VECTOR_EVENTS]
SIGNER = Signer.generate("runledger.test/log")


def note(size: int) -> str:
    return SIGNER.sign(Checkpoint("runledger.test/log", size, root_of(LEAVES[:size])))


def test_inclusion_and_consistency_documents_prove_what_they_say() -> None:
    proven = check_proof(inclusion_document(note(18), RAWS[7], 7, inclusion_proof(7, LEAVES)), SIGNER.verifier_key)
    assert (proven.event_id, proven.leaf_index, proven.checkpoint.size) == (VECTOR_EVENTS[7]["id"], 7, 18)
    proven = check_proof(consistency_document(note(5), note(18), consistency_proof(5, LEAVES)), SIGNER.verifier_key)
    assert proven.older is not None and (proven.older.size, proven.checkpoint.size) == (5, 18)


def test_documents_that_prove_nothing_say_why() -> None:
    with pytest.raises(ProofError, match="unknown proof format"):
        check_proof({"format": "x", "proof": []}, SIGNER.verifier_key)
    with pytest.raises(ProofError, match="not a runledger proof"):
        check_proof({"format": "runledger-inclusion-proof/1"}, SIGNER.verifier_key)
    wrong_index = inclusion_document(note(18), RAWS[7], 6, inclusion_proof(7, LEAVES))
    with pytest.raises(ProofError):
        check_proof(wrong_index, SIGNER.verifier_key)
    edited = orjson.loads(RAWS[7])
    edited["data"]["name"] = "edited"
    with pytest.raises(ProofError, match="hashes to"):
        check_proof(inclusion_document(note(18), orjson.dumps(edited), 7, inclusion_proof(7, LEAVES)),
                    SIGNER.verifier_key)
    other = Signer.generate("runledger.test/log").sign(Checkpoint("runledger.test/log", 18, root_of(LEAVES)))
    with pytest.raises(CheckpointError):
        check_proof(inclusion_document(other, RAWS[7], 7, inclusion_proof(7, LEAVES)), SIGNER.verifier_key)
    document = inclusion_document(note(18), RAWS[7], 7, inclusion_proof(7, LEAVES))
    document["event"] = base64.b64encode(b"[1]").decode()
    with pytest.raises(ProofError, match="cannot be read"):
        check_proof(document, SIGNER.verifier_key)
