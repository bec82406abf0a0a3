"""Artifact store: a local directory (embedded default) or any S3-compatible endpoint (boto3).

Keys are relative paths like ``jobs/<job_id>/model.tar.gz``. Writes go to a temporary name and
are renamed (local) or uploaded whole (S3), so a key either holds a complete object or nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .settings import Settings, get_settings

CHUNK = 1024 * 1024


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    bytes: int


class ArtifactStore(Protocol):
    kind: str

    def uri(self, key: str) -> str: ...
    def put_file(self, key: str, path: str | Path) -> ObjectInfo: ...
    def put_stream(self, key: str, stream: BinaryIO) -> ObjectInfo: ...
    def get_file(self, key: str, dest: str | Path) -> Path: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def sha256(self, key: str) -> str: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def keys(self, prefix: str) -> list[str]: ...
    def ping(self) -> None: ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in Path(key).parts:
        raise ValueError(f"invalid store key {key!r}")
    return key


class LocalStore:
    kind = "local"

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def put_stream(self, key: str, stream: BinaryIO) -> ObjectInfo:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(stream, f, CHUNK)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ObjectInfo(key, dest.stat().st_size)

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        with open(path, "rb") as f:
            return self.put_stream(key, f)

    def get_file(self, key: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path(key), dest)
        return dest

    def head(self, key: str) -> ObjectInfo | None:
        p = self.path(key)
        return ObjectInfo(key, p.stat().st_size) if p.is_file() else None

    def sha256(self, key: str) -> str:
        return sha256_file(self.path(key))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        """The keys of every object under the folder ``prefix`` (temporary uploads excluded)."""
        root = self.path(prefix.rstrip("/"))
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in root.rglob("*")
                      if p.is_file() and not p.name.startswith(".upload-"))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a folder: ends with '/'); returns how many."""
        root = self.path(prefix.rstrip("/"))
        if not root.is_dir():
            return 0
        n = sum(len(files) for _r, _d, files in os.walk(root))
        shutil.rmtree(root, ignore_errors=True)
        return n

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"artifact directory {self.root} is not writable")


class S3Store:
    kind = "s3"

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str = "us-east-1",
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 presign_expiry_s: int = 3600, create_bucket: bool = False,
                 public_endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.presign_expiry_s = presign_expiry_s

        def client(endpoint: str | None) -> Any:  # boto3 ships no types
            return boto3.client(
                "s3", endpoint_url=endpoint, region_name=region,
                aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                              retries={"max_attempts": 5, "mode": "standard"},
                              connect_timeout=5, read_timeout=60),
            )

        self.client = client(endpoint_url)
        # presigned URLs are signed for the host the client will use (SigV4 signs the host)
        self._presign_client = (client(public_endpoint_url)
                                if public_endpoint_url and public_endpoint_url != endpoint_url
                                else self.client)
        if create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{_check_key(key)}"

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        self.client.upload_file(str(path), self.bucket, _check_key(key))
        info = self.head(key)
        assert info is not None
        return info

    def put_stream(self, key: str, stream: BinaryIO) -> ObjectInfo:
        self.client.upload_fileobj(stream, self.bucket, _check_key(key))
        info = self.head(key)
        assert info is not None
        return info

    def get_file(self, key: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        self.client.download_file(self.bucket, _check_key(key), str(tmp))
        os.replace(tmp, dest)
        return dest

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=_check_key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        return ObjectInfo(key, int(r["ContentLength"]))

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=_check_key(key))["Body"]
        for chunk in iter(lambda: body.read(CHUNK), b""):
            h.update(chunk)
        return h.hexdigest()

    def presigned_url(self, key: str, filename: str | None = None) -> str:
        params = {"Bucket": self.bucket, "Key": _check_key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self._presign_client.generate_presigned_url("get_object", Params=params,
                                                               ExpiresIn=self.presign_expiry_s)
        return url

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=_check_key(key))

    def keys(self, prefix: str) -> list[str]:
        """The keys of every object under the folder ``prefix``."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=_check_key(prefix.rstrip("/")) + "/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a folder: ends with '/'); returns how many."""
        n = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=_check_key(prefix.rstrip("/")) + "/")
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
                n += len(keys)
        return n

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def make_store(settings: Settings | None = None) -> ArtifactStore:
    s = settings or get_settings()
    if s.store == "s3":
        return S3Store(
            bucket=s.s3_bucket, endpoint_url=s.s3_endpoint_url, region=s.s3_region,
            access_key_id=s.s3_access_key_id,
            secret_access_key=s.s3_secret_access_key.get_secret_value()
            if s.s3_secret_access_key else None,
            presign_expiry_s=s.s3_presign_expiry_s, create_bucket=s.s3_create_bucket,
            public_endpoint_url=s.s3_public_endpoint_url,
        )
    return LocalStore(s.resolved_store_dir)
