"""POST /v1/jobs with the measurement options: measure, task and prompt sets (validated as JSONL
at submission, 422 naming the line and nothing written), their gates; the worker's claim
carries them."""

from __future__ import annotations

import json

import pytest

from modelpress.domain.models import Job

TASKS = "\n".join(json.dumps({"question": q, "choices": ["a", "b"], "gold": 1})
                  for q in ("one", "two")) + "\n"
PROMPTS = '{"prompt": "Once upon a time"}\n{"prompt": "The capital of France is"}\n'


def _upload(client, headers, text: str | bytes, name="set.jsonl") -> str:
    body = text.encode() if isinstance(text, str) else text
    r = client.post("/v1/datasets", headers=headers, files={"file": (name, body)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_options_are_stored_and_shown(client, alice, model_id, published, db):
    t, p = _upload(client, alice[1], TASKS), _upload(client, alice[1], PROMPTS)
    r = client.post("/v1/jobs", headers=alice[1], json=dict(
        model_id=model_id, method="magnitude", measure="quality", tasks_dataset_id=t,
        prompts_dataset_id=p, max_accuracy_drop=0.05, max_mean_kl=0.2, eval_windows=4))
    assert r.status_code == 201, r.text
    j = r.json()
    assert (j["measure"], j["tasks_dataset_id"], j["prompts_dataset_id"]) == ("quality", t, p)
    assert (j["max_accuracy_drop"], j["max_mean_kl"], j["eval_windows"]) == (0.05, 0.2, 4)
    assert db.get(Job, j["id"]).measure_options == {
        "measure": "quality", "tasks_dataset_id": t, "prompts_dataset_id": p,
        "max_accuracy_drop": 0.05, "max_mean_kl": 0.2, "eval_windows": 4}
    got = client.get(f"/v1/jobs/{j['id']}", headers=alice[1]).json()
    assert got["measure"] == "quality" and got["max_mean_kl"] == 0.2
    plain = client.post("/v1/jobs", headers=alice[1],
                        json=dict(model_id=model_id, method="magnitude")).json()
    assert plain["measure"] == "full" and plain["tasks_dataset_id"] is None
    assert plain["eval_windows"] is None  # the workers' setting
    assert db.get(Job, plain["id"]).measure_options is None

    from modelpress.workers.execution import claim_job

    claim = claim_job(j["id"], "w1")
    assert claim.measure_options["tasks_dataset_id"] == t
    assert claim.measure_options["max_accuracy_drop"] == 0.05
    assert claim.measure_options["eval_windows"] == 4


@pytest.mark.parametrize("case", ["bad_json", "bad_gold", "prompt_no_prompt", "not_utf8",
                                  "gate_without_set", "none_with_gate", "bad_measure",
                                  "negative_kl", "zero_windows", "too_many_windows"])
def test_bad_sets_and_options_are_422_and_write_nothing(client, alice, model_id, published,
                                                        counts, case):
    good_t, good_p = _upload(client, alice[1], TASKS), _upload(client, alice[1], PROMPTS)
    body: dict = {"model_id": model_id, "method": "magnitude"}
    expect = None
    if case == "bad_json":
        body["tasks_dataset_id"] = _upload(client, alice[1], TASKS + "{oops\n")
        expect = "line 3: not JSON"
    elif case == "bad_gold":
        body["tasks_dataset_id"] = _upload(
            client, alice[1], '{"question": "q", "choices": ["a", "b"], "gold": 5}\n')
        expect = "line 1: 'gold'"
    elif case == "prompt_no_prompt":
        body["prompts_dataset_id"] = _upload(client, alice[1], '{"text": "x"}\n')
        expect = "needs one of 'prompt'"
    elif case == "not_utf8":
        # the upload itself may refuse non-UTF-8; then nothing to submit
        r = client.post("/v1/datasets", headers=alice[1], files={"file": ("x", b"\xff\xfe{")})
        if r.status_code != 201:
            assert r.status_code == 422
            return
        body["tasks_dataset_id"] = r.json()["id"]
    elif case == "gate_without_set":
        body["max_accuracy_drop"] = 0.1
        body["prompts_dataset_id"] = good_p
        expect = "needs `tasks_dataset_id`"
    elif case == "none_with_gate":
        body.update(measure="none", tasks_dataset_id=good_t, max_accuracy_drop=0.1)
        expect = "measures no quality"
    elif case == "bad_measure":
        body["measure"] = "fast"
    elif case == "negative_kl":
        body.update(prompts_dataset_id=good_p, max_mean_kl=-1)
    elif case == "zero_windows":
        body["eval_windows"] = 0
    elif case == "too_many_windows":
        body["eval_windows"] = 257
    before = counts()
    r = client.post("/v1/jobs", headers=alice[1], json=body)
    assert r.status_code == 422, r.text
    if expect:
        assert expect in r.json()["error"]["message"]
    if case in ("bad_json", "bad_gold", "prompt_no_prompt"):
        assert r.json()["error"]["code"] == "invalid_dataset"
    assert counts() == before and published == []


def test_foreign_task_set_is_404(client, alice, bob, model_id, published):
    t = _upload(client, bob[1], TASKS)
    r = client.post("/v1/jobs", headers=alice[1], json=dict(
        model_id=model_id, method="magnitude", tasks_dataset_id=t))
    assert r.status_code == 404 and "task dataset" in r.json()["error"]["message"]


def test_comparison_shows_task_accuracy_kl_and_the_other_text(client, alice, model_id, db,
                                                              published):
    from modelpress.domain.jobs import transition
    from modelpress.domain.models import Metric
    from modelpress.domain.states import JobState

    job_id = client.post("/v1/jobs", headers=alice[1], json={
        "model_id": model_id, "method": "magnitude"}).json()["id"]
    db.rollback()
    job = db.get(Job, job_id)
    transition(db, job, JobState.running)
    transition(db, job, JobState.succeeded)
    before = {"bytes": 100.0, "perplexity": 20.0, "perplexity_other": 9.0, "task_accuracy": 0.75}
    after = {"bytes": 50.0, "perplexity": 21.0, "ppl_ratio": 1.05, "perplexity_other": 9.5,
             "task_accuracy": 0.7, "prompt_mean_kl": 0.03}
    for stage, m in (("before", before), ("after", after)):
        for name, v in m.items():
            db.add(Metric(job_id=job_id, stage=stage, name=name, value=v))
    db.commit()
    comp = client.get(f"/v1/models/{model_id}/comparison", headers=alice[1]).json()
    row = comp["rows"][0]
    assert (row["task_accuracy"], row["prompt_mean_kl"], row["perplexity_other"]) == (0.7, 0.03, 9.5)
    assert comp["baseline"]["perplexity_other"] == 9.0
