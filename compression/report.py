"""A job's ``report.json``: the ratios derived from what was measured before and after, the
quality gates, and the report itself (the run, the recipe, how it was measured, the machine)."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import evaluation as E
from .measure import job as MJ
from .recipe import Stage

#: The quality gate a job may ask for: ``max_ppl_increase`` is a ratio bound on
#: ``perplexity_after / perplexity_before`` (1.10 = at most +10%) on the held-out eval text.
#: A miss does not raise: the outcome has ``gate_passed=False`` and ``report["gate"]`` says why.
QUALITY_GATE = {
    "param": "max_ppl_increase",
    "metric": "ppl_ratio",
    "definition": "perplexity(after) / perplexity(before) on the held-out eval text",
    "passes_when": "ppl_ratio <= max_ppl_increase",
    "applies_to": "causal-lm",
}

REPORT_VERSION = 1
REPORT_FILE = "report.json"
CAUSAL_KIND = "causal-lm"  # models.CAUSAL, without importing transformers at module load
Metrics = list[tuple[str, str, float, str | None]]  # (stage label, name, value, unit)


@dataclass
class Run:
    """What one way of running a job (in memory, streamed) hands to the report."""

    before: dict[str, float]
    after: dict[str, float]
    kind: str
    model_type: str | None
    stage_reports: list[dict[str, Any]]
    fmt: str
    after_measured_on: str
    notes: dict[str, Any]


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("modelpress", "torch", "transformers", "compressed-tensors", "safetensors", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(dev), "cpu_threads": torch.get_num_threads(),
                            "platform": platform.platform()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def jsonable(x: Any) -> Any:
    """A JSON-safe copy: non-finite floats become None, tuples lists, paths and unknown objects
    strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return jsonable(x.item())
    return str(x)


_SUMMARY_KEYS = ("compression_ratio", "speedup", "speedup_gpu", "ppl_ratio", "ppl_ratio_other",
                 "accuracy_loss", "wall_time_s", "peak_rss_bytes", "peak_gpu_bytes")


def derive(run: Run, plan: MJ.MeasurePlan, peak: E.PeakMemory, gpu: torch.device | None,
            wall: float, metrics: Metrics) -> None:
    """The ratios of ``after`` to ``before`` (compression, speed-up, perplexity), the job's wall
    time and peak memory, set on ``run.after`` (the dense speed moves to ``run.before``)."""
    before, after = run.before, run.after
    after["compression_ratio"] = before["bytes"] / after["bytes"] if after["bytes"] else float("nan")
    for sfx in ("", "_gpu"):  # interleaved rounds: the dense numbers are from the same rounds
        if f"dense_tokens_per_s{sfx}" in after:
            before[f"tokens_per_s{sfx}"] = after.pop(f"dense_tokens_per_s{sfx}")
            metrics.append(("before", f"tokens_per_s{sfx}", before[f"tokens_per_s{sfx}"],
                            "tokens/s"))
            v = plan.details.get(f"speed{sfx}", {})
            if v.get("measurable"):
                after[f"speedup{sfx}"] = v["speedup"]
        elif f"tokens_per_s{sfx}" in after and before.get(f"tokens_per_s{sfx}"):
            after[f"speedup{sfx}"] = after[f"tokens_per_s{sfx}"] / before[f"tokens_per_s{sfx}"]
    if "perplexity" in after and "perplexity" in before:
        after["ppl_ratio"] = after["perplexity"] / before["perplexity"]
        after["accuracy_loss"] = after["ppl_ratio"] - 1.0
    if "perplexity_other" in after and "perplexity_other" in before:
        after["ppl_ratio_other"] = after["perplexity_other"] / before["perplexity_other"]
    elif "embedding_fidelity" in after:
        after["accuracy_loss"] = 1.0 - after["embedding_fidelity"]
    after["wall_time_s"] = wall
    after["peak_rss_bytes"] = float(peak.peak_rss_bytes)
    if peak.peak_gpu_bytes is not None and gpu is not None:
        after["peak_gpu_bytes"] = float(peak.peak_gpu_bytes)


def build_report(run: Run, *, source: str | Path, revision: str | None, parsed: list[Stage],
            gate: dict[str, Any] | None, custom_eval: bool, custom_calibration: bool,
            plan: MJ.MeasurePlan, dev: torch.device, started_at: str,
            timings: dict[str, float]) -> dict[str, Any]:
    after = run.after
    report = {
        "report_version": REPORT_VERSION,
        "source": str(source),
        "revision": revision,
        "model_type": run.model_type,
        "model_kind": run.kind,
        "recipe": [st.model_dump(mode="json") for st in parsed],
        "stages": run.stage_reports,
        "before": run.before,
        "after": {k: v for k, v in after.items() if k not in _SUMMARY_KEYS or k in run.before},
        "summary": {k: after[k] for k in _SUMMARY_KEYS if k in after},
        "format": run.fmt,
        "gate": gate,
        "evaluation": {
            "perplexity": {"seq_len": 512, "num_chunks": plan.windows,
                           "text": "held-out eval text"},
            "eval_text": "custom" if custom_eval else "default (wikitext-2 valid, held-out part)",
            "calibration_text": "custom" if custom_calibration else
            "default (wikitext-2 valid, first 55%)",
            "after_measured_on": run.after_measured_on,
            "tokens_per_s": "greedy decode, batch 1, KV cache, CPU, each model in a fresh "
            "process" if run.kind == CAUSAL_KIND else "encoder forward tokens/s, CPU, each "
            "model in a fresh process",
            **MJ.evaluation_notes(plan),
            **run.notes,
        },
        # wall seconds per phase: load, before (0 when reused from the baseline cache), stages,
        # save, after (reload and measure), total
        "timings": {f"{k}_s": round(v, 3) for k, v in timings.items()},
        "device": device_info(dev),
        "versions": versions(),
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    out: dict[str, Any] = jsonable(report)
    return out


def quality_gate(max_ppl_increase: float | None, before: dict[str, Any], after: dict[str, Any]
          ) -> tuple[dict[str, Any] | None, bool]:
    if max_ppl_increase is None:
        return None, True
    if "ppl_ratio" not in after:
        return {"max_ppl_increase": max_ppl_increase, "passed": True,
                "skipped": "no perplexity for this model kind (encoder); gate not applied"}, True
    passed = bool(after["ppl_ratio"] <= max_ppl_increase)
    gate = {"max_ppl_increase": max_ppl_increase, "ppl_ratio": after["ppl_ratio"],
            "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"], "passed": passed}
    if not passed:
        gate["reason"] = (f"perplexity rose {after['ppl_ratio']:.4f}x "
                          f"({before['perplexity']:.3f} -> {after['perplexity']:.3f}), "
                          f"above the allowed {max_ppl_increase:g}x")
    return gate, passed


def combine_gates(gate: dict[str, Any] | None, passed: bool, more: list[dict[str, Any]]
                ) -> tuple[dict[str, Any] | None, bool]:
    """The perplexity gate with the task and prompt gates: ``gate['gates']`` lists those, and
    the reason names every miss."""
    if not more:
        return gate, passed
    gate = dict(gate or {})
    gate["gates"] = more
    reasons = [g["reason"] for g in ([gate] if "reason" in gate else []) + more if "reason" in g]
    passed = passed and all(g["passed"] for g in more)
    gate["passed"] = passed
    if reasons:
        gate["reason"] = "; ".join(reasons)
    return gate, passed
