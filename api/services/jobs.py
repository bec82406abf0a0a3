"""Submitting, reading, listing and cancelling jobs."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, func, select, text, tuple_, update
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from modelpress.domain.jobs import add_event, transition
from modelpress.domain.models import Artifact, Dataset, Job, JobEvent, Metric, ModelSource, new_id, utcnow
from modelpress.domain.settings import Settings
from modelpress.domain.states import JobState

from ..deps import after_commit
from ..errors import Conflict, NotFound, TooManyRequests, Unprocessable
from ..guards import clip
from ..schemas import MEASURE_OPTIONS, ArtifactOut, JobCreate, JobError, JobOut, MetricOut

log = logging.getLogger("modelpress.api")


# ------------------------------------------------------------------ model config (cached)
class _ConfigCache:
    """model id -> rebuilt transformers config. A registered model's config never changes, so
    it is rebuilt from the row's JSON once, not on every submission."""

    def __init__(self, size: int = 256):
        self.size = size
        self._d: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()

    def get(self, session: Session, model_id: str) -> Any:
        with self._lock:
            hit = self._d.get(model_id)
            if hit is not None:
                self._d.move_to_end(model_id)
                return hit
        raw = session.scalar(select(ModelSource.config).where(ModelSource.id == model_id))
        with self._build_lock:  # transformers imports a model type's config module lazily:
            cfg = rebuild_config(raw or {})  # not safe from many threads at once
        with self._lock:
            self._d[model_id] = cfg
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return cfg


def rebuild_config(cfg: dict[str, Any]) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    try:
        return AutoConfig.for_model(**cfg)
    except Exception:  # noqa: BLE001 - unknown model_type: a generic config still carries the dims
        return PretrainedConfig.from_dict(cfg)


config_cache = _ConfigCache()


# --------------------------------------------------------------------------- validation
def _field_path(prefix: str, loc: tuple[Any, ...]) -> str:
    return ".".join([prefix, *(str(p) for p in loc)])


def parse_strict(method: str, params: dict[str, Any]) -> Any:
    """A method's params as the JSON they came in, validated strictly: a number must be a JSON
    number (``"0.5"`` is refused, not coerced) and finite (Infinity/NaN are refused)."""
    from modelpress.compression.registry import get_method

    config = get_method(method).config  # unknown method -> CompressionError
    try:
        raw = json.dumps(params, allow_nan=False)
    except ValueError:
        raise Unprocessable("params must not hold Infinity or NaN", code="invalid_params") from None
    return config.model_validate_json(raw, strict=True)


def validate_stages(stages: list[dict[str, Any]], model_config: Any, *, single: bool) -> None:
    """Parse every stage's params (errors name the stage and the field), then check the recipe
    as a whole with the pipeline's validate_recipe."""
    from modelpress.compression.base import CompressionError

    for i, st in enumerate(stages):
        where = "" if single else f"stage {i} "
        prefix = "params" if single else f"recipe.{i}.params"
        try:
            parse_strict(st["method"], st["params"])
        except ValidationError as e:
            details = [{"field": _field_path(prefix, err["loc"]), "message": err["msg"],
                        "type": err["type"]} for err in e.errors()]
            msg = "; ".join(f"{d['field']}: {d['message']}" for d in details)
            raise Unprocessable(f"invalid params for {where}({st['method']}): {msg}",
                                code="invalid_params", details=details) from None
        except CompressionError as e:  # unknown method
            raise Unprocessable(f"{where.strip()}: {e}" if where else str(e),
                                code="unknown_method") from None
    from modelpress.compression.recipe import validate_recipe

    try:
        validate_recipe(stages, model_config)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise Unprocessable(f"invalid recipe: {msg}", code="invalid_params") from None
    except CompressionError as e:
        raise Unprocessable(str(e), code="invalid_recipe") from None


def admit(stages: list[dict[str, Any]], model_config: Any, settings: Settings) -> int | None:
    """The job's peak memory estimated from the model's config (:mod:`streaming.estimate`, run
    as a worker would run it: streamed or whole); 422 when it is above a worker's memory
    (``worker_memory_bytes``). None when the config lacks the sizes to estimate from."""
    from modelpress.compression.streaming.compress import STREAMABLE
    from modelpress.compression.streaming.estimate import describe, estimate_job

    capacity = settings.resolved_worker_memory_bytes
    try:
        est = estimate_job(model_config, stages, capacity)
    except (TypeError, ValueError, ZeroDivisionError):  # a config without the usual sizes
        return None
    if est.peak_bytes <= capacity:
        return est.peak_bytes
    how = ("even block by block" if est.streamed else
           f"with the model whole (single-stage {sorted(STREAMABLE)} jobs on causal language "
           "models run block by block)")
    raise Unprocessable(f"{describe(est.peak_bytes, capacity)} ({how})", code="job_too_large",
                        details={"estimated_peak_bytes": est.peak_bytes,
                                 "worker_memory_bytes": capacity, "streamed": est.streamed})


def choose_queue(stages: list[dict[str, Any]], settings: Settings) -> str:
    from modelpress.compression.registry import get_method

    if settings.gpu_queue_enabled and any(get_method(s["method"]).prefers_gpu for s in stages):
        return "gpu"
    return "cpu"


# ------------------------------------------------------------------------------ create
def _owned_dataset(session: Session, owner: str, ds_id: str | None, what: str) -> None:
    if ds_id is None:
        return
    found = session.scalar(select(Dataset.id).where(Dataset.id == ds_id, Dataset.owner == owner))
    if found is None:
        raise NotFound(f"{what} dataset {clip(ds_id)} not found")


def _check_jsonl_dataset(session: Session, settings: Settings, owner: str, ds_id: str | None,
                         what: str) -> None:
    """A task or prompt set must be the caller's and parse as one (422 naming the bad line)."""
    import tempfile
    from pathlib import Path

    from modelpress.compression.base import CompressionError
    from modelpress.compression.measure import prompts, tasks
    from modelpress.domain.store import make_store

    if ds_id is None:
        return
    ds = session.scalar(select(Dataset).where(Dataset.id == ds_id, Dataset.owner == owner))
    if ds is None:
        raise NotFound(f"{what} dataset {clip(ds_id)} not found")
    with tempfile.TemporaryDirectory(prefix="modelpress-jsonl-") as d:
        try:
            raw = make_store(settings).get_file(ds.store_key, Path(d) / "set.jsonl").read_bytes()
            (tasks.parse_tasks if what == "task" else prompts.parse_prompts)(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise Unprocessable(f"{what} dataset {clip(ds_id)} is not UTF-8 text",
                                code="invalid_dataset") from None
        except CompressionError as e:
            raise Unprocessable(f"{what} dataset {clip(ds_id)}: {e}",
                                code="invalid_dataset") from None


def _owned_model_refs(session: Session, owner: str, stages: list[dict[str, Any]]) -> None:
    """Params that name another registered model (a distillation teacher or student:
    ``*_model_id``) must name one of the caller's own models."""
    for i, st in enumerate(stages):
        for k, v in (st.get("params") or {}).items():
            if k.endswith("_model_id") and isinstance(v, str):
                found = session.scalar(select(ModelSource.id).where(
                    ModelSource.id == v, ModelSource.owner == owner))
                if found is None:
                    raise NotFound(f"stage {i} ({clip(st['method'])}): {k} {clip(v)}: "
                                   "model not found")


#: below ``limit - QUOTA_EXACT_MARGIN`` active jobs the quota is counted without a lock; nearer
#: the limit (PostgreSQL) submissions take a per-owner advisory lock and count again, so
#: concurrent submissions cannot pass it (more in flight at once than the margin would be needed)
QUOTA_EXACT_MARGIN = 200


def _count_active(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.state.in_((JobState.queued.value, JobState.running.value)))) or 0


def check_quota(session: Session, settings: Settings, owner: str) -> None:
    """An owner may have at most ``max_active_jobs_per_owner`` queued + running jobs."""
    limit = settings.max_active_jobs_per_owner
    if limit <= 0:
        return
    active = _count_active(session, owner)
    if active >= limit - QUOTA_EXACT_MARGIN and session.get_bind().dialect.name == "postgresql":
        # held until this transaction ends: the next submitter counts this one's job
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext("mp-quota:" + owner))))
        active = _count_active(session, owner)
    if active >= limit:
        raise TooManyRequests(f"you have {active} queued or running jobs (the limit is {limit}); "
                              "wait for some to finish or cancel them", retry_after_s=30,
                              code="job_quota_exceeded")


def create_job(session: Session, settings: Settings, owner: str, body: JobCreate,
               job_id: str | None = None) -> Job:
    check_quota(session, settings, owner)
    model_id = session.scalar(select(ModelSource.id).where(ModelSource.id == body.model_id,
                                                           ModelSource.owner == owner))
    if model_id is None:
        raise NotFound(f"model {clip(body.model_id)} not found")
    _owned_dataset(session, owner, body.calibration_dataset_id, "calibration")
    _owned_dataset(session, owner, body.eval_dataset_id, "evaluation")
    _check_jsonl_dataset(session, settings, owner, body.tasks_dataset_id, "task")
    _check_jsonl_dataset(session, settings, owner, body.prompts_dataset_id, "prompt")
    stages = body.stages()
    _owned_model_refs(session, owner, stages)
    model_config = config_cache.get(session, model_id)
    validate_stages(stages, model_config, single=body.method is not None)
    estimate = admit(stages, model_config, settings)
    now = utcnow()
    job = Job(id=job_id or new_id(), owner=owner, model_id=model_id, method=body.method,
              params=body.params if body.method is not None else None, recipe=stages,
              calibration_dataset_id=body.calibration_dataset_id,
              eval_dataset_id=body.eval_dataset_id, max_ppl_increase=body.max_ppl_increase,
              keep_intermediate=body.keep_intermediate, measure_options=body.measure_options(),
              estimated_peak_bytes=estimate,
              queue=choose_queue(stages, settings), state=JobState.queued.value, progress=0,
              attempt=0, cancel_requested=False, created_at=now, updated_at=now)
    session.add(job)
    _attach_webhook(session, settings, owner, job.id, body.callback_url)
    add_event(session, job.id, "submitted", f"submitted to the {job.queue} queue",
              {"stages": [s["method"] for s in stages], "queue": job.queue,
               "estimated_peak_bytes": estimate})
    session.flush()
    set_committed_value(job, "metrics", [])
    set_committed_value(job, "artifact", None)
    after_commit(session, lambda: dispatch(session, job))
    return job


def _attach_webhook(session: Session, settings: Settings, owner: str, job_id: str,
                    url: str | None) -> None:
    from modelpress.domain.webhooks import CallbackUrlError, attach

    try:
        attach(session, owner, job_id, url, allow_private=settings.webhook_allow_private)
    except CallbackUrlError as e:
        raise Unprocessable(str(e), code="invalid_callback_url") from None


def _async_commit(session: Session) -> None:
    """PostgreSQL: do not wait for the WAL flush on this transaction. Only for the bookkeeping
    after publishing (dispatched_at, dispatch_failed): losing it in a crash costs at most one
    extra publish by the sweep, which the worker's locked claim absorbs."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))


def dispatch(session: Session, job: Job) -> None:
    """Publish the committed job to its Celery queue; record dispatched_at, or a
    ``dispatch_failed`` event (the worker's sweep re-publishes it)."""
    try:
        from modelpress.workers.dispatch import publish_job

        publish_job(job.id, job.queue)
    except Exception as e:  # noqa: BLE001 - the job is safely queued; the sweep retries
        log.warning("publishing job %s failed: %s", job.id, e)
        _async_commit(session)
        add_event(session, job.id, "dispatch_failed", f"could not publish the job: {e}")
        session.commit()
        return
    now = utcnow()
    _async_commit(session)
    session.execute(update(Job).where(Job.id == job.id).values(dispatched_at=now)
                    .execution_options(synchronize_session=False))
    session.commit()
    set_committed_value(job, "dispatched_at", now)


# ------------------------------------------------------------------------------- read
def _with_children(stmt):
    return stmt.options(selectinload(Job.metrics), selectinload(Job.artifact))


def get_job(session: Session, owner: str, job_id: str, *, children: bool = True,
            for_update: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id, Job.owner == owner)
    if children:
        stmt = _with_children(stmt)
    if for_update:
        stmt = stmt.with_for_update(of=Job)
    job = session.scalar(stmt)
    if job is None:
        raise NotFound(f"job {clip(job_id)} not found")
    return job


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, job_id = raw.split("|", 1)
        if len(job_id) > 32 or not job_id.isalnum() or not job_id.isascii():
            raise ValueError(job_id)
        return datetime.fromisoformat(ts), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Unprocessable("invalid cursor", code="invalid_cursor") from None


def list_jobs(session: Session, owner: str, *, state: str | None = None,
              model_id: str | None = None, method: str | None = None, limit: int = 50,
              cursor: str | None = None) -> tuple[list[Job], str | None]:
    stmt = select(Job).where(Job.owner == owner)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    if method is not None:
        stmt = stmt.where(Job.method == method)
    if cursor is not None:
        ts, cid = decode_cursor(cursor)
        stmt = stmt.where(tuple_(Job.created_at, Job.id) < tuple_(ts, cid))
    stmt = _with_children(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    jobs = list(session.scalars(stmt))
    nxt = encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], nxt


def list_events(session: Session, owner: str, job_id: str, after: int | None,
                limit: int) -> list[JobEvent]:
    get_job(session, owner, job_id, children=False)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id > after)
    return list(session.scalars(stmt.order_by(JobEvent.id).limit(limit)))


# ----------------------------------------------------------------------------- cancel
def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """queued -> cancelled now; running -> cancel_requested (the worker stops at its next
    checkpoint); finished -> 409."""
    job = get_job(session, owner, job_id, for_update=True)
    state = JobState(job.state)
    if state.terminal:
        raise Conflict(f"job {job_id} is already {state.value}", code="job_finished")
    if state is JobState.queued:
        transition(session, job, JobState.cancelled, message="cancelled by the user before it "
                   "started", error_code="cancelled", error="cancelled by the user")
    elif not job.cancel_requested:
        job.cancel_requested = True
        add_event(session, job.id, "cancel_requested", "cancellation requested; the worker "
                  "stops at its next checkpoint")
    session.flush()
    return job


# ------------------------------------------------------------- read one (the hot path)
_JOB_COLS = [c for c in Job.__table__.c if c.key != "report"]
_ART_COLS = [Artifact.__table__.c[k] for k in ("bytes", "sha256", "format", "unpacked_bytes",
                                                "ready")]
_MET_COLS = [Metric.__table__.c[k] for k in ("stage", "name", "value", "unit")]
_ONE_JOB = (
    select(*_JOB_COLS, Job.report.is_not(None).label("has_report"),
           *[c.label(f"a_{c.key}") for c in _ART_COLS], Artifact.id.label("a_id"),
           *[c.label(f"m_{c.key}") for c in _MET_COLS])
    .select_from(Job)
    .outerjoin(Artifact, Artifact.job_id == Job.id)
    .outerjoin(Metric, Metric.job_id == Job.id)
    .where(Job.id == bindparam("job_id"), Job.owner == bindparam("owner"))
    .order_by(Metric.id)
)


def get_job_out(session: Session, owner: str, job_id: str, base_url: str) -> JobOut:
    """GET /v1/jobs/{id} in ONE round trip (job + artifact + metrics joined), no ORM objects.
    Executed on the session's connection: the ORM's statement handling (compile state, loading
    context, events) costs ~0.15 ms of CPU here for a Core select that loads no entities."""
    rows = session.connection().execute(_ONE_JOB, {"job_id": job_id, "owner": owner}).all()
    if not rows:
        raise NotFound(f"job {clip(job_id)} not found")
    r = rows[0]._mapping
    artifact = None
    if r["a_id"] is not None:
        artifact = ArtifactOut(bytes=r["a_bytes"], sha256=r["a_sha256"], format=r["a_format"],
                               unpacked_bytes=r["a_unpacked_bytes"], ready=r["a_ready"],
                               download_url=f"{base_url}v1/jobs/{job_id}/artifact"
                               if r["a_ready"] else None)
    metrics = [MetricOut(stage=m.m_stage, name=m.m_name, value=m.m_value, unit=m.m_unit)
               for m in rows if m.m_name is not None]
    return _out(r, metrics, artifact, r["has_report"])


# ----------------------------------------------------------------------------- output
def to_out(job: Job, base_url: str) -> JobOut:
    art = job.artifact
    artifact = None
    if art is not None:
        artifact = ArtifactOut(bytes=art.bytes, sha256=art.sha256, format=art.format,
                               unpacked_bytes=art.unpacked_bytes, ready=art.ready,
                               download_url=f"{base_url}v1/jobs/{job.id}/artifact"
                               if art.ready else None)
    metrics = [MetricOut(stage=m.stage, name=m.name, value=m.value, unit=m.unit)
               for m in job.metrics]
    return _out(job, metrics, artifact, job.report is not None)


def _measure_fields(opts: dict[str, Any] | None) -> dict[str, Any]:
    opts = opts or {}
    return {"measure": opts.get("measure", "full"), **{k: opts.get(k) for k in MEASURE_OPTIONS}}


def _out(j: Any, metrics: list[MetricOut], artifact: ArtifactOut | None,
         has_report: bool) -> JobOut:
    """JobOut from a Job or a row mapping with the same keys."""
    get = j.__getitem__ if hasattr(j, "__getitem__") else j.__getattribute__
    error = None
    if get("error") is not None or get("error_code") is not None:
        error = JobError(code=get("error_code") or "error", message=get("error") or "")
    return JobOut(
        id=get("id"), model_id=get("model_id"), method=get("method"), params=get("params"),
        recipe=get("recipe"), calibration_dataset_id=get("calibration_dataset_id"),
        eval_dataset_id=get("eval_dataset_id"), max_ppl_increase=get("max_ppl_increase"),
        keep_intermediate=bool(get("keep_intermediate")),
        **_measure_fields(get("measure_options")),
        queue=get("queue"), state=get("state"), progress=get("progress"), stage=get("stage"),
        attempt=get("attempt"), cancel_requested=get("cancel_requested"), error=error,
        estimated_peak_bytes=get("estimated_peak_bytes"),
        metrics=metrics, artifact=artifact, has_report=has_report,
        created_at=get("created_at"), updated_at=get("updated_at"),
        dispatched_at=get("dispatched_at"), started_at=get("started_at"),
        finished_at=get("finished_at"))
