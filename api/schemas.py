"""Request and response bodies of HTTP API v1 (pydantic). Requests forbid unknown fields."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelpress.domain.settings import EVAL_WINDOWS, MAX_EVAL_WINDOWS

from .guards import scrub_paths


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --------------------------------------------------------------------------------- models
class ModelFromHub(Strict):
    source: str = Field(..., min_length=1, max_length=500,
                        description="A Hugging Face hub model id, e.g. 'HuggingFaceTB/SmolLM2-135M'.")
    revision: str | None = Field(None, max_length=200, description="Branch, tag or commit.")
    name: str | None = Field(None, max_length=500, description="Display name (default: source).")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"source": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}]})


class ModelOut(Out):
    id: str
    name: str
    kind: Literal["hub", "gguf", "hf-dir"]
    source: str | None = None
    revision: str | None = None
    bytes: int | None = Field(None, description="Size of the uploaded file.")
    sha256: str | None = None
    model_type: str | None = None
    architecture: str | None = None
    config: dict[str, Any] | None = Field(None, description="The model's Hugging Face config.")
    created_at: datetime

    _no_paths = field_validator("config")(lambda v: scrub_paths(v))


class ModelList(BaseModel):
    items: list[ModelOut]


# ------------------------------------------------------------------------------- datasets
class DatasetOut(Out):
    id: str
    name: str
    bytes: int
    sha256: str
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetOut]


# ----------------------------------------------------------------------------------- jobs
class StageIn(Strict):
    method: str = Field(..., description="A registered method name (GET /v1/methods).")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's params.")


#: the JobCreate fields kept in the job row's ``measure_options`` (besides ``measure``)
MEASURE_OPTIONS = ("eval_windows", "tasks_dataset_id", "prompts_dataset_id", "max_accuracy_drop",
                   "max_mean_kl")


class JobCreate(Strict):
    model_id: str = Field(..., description="A model registered with POST /v1/models.")
    method: str | None = Field(None, description="One method (or give `recipe`).")
    params: dict[str, Any] | None = Field(None, description="Params of `method`.")
    recipe: list[StageIn] | None = Field(
        None, min_length=1, description="Several stages run in order (or give `method`).")
    calibration_dataset_id: str | None = Field(None, description="Uploaded calibration text.")
    eval_dataset_id: str | None = Field(None, description="Uploaded held-out evaluation text.")
    max_ppl_increase: float | None = Field(
        None, gt=1.0, allow_inf_nan=False,
        description="Quality gate: fail the job if perplexity after / before exceeds this ratio (e.g. 1.2).")
    keep_intermediate: bool = Field(
        False, description="Keep each stage's intermediate model (and its metrics) in the "
        "downloadable archive, under stages/<i>-<method>/.")
    measure: Literal["full", "quality", "none"] = Field(
        "full", description="What to measure: quality and speed (`full`), quality only "
        "(`quality`), or sizes and counts only (`none`). The source model's numbers are "
        "measured once per model, data, device and settings and reused.")
    eval_windows: int | None = Field(
        None, ge=1, le=MAX_EVAL_WINDOWS, description="512-token windows of the eval text and of "
        "the other domain's text that perplexity reads (fewer: faster and noisier); default: "
        f"the workers' MODELPRESS_EVAL_WINDOWS ({EVAL_WINDOWS}).")
    tasks_dataset_id: str | None = Field(
        None, description="Uploaded task set (JSONL: {question, choices, gold} or {prompt, "
        "expected}) scored before and after by log-likelihood.")
    prompts_dataset_id: str | None = Field(
        None, description="Uploaded prompt set (JSONL: {prompt}): per-prompt KL, top-1 "
        "agreement and greedy continuations before and after.")
    max_accuracy_drop: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="Gate: fail the job if task "
        "accuracy falls by more than this (0.02 = 2 points). Needs tasks_dataset_id.")
    max_mean_kl: float | None = Field(
        None, ge=0.0, allow_inf_nan=False, description="Gate: fail the job if the mean KL "
        "(nats) on the prompt set exceeds this. Needs prompts_dataset_id.")
    callback_url: str | None = Field(
        None, max_length=2000, description="POST every state change of the job here, signed "
        "(`Modelpress-Signature`); default: your `PUT /v1/webhooks/default` URL, if any.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "method": "magnitude",
         "params": {"sparsity": 0.5}},
        {"model_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
         "recipe": [{"method": "magnitude", "params": {"sparsity": 0.3}},
                    {"method": "rtn", "params": {"bits": 8}}],
         "max_ppl_increase": 1.5},
    ]})

    @model_validator(mode="after")
    def _one_of(self) -> JobCreate:
        if (self.method is None) == (self.recipe is None):
            raise ValueError("give exactly one of `method` (with optional `params`) or `recipe`")
        if self.recipe is not None and self.params is not None:
            raise ValueError("`params` goes with `method`; with `recipe` give each stage's params")
        if self.max_accuracy_drop is not None and self.tasks_dataset_id is None:
            raise ValueError("`max_accuracy_drop` needs `tasks_dataset_id`")
        if self.max_mean_kl is not None and self.prompts_dataset_id is None:
            raise ValueError("`max_mean_kl` needs `prompts_dataset_id`")
        if self.measure == "none" and any(v is not None for v in (
                self.max_ppl_increase, self.max_accuracy_drop, self.max_mean_kl)):
            raise ValueError("`measure: none` measures no quality, so no quality gate applies")
        return self

    def measure_options(self) -> dict[str, Any] | None:
        """What the job row keeps in ``measure_options`` (None: all defaults)."""
        opts = {k: getattr(self, k) for k in MEASURE_OPTIONS if getattr(self, k) is not None}
        if self.measure != "full":
            opts["measure"] = self.measure
        return opts or None

    def stages(self) -> list[dict[str, Any]]:
        if self.recipe is not None:
            return [{"method": s.method, "params": dict(s.params)} for s in self.recipe]
        return [{"method": self.method, "params": dict(self.params or {})}]


class JobError(BaseModel):
    code: str
    message: str

    _no_paths = field_validator("message")(lambda v: scrub_paths(v))


class MetricOut(Out):
    stage: str
    name: str
    value: float
    unit: str | None = None


class ArtifactOut(BaseModel):
    bytes: int = Field(..., description="Size of the archive (tar.gz).")
    sha256: str = Field(..., description="SHA-256 of the archive.")
    format: str
    unpacked_bytes: int | None = None
    ready: bool
    download_url: str | None = Field(None, description="GET this URL (with your key) once ready.")


class JobOut(BaseModel):
    id: str
    model_id: str
    method: str | None
    params: dict[str, Any] | None
    recipe: list[dict[str, Any]]
    calibration_dataset_id: str | None = None
    eval_dataset_id: str | None = None
    max_ppl_increase: float | None = None
    keep_intermediate: bool = False
    measure: str = "full"
    eval_windows: int | None = None
    tasks_dataset_id: str | None = None
    prompts_dataset_id: str | None = None
    max_accuracy_drop: float | None = None
    max_mean_kl: float | None = None
    estimated_peak_bytes: int | None = Field(
        None, description="Peak memory estimated at submission from the model's config.")
    queue: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: int
    stage: str | None
    attempt: int
    cancel_requested: bool
    error: JobError | None
    metrics: list[MetricOut]
    artifact: ArtifactOut | None
    has_report: bool
    created_at: datetime
    updated_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class EventOut(Out):
    id: int
    ts: datetime
    kind: str
    message: str
    data: dict[str, Any] | None = None

    _no_paths = field_validator("message", "data")(lambda v: scrub_paths(v))


class EventPage(BaseModel):
    items: list[EventOut]
    next_after: int | None = Field(None, description="Pass as `after` to poll for newer events.")


# -------------------------------------------------------------------------------- methods
class MethodOut(BaseModel):
    name: str
    family: str
    description: str
    needs_calibration: bool
    prefers_gpu: bool
    architectures: list[str] | None = Field(None, description="Supported model_type values; null: any.")
    terminal: bool = Field(..., description="Packs weights: must be the last stage of a recipe.")
    params_schema: dict[str, Any] = Field(..., description="JSON Schema of the method's params.")


class MethodList(BaseModel):
    items: list[MethodOut]


# ----------------------------------------------------------------------------- comparison
class ComparisonRow(BaseModel):
    job_id: str | None = Field(None, description="null for the uncompressed baseline row.")
    label: str
    methods: list[str]
    settings: list[dict[str, Any]]
    state: str
    gate_passed: bool
    compression_ratio: float | None = None
    speedup: float | None = None
    accuracy_loss: float | None = Field(None, description="Perplexity ratio - 1 (0 = no loss).")
    params: float | None = None
    nonzero_params: float | None = None
    bytes: float | None = Field(None, description="Weights on disk after compression.")
    artifact_bytes: int | None = None
    perplexity: float | None = None
    embedding_fidelity: float | None = None
    tokens_per_s: float | None = None
    perplexity_other: float | None = Field(
        None, description="Perplexity on the shipped text of another domain (KJV Genesis).")
    task_accuracy: float | None = Field(None, description="Accuracy on the job's task set.")
    prompt_mean_kl: float | None = Field(
        None, description="Mean KL(dense || compressed) on the job's prompt set, in nats.")
    pareto: bool = Field(False, description="On the size/quality Pareto frontier.")


class Comparison(BaseModel):
    model_id: str
    quality_metric: Literal["perplexity", "embedding_fidelity"] | None
    baseline: ComparisonRow | None
    rows: list[ComparisonRow]


# --------------------------------------------------------------------------------- health
class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


# ------------------------------------------------------------------------------- webhooks
class WebhookDefaultIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(..., max_length=2000,
                            description="Callback URL of jobs submitted without one; null: none.")


class WebhookSettingsOut(BaseModel):
    default_url: str | None
    secret: str = Field(..., description="Signs every delivery: `Modelpress-Signature: "
                        "t=<unix s>,v1=<hex HMAC-SHA256(secret, t + '.' + body)>`.")


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    event: str
    payload: dict
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class JobWebhooksOut(BaseModel):
    url: str | None = Field(..., description="The job's callback URL (null: none).")
    deliveries: list[DeliveryOut]
