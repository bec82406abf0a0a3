"""/v1/datasets: upload UTF-8 text for calibration or evaluation."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from modelpress.domain.models import Dataset

from ..deps import CurrentOwner, DbSession, ReadSession, Settings, Store, UnitOfWorkRoute, in_unit_of_work
from ..schemas import DatasetList, DatasetOut
from ..services import datasets as svc
from ..services import deletion, idempotency
from ..uploads import UploadedFile, receive_file

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=UnitOfWorkRoute)

_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "UTF-8 text."},
                   "name": {"type": "string", "description": "Display name."}}}}}}


@router.post("", status_code=201, response_model=DatasetOut, summary="Upload a text dataset",
             openapi_extra={"requestBody": _UPLOAD_BODY},
             responses={413: {"description": "Upload over the size limit"},
                        422: {"description": "Not UTF-8 text, or empty"}})
async def create_dataset(request: Request, session: DbSession, owner: CurrentOwner,
                         store: Store, settings: Settings) -> Response:
    key = idempotency.header_key(request)

    def register(f: UploadedFile, name: str | None) -> tuple[Dataset, bool]:
        return idempotency.run_once(
            session, settings, owner, "datasets", key,
            idempotency.body_hash({"sha256": f.sha256, "bytes": f.bytes, "name": name}),
            lambda: svc.register_dataset(session, store, owner, f, name),
            lambda did: svc.get_dataset(session, owner, did))

    row, replayed = await receive_file(request, settings.resolved_work_dir / "uploads",
                                       settings.upload_max_bytes,
                                       in_unit_of_work(session, register))
    return Response(DatasetOut.model_validate(row).model_dump_json(),
                    media_type="application/json", status_code=200 if replayed else 201,
                    headers={"Idempotent-Replayed": "true"} if replayed else None)


@router.get("", response_model=DatasetList, summary="List your datasets")
def list_datasets(session: ReadSession, owner: CurrentOwner) -> DatasetList:
    return DatasetList(items=[DatasetOut.model_validate(d)
                              for d in svc.list_datasets(session, owner)])


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Get a dataset")
def get_dataset(dataset_id: str, session: ReadSession, owner: CurrentOwner) -> DatasetOut:
    return DatasetOut.model_validate(svc.get_dataset(session, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset",
               description="Deletes the dataset and its stored upload. While jobs use it -> 409 "
               "`dataset_in_use`, unless `cascade=true`: then those jobs are deleted too (queued "
               "or running ones are cancelled first) with their artifacts.",
               responses={204: {"description": "Deleted"}, 404: {"description": "No such dataset"},
                          409: {"description": "Jobs use it (and cascade is false)"}})
def delete_dataset(dataset_id: str, session: DbSession, owner: CurrentOwner, store: Store,
                 cascade: bool = Query(False, description="Also delete the jobs that use it."),
                 ) -> Response:
    deletion.delete_dataset(session, store, owner, dataset_id, cascade)
    return Response(status_code=204)
