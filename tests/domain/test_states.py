import pytest

from modelpress.domain.states import IllegalTransition, JobState, check_transition


@pytest.mark.parametrize("a,b", [("queued", "running"), ("queued", "cancelled"), ("running", "succeeded"),
                                 ("running", "failed"), ("running", "cancelled"), ("running", "queued")])
def test_legal(a, b):
    assert check_transition(a, b) is JobState(b)


@pytest.mark.parametrize("a,b", [("succeeded", "running"), ("failed", "queued"), ("cancelled", "running"),
                                 ("queued", "succeeded"), ("succeeded", "failed")])
def test_illegal(a, b):
    with pytest.raises(IllegalTransition):
        check_transition(a, b)
