"""Issue 5: a job's stored report, and the technique comparison of every finished job on a model
(table + a size-vs-quality scatter with the Pareto frontier)."""

from __future__ import annotations

import io
from typing import Any, Literal

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, selectinload

from modelpress.domain.models import Job
from modelpress.domain.states import JobState

from ..errors import NotFound
from ..guards import scrub_paths
from ..schemas import Comparison, ComparisonRow
from .jobs import get_job
from .models import get_model


def get_report(session: Session, owner: str, job_id: str) -> dict[str, Any]:
    """The pipeline's report with ``memory``: the peak estimated at submission beside the
    measured one."""
    job = get_job(session, owner, job_id, children=False)
    if job.report is None:
        raise NotFound(f"job {job_id} has no report yet (state: {job.state})", code="no_report")
    report = scrub_paths(job.report)  # no server paths (the model's source, scratch folders)
    return {**report, "memory": memory_section(job.estimated_peak_bytes, report)}


def memory_section(estimated: int | None, report: dict[str, Any]) -> dict[str, Any]:
    raw = report.get("summary")
    summary: dict[str, Any] = raw if isinstance(raw, dict) else {}
    measured = summary.get("peak_rss_bytes")
    ratio = measured / estimated if measured is not None and estimated else None
    return {"estimated_peak_bytes": estimated, "measured_peak_rss_bytes": measured,
            "measured_over_estimated": ratio}


def _metrics(job: Job, stage: str) -> dict[str, float]:
    return {m.name: m.value for m in job.metrics if m.stage == stage}


def _label(methods: list[str], settings: list[dict[str, Any]]) -> str:
    parts = []
    for m, p in zip(methods, settings):
        short = ",".join(f"{k}={v}" for k, v in sorted(p.items()))
        parts.append(f"{m}({short})" if short else m)
    return " + ".join(parts)


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point beats on both size and loss (both minimised)."""
    front = set()
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.add(i)
    return front


def comparison(session: Session, owner: str, model_id: str) -> Comparison:
    get_model(session, owner, model_id)
    jobs = list(session.scalars(
        select(Job).where(Job.owner == owner, Job.model_id == model_id, or_(
            Job.state == JobState.succeeded.value,
            and_(Job.state == JobState.failed.value, Job.error_code == "quality_gate")))
        .options(selectinload(Job.metrics), selectinload(Job.artifact))
        .order_by(Job.created_at, Job.id)))
    rows: list[ComparisonRow] = []
    baseline: ComparisonRow | None = None
    for job in jobs:
        after = _metrics(job, "after")
        if not after:
            continue
        methods = [s["method"] for s in job.recipe]
        settings = [dict(s.get("params") or {}) for s in job.recipe]
        ppl_ratio = after.get("ppl_ratio")
        rows.append(ComparisonRow(
            job_id=job.id, label=_label(methods, settings), methods=methods, settings=settings,
            state=job.state, gate_passed=job.state == JobState.succeeded.value,
            compression_ratio=after.get("compression_ratio"), speedup=after.get("speedup"),
            accuracy_loss=None if ppl_ratio is None else ppl_ratio - 1.0,
            params=after.get("params"), nonzero_params=after.get("nonzero_params"),
            bytes=after.get("bytes"),
            artifact_bytes=job.artifact.bytes if job.artifact is not None else None,
            perplexity=after.get("perplexity"),
            embedding_fidelity=after.get("embedding_fidelity"),
            tokens_per_s=after.get("tokens_per_s"), perplexity_other=after.get("perplexity_other"),
            task_accuracy=after.get("task_accuracy"), prompt_mean_kl=after.get("prompt_mean_kl")))
        before = _metrics(job, "before")
        if baseline is None and before:
            baseline = ComparisonRow(
                job_id=None, label="original", methods=[], settings=[], state="baseline",
                gate_passed=True, compression_ratio=1.0, speedup=1.0,
                accuracy_loss=0.0 if "perplexity" in before else None,
                params=before.get("params"), nonzero_params=before.get("nonzero_params"),
                bytes=before.get("bytes"), perplexity=before.get("perplexity"),
                embedding_fidelity=before.get("embedding_fidelity"),
                tokens_per_s=before.get("tokens_per_s"),
                perplexity_other=before.get("perplexity_other"))
    quality: Literal["perplexity", "embedding_fidelity"] | None = None
    if any(r.perplexity is not None for r in rows):
        quality = "perplexity"
    elif any(r.embedding_fidelity is not None for r in rows):
        quality = "embedding_fidelity"
    all_rows = ([baseline] if baseline else []) + rows
    scored = [(i, _xy(r, quality)) for i, r in enumerate(all_rows)]
    pts = [(i, p) for i, p in scored if p is not None]
    for k in pareto_front([p for _, p in pts]):
        all_rows[pts[k][0]].pareto = True
    return Comparison(model_id=model_id, quality_metric=quality, baseline=baseline, rows=rows)


def _size(r: ComparisonRow) -> float | None:
    return r.bytes if r.bytes is not None else r.artifact_bytes


def _xy(r: ComparisonRow, quality: str | None) -> tuple[float, float] | None:
    """(size, loss) with both to be minimised."""
    size = _size(r)
    if size is None or quality is None:
        return None
    if quality == "perplexity":
        return None if r.perplexity is None else (size, r.perplexity)
    return None if r.embedding_fidelity is None else (size, 1.0 - r.embedding_fidelity)


def plot(comp: Comparison, fmt: str) -> bytes:
    """Scatter of weight size vs quality, the Pareto frontier as a step line, points labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    quality = comp.quality_metric
    ylabel = {"perplexity": "perplexity (held-out, lower is better)",
              "embedding_fidelity": "1 - embedding fidelity (lower is better)"}.get(
        quality or "", "quality")
    rows = ([comp.baseline] if comp.baseline else []) + comp.rows
    scored = [(r, _xy(r, quality)) for r in rows]
    pts = [(r, p) for r, p in scored if p is not None]
    if not pts:
        ax.text(0.5, 0.5, "no finished jobs with size and quality metrics yet",
                ha="center", va="center", transform=ax.transAxes)
    for r, (x, y) in pts:
        colour = "black" if r.job_id is None else ("tab:green" if r.pareto else "tab:blue")
        marker = "*" if r.job_id is None else ("o" if r.gate_passed else "x")
        ax.scatter([x / 1e6], [y], c=colour, marker=marker, s=80 if r.job_id is None else 40,
                   zorder=3)
        ax.annotate(r.label if len(r.label) <= 48 else r.label[:45] + "...", (x / 1e6, y),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    front = sorted(p for r, p in pts if r.pareto)
    if len(front) > 1:
        ax.step([x / 1e6 for x, _ in front], [y for _, y in front], where="post",
                color="tab:green", linestyle="--", label="Pareto frontier", zorder=2)
        ax.legend(loc="best")
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"model {comp.model_id}: size vs quality")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()
