"""The production stack as files: compose.yaml, the image, Prometheus' config and Grafana's provisioning.

No container runs here (there is no Docker daemon); what can be checked without one is: the Compose
Specification's JSON schema on compose.yaml, Prometheus' own checker on its config, and compose.yaml read as the
data it is."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from runledger.streams.settings import DATABASE_ROLES, Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def redis_command() -> str:
    """What the redis service runs: a shell line that writes requirepass from its secret, then the server."""
    command = compose()["services"]["redis"]["command"]
    assert command[:2] == ["sh", "-c"]
    return str(command[2])


def test_compose_yaml_is_valid_under_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests" / "vectors" / "compose-spec" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    misspelt = {**compose(), "services": {"worker": {"image": "runledger:1.0", "depend_on": ["postgres"]}}}
    assert not validator.is_valid(misspelt)  # the schema knows its keys: a typo is an error, not ignored


def test_every_image_is_pinned_and_every_service_checked() -> None:
    services = compose()["services"]
    for name, service in services.items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:v?\d+(\.\d+)+(-\w+)?", image), f"{name}: image {image!r} is not pinned"
        if name not in ("roles", "migrate"):  # the two that run once
            assert "healthcheck" in service, f"{name} has no health check"
    assert set(services) == {"kafka", "postgres", "redis", "roles", "migrate", "worker", "serve", "webhooks",
                             "prometheus", "grafana"}


def test_kafka_in_kraft_mode_redis_with_aof_and_named_volumes() -> None:
    spec = compose()
    services = spec["services"]
    kafka = services["kafka"]["environment"]
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["KAFKA_LOG_RETENTION_MS"] == "-1"
    assert "--appendonly yes" in redis_command()
    named = set(spec["volumes"])
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert used == named, "a named volume declared and not used, or used and not declared"
    for name in ("kafka", "postgres", "redis", "prometheus", "grafana"):
        assert any(v.split(":")[0] in named for v in services[name]["volumes"]), f"{name} keeps no data"


def test_the_migrations_run_once_before_two_workers() -> None:
    services = compose()["services"]
    assert services["roles"]["command"] == ["runledger", "db", "roles"]
    assert services["migrate"]["depends_on"]["roles"] == {"condition": "service_completed_successfully"}
    assert "runledger db migrate" in " ".join(services["migrate"]["command"])
    assert "runledger topics create" in " ".join(services["migrate"]["command"])
    worker = services["worker"]
    assert worker["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert worker["deploy"]["replicas"] == 2 and "ports" not in worker  # --scale must not clash on host ports
    for name in ("roles", "migrate", "worker", "serve", "webhooks"):
        env = services[name]["environment"]
        unknown = [k for k in env if k.removeprefix("RUNLEDGER_").lower() not in Settings.model_fields]
        assert not unknown, f"{name}: no such setting {unknown}"
        assert env["RUNLEDGER_EMBEDDED"] == "" and env["RUNLEDGER_METRICS_HOST"] == "0.0.0.0"  # noqa: S104


def test_prometheus_scrapes_every_worker_with_the_alert_rules() -> None:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is needed (Debian: apt-get install prometheus; `./dev test` does as root)"
    checked = subprocess.run([tool, "check", "config", "prometheus.yml"], cwd=ROOT / "ops" / "prometheus",
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "16 rules found" in checked.stdout, checked.stdout + checked.stderr
    config = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"runledger-worker", "runledger-serve", "runledger-webhooks"}
    for service in ("worker", "serve", "webhooks"):
        port = compose()["services"][service]["environment"]["RUNLEDGER_METRICS_PORT"]
        assert jobs[f"runledger-{service}"]["dns_sd_configs"][0] == {
            "names": [service], "type": "A", "port": int(port), "refresh_interval": "15s"}


def test_grafana_gets_both_datasources_and_the_dashboards() -> None:
    provisioning = ROOT / "ops" / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "runledger.yml").read_text())["datasources"]
    assert {s["uid"]: s["type"] for s in sources} == {"prometheus": "prometheus",
                                                      "runledger-postgres": "grafana-postgresql-datasource"}
    [postgres] = [s for s in sources if s["uid"] == "runledger-postgres"]
    assert postgres["user"] == DATABASE_ROLES["reader"], "Grafana reads with the reader's login, not the owner"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "runledger.yml").read_text())["providers"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./ops/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_the_image_installs_the_package_and_runs_a_worker() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("schemas", "projections", "streams", "sql"):
        assert f"COPY {folder} {folder}" in dockerfile
    assert 'CMD ["runledger", "worker"' in dockerfile and "pip install --no-cache-dir ." in dockerfile


def test_redis_commits_every_head_to_disk_before_it_answers() -> None:
    """A head Redis acknowledged and then lost in a crash would let the next append fork its stream (the complete
    mark survives): every deployment the project ships syncs the append-only file on every write."""
    assert "--appendonly yes --appendfsync always" in redis_command()
