"""The transparency log's tree against the transparency-dev RFC 9162 vectors (tests/vectors/tlog/SOURCE.md)."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from runledger.schemas.merkle import (
    EMPTY_ROOT,
    ProofError,
    TreeState,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_of,
    subtrees,
    verify_consistency,
    verify_inclusion,
)

TLOG = Path(__file__).parents[1] / "vectors" / "tlog"
# The leaves of RFC 6962's test data, from which the vectors' trees are built.
LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                     "606162636465666768696a6b6c6d6e6f")]
HASHES = [leaf_hash(leaf) for leaf in LEAVES]


def vectors(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(str(p.relative_to(TLOG)), orjson.loads(p.read_bytes())) for p in sorted((TLOG / kind).rglob("*.json"))]


def b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def test_the_vectors_are_there() -> None:
    assert len(vectors("inclusion")) > 60 and len(vectors("consistency")) > 90


def test_the_empty_tree_and_the_eight_leaf_root() -> None:
    assert root_of([]).hex() == EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_of(HASHES).hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


@pytest.mark.parametrize(("name", "v"), vectors("inclusion"), ids=lambda x: x if isinstance(x, str) else "")
def test_inclusion_vectors(name: str, v: dict[str, Any]) -> None:
    proof = [b64(p) for p in v["proof"] or []]
    args = (v["leafIdx"], v["treeSize"], b64(v["leafHash"]), proof, b64(v["root"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
        return
    verify_inclusion(*args)
    if not name.split("/")[1].isdigit():
        return  # not one of the trees over LEAVES
    index, size = v["leafIdx"], v["treeSize"]
    assert HASHES[index] == b64(v["leafHash"]) and root_of(HASHES[:size]) == b64(v["root"])
    assert inclusion_proof(index, HASHES[:size]) == proof  # the same bytes as the independent implementation


@pytest.mark.parametrize(("name", "v"), vectors("consistency"), ids=lambda x: x if isinstance(x, str) else "")
def test_consistency_vectors(name: str, v: dict[str, Any]) -> None:
    proof = [b64(p) for p in v["proof"] or []]
    args = (v["size1"], v["size2"], b64(v["root1"]), b64(v["root2"]), proof)
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
        return
    verify_consistency(*args)
    size1, size2 = v["size1"], v["size2"]
    if name.split("/")[1].isdigit():  # one of the trees over LEAVES
        assert root_of(HASHES[:size1]) == b64(v["root1"]) and root_of(HASHES[:size2]) == b64(v["root2"])
        assert consistency_proof(size1, HASHES[:size2]) == proof


def test_every_proof_of_trees_up_to_40_leaves_verifies_and_fails_when_any_byte_changes() -> None:
    rng = random.Random(5)
    hashes = [leaf_hash(rng.randbytes(32)) for _ in range(40)]
    state = TreeState()
    for n in range(1, 41):
        for level, index, made in state.append(hashes[n - 1]):  # every perfect subtree the leaf completes
            assert made == root_of(hashes[index << level:(index + 1) << level]) and (index + 1) << level == n
        root = root_of(hashes[:n])
        assert state.root() == root and state.size == n
        assert state.peaks == [root_of(hashes[i << lv:(i + 1) << lv]) for lv, i in subtrees(0, n)]
        for i in range(n):
            proof = inclusion_proof(i, hashes[:n])
            verify_inclusion(i, n, hashes[i], proof, root)
            if proof:
                j = rng.randrange(len(proof))
                bad = [*proof[:j], bytes([proof[j][0] ^ 1]) + proof[j][1:], *proof[j + 1:]]
                with pytest.raises(ProofError):
                    verify_inclusion(i, n, hashes[i], bad, root)
            with pytest.raises(ProofError):
                verify_inclusion(i, n, leaf_hash(b"forged"), proof, root)
        for m in range(1, n):
            proof = consistency_proof(m, hashes[:n])
            verify_consistency(m, n, root_of(hashes[:m]), root, proof)
            with pytest.raises(ProofError):  # one leaf before m changed: the old root no longer follows
                verify_consistency(m, n, root_of([leaf_hash(b"x"), *hashes[1:m]]), root, proof)
            j = rng.randrange(len(proof))
            with pytest.raises(ProofError):
                verify_consistency(m, n, root_of(hashes[:m]), root,
                                   [*proof[:j], bytes([proof[j][0] ^ 1]) + proof[j][1:], *proof[j + 1:]])
