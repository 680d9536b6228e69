"""The retry policy: exponential backoff with jitter, capped, mapped onto delay queues."""

from __future__ import annotations

from transport.policy import DELAY_STEPS_MS, JITTER, MAX_RETRY_DELAY, backoff, delay_step


def test_backoff_doubles_per_attempt_within_its_jitter_and_is_capped() -> None:
    for attempt, nominal in ((1, 2.0), (2, 4.0), (3, 8.0)):
        seen = [backoff(2.0, attempt) for _ in range(200)]
        assert nominal * (1 - JITTER) <= min(seen) and max(seen) <= nominal * (1 + JITTER)
        assert max(seen) - min(seen) > nominal * JITTER  # jittered, not constant
    assert backoff(2.0, 10_000) <= MAX_RETRY_DELAY * (1 + JITTER)  # no float overflow
    assert backoff(0.0, 3) == 0.0


def test_a_delay_waits_in_the_longest_step_not_above_it() -> None:
    assert delay_step(0) == DELAY_STEPS_MS[0]  # the shortest, for anything below it
    assert delay_step(0.25) == 200 and delay_step(2.0) == 2000 and delay_step(2.9) == 2000
    assert delay_step(10**6) == DELAY_STEPS_MS[-1]
    assert list(DELAY_STEPS_MS) == sorted(set(DELAY_STEPS_MS))
