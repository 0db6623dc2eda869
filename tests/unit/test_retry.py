from datetime import timedelta

from daemon.retry import backoff


def test_backoff_doubles_from_half_a_second_and_is_capped() -> None:
    assert [backoff(n).total_seconds() for n in range(0, 6)] == [0, 0.5, 1, 2, 4, 8]
    assert backoff(50) == timedelta(seconds=30)
    assert backoff(1000) == timedelta(seconds=30)
