"""The job state machine: the only place that knows which transitions are legal."""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):  # noqa: UP042 (str() of a member stays "JobState.x")
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled, JobState.failed}),
    # running -> queued: a retry after the worker died (attempt + 1)
    JobState.running: frozenset({JobState.succeeded, JobState.failed, JobState.cancelled,
                                 JobState.queued}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, current: JobState, new: JobState):
        super().__init__(f"job cannot go from {current.value} to {new.value}")
        self.current, self.new = current, new


def check_transition(current: JobState | str, new: JobState | str) -> JobState:
    cur, nxt = JobState(current), JobState(new)
    if nxt not in TRANSITIONS[cur]:
        raise IllegalTransition(cur, nxt)
    return nxt
