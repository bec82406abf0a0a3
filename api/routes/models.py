"""/v1/models: register (upload or hub id), list, read, and compare compression results."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from modelpress.domain.models import ModelSource

from ..deps import CurrentOwner, DbSession, ReadSession, Settings, Store, UnitOfWorkRoute, in_unit_of_work
from ..errors import UnsupportedMediaType
from ..schemas import Comparison, ModelFromHub, ModelList, ModelOut
from ..services import deletion, idempotency, reports
from ..services import models as svc
from ..uploads import UploadedFile, receive_file

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=UnitOfWorkRoute)

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object", "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary",
                             "description": "A .gguf file, or a tar (optionally gzipped) of a "
                             "Hugging Face model directory with config.json at its root or in "
                             "its single top folder."},
                    "name": {"type": "string", "description": "Display name."},
                },
            },
        },
        "application/json": {
            "schema": ModelFromHub.model_json_schema(),
            "example": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
        },
    },
}


@router.post("", status_code=201, response_model=ModelOut, summary="Register a model",
             description="Upload a GGUF file or a tar of a Hugging Face directory "
             "(multipart/form-data, field `file`), or name a hub model (JSON `{source, "
             "revision}`). The model's config is read and validated; a file that cannot be "
             "read as a model is refused with 422 and nothing is stored.",
             openapi_extra={"requestBody": _UPLOAD_BODY},
             responses={413: {"description": "Upload over the size limit"},
                        415: {"description": "Neither multipart nor JSON"},
                        422: {"description": "Not a readable model"}})
async def create_model(request: Request, session: DbSession, owner: CurrentOwner, store: Store,
                       settings: Settings) -> Response:
    key = idempotency.header_key(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = ModelFromHub.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None

        def hub() -> tuple[ModelSource, bool]:
            return idempotency.run_once(
                session, settings, owner, "models", key,
                idempotency.body_hash({"hub": body.model_dump(mode="json")}),
                lambda: svc.register_hub(session, owner, body.source, body.revision, body.name),
                lambda mid: svc.get_model(session, owner, mid))

        return _created(*await run_in_threadpool(in_unit_of_work(session, hub)))
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data (a file) or application/json "
                                   "(a hub id)")

    def upload(f: UploadedFile, name: str | None) -> tuple[ModelSource, bool]:
        return idempotency.run_once(
            session, settings, owner, "models", key,
            idempotency.body_hash({"sha256": f.sha256, "bytes": f.bytes, "name": name}),
            lambda: svc.register_upload(session, store, owner, f, name),
            lambda mid: svc.get_model(session, owner, mid))

    return _created(*await receive_file(request, settings.resolved_work_dir / "uploads",
                                        settings.upload_max_bytes,
                                        in_unit_of_work(session, upload)))


def _created(row: ModelSource, replayed: bool) -> Response:
    return Response(ModelOut.model_validate(row).model_dump_json(), media_type="application/json",
                    status_code=200 if replayed else 201,
                    headers={"Idempotent-Replayed": "true"} if replayed else None)


@router.get("", response_model=ModelList, summary="List your models")
def list_models(session: ReadSession, owner: CurrentOwner) -> ModelList:
    return ModelList(items=[ModelOut.model_validate(m) for m in svc.list_models(session, owner)])


@router.get("/{model_id}", response_model=ModelOut, summary="Get a model")
def get_model(model_id: str, session: ReadSession, owner: CurrentOwner) -> ModelOut:
    return ModelOut.model_validate(svc.get_model(session, owner, model_id))


@router.get("/{model_id}/comparison", response_model=Comparison,
            summary="Compare the finished jobs on a model",
            description="The technique table: for every finished job on this model its methods "
            "and settings with compression ratio, speed-up, accuracy loss (perplexity ratio - 1), "
            "params, bytes and perplexity, and which jobs are on the size/quality Pareto "
            "frontier. `format=png` or `svg` returns the scatter plot instead.",
            responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}})
def model_comparison(model_id: str, session: ReadSession, owner: CurrentOwner,
                     format: Literal["json", "png", "svg"] = Query(
                         "json", description="json (default), png or svg")):
    comp = reports.comparison(session, owner, model_id)
    if format == "json":
        return comp
    media = {"png": "image/png", "svg": "image/svg+xml"}[format]
    return Response(reports.plot(comp, format), media_type=media)


@router.delete("/{model_id}", status_code=204, summary="Delete a model",
               description="Deletes the model and its stored upload. While jobs use it -> 409 "
               "`model_in_use`, unless `cascade=true`: then those jobs are deleted too (queued "
               "or running ones are cancelled first) with their artifacts.",
               responses={204: {"description": "Deleted"}, 404: {"description": "No such model"},
                          409: {"description": "Jobs use it (and cascade is false)"}})
def delete_model(model_id: str, session: DbSession, owner: CurrentOwner, store: Store,
                 cascade: bool = Query(False, description="Also delete the jobs that use it."),
                 ) -> Response:
    deletion.delete_model(session, store, owner, model_id, cascade)
    return Response(status_code=204)
