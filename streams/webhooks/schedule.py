"""What becomes of a delivery after an attempt: delivered, retried after a delay, or dead. Pure logic.

A failure worth retrying (no answer, a timeout, a 5xx, 429 or 408: ``Attempt.retryable``) is retried after the
next of ``RUNLEDGER_WEBHOOK_RETRY_DELAYS`` (1, 2, 4, 8, 16 s by default), drawn within
``RUNLEDGER_WEBHOOK_RETRY_JITTER`` of itself so that receivers that failed together are not retried together, or
after the receiver's ``Retry-After`` if it asks for longer (up to ``RUNLEDGER_WEBHOOK_RETRY_AFTER_CAP_S``). After
the last delay's retry fails too, or at once for any other answer (a 3xx, a 4xx but 408 and 429), the delivery is
dead: it goes to the deliveries' dead-letter topic, where ``runledger webhooks replay`` finds it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from runledger.streams.webhooks.sender import Attempt

__all__ = ["Next", "after"]


@dataclass(frozen=True, slots=True)
class Next:
    """``outcome`` of a delivery after its attempt number ``attempt`` (1: the first), and for a retry the seconds
    to wait before the next attempt."""

    outcome: Literal["delivered", "retry", "dead"]
    delay_s: float = 0.0
    why: str = ""


def after(attempt: Attempt, number: int, delays: Sequence[float], *, jitter: float, retry_after_cap_s: float,
          rng: random.Random | None = None) -> Next:
    """What follows attempt ``number`` (1-based) that got ``attempt``."""
    if attempt.ok:
        return Next("delivered")
    answered = f"answered {attempt.status}" if attempt.status is not None else f"no answer ({attempt.error})"
    if not attempt.retryable:
        return Next("dead", why=f"{answered}: not retried (a 3xx or 4xx other than 408 and 429 is permanent)")
    if number > len(delays):
        return Next("dead", why=f"{answered}, attempt {number}: no retry left ({len(delays)} retries)")
    base = delays[number - 1]
    delay = base * (1 + (rng or random).uniform(-jitter, jitter)) if jitter else base  # noqa: S311 - not security
    if attempt.retry_after_s is not None:
        delay = max(delay, min(attempt.retry_after_s, retry_after_cap_s))
    return Next("retry", round(delay, 3), f"{answered}: retry {number} of {len(delays)}")
