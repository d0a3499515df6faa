"""What follows a delivery attempt, without I/O: the seeds' schedule with jitter, Retry-After up to a cap, dead
after the last retry or at once for a permanent answer."""

from __future__ import annotations

import random

import pytest

from runledger.streams.settings import Settings
from runledger.streams.webhooks.schedule import after
from runledger.streams.webhooks.sender import Attempt

SEEDS = (1.0, 2.0, 4.0, 8.0, 16.0)


def failed(status: int | None = 500, retry_after_s: float | None = None) -> Attempt:
    return Attempt(status, 0.01, retry_after_s=retry_after_s, error=None if status else "timed out")


def test_the_seeds_schedule_then_dead_after_five_retries() -> None:
    plan = [after(failed(), n, SEEDS, jitter=0, retry_after_cap_s=300) for n in range(1, 7)]
    assert [(p.outcome, p.delay_s) for p in plan] == [("retry", 1.0), ("retry", 2.0), ("retry", 4.0),
                                                      ("retry", 8.0), ("retry", 16.0), ("dead", 0.0)]
    assert "no retry left" in plan[-1].why
    assert after(Attempt(204, 0.01), 1, SEEDS, jitter=0.1, retry_after_cap_s=300).outcome == "delivered"


@pytest.mark.parametrize("status", [None, 500, 502, 503, 408, 429])
def test_no_answer_5xx_408_and_429_are_retried(status: int | None) -> None:
    assert after(failed(status), 1, SEEDS, jitter=0, retry_after_cap_s=300).outcome == "retry"


@pytest.mark.parametrize("status", [301, 302, 400, 401, 403, 404, 410, 413, 422])
def test_other_answers_are_dead_at_once(status: int) -> None:
    plan = after(failed(status), 1, SEEDS, jitter=0, retry_after_cap_s=300)
    assert plan.outcome == "dead" and str(status) in plan.why


def test_jitter_spreads_each_delay_within_its_fraction() -> None:
    rng = random.Random(7)
    delays = [after(failed(), 3, SEEDS, jitter=0.1, retry_after_cap_s=300, rng=rng).delay_s for _ in range(500)]
    assert min(delays) >= 3.6 and max(delays) <= 4.4 and len(set(delays)) > 100


def test_retry_after_is_honoured_when_longer_up_to_the_cap() -> None:
    assert after(failed(429, 30.0), 1, SEEDS, jitter=0, retry_after_cap_s=300).delay_s == 30.0
    assert after(failed(503, 0.5), 2, SEEDS, jitter=0, retry_after_cap_s=300).delay_s == 2.0  # shorter: the schedule
    assert after(failed(503, 3600.0), 1, SEEDS, jitter=0, retry_after_cap_s=60).delay_s == 60.0


def test_the_settings_read_the_delays_and_refuse_negative_ones() -> None:
    assert Settings(webhook_retry_delays="1,2,4,8,16").webhook_retry_delays == SEEDS  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 to 86,400"):
        Settings(webhook_retry_delays="1,-2")  # type: ignore[arg-type]
