"""The attestations file of `verify projection`: kept for one database and one fingerprint of the rules."""

from __future__ import annotations

from pathlib import Path

from runledger.projections.postgres.attestations import Attestations


def test_attestations_are_kept_for_one_database_and_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "a" / "verified.json"
    Attestations("db1", "f1", {"s": "d"}).save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Attestations.load(path, "db1", "f1") == (Attestations("db1", "f1", {"s": "d"}), None)
    other_db, why = Attestations.load(path, "db2", "f1")
    assert other_db.streams == {} and "attests 'db1', not 'db2'" in (why or "")
    other_rules, why = Attestations.load(path, "db1", "f2")
    assert other_rules.streams == {} and "changed" in (why or "")
    path.write_bytes(b"{not json")
    broken, why = Attestations.load(path, "db1", "f1")
    assert broken.streams == {} and "cannot be read" in (why or "")
    assert Attestations.load(tmp_path / "none.json", "db1", "f1") == (Attestations("db1", "f1"), None)
