"""/v1/jobs: submit, read, list, cancel, follow events, download the artifact, read the report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from modelpress.domain.states import JobState

from ..deps import CurrentOwner, DbSession, ReadSession, Settings, Store, UnitOfWorkRoute, after_commit
from ..schemas import EventOut, EventPage, JobCreate, JobOut, JobPage
from ..services import artifacts, deletion, idempotency, reports
from ..services import jobs as svc

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=UnitOfWorkRoute)


def _base(request: Request) -> str:
    return str(request.base_url)


@router.post("", status_code=201, response_model=JobOut, summary="Submit a compression job",
             description="One method with its params, or a recipe of stages run in order. The "
             "params are validated against the method and the model at submission: a job that "
             "is accepted can run. Unknown model or dataset -> 404; bad params or recipe -> 422. "
             "With an `Idempotency-Key` header, a retry with the same key and body returns the "
             "same job (200, `Idempotent-Replayed: true`); the same key with another body -> 409.",
             responses={200: {"description": "Replay of an earlier request with the same "
                              "Idempotency-Key"},
                        404: {"description": "Unknown model or dataset"},
                        409: {"description": "Idempotency-Key reused with another body"},
                        422: {"description": "Invalid method, params or recipe"},
                        429: {"description": "Too many active jobs, or over the request rate"}})
def submit_job(body: JobCreate, request: Request, session: DbSession, owner: CurrentOwner,
               settings: Settings) -> Response:
    key = idempotency.header_key(request)
    job_id = None
    if key is not None:
        claim = idempotency.claim(session, settings, owner, "jobs", key,
                                  idempotency.body_hash(body.model_dump(mode="json")))
        if claim.replay:  # the job the first request with this key created, as it is now
            out = svc.get_job_out(session, owner, claim.resource_id, _base(request))
            return Response(out.model_dump_json(), status_code=200, media_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
        job_id = claim.resource_id
    job = svc.create_job(session, settings, owner, body, job_id=job_id)
    counter = request.app.state.metrics.jobs_submitted.labels(job.queue)
    after_commit(session, counter.inc)
    out = svc.to_out(job, _base(request))
    return Response(out.model_dump_json(), status_code=201, media_type="application/json")


@router.get("", response_model=JobPage, summary="List your jobs (newest first)")
def list_jobs(request: Request, session: ReadSession, owner: CurrentOwner,
              state: JobState | None = None, model_id: str | None = None,
              method: Annotated[str | None, Query(description="Single-method jobs using it")] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
              ) -> JobPage:
    items, nxt = svc.list_jobs(session, owner, state=state.value if state else None,
                               model_id=model_id, method=method, limit=limit, cursor=cursor)
    base = _base(request)
    return JobPage(items=[svc.to_out(j, base) for j in items], next_cursor=nxt)


@router.get("/{job_id}", response_model=JobOut, summary="Get a job")
def get_job(job_id: str, request: Request, session: ReadSession,
            owner: CurrentOwner) -> Response:
    # the hot path: one query, and the body serialised once (no second validation pass)
    out = svc.get_job_out(session, owner, job_id, _base(request))
    return Response(out.model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a job",
             description="A queued job is cancelled at once; a running job gets "
             "`cancel_requested` and stops at its next checkpoint; a finished job -> 409.",
             responses={409: {"description": "The job already finished"}})
def cancel_job(job_id: str, request: Request, session: DbSession,
               owner: CurrentOwner) -> JobOut:
    return svc.to_out(svc.cancel_job(session, owner, job_id), _base(request))


@router.delete("/{job_id}", status_code=204, summary="Delete a job",
               description="A queued or running job is cancelled first (a running job's "
               "worker stops at its next checkpoint); then the job, its events, metrics, report "
               "and every stored artifact of it are deleted. Another owner's job -> 404.",
               responses={204: {"description": "Deleted"}, 404: {"description": "No such job"}})
def delete_job(job_id: str, session: DbSession, owner: CurrentOwner, store: Store) -> Response:
    deletion.delete_job(session, store, owner, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=EventPage, summary="A job's event log",
            description="Append-only; poll with `after` = the last id you saw.")
def job_events(job_id: str, session: ReadSession, owner: CurrentOwner,
               after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> EventPage:
    evs = svc.list_events(session, owner, job_id, after, limit)
    return EventPage(items=[EventOut.model_validate(e) for e in evs],
                     next_after=evs[-1].id if evs else after)


@router.get("/{job_id}/report", response_model=dict[str, Any], summary="A job's report",
            description="The report the pipeline wrote (the same as report.json in the "
            "artifact) plus `memory`: the peak memory estimated at submission beside the "
            "measured peak RSS. 404 until the job has one.")
def job_report(job_id: str, session: ReadSession, owner: CurrentOwner) -> dict[str, Any]:
    return reports.get_report(session, owner, job_id)


@router.api_route("/{job_id}/artifact", methods=["GET", "HEAD"],
                  summary="Download the compressed model",
                  description="A tar.gz of the Hugging Face directory. Local store: streamed, "
                  "with `Range` support (206), `If-Range` (an ETag that is not the artifact's "
                  "-> the whole file, 200), `HEAD` (the headers only), `ETag` (the SHA-256), "
                  "`X-Checksum-SHA256` and `Digest`. S3 store: a 307 redirect to a presigned "
                  "URL. 409 until the artifact is ready.",
                  response_class=StreamingResponse,
                  responses={200: {"content": {"application/gzip": {}}},
                             206: {"description": "Partial content (Range)"},
                             307: {"description": "Redirect to a presigned S3 URL"},
                             409: {"description": "Not ready"},
                             416: {"description": "Invalid range"}})
def download_artifact(job_id: str, request: Request, session: ReadSession,
                      owner: CurrentOwner, store: Store):
    art = artifacts.ready_artifact(session, owner, job_id)
    name = artifacts.filename(art)
    if store.kind == "s3":
        return RedirectResponse(store.presigned_url(art.store_key, name),  # type: ignore[attr-defined]
                                status_code=307)
    rng = request.headers.get("range")
    if not artifacts.if_range_matches(request.headers.get("if-range"), art.sha256):
        rng = None  # the client's copy is another version: send the whole file
    dl = artifacts.local_download(store, art, rng)
    headers = {
        "Content-Length": str(dl.end - dl.start + 1),
        "Content-Disposition": f'attachment; filename="{name}"',
        "Accept-Ranges": "bytes",
        "X-Checksum-SHA256": art.sha256,
        "Digest": artifacts.digest_header(art.sha256),
        "ETag": f'"{art.sha256}"',
    }
    if dl.partial:
        headers["Content-Range"] = f"bytes {dl.start}-{dl.end}/{dl.size}"
    status = 206 if dl.partial else 200
    if request.method == "HEAD":
        return Response(status_code=status, media_type="application/gzip", headers=headers)
    return StreamingResponse(artifacts.iter_file(dl.path, dl.start, dl.end), status_code=status,
                             media_type="application/gzip", headers=headers)
