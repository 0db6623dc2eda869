from daemon.jobs.state import FINISH_STATES, TERMINAL_STATES, JobState, can_transition, progress


def test_terminal_states_never_move() -> None:
    for state in TERMINAL_STATES:
        assert state.terminal
        assert not any(can_transition(state, target) for target in JobState)


def test_the_only_paths_out_of_queued_and_running() -> None:
    allowed = {(a, b) for a in JobState for b in JobState if can_transition(a, b)}
    assert allowed == {
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.QUEUED, JobState.CANCELLED),
        (JobState.QUEUED, JobState.FAILED),
        (JobState.RUNNING, JobState.QUEUED),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.FAILED),
        (JobState.RUNNING, JobState.TIMED_OUT),
        (JobState.RUNNING, JobState.CANCELLED),
    }


def test_a_peer_finishes_only_into_outcomes_it_can_observe() -> None:
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT} == FINISH_STATES
    assert all(can_transition(JobState.RUNNING, s) for s in FINISH_STATES)


def test_progress_grows_with_every_allowed_change() -> None:
    """Watchers tell old news from new by it: it must never stand still or go back."""
    for attempt in range(3):
        for a in JobState:
            for b in JobState:
                if can_transition(a, b):
                    # Only a claim starts a new attempt.
                    after = attempt + 1 if b is JobState.RUNNING else attempt
                    assert progress(b, after) > progress(a, attempt), (a, b, attempt)
