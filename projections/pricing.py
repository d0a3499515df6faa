"""The model price catalog: prices per token as Decimal, and what a cost comes to.

The catalog ships with the ``tokencost`` package (a JSON table kept up to date
from providers' published prices); it is read from the installed package, never
from the network, and its floats are parsed straight to Decimal.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import metadata
from pathlib import Path

__all__ = ["COST_PLACES", "ModelPrice", "PriceCatalog", "load_tokencost_catalog"]

COST_PLACES = Decimal("1e-12")
"""Money has at most 12 digits after the point (SPEC.md section 4)."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per token for one model in one catalog version."""

    model: str
    provider: str | None
    input: Decimal
    output: Decimal
    cached: Decimal | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Decimal:
        """Cached tokens are the part of the input served from cache (billed at the cached rate
        when the catalog has one, else as input)."""
        cached = min(cached_tokens, input_tokens)
        cached_rate = self.cached if self.cached is not None else self.input
        total = (input_tokens - cached) * self.input + cached * cached_rate + output_tokens * self.output
        return total.quantize(COST_PLACES)


@dataclass(frozen=True, slots=True)
class PriceCatalog:
    """One version of the price table: model name -> price."""

    version: str
    source: str
    prices: Mapping[str, ModelPrice]

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        """The price of ``model`` (also tried as ``provider/model``), or None if unknown."""
        return self.prices.get(model) or self.prices.get(f"{provider}/{model}")


def load_tokencost_catalog() -> PriceCatalog:
    """The catalog inside the installed ``tokencost`` package, versioned by package and content."""
    spec = importlib.util.find_spec("tokencost")  # locates the package without running its imports
    if spec is None or spec.origin is None:
        raise RuntimeError("the tokencost package is not installed: pip install tokencost")
    blob = (Path(spec.origin).parent / "model_prices.json").read_bytes()
    table = json.loads(blob, parse_float=Decimal, parse_int=Decimal)
    prices = {}
    for model, entry in table.items():
        if not isinstance(entry, dict):
            continue
        unit_in, unit_out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
        if not isinstance(unit_in, Decimal) or not isinstance(unit_out, Decimal):
            continue
        cached = entry.get("cache_read_input_token_cost")
        prices[model] = ModelPrice(model, entry.get("litellm_provider"), unit_in, unit_out,
                                   cached if isinstance(cached, Decimal) else None)
    version = f"tokencost-{metadata.version('tokencost')}-{hashlib.sha256(blob).hexdigest()[:12]}"
    return PriceCatalog(version, "tokencost/model_prices.json", prices)
