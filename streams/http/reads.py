"""The read API over the projection and the proofs (filled by issue 24's reads part)."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
