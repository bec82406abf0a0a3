"""The job pipeline: load a model, run a recipe of compression stages, save the artifact, measure
it, write ``report.json``.

This is exactly what a worker runs for a job and what ``modelpress compress`` runs offline. It
knows nothing about HTTP, databases or queues: the caller passes :class:`JobHooks` callbacks.

Numbers in the report are *measured*, never claimed: ``before`` on the loaded source model,
``after`` on the saved artifact reloaded with plain ``from_pretrained`` (its quality and speed
in the method's serving form where it declares one, e.g. int8_dynamic's int8 kernels:
``Method.runtime``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from . import evaluation as E
from .base import (
    Cancelled,
    CheckpointStore,
    CompressionError,
    CompressionResult,
    Context,
    Method,
    MethodConfig,
    hf,
)
from .measure import job as MJ
from .recipe import MAX_STAGES, RecipeError, Stage, as_stages, validate_recipe
from .registry import get_method
from .report import (
    QUALITY_GATE,
    REPORT_FILE,
    Metrics,
    Run,
    build_report,
    combine_gates,
    derive,
    quality_gate,
)

if TYPE_CHECKING:
    from .streaming.job import StreamPlan

# progress slices (percent of the whole job)
_LOAD = (0.0, 4.0)
_BEFORE = (4.0, 12.0)
_STAGES = (12.0, 88.0)
_AFTER = (88.0, 100.0)


def _noop(*_a: Any, **_k: Any) -> None:
    return None


@dataclass
class JobHooks:
    #: ``progress(percent_0_to_100, label)`` across the whole recipe (monotonic)
    progress: Callable[[int, str], None] = _noop
    #: ``event(kind, data)``: appended to the job's event log
    event: Callable[[str, dict[str, Any]], None] = _noop
    should_stop: Callable[[], bool] = lambda: False
    checkpoints: CheckpointStore | None = None
    #: registered model id -> model (distillation teacher/student)
    load_model: Callable[[str], nn.Module] | None = None


@dataclass
class PipelineOutcome:
    output_dir: Path
    report: dict[str, Any]
    metrics: list[tuple[str, str, float, str | None]]
    format: str
    gate_passed: bool


class LocalCheckpoints:
    """A :class:`base.CheckpointStore` in a local folder (``modelpress compress``, tests)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        parts = Path(name.strip("/")).parts
        if not parts or ".." in parts:
            raise ValueError(f"invalid checkpoint name {name!r}")
        return self.root.joinpath(*parts)

    def save(self, name: str, path: Path) -> None:
        dst = self._path(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        if Path(path).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(dst, ignore_errors=True)
        else:
            shutil.copyfile(path, tmp)
        tmp.replace(dst)

    def load(self, name: str, dest: Path) -> bool:
        src = self._path(name)
        if not src.exists():
            return False
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest)
        else:
            shutil.copyfile(src, dest)
        return True


class _PrefixedCheckpoints:
    """Namespaces one stage's checkpoints (two distill stages never collide)."""

    def __init__(self, inner: CheckpointStore, prefix: str):
        self.inner = inner
        self.prefix = prefix

    def save(self, name: str, path: Path) -> None:
        self.inner.save(self.prefix + name, path)

    def load(self, name: str, dest: Path) -> bool:
        return self.inner.load(self.prefix + name, dest)


# --------------------------------------------------------------------------------- measuring


class _Progress:
    def __init__(self, hook: Callable[[int, str], None]):
        self.hook = hook
        self.last = 0

    def __call__(self, percent: float, label: str) -> None:
        p = int(max(0, min(100, math.floor(percent))))
        p = max(p, self.last)
        self.last = p
        self.hook(p, label)

    def span(self, lo: float, hi: float, label: str) -> Callable[[float, str | None], None]:
        def report(frac: float, msg: str | None = None) -> None:
            f = 0.0 if frac is None or not math.isfinite(frac) else min(1.0, max(0.0, float(frac)))
            self(lo + f * (hi - lo), f"{label}: {msg}" if msg else label)

        return report


def _stage_weight(method: Method) -> float:
    if method.family == "distillation":
        return 6.0
    return 2.0 if method.needs_calibration else 1.0


def _eval_seq_len(model: nn.Module) -> int:
    mp = getattr(model.config, "max_position_embeddings", None) or 512
    return int(min(512, mp))


def _perplexity(model: nn.Module, tokenizer: Any, text: str,
                windows: int = MJ.EVAL_WINDOWS) -> float:
    seq = _eval_seq_len(model)
    try:
        return E.perplexity(model, tokenizer, text, seq_len=seq, num_chunks=windows)
    except ValueError:
        try:
            return E.perplexity(model, tokenizer, text, seq_len=min(seq, 64), num_chunks=windows)
        except ValueError:
            raise CompressionError("the eval text is too short to measure perplexity "
                                   "(needs at least 64 tokens)") from None


def _safetensors_all_f32(paths: list[Path]) -> bool:
    from safetensors import safe_open

    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                if f.get_slice(k).get_dtype() not in ("F32",):
                    return False
    return True


def _source_weight_bytes(source: str, model: nn.Module, work: Path) -> int:
    """Bytes of the source's fp32 safetensors: the files themselves for a local fp32 HF
    directory, else what ``save_pretrained`` writes for the loaded (fp32) model."""
    p = Path(source)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if files and _safetensors_all_f32(files):
            return sum(f.stat().st_size for f in files)
    d = work / "source-fp32"
    hf(model).save_pretrained(d, safe_serialization=True)
    n = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    shutil.rmtree(d, ignore_errors=True)
    return n


def _top_weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def _measure(model: nn.Module, tokenizer: Any, kind: str, eval_text: str, *,
             reference: nn.Module | None, gpu: torch.device | None, weight_bytes: int,
             progress: Callable[[float, str | None], None],
             check: Callable[[], None],
             runtime: Callable[[nn.Module], nn.Module] | None = None,
             plan: MJ.MeasurePlan | None = None, phase: str = "before") -> dict[str, float]:
    """The standard metrics of ``model``. With ``runtime`` the counts are taken on ``model`` as
    loaded (weights by their logical size) and quality and speed on ``runtime(model)`` (the
    form that serves it). Quality as ``plan`` says (:mod:`measure.job`); speed is measured
    apart (:func:`_speed`)."""
    from .models import CAUSAL

    m: dict[str, float] = {}
    m["params"] = float(E.param_count(model))
    m["nonzero_params"] = float(E.nonzero_count(model))
    m["bytes"] = float(weight_bytes)
    m["sparsity"] = float(E.linear_sparsity(model))
    if runtime is not None:
        model = runtime(model)
    progress(0.1, "evaluating quality" if tokenizer is not None else "counted")
    check()
    plan = plan or MJ.MeasurePlan()
    if tokenizer is not None and plan.mode != "none":
        if kind == CAUSAL:
            m.update(MJ.quality(plan, model, tokenizer, eval_text, _perplexity, phase))
        elif reference is not None:
            m["embedding_fidelity"] = E.embedding_fidelity(model, reference, tokenizer, eval_text)
        else:
            m["embedding_fidelity"] = 1.0
    progress(1.0, "measured")
    return m


UNITS = {
    "params": None, "nonzero_params": None, "bytes": "bytes", "sparsity": "ratio",
    "perplexity": None, "embedding_fidelity": "cosine", "tokens_per_s": "tokens/s",
    "tokens_per_s_gpu": "tokens/s", "compression_ratio": "x", "speedup": "x",
    "speedup_gpu": "x", "ppl_ratio": "ratio", "accuracy_loss": "ratio", "wall_time_s": "s",
    "peak_rss_bytes": "bytes", "peak_gpu_bytes": "bytes", "duration_s": "s",
}


# --------------------------------------------------------------------------------- running


def run_pipeline(source: str | Path, stages: list[Stage] | list[dict[str, Any]], output_dir: Path, *,
                 revision: str | None = None,
                 calibration_text: str | None = None,
                 eval_text: str | None = None,
                 max_ppl_increase: float | None = None,
                 hooks: JobHooks | None = None,
                 device: str | None = None,
                 keep_intermediate: bool = False,
                 measure_stages: bool = False,
                 stream: bool | None = None,
                 measure: str = "full",
                 baseline_cache: str | Path | None = None,
                 tasks_text: str | None = None,
                 prompts_text: str | None = None,
                 max_accuracy_drop: float | None = None,
                 max_mean_kl: float | None = None,
                 eval_windows: int = MJ.EVAL_WINDOWS) -> PipelineOutcome:
    """Load SOURCE, measure ``before``, run the stages in order, save the final model to
    ``output_dir``, measure ``after`` on the artifact reloaded with plain ``from_pretrained``,
    write ``report.json`` and return the outcome.

    ``measure_stages``: also measure held-out perplexity (or embedding fidelity) of the
    in-memory model after every stage (slower; the benchmark uses it).
    ``stream``: run the job block by block without ever holding the whole model
    (:mod:`streaming.job`): None decides by the model's size, True forces it (an error where
    the recipe or source cannot stream), False never.
    ``measure``: ``full`` / ``quality`` / ``none`` (:mod:`measure.job`); ``baseline_cache``: a
    folder where the source model's numbers are kept and reused by later jobs on the same
    model, data, device and settings; ``tasks_text`` / ``prompts_text``: the user's task and
    prompt sets (JSONL), gated by ``max_accuracy_drop`` / ``max_mean_kl``; ``eval_windows``:
    how many 512-token windows of the eval text and of the other domain's text perplexity reads.
    Raises ``base.Cancelled`` when ``hooks.should_stop()`` turns true."""
    from .data import default_calibration_text, default_eval_text
    from .device import choose_device
    from .streaming.job import streaming_plan

    hooks = hooks or JobHooks()
    t_start = time.monotonic()
    started_at = datetime.now(UTC).isoformat()
    output_dir = Path(output_dir)
    prog = _Progress(hooks.progress)

    def check() -> None:
        if hooks.should_stop():
            raise Cancelled("job cancelled")

    if max_ppl_increase is not None and not (max_ppl_increase > 0 and math.isfinite(max_ppl_increase)):
        raise RecipeError(f"max_ppl_increase must be a positive ratio (1.10 = at most +10%), "
                          f"got {max_ppl_increase}")
    if measure == "none" and max_ppl_increase is not None:
        raise RecipeError("measure='none' measures no perplexity, so max_ppl_increase cannot apply")
    mplan = MJ.make_plan(measure, cache_dir=baseline_cache, tasks_text=tasks_text,
                        prompts_text=prompts_text, max_accuracy_drop=max_accuracy_drop,
                        max_mean_kl=max_mean_kl, windows=eval_windows)
    parsed = as_stages(stages)
    configs = validate_recipe(parsed)
    methods = [get_method(st.method) for st in parsed]
    cal_text = calibration_text if calibration_text else default_calibration_text()
    ev_text = eval_text if eval_text else default_eval_text()
    dev = torch.device(device) if device else choose_device()
    gpu = dev if dev.type == "cuda" else None
    if output_dir.exists() and any(output_dir.iterdir()):
        raise CompressionError(f"output directory {output_dir} is not empty")

    metrics: Metrics = []
    work = Path(tempfile.mkdtemp(prefix="modelpress-pipeline-"))
    phases = Phases()
    env = _Env(prog=prog, hooks=hooks, check=check, metrics=metrics, work=work, dev=dev, gpu=gpu,
               plan=mplan, phases=phases, cal_text=cal_text, ev_text=ev_text)
    peak = E.PeakMemory()
    peak.__enter__()
    try:
        check()
        splan = streaming_plan(source, methods, stream, work,
                               configs[0].model_dump() if len(configs) == 1 else None)
        if splan is not None:
            run = _run_streamed(splan, parsed, methods, configs, output_dir, env)
        else:
            run = _run_in_memory(source, revision, parsed, methods, configs, output_dir, env,
                                 keep_intermediate, measure_stages)
        peak.stop()
        phases.seconds["total"] = time.monotonic() - t_start
        derive(run, mplan, peak, gpu, phases.seconds["total"], metrics)
        for k, v in run.after.items():
            metrics.append(("after", k, v, UNITS.get(k)))
        gate, gate_passed = quality_gate(max_ppl_increase, run.before, run.after)
        gate, gate_passed = combine_gates(gate, gate_passed, MJ.gates(mplan, run.before, run.after))
        if "task_accuracy" in run.after and "task_accuracy" in run.before:
            run.after["accuracy_drop"] = run.before["task_accuracy"] - run.after["task_accuracy"]
        report = build_report(run, source=source, revision=revision, parsed=parsed, gate=gate,
                         custom_eval=bool(eval_text), custom_calibration=bool(calibration_text),
                         plan=mplan, dev=dev, started_at=started_at, timings=phases.seconds)
        (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=False))
        prog(100, "done")
        hooks.event("done", {"message": "pipeline finished", "gate_passed": gate_passed,
                             "summary": report["summary"]})
        return PipelineOutcome(output_dir=output_dir, report=report, metrics=metrics,
                               format=run.fmt, gate_passed=gate_passed)
    finally:
        peak.stop()
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Env:
    """What every phase of one job run shares."""

    prog: _Progress
    hooks: JobHooks
    check: Callable[[], None]
    metrics: Metrics
    work: Path
    dev: torch.device
    gpu: torch.device | None
    plan: MJ.MeasurePlan
    phases: Phases
    cal_text: str
    ev_text: str


class Phases:
    """Wall seconds per phase of a job (``report["timings"]``): load, before, stages, save,
    after, and the job's total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0


def _run_in_memory(source: str | Path, revision: str | None, parsed: list[Stage],
                   methods: list[Method], configs: list[MethodConfig], output_dir: Path,
                   env: _Env, keep_intermediate: bool, measure_stages: bool) -> Run:
    """The whole model in memory: load, measure, run every stage, save, reload, measure."""
    from .models import CAUSAL

    with env.phases("load"):
        model, tok, kind = _load_whole(source, revision, methods, configs, env)
    model_type = getattr(model.config, "model_type", None)
    with env.phases("before"):
        before = _before_in_memory(source, revision, model, tok, kind, env)
    full = env.plan.mode == "full"
    need_original = (kind != CAUSAL or (full and env.gpu is not None)
                     or any(m.family == "distillation" for m in methods))
    original = copy.deepcopy(model).eval() if need_original else None
    if original is not None:
        original.requires_grad_(False)
    # the dense model on disk for the speed rounds' fresh processes (before any stage changes it)
    dense_dir = _dense_dir(source, model, env.work) if full else None
    model.to(env.dev)
    with env.phases("stages"):
        result, stage_reports = _run_stages(model, tok, kind, parsed, methods, configs, output_dir,
                                            original, env, keep_intermediate, measure_stages)
    env.check()
    after, fmt = _save_and_measure(result, tok, kind, methods[-1], configs[-1], output_dir,
                                   original, env, dense_dir)
    last = methods[-1]
    on = "the saved artifact reloaded with from_pretrained" + (
        f"; quality and speed on it put in {last.name}'s runtime (what serves it)"
        if last.runtime else "")
    return Run(before, after, kind, model_type, stage_reports, fmt, on, {})


def _load_whole(source: str | Path, revision: str | None, methods: list[Method],
                configs: list[MethodConfig], env: _Env) -> tuple[nn.Module, Any, str]:
    from .models import load_source

    env.prog(_LOAD[0], "loading model")
    env.hooks.event("stage", {"message": f"loading {source}", "phase": "load"})
    loaded = load_source(source, revision=revision)
    model, tok, kind = loaded.model, loaded.tokenizer, loaded.kind
    model.eval()
    for m, cfg in zip(methods, configs):
        m.check_model(cfg, model.config)
    env.prog(_LOAD[1], "model loaded")
    env.check()
    return model, tok, kind


def _before_in_memory(source: str | Path, revision: str | None, model: nn.Module, tok: Any,
                      kind: str, env: _Env) -> dict[str, float]:
    """The source's numbers: from the baseline cache where measured already, else measured."""
    from .models import CAUSAL

    plan = env.plan
    before = MJ.lookup_before(plan, str(source), revision, env.ev_text, env.dev)
    if before is None:
        before_bytes = _source_weight_bytes(str(source), model, env.work)
        before = _measure(model, tok, kind, env.ev_text, reference=None, gpu=env.gpu,
                          weight_bytes=before_bytes,
                          progress=env.prog.span(*_BEFORE, "measuring before"), check=env.check,
                          plan=plan, phase="before")
        MJ.store_before(plan, before)
    else:
        env.prog(_BEFORE[1], "source model's numbers reused from the baseline cache")
        env.hooks.event("stage", {"message": "source model's numbers reused from the baseline "
                                  "cache", "phase": "before", "key": plan.details["baseline"]["key"]})
    if kind == CAUSAL:
        MJ.dense_behaviour(plan, model, tok)
    for k, v in before.items():
        env.metrics.append(("before", k, v, UNITS.get(k)))
    env.hooks.event("metrics", {"stage": "before", "metrics": before})
    return before


def _run_stages(model: nn.Module, tok: Any, kind: str, parsed: list[Stage],
                methods: list[Method], configs: list[MethodConfig], output_dir: Path,
                original: nn.Module | None, env: _Env, keep_intermediate: bool,
                measure_stages: bool) -> tuple[CompressionResult, list[dict[str, Any]]]:
    """Every stage in order on the in-memory model; returns the last stage's result."""
    weights = [_stage_weight(m) for m in methods]
    lo = _STAGES[0]
    stage_reports: list[dict[str, Any]] = []
    result: CompressionResult | None = None
    for i, (method, cfg) in enumerate(zip(methods, configs)):
        env.check()
        hi = lo + (_STAGES[1] - _STAGES[0]) * weights[i] / sum(weights)
        result, rep = _run_stage(i, model, tok, kind, method, cfg, len(parsed), output_dir,
                                 original, env, (lo, hi), keep_intermediate, measure_stages)
        model = result.model
        stage_reports.append(rep)
        lo = hi
    assert result is not None
    return result, stage_reports


def _run_stage(i: int, model: nn.Module, tok: Any, kind: str, method: Method, cfg: MethodConfig,
               n_stages: int, output_dir: Path, original: nn.Module | None, env: _Env,
               span: tuple[float, float], keep_intermediate: bool, measure_stages: bool
               ) -> tuple[CompressionResult, dict[str, Any]]:
    from .models import save_model
    from .moe import expert_report

    label = f"{i}:{method.name}"
    stage_metrics: dict[str, float] = {}
    curve: list[dict[str, Any]] = []

    def metric(name: str, value: float, unit: str | None = None) -> None:
        env.metrics.append((label, name, float(value), unit))
        stage_metrics[name] = float(value)

    def event(kind_: str, data: dict[str, Any]) -> None:
        if kind_ == "train":
            curve.append(dict(data))
        env.hooks.event(kind_, {"stage": label, **data})

    stage_work = env.work / f"stage-{i}"
    stage_work.mkdir()
    hooks = env.hooks
    ctx = Context(
        device=env.dev, tokenizer=tok, calibration_text=env.cal_text, eval_text=env.ev_text,
        work_dir=stage_work, progress=env.prog.span(span[0], span[1], label), event=event,
        metric=metric, should_stop=hooks.should_stop,
        checkpoints=(_PrefixedCheckpoints(hooks.checkpoints, f"{i}-{method.name}/")
                     if hooks.checkpoints is not None else None),
        load_model=hooks.load_model, original_model=original,
    )
    env.prog(span[0], f"{label}: starting")
    hooks.event("stage", {"stage": label, "message": f"stage {i} ({method.name}) started",
                          "params": cfg.model_dump(mode="json")})
    t0 = time.monotonic()
    result = method.apply(model, cfg, ctx)
    duration = time.monotonic() - t0
    # mixture of experts: calibration tokens routed to each expert, fallbacks
    result.metrics = {**(result.metrics or {}), **expert_report(result.model)}
    for k, v in (result.metrics or {}).items():
        metric(k, v, UNITS.get(k))
    metric("duration_s", duration, "s")
    _stage_counts(result, kind, tok, original, env.ev_text,
                  env.plan.windows if measure_stages else 0, metric, event)
    artifact = None
    if keep_intermediate and i < n_stages - 1:
        d = output_dir / "stages" / f"{i}-{method.name}"
        save_model(result.model, tok, d, saver=result.saver)
        artifact = str(d.relative_to(output_dir))
    hooks.event("stage", {"stage": label, "message": f"stage {i} ({method.name}) done "
                          f"in {duration:.1f} s", "metrics": dict(stage_metrics)})
    if result.packed and i != n_stages - 1:  # validate_recipe should have caught it
        raise RecipeError(f"stage {i} ({method.name}) packed the weights but is not last")
    rep = {"index": i, "method": method.name, "params": cfg.model_dump(mode="json"),
           "duration_s": duration, "metrics": dict(stage_metrics), "packed": result.packed,
           "format": result.format,
           "artifact": artifact if artifact else "." if i == n_stages - 1 else None,
           **({"train_curve": curve} if curve else {})}
    return result, rep


def _stage_counts(result: CompressionResult, kind: str, tok: Any, original: nn.Module | None,
                  ev_text: str, windows: int, metric: Callable[..., None],
                  event: Callable[[str, dict[str, Any]], None]) -> None:
    """The in-memory model's counts after a stage (and its quality over ``windows`` windows of
    the eval text: 0 measures none)."""
    from .models import CAUSAL

    model = result.model
    if not result.packed:
        metric("params", E.param_count(model))
        metric("nonzero_params", E.nonzero_count(model))
        metric("sparsity", E.linear_sparsity(model), "ratio")
    if not (windows and tok is not None):
        return
    try:
        if kind == CAUSAL:
            metric("perplexity", _perplexity(model, tok, ev_text, windows))
        elif original is not None:
            metric("embedding_fidelity", E.embedding_fidelity(model, original, tok, ev_text),
                   "cosine")
    except CompressionError:
        raise
    except Exception as e:  # noqa: BLE001 - a packed model may not run in memory
        event("warning", {"message": f"stage metric: {e}"})


def _dense_dir(source: str | Path, model: nn.Module, work: Path) -> str:
    """A folder ``from_pretrained`` loads the dense model from: the source itself where it is a
    local model folder, else (GGUF, hub id) the loaded model saved to the job's scratch."""
    p = Path(source)
    if p.is_dir() and (p / "config.json").is_file():
        return str(p)
    d = work / "dense"
    hf(model).save_pretrained(d, safe_serialization=True)
    return str(d)


def _save_and_measure(result: CompressionResult, tok: Any, kind: str, last: Method,
                      last_cfg: MethodConfig, output_dir: Path, original: nn.Module | None,
                      env: _Env, dense_dir: str | None) -> tuple[dict[str, float], str]:
    """Save the artifact, reload it with plain from_pretrained and measure it (``after``); with
    ``dense_dir`` (measure='full') the speed rounds too."""
    from .models import CAUSAL, load_pretrained, save_model

    env.prog(_AFTER[0], "saving")
    plan = env.plan
    if kind == CAUSAL and plan.mode != "full":
        original = None  # the teacher is no longer needed: free it before reloading
    with env.phases("save"):
        model = result.model.to("cpu")
        save_model(model, tok, output_dir, saver=result.saver)
        fmt = result.format
        del model, result
    env.check()
    with env.phases("after"):
        reloaded = load_pretrained(output_dir).model
        runtime = last.runtime
        after = _measure(reloaded, tok, kind, env.ev_text, reference=original, gpu=env.gpu,
                         weight_bytes=_top_weight_bytes(output_dir),
                         progress=env.prog.span(_AFTER[0] + 1, 94.0, "measuring after"),
                         check=env.check,
                         # quality and speed of what serves the artifact (e.g. int8 kernels)
                         runtime=(lambda m: runtime(m, last_cfg)) if runtime else None,
                         plan=plan, phase="after")
        del reloaded
        if dense_dir is not None:
            after.update(_speed(dense_dir, output_dir, kind, last, last_cfg, original, env))
    return after, fmt


def _speed(dense_dir: str, output_dir: Path, kind: str, last: Method, last_cfg: MethodConfig,
           original: nn.Module | None, env: _Env) -> dict[str, float]:
    """Interleaved speed rounds of the dense model and the artifact, each in a fresh process
    as a user loads it (the artifact in ``last``'s runtime where it has one); on a GPU job also
    in this process on the GPU."""
    from .models import CAUSAL, load_pretrained

    env.prog(94.0, "measuring speed (fresh processes, interleaved rounds)")
    spec = (last.name, last_cfg.model_dump(mode="json")) if last.runtime else None
    out = MJ.speed_processes(env.plan, dense_dir, str(output_dir), kind == CAUSAL, spec,
                             env.check)
    if env.gpu is not None and original is not None:
        comp = load_pretrained(output_dir).model
        if last.runtime is not None:
            comp = last.runtime(comp, last_cfg)
        out.update(MJ.speed_gpu(env.plan, original, comp, kind == CAUSAL, env.gpu, env.check))
    return out


def _eval_windows(tok: Any, text: str, max_positions: int | None, count: int) -> torch.Tensor:
    """The ``count`` windows :func:`_perplexity` uses (512 tokens, or 64 for a short text)."""
    from .data import token_chunks

    seq = int(min(512, max_positions or 512))
    for s in (seq, min(seq, 64)):
        try:
            return token_chunks(tok, text, count, s)
        except ValueError:
            continue
    raise CompressionError("the eval text is too short to measure perplexity "
                           "(needs at least 64 tokens)")


def _run_streamed(plan: StreamPlan, parsed: list[Stage], methods: list[Method],
                  configs: list[MethodConfig], output_dir: Path, env: _Env) -> Run:
    """One block in memory at a time (:mod:`streaming`): ``before`` and ``after`` perplexity by a
    block-sequential forward over the eval windows; speed only where the model fits and the job
    measures it (``speed``: measure='full'; loading the model whole for it is the job's peak)."""
    from .models import CAUSAL, model_kind
    from .streaming import job as J
    from .streaming.artifact_source import ArtifactCheckpoint
    from .streaming.source import LazyCheckpoint

    method, cfg, _st = methods[0], configs[0], parsed[0]
    prog, hooks, check, metrics, dev = env.prog, env.hooks, env.check, env.metrics, env.dev
    cal_text, ev_text, work = env.cal_text, env.ev_text, env.work
    speed = env.plan.mode == "full"
    prog(_LOAD[0], "reading the model lazily")
    hooks.event("stage", {"message": f"streaming {plan.source_dir} block by block "
                          f"({plan.reason})", "phase": "load"})
    tok = J.load_tokenizer(plan.source_dir)
    with LazyCheckpoint(plan.source_dir) as ckpt:
        kind = model_kind(ckpt.config)
        if kind != CAUSAL:
            raise CompressionError("only causal language models stream block by block")
        method.check_model(cfg, ckpt.config)
        model_type = getattr(ckpt.config, "model_type", None)
        max_pos = getattr(ckpt.config, "max_position_embeddings", None)
        # measure 'none': no perplexity passes (a pass over a large model's blocks and head
        # costs minutes); the other domain's text is measured in the same passes
        n = env.plan.windows
        windows = (_eval_windows(tok, ev_text, max_pos, n)
                   if tok is not None and env.plan.mode != "none" else None)
        other = (_eval_windows(tok, MJ.other_domain_text(), max_pos, n)
                 if windows is not None else None)
        prog(_LOAD[1], "model read")
        with env.phases("before"):
            before = J.measure_blockwise(ckpt, windows, dev, plan.fp32_bytes,
                                         prog.span(*_BEFORE, "measuring before (block by block)"),
                                         check_stop(check), other)
    for k, v in before.items():
        metrics.append(("before", k, v, UNITS.get(k)))
    hooks.event("metrics", {"stage": "before", "metrics": before})

    label = f"0:{method.name}"
    hooks.event("stage", {"stage": label, "message": f"stage 0 ({method.name}) started "
                          "(block by block)", "params": cfg.model_dump(mode="json")})
    t0 = time.monotonic()
    from .device import return_freed_memory

    return_freed_memory()  # the before pass's work tensors
    with env.phases("stages"):  # block by block: compressing and writing are one pass
        res = J.compress(plan, method, cfg, output_dir, dev,
                         prog.span(_STAGES[0], _STAGES[1], label), check_stop(check),
                         tokenizer=tok, calibration_text=cal_text, scratch=work / "blocks")
    stage_metrics = res.metrics
    duration = time.monotonic() - t0
    stage_metrics["duration_s"] = duration
    for k, v in stage_metrics.items():
        metrics.append((label, k, float(v), UNITS.get(k)))
    if tok is not None:
        tok.save_pretrained(output_dir)
    hooks.event("stage", {"stage": label, "message": f"stage 0 ({method.name}) done in "
                          f"{duration:.1f} s", "metrics": dict(stage_metrics)})
    check()

    with env.phases("after"), ArtifactCheckpoint(output_dir) as art:
        after = J.measure_blockwise(art, windows, dev, _top_weight_bytes(output_dir),
                                    prog.span(_AFTER[0] + 1, 99.0, "measuring after "
                                              "(block by block)"), check_stop(check), other)
    notes: dict[str, Any] = {"streamed": {
        "why": plan.reason,
        "how": "one decoder block in memory at a time; before/after perplexity (the eval "
               "text and the other domain's) by a block-sequential forward over the same "
               "windows",
        "before_bytes": "the source's size in float32 (computed from its tensors' shapes)",
    }}
    both_fit = J.fits_in_memory(2 * plan.fp32_bytes)  # the two speed processes at once
    if both_fit and speed:
        with env.phases("after"):
            spec = (method.name, cfg.model_dump(mode="json")) if method.runtime else None
            after.update(MJ.speed_processes(env.plan, str(plan.source_dir), str(output_dir),
                                            True, spec, check))
    elif not speed:
        notes["tokens_per_s_absent"] = "not measured: the job measures quality only"
    else:
        notes["tokens_per_s_absent"] = (
            f"not measured: the dense model and the artifact need {2 * plan.fp32_bytes / 2**30:.1f}"
            f" GiB in float32 side by side, more than fits in this machine's "
            f"{J.memory_bytes() / 2**30:.1f} GiB")
    stage_reports = [{
        "index": 0, "method": method.name, "params": cfg.model_dump(mode="json"),
        "duration_s": duration, "metrics": dict(stage_metrics),
        "packed": res.fmt == "compressed-tensors", "format": res.fmt, "artifact": ".",
        "streamed": True,
    }]
    on = "the saved artifact, read block by block (quantized weights dequantized as on load)"
    return Run(before, after, kind, model_type, stage_reports, res.fmt, on, notes)


def check_stop(check: Callable[[], None]) -> Callable[[], bool]:
    """A ``should_stop`` that raises :class:`Cancelled` itself (via ``check``)."""
    def should_stop() -> bool:
        check()
        return False

    return should_stop


__all__ = [
    "MAX_STAGES",
    "QUALITY_GATE",
    "JobHooks",
    "LocalCheckpoints",
    "PipelineOutcome",
    "RecipeError",
    "Stage",
    "ValidationError",
    "run_pipeline",
    "validate_recipe",
]
