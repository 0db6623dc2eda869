"""The one place a guest's end becomes the error a user reads (outcome_of)."""

from __future__ import annotations

from dataclasses import replace

from daemon.executors import result as results
from daemon.executors.job_executor import MAX_GUEST_MESSAGE, guest_words, outcome_of
from daemon.jobstate import JobState


def test_a_guests_own_message_is_said_once() -> None:
    exited = replace(results.nonzero_exit(2), stderr=b"bad input: no header row\n")
    assert outcome_of(exited).error == "bad input: no header row"
    trapped = replace(results.trapped("unreachable", "wasm trap"), stderr=b"about to fail\n")
    failed = outcome_of(trapped)
    assert failed.state is JobState.FAILED
    assert failed.error == "guest trapped (unreachable): wasm trap: about to fail"
    assert failed.error.count("about to fail") == 1


def test_control_bytes_are_escaped_and_the_tail_kept() -> None:
    assert guest_words(b"a\x00b\x1b[2J\tc\nd\x7f") == "a\\x00b\\x1b[2J\tc\nd\\x7f"
    long = b"x" * 5000 + b"END"
    assert guest_words(long).endswith("END") and len(guest_words(long)) == MAX_GUEST_MESSAGE
    assert guest_words(b"\xff\xfe broken utf-8") == "\ufffd\ufffd broken utf-8"
