"""Registering models: an uploaded GGUF file, an uploaded tar of a Hugging Face directory, or a
hub id. Whatever is stored has had its config read successfully; a bad upload stores nothing."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from modelpress.domain.archives import ArchiveLimitError, ArchiveLimits, check_headers, weights_problem
from modelpress.domain.models import ModelSource, new_id
from modelpress.domain.store import ArtifactStore

from ..deps import on_rollback
from ..errors import NotFound, PayloadTooLarge, Unprocessable
from ..guards import clip, display_name
from ..uploads import UploadedFile

GGUF_MAGIC = b"GGUF"
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def get_model(session: Session, owner: str, model_id: str) -> ModelSource:
    m = session.scalar(select(ModelSource).where(ModelSource.id == model_id,
                                                 ModelSource.owner == owner))
    if m is None:
        raise NotFound(f"model {clip(model_id)} not found")
    return m


def list_models(session: Session, owner: str) -> list[ModelSource]:
    return list(session.scalars(select(ModelSource).where(ModelSource.owner == owner)
                                .order_by(ModelSource.created_at.desc(), ModelSource.id.desc())))


def _config_facts(config: Any) -> tuple[str | None, str | None, dict[str, Any]]:
    # to_json_string turns dtypes and other non-JSON values into JSON-safe ones
    cfg = json.loads(config.to_json_string(use_diff=False))
    archs = getattr(config, "architectures", None) or []
    return getattr(config, "model_type", None), (archs[0] if archs else None), cfg


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:500]


def read_gguf_config(path: Path) -> Any:
    from modelpress.compression.models import read_config

    try:
        return read_config(path)
    except Exception as e:  # noqa: BLE001 - any failure to read it is a bad upload
        msg = _short(e).replace(str(path), "the upload").replace(str(path.parent), "<tmp>")
        raise Unprocessable(f"not a readable GGUF model: {msg}", code="invalid_model") from e


def _tar_config_member(tf: tarfile.TarFile) -> tarfile.TarInfo:
    """Check every member is safe; return the config.json at the root or in the single top
    folder."""
    names: dict[str, tarfile.TarInfo] = {}
    tops: set[str] = set()
    for m in tf:
        p = PurePosixPath(m.name)
        parts = [q for q in p.parts if q not in ("", ".")]
        if m.name.startswith("/") or p.is_absolute() or ".." in parts:
            raise Unprocessable(f"unsafe path in tar: {m.name!r}", code="invalid_model")
        if not (m.isfile() or m.isdir()):
            raise Unprocessable(f"tar member {m.name!r} is not a regular file or directory "
                                "(links and devices are refused)", code="invalid_model")
        if not parts:
            continue
        tops.add(parts[0] if (m.isdir() or len(parts) > 1) else "")
        if m.isfile():
            names["/".join(parts)] = m
    if not names:
        raise Unprocessable("the tar holds no files", code="invalid_model")
    if "config.json" in names:
        return names["config.json"]
    if len(tops) == 1 and "" not in tops:
        top = next(iter(tops))
        if f"{top}/config.json" in names:
            return names[f"{top}/config.json"]
    raise Unprocessable("the tar has no config.json at its root or in its single top folder",
                        code="invalid_model")


def read_tar_config(path: Path) -> Any:
    from modelpress.compression.models import read_config

    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise Unprocessable(f"not a readable tar: {_short(e)}", code="invalid_model") from e
    with tf:
        try:
            check_headers(tf, ArchiveLimits.for_archive(path.stat().st_size))
            member = _tar_config_member(tf)
        except ArchiveLimitError as e:
            raise PayloadTooLarge(f"the tar is refused: {e}", code="archive_too_large") from e
        except tarfile.TarError as e:
            raise Unprocessable(f"corrupt tar: {_short(e)}", code="invalid_model") from e
        problem = weights_problem(tf.getnames())
        if problem:
            raise Unprocessable(problem, code="unsafe_weights")
        if member.size > MAX_CONFIG_BYTES:
            raise Unprocessable("config.json is implausibly large", code="invalid_model")
        f = tf.extractfile(member)
        raw = f.read() if f is not None else b""
    try:
        cfg = json.loads(raw)
    except RecursionError:
        raise Unprocessable("config.json is nested too deeply", code="invalid_model") from None
    except ValueError as e:
        raise Unprocessable(f"config.json is not valid JSON: {_short(e)}",
                            code="invalid_model") from e
    if not isinstance(cfg, dict):
        raise Unprocessable("config.json is not a JSON object", code="invalid_model")
    tmp = Path(tempfile.mkdtemp(prefix="mp-cfg-"))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg))
        try:
            return read_config(tmp)
        except Exception as e:  # noqa: BLE001
            raise Unprocessable(f"unsupported model config: {_short(e)}",
                                code="invalid_model") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sniff_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return "gguf"
    try:
        if tarfile.is_tarfile(path):
            return "hf-dir"
    except OSError:
        pass
    raise Unprocessable("the upload is neither a GGUF file nor a tar of a Hugging Face model "
                        "directory", code="invalid_model")


def register_upload(session: Session, store: ArtifactStore, owner: str, upload: UploadedFile,
                    name: str | None) -> ModelSource:
    if upload.bytes == 0:
        raise Unprocessable("the uploaded file is empty", code="invalid_model")
    kind = sniff_kind(upload.path)
    if kind == "gguf":
        # transformers picks the GGUF reader by file name
        gguf_path = upload.path.with_name(upload.path.name + ".gguf")
        upload.path.rename(gguf_path)
        upload.path = gguf_path
        config = read_gguf_config(gguf_path)
        key_name = "model.gguf"
    else:
        config = read_tar_config(upload.path)
        key_name = "model.tar"
    model_type, arch, cfg = _config_facts(config)
    model_id = new_id()
    key = f"models/{model_id}/{key_name}"
    store.put_file(key, upload.path)
    on_rollback(session, lambda: store.delete(key))
    row = ModelSource(id=model_id, owner=owner, name=display_name(name, upload.filename),
                      kind=kind,
                      store_key=key, bytes=upload.bytes, sha256=upload.sha256,
                      model_type=model_type, architecture=arch, config=cfg)
    session.add(row)
    session.flush()
    return row


def _is_path(source: str) -> bool:
    try:
        return Path(source).exists()
    except OSError:  # e.g. ENAMETOOLONG: not a path the server has
        return False


def register_hub(session: Session, owner: str, source: str, revision: str | None,
                 name: str | None) -> ModelSource:
    from modelpress.compression.models import read_config

    # only hub ids: never let a caller make the server read its own file system
    if not _HUB_ID.match(source) or ".." in source or len(source) > 200 or _is_path(source):
        raise Unprocessable(f"{source!r} is not a hub model id ('org/name')", code="invalid_model")
    try:
        config = read_config(source, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise Unprocessable(f"cannot fetch the config of {source!r}: {_short(e)}",
                            code="invalid_model") from e
    model_type, arch, cfg = _config_facts(config)
    row = ModelSource(owner=owner, name=display_name(name, source), kind="hub", source=source,
                      revision=revision, model_type=model_type, architecture=arch, config=cfg)
    session.add(row)
    session.flush()
    return row
