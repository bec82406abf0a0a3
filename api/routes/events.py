"""GET /v1/jobs/{id}/events/stream: a job's events as Server-Sent Events.

Each event-log row is sent as ``event: log`` with ``id:`` = its id (so ``Last-Event-ID``, or
``?after=``, resumes after it); a change of the job's state, progress or stage as
``event: progress`` (no id). The stream ends after the job's terminal state event; a comment
line every ``HEARTBEAT_S`` keeps proxies from closing an idle stream.

No database connection is held by the stream: every poll is one short read in the thread pool
with a session of its own, so a thousand open streams cost a thousand idle sockets, not the
pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from modelpress.domain.models import Job, JobEvent
from modelpress.domain.states import JobState

from ..deps import CurrentOwner
from ..errors import NotFound, Unprocessable
from ..guards import clip
from ..schemas import EventOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_S = 0.5
HEARTBEAT_S = 15.0
MAX_STREAM_S = 3600.0  # then the client reconnects with Last-Event-ID
BATCH = 500
TERMINAL = {s.value for s in JobState if s.terminal}


def _poll(factory: Callable[[], Session], owner: str, job_id: str,
          after: int) -> tuple[dict[str, Any], list[EventOut]] | None:
    with factory() as s:
        row = s.execute(select(Job.state, Job.progress, Job.stage).where(
            Job.id == job_id, Job.owner == owner)).one_or_none()
        if row is None:
            return None
        evs = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                        .order_by(JobEvent.id).limit(BATCH)).all()
        return ({"state": row.state, "progress": row.progress, "stage": row.stage},
                [EventOut.model_validate(e) for e in evs])


def _sse(event: str, data: str, id_: int | None = None) -> str:
    head = f"id: {id_}\n" if id_ is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


def _start_after(last_event_id: str | None, after: int | None) -> int:
    if last_event_id is None:
        return after or 0
    try:
        v = int(last_event_id)
    except ValueError:
        raise Unprocessable("Last-Event-ID must be an event id (an integer)",
                            code="invalid_last_event_id") from None
    if not 0 <= v < 2**63:
        raise Unprocessable("Last-Event-ID out of range", code="invalid_last_event_id")
    return v


async def _stream(request: Request, factory: Callable[[], Session], owner: str, job_id: str,
                  after: int, first: tuple[dict[str, Any], list[EventOut]]
                  ) -> AsyncIterator[str]:
    snap, evs = first
    last_snap: dict[str, Any] | None = None
    started = beat = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        ended = False
        for e in evs:
            after = e.id
            yield _sse("log", e.model_dump_json(), e.id)
            if e.kind == "state" and (e.data or {}).get("to") in TERMINAL:
                ended = True
        if snap != last_snap:
            last_snap = snap
            yield _sse("progress", json.dumps(snap))
        if ended or (snap["state"] in TERMINAL and len(evs) < BATCH):
            return
        now = time.monotonic()
        if now - started > MAX_STREAM_S or await request.is_disconnected():
            return
        if now - beat >= HEARTBEAT_S:
            beat = now
            yield ": keep-alive\n\n"
        if len(evs) < BATCH:
            await asyncio.sleep(POLL_S)
        polled = await run_in_threadpool(_poll, factory, owner, job_id, after)
        if polled is None:  # deleted meanwhile
            return
        snap, evs = polled


@router.get("/{job_id}/events/stream", summary="Follow a job's events (Server-Sent Events)",
            description="`text/event-stream`: `event: log` per event-log row (`id:` = the "
            "event id; reconnect with `Last-Event-ID` or `?after=` to resume), `event: "
            "progress` when the state, progress or stage changes. Ends after the terminal state.",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}},
                       404: {"description": "No such job"}})
async def stream_events(job_id: str, request: Request, owner: CurrentOwner,
                        after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
                        last_event_id: Annotated[str | None, Header()] = None,
                        ) -> StreamingResponse:
    start = _start_after(last_event_id, after)
    factory = request.app.state.read_session_factory
    first = await run_in_threadpool(_poll, factory, owner, job_id, start)
    if first is None:
        raise NotFound(f"job {clip(job_id)} not found")
    return StreamingResponse(_stream(request, factory, owner, job_id, start, first),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
