"""Signed checkpoints: Go's sumdb/note reference vector, and checkpoints that must be refused."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from runledger.schemas.checkpoint import Checkpoint, CheckpointError, Signer, Verifier
from runledger.schemas.merkle import leaf_hash

# The example of golang.org/x/mod/sumdb/note (its package documentation and note_test.go): an independent
# implementation of the signed-note format. Ed25519 signatures are deterministic, so ours must be its bytes.
GO_SIGNER = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngot"
           "pRZb6KE6RyyBwJnAM=\n")


def go_signer() -> Signer:
    signer = Signer.from_private_key(GO_SIGNER)
    assert signer.private_key == GO_SIGNER
    return signer


def test_go_reference_note_is_reproduced_and_opened() -> None:
    signer = go_signer()
    assert signer.verifier_key == GO_VERIFIER
    assert signer.sign_note(GO_TEXT) == GO_NOTE
    assert Verifier(GO_VERIFIER).open_note(GO_NOTE) == GO_TEXT


def test_a_checkpoint_round_trips() -> None:
    signer = Signer.generate("runledger.test/log")
    checkpoint = Checkpoint("runledger.test/log", 27, leaf_hash(b"x"))
    note = signer.sign(checkpoint)
    assert note.startswith(f"runledger.test/log\n27\n{base64.b64encode(checkpoint.root).decode()}\n\n\u2014 ")
    assert Verifier(signer.verifier_key).open(note, origin="runledger.test/log") == checkpoint


def test_a_changed_size_or_root_another_key_or_origin_is_refused() -> None:
    signer = Signer.generate("runledger.test/log")
    checkpoint = Checkpoint("runledger.test/log", 27, leaf_hash(b"x"))
    note = signer.sign(checkpoint)
    verifier = Verifier(signer.verifier_key)
    root = base64.b64encode(checkpoint.root).decode()
    with pytest.raises(CheckpointError, match="changed after it was signed"):
        verifier.open(note.replace("\n27\n", "\n28\n"))
    with pytest.raises(CheckpointError, match="changed after it was signed"):
        verifier.open(note.replace(root, base64.b64encode(leaf_hash(b"y")).decode()))
    other = Signer.generate("runledger.test/log")  # the same name, another key
    with pytest.raises(CheckpointError, match="no signature"):
        Verifier(other.verifier_key).open(note)
    with pytest.raises(CheckpointError, match="no signature"):
        verifier.open(other.sign(checkpoint))
    with pytest.raises(CheckpointError, match="of log"):
        verifier.open(note, origin="elsewhere/log")


@pytest.mark.parametrize("key", ["", "PeterNeumann+c74f20a3", "PeterNeumann+c74f20a4+" + GO_VERIFIER.split("+")[2],
                                 "Peter+c74f20a3+" + GO_VERIFIER.split("+")[2], "PeterNeumann+c74f20a3+AQ=="])
def test_malformed_verifier_keys_are_refused(key: str) -> None:
    with pytest.raises(CheckpointError):
        Verifier(key)


def test_a_replaced_signer_key_is_readable_by_its_owner_alone(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from runledger.streams.settings import Settings
    from runledger.streams.tools.checkpoints import create_signer_key

    key = tmp_path / "checkpoint.key"
    key.write_text("an old key, left readable by everyone\n")
    key.chmod(0o644)
    monkeypatch.setenv("RUNLEDGER_CHECKPOINT_KEY", str(key))
    create_signer_key(Settings())  # what `runledger keys init --force` does
    assert key.stat().st_mode & 0o777 == 0o600
