"""What one job measures, decided once: :class:`MeasurePlan` (the ``measure`` option, the
baseline cache, the user's task and prompt sets, their gates) and the steps the pipeline calls.

``measure``: ``full`` (quality and speed), ``quality`` (perplexities, tasks, prompts; no
speed), ``none`` (sizes and counts only; no gate that needs a measurement may be asked for)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import CompressionError
from . import MODES
from . import baseline as B
from . import prompts as P
from . import speed as S
from . import tasks as T
from .quality import OTHER_TEXT_NAME
from .quality import other_domain_text as other_domain_text  # re-exported: tests patch it here

#: bump when what a baseline entry holds or how it is measured changes
BASELINE_VERSION = 1
#: 512-token windows of each text that perplexity reads by default (fewer: faster, noisier)
EVAL_WINDOWS = 16
MAX_EVAL_WINDOWS = 256


@dataclass
class MeasurePlan:
    mode: str = "full"
    cache: B.BaselineCache | None = None
    tasks: list[T.Task] | None = None
    prompts: list[str] | None = None
    tasks_text: str | None = None
    prompts_text: str | None = None
    max_accuracy_drop: float | None = None
    max_mean_kl: float | None = None
    speed_rounds: int = 5
    #: windows of each text (eval and other domain) that perplexity reads
    windows: int = EVAL_WINDOWS
    #: what the report's ``evaluation`` gets: baseline, speed, tasks, prompts
    details: dict[str, Any] = field(default_factory=dict)
    _key: str | None = None
    _identity: dict[str, Any] | None = None
    _dense: P.Behaviour | None = None


def make_plan(mode: str = "full", *, cache_dir: str | Path | None = None,
              tasks_text: str | None = None, prompts_text: str | None = None,
              max_accuracy_drop: float | None = None, max_mean_kl: float | None = None,
              speed_rounds: int = 5, windows: int = EVAL_WINDOWS) -> MeasurePlan:
    """Validate the options (a :class:`CompressionError` says what is wrong)."""
    if mode not in MODES:
        raise CompressionError(f"measure must be one of {', '.join(MODES)}, got {mode!r}")
    for name, v in (("max_accuracy_drop", max_accuracy_drop), ("max_mean_kl", max_mean_kl)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise CompressionError(f"{name} must be a finite number >= 0, got {v}")
    if max_accuracy_drop is not None and not tasks_text:
        raise CompressionError("max_accuracy_drop needs a task set (tasks_dataset_id / --tasks)")
    if max_mean_kl is not None and not prompts_text:
        raise CompressionError("max_mean_kl needs a prompt set (prompts_dataset_id / --prompts)")
    if not (isinstance(windows, int) and 1 <= windows <= MAX_EVAL_WINDOWS):
        raise CompressionError(f"eval windows must be a whole number from 1 to "
                               f"{MAX_EVAL_WINDOWS}, got {windows!r}")
    if mode == "none" and (max_accuracy_drop is not None or max_mean_kl is not None):
        raise CompressionError("measure='none' measures no quality, so it cannot gate on it")
    return MeasurePlan(
        mode=mode, cache=B.BaselineCache(cache_dir) if cache_dir else None,
        tasks=T.parse_tasks(tasks_text) if tasks_text else None,
        prompts=P.parse_prompts(prompts_text) if prompts_text else None,
        tasks_text=tasks_text, prompts_text=prompts_text, max_accuracy_drop=max_accuracy_drop,
        max_mean_kl=max_mean_kl, speed_rounds=speed_rounds, windows=windows)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------------ baseline


def lookup_before(plan: MeasurePlan, source: str, revision: str | None, eval_text: str,
                  device: torch.device) -> dict[str, float] | None:
    """The source model's cached ``before`` numbers, or None (then :func:`store_before`)."""
    if plan.cache is None:
        plan.details["baseline"] = {"reused": False, "why": "no baseline cache configured"}
        return None
    plan._identity = {
        "version": BASELINE_VERSION, "model": B.model_identity(str(source), revision),
        "mode": "none" if plan.mode == "none" else "quality",
        "eval_text": B.text_hash(eval_text), "other_text": B.text_hash(other_domain_text()),
        "tasks": B.text_hash(plan.tasks_text), "device": str(device),
        "perplexity": {"seq_len": 512, "num_chunks": plan.windows}, "versions": _versions(),
    }
    plan._key = B.cache_key(plan._identity)
    entry = plan.cache.get(plan._key)
    if entry is None:
        plan.details["baseline"] = {"reused": False, "key": plan._key}
        return None
    plan.details["baseline"] = {"reused": True, "key": plan._key,
                                "measured_at": entry.get("measured_at")}
    if "tasks" in entry:
        plan.details["tasks_before"] = entry["tasks"]
    return {k: float(v) for k, v in entry["metrics"].items()}


def store_before(plan: MeasurePlan, before: dict[str, float]) -> None:
    if plan.cache is None or plan._key is None or plan._identity is None:
        return
    metrics = {k: v for k, v in before.items() if "tokens_per_s" not in k}
    extra = {"tasks": plan.details["tasks_before"]} if "tasks_before" in plan.details else None
    plan.cache.put(plan._key, plan._identity, metrics, datetime.now(UTC).isoformat(),
                   extra)


# ------------------------------------------------------------------------------ quality


def quality(plan: MeasurePlan, model: nn.Module, tok: Any, eval_text: str,
            perplexity: Callable[[nn.Module, Any, str, int], float], phase: str) -> dict[str, float]:
    """Perplexity on the eval text and the shipped text of another domain, task accuracy and
    (after) the prompt diff. ``phase`` is ``before`` or ``after``."""
    if plan.mode == "none":
        return {}
    m = {"perplexity": perplexity(model, tok, eval_text, plan.windows),
         "perplexity_other": perplexity(model, tok, other_domain_text(), plan.windows)}
    if plan.tasks:
        res = T.evaluate(model, tok, plan.tasks)
        plan.details[f"tasks_{phase}"] = res
        m["task_accuracy"] = res["accuracy"]
    if plan.prompts and phase == "after" and plan._dense is not None:
        d = P.diff(plan.prompts, plan._dense, P.behaviour(model, tok, plan.prompts))
        plan.details["prompts"] = d
        m["prompt_mean_kl"] = d["mean_kl"]
        m["prompt_top1_agreement"] = d["top1_agreement"]
    return m


def dense_behaviour(plan: MeasurePlan, model: nn.Module, tok: Any) -> None:
    """The dense model's answers to the prompt set (before it is compressed)."""
    if plan.prompts and plan.mode != "none" and tok is not None:
        plan._dense = P.behaviour(model, tok, plan.prompts)


# ------------------------------------------------------------------------------ speed


def speed_processes(plan: MeasurePlan, dense_dir: str, compressed_dir: str, causal: bool,
                    runtime: tuple[str, dict[str, Any]] | None,
                    check: Callable[[], None]) -> dict[str, float]:
    """Interleaved CPU rounds with each model in a fresh process, loaded as a user loads it
    (``runtime``: the method whose runtime serves the artifact, with its params): sets
    ``tokens_per_s`` (compressed) and ``dense_tokens_per_s``; the verdict goes to
    ``details['speed']``."""
    if plan.mode != "full":
        return {}
    res = S.interleaved_processes(dense_dir, compressed_dir, causal, runtime, plan.speed_rounds,
                                  check)
    plan.details["speed"] = res
    return {"tokens_per_s": res["compressed"]["median"],
            "dense_tokens_per_s": res["dense"]["median"]}


def speed_gpu(plan: MeasurePlan, dense: nn.Module, compressed: nn.Module, causal: bool,
              gpu: torch.device, check: Callable[[], None]) -> dict[str, float]:
    """Interleaved rounds of both models moved to the GPU (in this process)."""
    if plan.mode != "full":
        return {}
    import copy

    rate = S.decode_rate if causal else S.encoder_rate
    d, c = copy.deepcopy(dense).to(gpu), copy.deepcopy(compressed).to(gpu)
    res = S.interleaved(d, c, rate, plan.speed_rounds, check)
    del d, c
    torch.cuda.empty_cache()
    plan.details["speed_gpu"] = res
    return {"tokens_per_s_gpu": res["compressed"]["median"],
            "dense_tokens_per_s_gpu": res["dense"]["median"]}


# ------------------------------------------------------------------------------ gates


def gates(plan: MeasurePlan, before: dict[str, float], after: dict[str, float]
          ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if plan.max_accuracy_drop is not None:
        drop = before["task_accuracy"] - after["task_accuracy"]
        g: dict[str, Any] = {"max_accuracy_drop": plan.max_accuracy_drop, "accuracy_before":
             before["task_accuracy"], "accuracy_after": after["task_accuracy"],
             "accuracy_drop": drop, "passed": drop <= plan.max_accuracy_drop + 1e-12}
        if not g["passed"]:
            g["reason"] = (f"task accuracy fell {drop:.4f} ({before['task_accuracy']:.4f} -> "
                           f"{after['task_accuracy']:.4f}), more than the allowed "
                           f"{plan.max_accuracy_drop:g}")
        out.append(g)
    if plan.max_mean_kl is not None:
        kl = after["prompt_mean_kl"]
        g = {"max_mean_kl": plan.max_mean_kl, "mean_kl": kl, "passed": kl <= plan.max_mean_kl}
        if not g["passed"]:
            g["reason"] = (f"mean KL on the prompt set is {kl:.4f} nats, above the allowed "
                           f"{plan.max_mean_kl:g}")
        out.append(g)
    return out


def evaluation_notes(plan: MeasurePlan) -> dict[str, Any]:
    notes: dict[str, Any] = {"measure": plan.mode, "other_text": OTHER_TEXT_NAME}
    for k in ("baseline", "speed", "speed_gpu", "prompts"):
        if k in plan.details:
            notes[k] = plan.details[k]
    tb, ta = plan.details.get("tasks_before"), plan.details.get("tasks_after")
    if tb and ta:
        notes["tasks"] = {
            "n": ta["n"], "scorer": "log-likelihood (lm-eval acc / is_greedy)",
            "accuracy_before": tb["accuracy"], "accuracy_after": ta["accuracy"],
            "changed": [i for i, (a, b) in enumerate(zip(tb["correct"], ta["correct"])) if a != b]}
    return notes
