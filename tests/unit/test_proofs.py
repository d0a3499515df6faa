"""Proof documents checked offline: what they prove, and documents that prove nothing."""

from __future__ import annotations

import base64

import orjson
import pytest

from runledger.schemas.checkpoint import Checkpoint, CheckpointError, Signer
from runledger.schemas.merkle import ProofError, consistency_proof, inclusion_proof, leaf_hash, root_of
from runledger.schemas.proofs import INCLUSION_V1, check_proof, consistency_document, inclusion_document
from tests.conftest import VECTOR_EVENTS

RAWS = [orjson.dumps(e) for e in VECTOR_EVENTS]
LEAVES = [leaf_hash(raw) for raw in RAWS]  # a partition's leaf: the record's bytes
SIGNER = Signer.generate("runledger.test/log")
ORIGIN = "runledger.test/log/t.events/3"


def note(size: int, origin: str = ORIGIN, leaves: list[bytes] = LEAVES) -> str:
    return SIGNER.sign(Checkpoint(origin, size, root_of(leaves[:size])))


def inclusion(index: int = 7, *, checkpoint: str | None = None, raw: bytes | None = None,
              partition: int = 3) -> dict[str, object]:
    return inclusion_document(checkpoint or note(18), RAWS[index] if raw is None else raw, partition, 40 + index,
                              index, inclusion_proof(index, LEAVES))


def test_inclusion_and_consistency_documents_prove_what_they_say() -> None:
    proven = check_proof(inclusion(), SIGNER.verifier_key)
    assert (proven.event_id, proven.leaf_index, proven.checkpoint.size) == (VECTOR_EVENTS[7]["id"], 7, 18)
    assert check_proof(inclusion(), SIGNER.verifier_key, "runledger.test/log").checkpoint.origin == ORIGIN
    proven = check_proof(consistency_document(note(5), note(18), consistency_proof(5, LEAVES)), SIGNER.verifier_key)
    assert proven.older is not None and (proven.older.size, proven.checkpoint.size) == (5, 18)


def test_every_checkpoint_opened_must_be_of_the_expected_log() -> None:
    with pytest.raises(ProofError, match="not of 'elsewhere'"):
        check_proof(inclusion(), SIGNER.verifier_key, "elsewhere")
    with pytest.raises(ProofError, match=r"partition 3's log, the proof says partition 4"):
        check_proof(inclusion(partition=4), SIGNER.verifier_key)
    foreign = note(18, "another.log/t.events/3")  # same key, another log's origin
    with pytest.raises(ProofError, match=r"another\.log"):
        check_proof(inclusion(checkpoint=foreign), SIGNER.verifier_key)
    with pytest.raises(ProofError, match=r"another\.log"):
        check_proof(consistency_document(note(5, "another.log/t.events/3"), note(18, "another.log/t.events/3"),
                                         consistency_proof(5, LEAVES)), SIGNER.verifier_key)


def test_proofs_of_the_single_tree_before_migration_12_still_verify() -> None:
    leaves = [leaf_hash(bytes.fromhex(e["hash"])) for e in VECTOR_EVENTS]  # the retired tree's leaf: the hash
    checkpoint = note(18, "runledger.test/log", leaves)
    document = {"format": INCLUSION_V1, "checkpoint": checkpoint, "leaf_index": 7,
                "event": base64.b64encode(RAWS[7]).decode(),
                "proof": [base64.b64encode(p).decode() for p in inclusion_proof(7, leaves)]}
    assert check_proof(document, SIGNER.verifier_key).leaf_index == 7
    with pytest.raises(ProofError, match="not 'other'"):
        check_proof(document, SIGNER.verifier_key, "other")


def test_documents_that_prove_nothing_say_why() -> None:
    with pytest.raises(ProofError, match="unknown proof format"):
        check_proof({"format": "x", "proof": []}, SIGNER.verifier_key)
    with pytest.raises(ProofError, match="not a runledger proof"):
        check_proof({"format": "runledger-inclusion-proof/2"}, SIGNER.verifier_key)
    wrong_index = inclusion()
    wrong_index["leaf_index"] = 6
    with pytest.raises(ProofError):
        check_proof(wrong_index, SIGNER.verifier_key)
    edited = orjson.loads(RAWS[7])
    edited["data"]["name"] = "edited"
    with pytest.raises(ProofError, match="hashes to"):
        check_proof(inclusion(raw=orjson.dumps(edited)), SIGNER.verifier_key)
    other = Signer.generate("runledger.test/log").sign(Checkpoint(ORIGIN, 18, root_of(LEAVES)))
    with pytest.raises(CheckpointError):
        check_proof(inclusion(checkpoint=other), SIGNER.verifier_key)
    document = inclusion()
    document["event"] = base64.b64encode(b"[1]").decode()
    with pytest.raises(ProofError, match="cannot be read"):
        check_proof(document, SIGNER.verifier_key)
