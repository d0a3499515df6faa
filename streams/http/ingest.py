"""Appends over HTTP (filled by issue 24's ingest part)."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
