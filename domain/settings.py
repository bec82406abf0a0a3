"""All configuration, from environment variables prefixed ``MODELPRESS_`` (pydantic-settings).

With nothing set, modelpress runs embedded: SQLite, a SQLite-backed Celery transport and a local
artifact directory, all under ``MODELPRESS_HOME`` (default ``./var``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: 512-token windows of each text a job's perplexity reads: the default and the most a job may ask
EVAL_WINDOWS, MAX_EVAL_WINDOWS = 16, 256


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    home: Path = Field(Path("var"), description="Root for embedded-mode state.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db. "
        "Default: SQLite under home.")
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. redis://host:6379/0. Default: a SQLite-backed "
        "kombu transport under home.")
    store: Literal["local", "s3"] = Field("local", description="Artifact store kind.")
    store_dir: Path | None = Field(None, description="Local store root (default home/artifacts).")
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = Field(
        None, description="Endpoint clients use to download artifacts (presigned URLs), when it "
        "differs from the one the service uses, e.g. http://localhost:9000 vs http://minio:9000.")
    s3_bucket: str = "modelpress"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_presign_expiry_s: int = 3600
    s3_create_bucket: bool = Field(True, description="Create the bucket if it is missing.")

    api_key: SecretStr | None = Field(
        None, description="Bootstrap API key (owner 'admin'), stored hashed at start-up.")
    host: str = "127.0.0.1"
    port: int = 8000

    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    gpu_queue_enabled: bool = Field(
        False, description="GPU workers exist: jobs whose methods prefer a GPU go to the 'gpu' "
        "queue (otherwise every job goes to 'cpu').")
    work_dir: Path | None = Field(None, description="Worker scratch space (default home/work).")
    upload_max_bytes: int = 20 * 1024**3
    max_extracted_bytes: int = Field(
        64 * 1024**3, description="Most bytes an uploaded model tar may unpack to.")
    max_archive_members: int = Field(
        10_000, description="Most files and folders an uploaded model tar may hold.")
    max_archive_ratio: float = Field(
        20.0, description="Most unpacked bytes per archive byte (a decompression bomb's "
        "ratio is in the hundreds; model weights barely compress). Not applied below "
        "archive_ratio_floor_bytes.")
    archive_ratio_floor_bytes: int = Field(
        256 * 1024**2, description="An archive may always unpack to this many bytes.")
    model_cache_max_bytes: int = Field(
        40 * 1024**3, description="Cap on a worker's model cache (work_dir/cache/models); "
        "least recently used entries that no running job uses are evicted past it.")

    worker_memory_bytes: int | None = Field(
        None, gt=0, description="Memory of one worker (bytes): a job whose estimated peak "
        "memory is above it is refused at submission (422). Default: this machine's memory "
        "(set it where the API runs on a different machine than the workers).")

    eval_windows: int = Field(
        EVAL_WINDOWS, ge=1, le=MAX_EVAL_WINDOWS, description="512-token windows of the eval "
        "text and of the other domain's text that a job's perplexity reads (fewer: faster and "
        "noisier).")
    heartbeat_s: float = Field(10.0, description="How often a running job's worker heartbeats.")
    reaper_timeout_s: float = Field(120.0, description="No heartbeat for this long: worker dead.")
    max_attempts: int = Field(3, description="Attempts before a job whose worker died is failed.")
    sweep_interval_s: float = Field(15.0, description="Period of the re-dispatch/reaper sweep.")
    dispatch_grace_s: float = Field(30.0, description="A job still queued and never picked "
                                    "up after this long is re-published.")
    task_soft_time_limit_s: int = 6 * 3600
    task_time_limit_s: int = 6 * 3600 + 300
    progress_min_interval_s: float = Field(1.0, description="Progress write throttle.")

    # API limits (per API process; see README "Limits")
    max_json_body_bytes: int = Field(
        1024**2, description="Largest JSON request body; larger -> 413.")
    max_active_jobs_per_owner: int = Field(
        10_000, description="Queued + running jobs one owner may have; more -> 429. 0: no limit.")
    rate_limit_per_s: float = Field(
        2000.0, description="Requests per second per owner and API process (token bucket); "
        "over it -> 429 with Retry-After. 0: no limit.")
    rate_limit_burst: int = Field(4000, description="Token bucket size of the rate limit.")
    idempotency_ttl_s: float = Field(
        24 * 3600.0, description="How long an Idempotency-Key is remembered.")
    db_pool_timeout_s: float = Field(
        10.0, description="API: longest wait for a database connection before answering 503.")
    db_pool_size: int = Field(
        10, ge=1, le=200, description="API: pooled database connections per API process; as "
        "many again may open for bursts. Keep processes x 2 x this under the server's "
        "max_connections (PostgreSQL's default is 100).")

    # webhooks (see README "Webhooks")
    webhook_allow_private: bool = Field(
        False, description="Allow callback URLs that resolve to loopback, link-local or "
        "private addresses (refused by default).")
    webhook_max_attempts: int = Field(8, description="POSTs of one delivery before it fails.")
    webhook_backoff_s: float = Field(
        5.0, description="First retry delay of a delivery; doubles per attempt (cap 1 h).")
    webhook_timeout_s: float = Field(10.0, description="Timeout of one webhook POST.")
    webhook_dispatch_interval_s: float = Field(
        1.0, description="How often the API's dispatcher thread looks for due deliveries "
        "(0: not in the API; the worker's sweep still delivers).")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.home / 'modelpress.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqla+sqlite:///{(self.home / 'broker.db').resolve()}"

    @property
    def resolved_store_dir(self) -> Path:
        return (self.store_dir or self.home / "artifacts").resolve()

    @property
    def resolved_work_dir(self) -> Path:
        d = (self.work_dir or self.home / "work").resolve()
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def resolved_worker_memory_bytes(self) -> int:
        if self.worker_memory_bytes is not None:
            return self.worker_memory_bytes
        import psutil

        return int(psutil.virtual_memory().total)

    @property
    def embedded(self) -> bool:
        return self.database_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
