"""The one place a run's end becomes the job state and error a user reads (`ending`)."""

from __future__ import annotations

from dataclasses import replace

from daemon.executors import result as results
from daemon.executors.result import MAX_GUEST_MESSAGE, ending, guest_words
from daemon.jobs.state import JobState


def test_a_guests_own_message_is_said_once() -> None:
    exited = replace(results.nonzero_exit(2), stderr=b"bad input: no header row\n")
    assert ending(exited) == (JobState.FAILED, "bad input: no header row")
    trapped = replace(results.trapped("unreachable", "wasm trap"), stderr=b"about to fail\n")
    assert ending(trapped) == (
        JobState.FAILED,
        "guest trapped (unreachable): wasm trap: about to fail",
    )


def test_control_bytes_are_escaped_and_the_tail_kept() -> None:
    assert guest_words(b"a\x00b\x1b[2J\tc\nd\x7f") == "a\\x00b\\x1b[2J\tc\nd\\x7f"
    long = b"x" * 5000 + b"END"
    assert guest_words(long).endswith("END") and len(guest_words(long)) == MAX_GUEST_MESSAGE
    assert guest_words(b"\xff\xfe broken utf-8") == "\ufffd\ufffd broken utf-8"
