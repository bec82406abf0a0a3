"""The worker on the real stack: real ``celery worker`` subprocesses consuming from Redis,
PostgreSQL for state, a local artifact directory. Jobs are submitted the way the API does
(commit the row, publish, stamp dispatched_at) and followed in the database."""

from __future__ import annotations

import re
import tarfile
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from modelpress.domain.db import session_scope
from modelpress.domain.models import Artifact, Job, Metric, utcnow

from .conftest import events, insert_job, job_row, register_model, submit, tar_dir, wait_for

OWNER = "alice"
MAGNITUDE = [{"method": "magnitude", "params": {"sparsity": 0.5}}]


@pytest.fixture(scope="module")
def worker(use_stack, start_worker):
    return start_worker("main")


@pytest.fixture(scope="module")
def tiny_model_id(use_stack, tiny_llama_dir, tmp_path_factory) -> str:
    tar = tar_dir(tiny_llama_dir, tmp_path_factory.mktemp("tar") / "tiny.tar", top="tiny-llama")
    return register_model(OWNER, tar, "hf-dir")


def _artifact(job_id: str) -> Artifact | None:
    with session_scope() as s:
        a = s.scalar(select(Artifact).where(Artifact.job_id == job_id))
        if a is not None:
            s.expunge(a)
        return a


def _uploads(job_id: str) -> list[str]:
    """Artifact archives in the store under the job's prefix (any attempt)."""
    from modelpress.domain.settings import get_settings

    root = get_settings().resolved_store_dir
    return sorted(str(p.relative_to(root)) for p in (root / "jobs" / job_id).rglob("model.tar.gz"))


def _metrics(job_id: str) -> dict[tuple[str, str], float]:
    with session_scope() as s:
        return {(m.stage, m.name): m.value
                for m in s.scalars(select(Metric).where(Metric.job_id == job_id))}


def _linear_sparsity(model) -> float:
    from modelpress.compression.evaluation import linear_sparsity

    return linear_sparsity(model)


def test_magnitude_job_succeeds_with_verified_artifact(worker, tiny_model_id, tmp_path):
    from transformers import AutoModelForCausalLM

    from modelpress.domain.store import make_store, sha256_file

    jid = submit(OWNER, tiny_model_id, MAGNITUDE)
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=worker)
    assert job.state == "succeeded", (job.error_code, job.error, worker.text()[-3000:])
    assert job.attempt == 1 and job.progress == 100 and job.worker.startswith("main-0@")
    assert job.error is None and job.finished_at >= job.started_at

    art = _artifact(jid)
    assert art is not None and art.ready
    assert re.fullmatch(rf"jobs/{jid}/a1-[0-9a-f]{{8}}/model\.tar\.gz", art.store_key)
    assert _uploads(jid) == [art.store_key], "one attempt, one upload"
    store = make_store()
    local = tmp_path / "model.tar.gz"
    store.get_file(art.store_key, local)
    assert local.stat().st_size == art.bytes
    assert sha256_file(local) == art.sha256
    with tarfile.open(local) as tf:
        names = tf.getnames()
        assert {n.split("/")[0] for n in names} == {jid}, "one top folder named after the job"
        tf.extractall(tmp_path / "x", filter="data")
    out = tmp_path / "x" / jid
    assert (out / "config.json").is_file() and (out / "report.json").is_file()
    assert art.unpacked_bytes == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

    model = AutoModelForCausalLM.from_pretrained(out)
    measured = _linear_sparsity(model)
    assert measured == pytest.approx(0.5, abs=0.02)
    metrics = _metrics(jid)
    assert metrics[("after", "sparsity")] == pytest.approx(measured, abs=1e-6)
    assert metrics[("after", "params")] == sum(p.numel() for p in model.parameters())
    assert job.report is not None and job.report  # the report dict is stored
    kinds = [e.kind for e in events(jid)]
    assert "artifact" in kinds
    states = [e.data["to"] for e in events(jid) if e.kind == "state"]
    assert states == ["running", "succeeded"]


def test_recipe_keep_intermediate_archives_each_stage(worker, tiny_model_id, tmp_path):
    """A two-stage recipe with keep_intermediate: the archive holds the final model and the
    intermediate model of every stage before the last, with each stage's metrics."""
    from modelpress.domain.store import make_store

    recipe = [{"method": "magnitude", "params": {"sparsity": 0.3}},
              {"method": "magnitude", "params": {"pattern": "2:4"}}]
    jid = submit(OWNER, tiny_model_id, recipe, keep_intermediate=True)
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=worker)
    assert job.state == "succeeded", (job.error_code, job.error)
    local = tmp_path / "model.tar.gz"
    make_store().get_file(_artifact(jid).store_key, local)
    with tarfile.open(local) as tf:
        names = set(tf.getnames())
    assert f"{jid}/config.json" in names
    assert f"{jid}/stages/0-magnitude/config.json" in names
    # the last stage's model is the artifact itself, not stored twice
    assert not any(n.startswith(f"{jid}/stages/1-") for n in names)
    metrics = _metrics(jid)
    assert metrics[("0:magnitude", "sparsity")] == pytest.approx(0.3, abs=0.01)
    # 2:4 on top of 30%: every group of 4 keeps at most 2, so at least half is zero
    assert 0.5 <= metrics[("after", "sparsity")] < 0.6


def test_corrupt_model_fails_with_reason_and_no_artifact(worker, use_stack, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 1000)
    mid = register_model(OWNER, bad, "gguf")
    jid = submit(OWNER, mid, MAGNITUDE)
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=worker)
    assert job.state == "failed"
    assert job.error_code == "invalid_model"
    assert "\n" not in job.error and len(job.error) > 20
    assert "GGUF" in job.error or "gguf" in job.error
    assert _artifact(jid) is None
    tb = [e for e in events(jid) if e.kind == "traceback"]
    assert tb and "Traceback" in tb[0].data["traceback"]
    # nothing left under jobs/<id>/ in the store
    assert _uploads(jid) == []


def _drained(redis_url: str, timeout: float = 60) -> None:
    """Wait until the worker consumed and acknowledged every message (kombu's Redis transport
    keeps delivered-but-unacked messages in the ``unacked`` hash)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.llen("cpu") == 0 and r.llen("gpu") == 0 and r.hlen("unacked") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the worker did not drain the queues")


def test_cancel_before_a_worker_takes_it(worker, tiny_model_id, stack_env):
    """The API cancels a queued job at once; when its message arrives the worker skips it.
    A job with cancel_requested set while queued is cancelled at claim time, never started."""
    from modelpress.domain.jobs import transition
    from modelpress.domain.states import JobState
    from modelpress.workers.dispatch import publish_job

    jid = insert_job(OWNER, tiny_model_id, MAGNITUDE)
    with session_scope() as s:
        transition(s, s.get(Job, jid), JobState.cancelled, message="cancelled by the user")
    publish_job(jid, "cpu")
    jid2 = insert_job(OWNER, tiny_model_id, MAGNITUDE, cancel_requested=True)
    publish_job(jid2, "cpu")
    _drained(stack_env["MODELPRESS_BROKER_URL"])
    # kombu's Redis transport pops a message before it records it as unacked: the queues can
    # look drained a moment before the worker has the message (seen once in CI under load)
    wait_for(jid2, {"cancelled", "running", "succeeded", "failed"}, worker=worker, timeout=60)
    for j in (jid, jid2):
        job = job_row(j)
        assert job.state == "cancelled"
        assert job.started_at is None and job.attempt == 0 and job.worker is None
        assert _artifact(j) is None
    assert [e.data["to"] for e in events(jid2) if e.kind == "state"] == ["cancelled"]


def test_cancel_running_job(worker, tiny_model_id):
    jid = submit(OWNER, tiny_model_id, MAGNITUDE)
    wait_for(jid, {"running"}, worker=worker, timeout=60)
    with session_scope() as s:  # what POST /v1/jobs/{id}/cancel does for a running job
        s.execute(update(Job).where(Job.id == jid).values(cancel_requested=True))
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=worker, timeout=120)
    assert job.state == "cancelled", (job.state, job.error)
    assert job.attempt == 1 and job.started_at is not None
    assert _artifact(jid) is None
    assert _uploads(jid) == []
    assert [e.data["to"] for e in events(jid) if e.kind == "state"] == ["running", "cancelled"]


def test_sweep_republishes_a_job_whose_publish_failed(worker, tiny_model_id):
    from modelpress.workers.sweeper import sweep

    # the API committed the job but the broker was down: dispatched_at stays NULL
    jid = insert_job(OWNER, tiny_model_id, MAGNITUDE, age_s=10)
    time.sleep(1.0)
    assert job_row(jid).state == "queued"
    out = sweep()
    assert jid in out["published"]
    assert job_row(jid).dispatched_at is not None
    assert jid not in sweep()["published"], "a fresh dispatch is not repeated"
    # the re-published message reaches the worker, which claims the job (then we cancel it:
    # running it to the end is what the first test does)
    wait_for(jid, {"running", "succeeded"}, worker=worker, timeout=60)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == jid).values(cancel_requested=True))
    assert wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=worker).state in {
        "cancelled", "succeeded"}
    assert job_row(jid).attempt == 1
    assert any(e.kind == "redispatched" for e in events(jid))


def test_sweep_selection_and_backoff(use_stack, tiny_model_id):
    """Which queued jobs the sweep publishes (with a publisher that only records)."""
    from modelpress.domain.jobs import add_event
    from modelpress.workers.sweeper import sweep

    sent: list[str] = []
    now = utcnow()
    fresh = insert_job(OWNER, tiny_model_id, MAGNITUDE)  # the API may still be publishing it
    lost = insert_job(OWNER, tiny_model_id, MAGNITUDE, age_s=120,
                      dispatched_at=now - timedelta(seconds=40))  # > grace (30 s)
    backed_off = insert_job(OWNER, tiny_model_id, MAGNITUDE, age_s=120,
                            dispatched_at=now - timedelta(seconds=40))
    with session_scope() as s:
        add_event(s, backed_off, "redispatched", "earlier re-publish")  # next wait: 60 s
    broker_down = insert_job(OWNER, tiny_model_id, MAGNITUDE, age_s=120)

    def publish(job_id, queue):
        if job_id == broker_down:
            raise ConnectionError("broker down")
        sent.append(job_id)

    out = sweep(publish=publish)
    mine = {fresh, lost, backed_off, broker_down}
    assert set(sent) & mine == {lost}
    assert broker_down in out["publish_failed"]
    assert job_row(broker_down).dispatched_at is None
    # clean up: these jobs must not run later in the module
    with session_scope() as s:
        s.execute(update(Job).where(Job.id.in_(mine)).values(state="cancelled"))


def test_reaper_gives_up_after_max_attempts(use_stack, tiny_model_id):
    from modelpress.workers.sweeper import sweep

    old = utcnow() - timedelta(hours=1)
    dead = insert_job(OWNER, tiny_model_id, MAGNITUDE, state="running", attempt=2,
                      worker="ghost@host:1", heartbeat_at=old, started_at=old)
    cancelling = insert_job(OWNER, tiny_model_id, MAGNITUDE, state="running", attempt=1,
                            worker="ghost@host:1", heartbeat_at=old, started_at=old,
                            cancel_requested=True)
    out = sweep(publish=lambda *_: None)
    assert dead in out["failed"] and cancelling in out["cancelled"]
    j = job_row(dead)
    assert j.state == "failed" and j.error_code == "worker_lost"
    assert "ghost@host:1" in j.error and "2 attempts" in j.error
    assert job_row(cancelling).state == "cancelled"
    assert any(e.kind == "worker_lost" for e in events(dead))


def test_quality_gate_miss_keeps_metrics_and_report_but_no_artifact(worker, tiny_model_id):
    # an impossible gate (perplexity must drop a million-fold) makes the miss deterministic
    jid = submit(OWNER, tiny_model_id, MAGNITUDE, max_ppl_increase=1e-6)
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=worker)
    assert job.state == "failed" and job.error_code == "quality_gate", (job.error_code, job.error)
    assert "perplexity" in job.error
    assert job.report["gate"]["passed"] is False
    metrics = _metrics(jid)
    assert metrics[("after", "sparsity")] == pytest.approx(0.5, abs=0.02)
    assert ("before", "perplexity") in metrics and ("after", "ppl_ratio") in metrics
    assert _artifact(jid) is None
    assert _uploads(jid) == [], "a gate miss uploads nothing"


def test_soft_time_limit_fails_the_job_with_timeout(use_stack, start_worker, tiny_model_id,
                                                    worker):
    """Celery's soft time limit (prefork pool) interrupts the job: failed, error_code timeout."""
    start_worker.kill_all()
    timed = start_worker("timed", pool="prefork",
                         extra_env={"MODELPRESS_TASK_SOFT_TIME_LIMIT_S": "2",
                                    "MODELPRESS_TASK_TIME_LIMIT_S": "120"})
    jid = submit(OWNER, tiny_model_id, MAGNITUDE)
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=timed, timeout=180)
    assert job.state == "failed" and job.error_code == "timeout", (job.error_code, job.error)
    assert "SoftTimeLimitExceeded" in job.error
    assert _artifact(jid) is None
    timed.kill()


def test_killed_worker_job_is_reaped_requeued_and_succeeds(use_stack, start_worker,
                                                           tiny_model_id, worker):
    """kill -9 the worker mid-job: the heartbeat stops, the sweep requeues the job (attempt 1 of
    2) and re-publishes it, and another worker finishes it on attempt 2."""
    from modelpress.workers.sweeper import sweep

    start_worker.kill_all()  # no other worker may take the job
    doomed = start_worker("doomed")
    jid = submit(OWNER, tiny_model_id, MAGNITUDE)
    wait_for(jid, {"running"}, worker=doomed, timeout=60)
    assert job_row(jid).worker.startswith("doomed-")
    time.sleep(0.5)
    doomed.kill()
    assert job_row(jid).state == "running"
    time.sleep(5.0)  # > MODELPRESS_REAPER_TIMEOUT_S
    out = sweep()
    assert jid in out["requeued"] and jid in out["published"]
    j = job_row(jid)
    assert j.state == "queued" and j.attempt == 1
    rescuer = start_worker("rescuer")
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=rescuer, timeout=300)
    assert job.state == "succeeded", (job.error_code, job.error)
    assert job.attempt == 2 and job.worker.startswith("rescuer-")
    rescuer.kill()
    kinds = [e.kind for e in events(jid)]
    assert "worker_lost" in kinds
    states = [e.data["to"] for e in events(jid) if e.kind == "state"]
    assert states == ["running", "queued", "running", "succeeded"]
    art = _artifact(jid)
    assert art is not None and art.ready


def test_killed_worker_distill_resumes_from_checkpoint(use_stack, start_worker, tiny_model_id,
                                                        worker):
    """kill -9 a worker in the middle of a distillation stage: the retried job resumes training
    from the last checkpoint in the artifact store, not from step 0."""
    from modelpress.workers.sweeper import sweep

    recipe = [{"method": "distill", "params": {
        "steps": 400, "checkpoint_every": 5, "log_every": 5, "batch_size": 1, "seq_len": 32,
        "warmup_steps": 0, "max_minutes": 5, "autocast": "none"}}]
    start_worker.kill_all()  # no other worker may take the job
    doomed = start_worker("doomed-distill")
    jid = submit(OWNER, tiny_model_id, recipe)
    deadline = time.monotonic() + 180
    saved = []
    while time.monotonic() < deadline and not saved:
        saved = [e.data["step"] for e in events(jid) if e.kind == "checkpoint"]
        time.sleep(0.05)
    assert saved, "no checkpoint was written"
    assert job_row(jid).worker.startswith("doomed-distill-")
    doomed.kill()
    killed_at = max(e.data["step"] for e in events(jid) if e.kind == "checkpoint")
    assert job_row(jid).state == "running"
    time.sleep(5.0)  # > MODELPRESS_REAPER_TIMEOUT_S
    assert jid in sweep()["requeued"]
    rescuer = start_worker("rescuer-distill")
    job = wait_for(jid, {"succeeded", "failed", "cancelled"}, worker=rescuer, timeout=300)
    assert job.state == "succeeded", (job.error_code, job.error)
    assert job.attempt == 2
    resumed = [e.data["step"] for e in events(jid) if e.kind == "resume"]
    assert resumed and resumed[0] >= killed_at > 0
