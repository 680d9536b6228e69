"""The retry policy, in one place: how long a failed attempt waits before the next one,
and in which delay queue it waits.

How many attempts an event gets is the task's (``numberOfRetries``, stored as
``tasks.max_attempts``); the decision that an attempt was the last one is taken where the
attempt is recorded (``apply_updates`` and ``return_events`` in the SQL), and what follows
it (the next attempt, or the dead letter) is published by ``dispatcher.reissue``.
"""

from __future__ import annotations

import random

# One delay queue per backoff step, each with a fixed TTL: a per-message TTL expires only
# at the head of a queue, so mixed delays in one queue would hold short ones behind long.
DELAY_STEPS_MS = (
    100,
    200,
    500,
    1000,
    1500,
    2000,
    3000,
    4000,
    6000,
    8000,
    12000,
    16000,
    24000,
    32000,
    48000,
    64000,
    96000,
    128000,
    192000,
    256000,
    384000,
    512000,
)
MAX_RETRY_DELAY = DELAY_STEPS_MS[-1] / 1000  # seconds: the longest delay step
JITTER = 0.25  # +-: events that failed together do not all come back at once


def backoff(base: float, attempt: int) -> float:
    """Seconds before the attempt after ``attempt``: base x 2^(attempt-1), capped, with jitter."""
    doublings = min(max(attempt - 1, 0), 32)  # 2**1023 would overflow a float
    return float(min(base * 2**doublings, MAX_RETRY_DELAY) * random.uniform(1 - JITTER, 1 + JITTER))


def delay_step(seconds: float) -> int:
    """The longest delay step not above ``seconds`` (the shortest if all are)."""
    ms = seconds * 1000
    fitting = [step for step in DELAY_STEPS_MS if step <= ms]
    return fitting[-1] if fitting else DELAY_STEPS_MS[0]
