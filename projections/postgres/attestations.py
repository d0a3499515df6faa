"""What ``verify projection`` found intact before, so that a run derives again only the streams that changed.

An attestation is a fact that does not age: "a stream whose stored events and projection rows have digest D is
what the rules give from those events". The digest covers the events' bytes in ``seq`` order and the stream's
rows in every projection table (the ``verify_digests`` query), and holds only under the rules and price catalogs
it was made with, which the fingerprint names: a new release of the rules or any change to a stored catalog
starts over. A stream whose digest is attested needs no derivation; any change to one of its events or rows
changes the digest, and the stream is derived and compared row by row again.

The file is the verifier's, not the database's: keep it where whoever could change the tables cannot write (a
database superuser who could rewrite it could attest rows of their own). ``--full`` checks without it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from runledger.projections.postgres.queries import SQL_DIR

__all__ = ["Attestations", "fingerprint"]

_FORMAT = 1


_RULES = ("projections.consistency", "projections.planner", "projections.rules", "projections.pricing",
          "projections.records", "projections.postgres.verify", "schemas.events", "schemas.chain", "schemas.errors")
"""The modules whose code decides the rows the rules give (and how verify projection compares them)."""
_LIBRARIES = ("msgspec", "orjson", "rfc8785")
"""The libraries that parse and canonicalise events."""


def fingerprint(catalogs: Iterable[tuple[object, ...]] = ()) -> str:
    """What the rows the rules give depend on besides the events: the code of the rules' modules, the
    libraries that parse events, the named queries, and the stored price catalogs' rows (``catalogs``)."""
    digest = hashlib.sha256(f"runledger-attestations-{_FORMAT}".encode())
    for name in _RULES:
        module = importlib.import_module(f"runledger.{name}")
        digest.update(name.encode() + b"\0" + Path(str(module.__file__)).read_bytes() + b"\0")
    for library in _LIBRARIES:
        digest.update(f"{library} {importlib.metadata.version(library)}\0".encode())
    digest.update((SQL_DIR / "queries.sql").read_bytes())
    for row in catalogs:
        digest.update(repr(row).encode() + b"\n")
    return digest.hexdigest()


@dataclass(slots=True)
class Attestations:
    """The streams found intact under ``fingerprint`` in ``database``: stream id -> digest."""

    database: str
    fingerprint: str
    streams: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, database: str, fingerprint: str) -> tuple[Attestations, str | None]:
        """The attestations kept in ``path`` for this database and fingerprint, and why none were taken over if
        some were kept but cannot be used (None if they can, or if the file does not exist yet)."""
        fresh = cls(database, fingerprint)
        try:
            kept = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return fresh, None
        except (OSError, orjson.JSONDecodeError) as e:
            return fresh, f"{path} cannot be read ({e}): every stream is derived"
        if not isinstance(kept, dict) or kept.get("format") != _FORMAT or not isinstance(kept.get("streams"), dict):
            return fresh, f"{path} is not an attestations file of format {_FORMAT}: every stream is derived"
        if kept.get("database") != database:
            return fresh, f"{path} attests {kept.get('database')!r}, not {database!r}: every stream is derived"
        if kept.get("fingerprint") != fingerprint:
            return fresh, ("the rules or the stored price catalogs changed since the attestations were made: every "
                           "stream is derived")
        return cls(database, fingerprint, kept["streams"]), None

    def save(self, path: Path) -> None:
        """Write the file whole or not at all (a rename), readable by its owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{os.getpid()}")
        staged.write_bytes(orjson.dumps({"format": _FORMAT, "database": self.database,
                                         "fingerprint": self.fingerprint, "streams": self.streams}))
        staged.chmod(0o600)
        staged.replace(path)
