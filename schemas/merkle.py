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

__all__ = ["EMPTY_ROOT", "Node", "ProofError", "Range", "TreeState", "consistency_proof", "consistency_ranges", "fold",
           "inclusion_proof", "inclusion_ranges", "leaf_hash", "node_hash", "root_of", "subtrees",
           "verify_consistency", "verify_inclusion"]

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
    """MTH: the root of the tree over ``leaves`` (leaf hashes). Level by level, an odd last node carried up as it
    is: the same root as RFC 9162's recursive split, with one loop in C per level."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    sha256 = hashlib.sha256
    while len(level) > 1:
        paired = [sha256(b"\x01" + left + right).digest() for left, right in zip(level[::2], level[1::2], strict=False)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


Node = tuple[int, int]
"""A perfect subtree as (level, index): the leaves ``index << level`` to ``(index + 1) << level``, exclusive."""
Range = tuple[int, int]
"""Leaves ``lo`` to ``hi``, exclusive, whose MTH a proof holds."""


def subtrees(lo: int, hi: int) -> list[Node]:
    """The perfect subtrees that leaves ``lo`` to ``hi`` split into, left to right, largest first (``lo`` a
    multiple of the largest power of two not over ``hi - lo``, as in every range a proof or a root needs).
    Their hashes folded from the right give the range's MTH: ``fold``."""
    nodes = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        while lo & ((1 << level) - 1):
            level -= 1
        nodes.append((level, lo >> level))
        lo += 1 << level
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """The MTH of a range from the hashes of its ``subtrees``."""
    if not hashes:
        return EMPTY_ROOT
    r = hashes[-1]
    for h in reversed(hashes[:-1]):
        r = node_hash(h, r)
    return r


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The ranges whose MTHs are PATH(index, D[size]): the audit path of leaf ``index``, leaf side first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    out: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    return out[::-1]


def consistency_ranges(size1: int, size2: int) -> list[Range]:
    """The ranges whose MTHs are PROOF(size1, D[size2]): that the tree of ``size1`` leaves is a prefix."""
    if not 0 <= size1 <= size2:
        raise ValueError(f"a tree of {size1} leaves is not a prefix of one of {size2}")
    if size1 in (0, size2):
        return []
    out: list[Range] = []
    lo, hi, whole = 0, size2, True
    while True:
        if size1 == hi:  # SUBPROOF(m, D[m], b)
            if not whole:
                out.append((lo, hi))
            break
        k = _split(hi - lo)
        if size1 <= lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, whole = lo + k, False
    return out[::-1]


def _range_roots(ranges: list[Range], leaves: Sequence[bytes]) -> list[bytes]:
    return [root_of(leaves[lo:hi]) for lo, hi in ranges]


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, leaves): the audit path of leaf ``index`` in the tree over ``leaves`` (leaf hashes)."""
    return _range_roots(inclusion_ranges(index, len(leaves)), leaves)


def consistency_proof(size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(size, leaves): that the tree of the first ``size`` leaves is a prefix of the tree over ``leaves``."""
    return _range_roots(consistency_ranges(size, len(leaves)), leaves)


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

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash; the perfect subtrees it completes, as (level, index, hash), the leaf first."""
        index = self.size
        self.peaks.append(leaf)
        made = [(0, index, leaf)]
        level, n = 0, index
        while n & 1:  # each carry merges two equal subtrees into one
            right = self.peaks.pop()
            self.peaks[-1] = node_hash(self.peaks[-1], right)
            level, n = level + 1, n >> 1
            made.append((level, n, self.peaks[-1]))
        self.size += 1
        return made

    def root(self) -> bytes:
        return fold(self.peaks)
