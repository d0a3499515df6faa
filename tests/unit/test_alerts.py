"""The alert rules (ops/prometheus/alerts.yml) are valid, and their unit tests pass under promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

RULES = Path(__file__).resolve().parents[2] / "ops" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is needed (Debian: apt-get install prometheus; `./dev test` does as root)"
    return subprocess.run([tool, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0 and "16 rules found" in checked.stdout, checked.stdout + checked.stderr


def test_every_alert_fires_when_it_should_and_not_before() -> None:
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    rules = (RULES / "alerts.yml").read_text()
    tests = (RULES / "alerts_test.yml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")]
    assert len(alerts) == 16 and all(f"alertname: {a}" in tests for a in alerts), "an alert without a test"
