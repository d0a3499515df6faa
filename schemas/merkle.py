"""The transparency log's Merkle tree (RFC 9162 section 2.1): tree heads, inclusion and consistency proofs.

Leaves are appended in ``audit_log`` order; a leaf's data is the event's 32-byte hash. ``leaf_hash`` is
``SHA-256(0x00 || leaf)``, ``node_hash`` is ``SHA-256(0x01 || left || right)``. ``TreeState`` keeps the
roots of the perfect subtrees a tree of any size splits into, so appending a leaf and computing the root
cost O(log n) without reading the leaves again. The proof functions take the leaf hashes; the verifiers
need only the proof, the sizes and the roots: an auditor checks them with nothing of runledger's. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["EMPTY_ROOT", "ProofError", "TreeState", "consistency_proof", "inclusion_proof", "leaf_hash",
           "node_hash", "root_of", "verify_consistency", "verify_inclusion"]

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree: SHA-256 of nothing."""


class ProofError(ValueError):
    """A proof does not prove what it is offered for: the message says which check failed."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): where RFC 9162 splits a tree of ``n`` leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH: the root of the tree over ``leaves`` (leaf hashes)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, leaves): the audit path of leaf ``index`` in the tree over ``leaves`` (leaf hashes)."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)} leaves")
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root_of(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root_of(leaves[:k])]


def consistency_proof(size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(size, leaves): that the tree of the first ``size`` leaves is a prefix of the tree over ``leaves``."""
    if not 0 <= size <= len(leaves):
        raise ValueError(f"a tree of {size} leaves is not a prefix of one of {len(leaves)}")
    if size in (0, len(leaves)):
        return []
    return _subproof(size, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [root_of(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], whole), root_of(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root_of(leaves[:k])]


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raise ProofError unless ``proof`` shows leaf hash ``leaf`` at ``index`` of the tree of ``size`` with
    ``root`` (RFC 9162 section 2.1.3.2)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below the tree size {size}")
    if len(leaf) != len(EMPTY_ROOT):
        raise ProofError(f"a leaf hash has {len(EMPTY_ROOT)} bytes, not {len(leaf)}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the proof is longer than the path from the leaf to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the proof is shorter than the path from the leaf to the root")
    if r != root:
        raise ProofError(f"the proof leads to root {r.hex()}, not {root.hex()}")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Raise ProofError unless ``proof`` shows the tree of ``size1`` with ``root1`` is a prefix of the tree of
    ``size2`` with ``root2``: nothing before ``size1`` changed (RFC 9162 section 2.1.4.2)."""
    if size2 < size1:
        raise ProofError(f"the new tree ({size2}) is smaller than the old one ({size1})")
    if size1 == 0:  # as transparency-dev's verifier: every tree extends the empty one, which proves nothing
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("trees of one size need an empty proof")
        if root1 != root2:
            raise ProofError(f"two trees of size {size1} with different roots: the log was rewritten")
        return
    if not proof:
        raise ProofError("the proof is empty")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is a node of the new tree
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the proof is longer than the trees need")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the proof is shorter than the trees need")
    if fr != root1:
        raise ProofError(f"the proof leads to old root {fr.hex()}, not {root1.hex()}: the log before it changed")
    if sr != root2:
        raise ProofError(f"the proof leads to new root {sr.hex()}, not {root2.hex()}")


@dataclass(slots=True)
class TreeState:
    """A tree of ``size`` leaves as the roots of its perfect subtrees, largest first (one per bit of ``size``):
    enough to append and to compute the root, in O(log size)."""

    size: int = 0
    peaks: list[bytes] = field(default_factory=list)

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash."""
        self.peaks.append(leaf)
        n = self.size
        while n & 1:  # each carry merges two equal subtrees into one
            right = self.peaks.pop()
            self.peaks[-1] = node_hash(self.peaks[-1], right)
            n >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self.peaks:
            return EMPTY_ROOT
        r = self.peaks[-1]
        for peak in reversed(self.peaks[:-1]):
            r = node_hash(peak, r)
        return r
