"""Uploaded text datasets (calibration / evaluation): UTF-8 checked before anything is stored."""

from __future__ import annotations

import codecs

from sqlalchemy import select
from sqlalchemy.orm import Session

from modelpress.domain.models import Dataset, new_id
from modelpress.domain.store import CHUNK, ArtifactStore

from ..deps import on_rollback
from ..errors import NotFound, Unprocessable
from ..guards import clip, display_name
from ..uploads import UploadedFile


def get_dataset(session: Session, owner: str, dataset_id: str) -> Dataset:
    d = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner))
    if d is None:
        raise NotFound(f"dataset {clip(dataset_id)} not found")
    return d


def list_datasets(session: Session, owner: str) -> list[Dataset]:
    return list(session.scalars(select(Dataset).where(Dataset.owner == owner)
                                .order_by(Dataset.created_at.desc(), Dataset.id.desc())))


def check_utf8(upload: UploadedFile) -> None:
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(upload.path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise Unprocessable(f"the dataset is not UTF-8 text (invalid byte at offset "
                                    f"{offset + e.start})", code="invalid_dataset") from None
            if not chunk:
                return
            offset += len(chunk)


def register_dataset(session: Session, store: ArtifactStore, owner: str, upload: UploadedFile,
                     name: str | None) -> Dataset:
    if upload.bytes == 0:
        raise Unprocessable("the dataset is empty", code="invalid_dataset")
    check_utf8(upload)
    ds_id = new_id()
    key = f"datasets/{ds_id}/data.txt"
    store.put_file(key, upload.path)
    on_rollback(session, lambda: store.delete(key))
    row = Dataset(id=ds_id, owner=owner, name=display_name(name, upload.filename),
                  store_key=key,
                  bytes=upload.bytes, sha256=upload.sha256)
    session.add(row)
    session.flush()
    return row
