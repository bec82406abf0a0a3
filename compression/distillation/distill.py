"""Knowledge distillation: train the student (the model flowing into this stage, typically a
pruned model being "healed") to match a teacher (by default the job's source model).

Orchestration only; the loss math lives in :mod:`.losses`. The training state is checkpointed
to ``ctx.checkpoints`` as one safetensors file (student weights, AdamW state, step, RNG state,
JSON metadata); a retried job resumes from its last checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from ..base import CompressionError, CompressionResult, Context, Method, MethodConfig, hf, hf_config
from ..data import tokenize
from .losses import distillation_loss, hidden_state_loss, next_token_labels, uniform_layer_map

CHECKPOINT_NAME = "distill-state.safetensors"
_FORMAT_VERSION = 1


class DistillConfig(MethodConfig):
    teacher_model_id: str | None = Field(
        None, description="Registered model to use as teacher; default: the job's source model.")
    student_model_id: str | None = Field(
        None, description="Registered model to train as student; default: the model flowing "
        "into this stage (e.g. the output of a pruning stage).")
    temperature: float = Field(2.0, gt=0, le=20, description="Softmax temperature T.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft (KL) term; "
                         "1 - alpha weighs the next-token cross-entropy.")
    hidden_loss_weight: float = Field(0.0, ge=0, description="Weight of the normalised MSE "
                                      "between mapped intermediate hidden states (0 = off).")
    layer_map: list[int] | None = Field(
        None, description="Teacher hidden-state index for each student block (1-based); "
        "default: same relative depth.")
    lr: float = Field(3e-4, gt=0, le=1e-1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(5, ge=0)
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="LR after warmup: cosine decay to min_lr_ratio*lr over the run "
        "(the run's length is steps or max_minutes, whichever ends first), or constant.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm.")
    batch_size: int = Field(4, ge=1, le=512)
    seq_len: int = Field(256, ge=8, le=8192)
    steps: int = Field(200, ge=1, le=1_000_000)
    max_minutes: float | None = Field(10.0, gt=0, le=7 * 24 * 60,
                                      description="Wall-clock budget of the stage.")
    freeze_embeddings: bool = Field(True, description="Keep input/output embeddings fixed "
                                    "(cheaper; the vocabulary rarely needs healing).")
    autocast: Literal["auto", "bf16", "none"] = Field(
        "auto", description="Mixed precision for forward/backward: 'auto' = bf16 on CUDA with "
        "bf16 support, else fp32.")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(5, ge=1, description="Steps between 'train' events.")
    seed: int = 0


# ----------------------------------------------------------------------------- helpers


def _lr_at(cfg: DistillConfig, step: int, frac_done: float) -> float:
    """LR for optimizer step ``step`` (0-based); ``frac_done`` in [0, 1] is how far the run is."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    f = min(1.0, max(0.0, frac_done))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * f))


def _batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows for ``step``: a seeded permutation per epoch, so any step is reproducible without
    replaying earlier ones (needed to resume)."""
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n_rows)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(torch.randperm(n_rows, generator=g)[i])
    return torch.stack(out)


def _autocast_ctx(device: torch.device, mode: str) -> AbstractContextManager[Any]:
    import contextlib

    if mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _trainable(student: nn.Module, cfg: DistillConfig) -> list[tuple[str, nn.Parameter]]:
    frozen: set[int] = set()
    if cfg.freeze_embeddings:
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            mod = getattr(student, getter, lambda: None)()
            if mod is not None:
                frozen.update(id(p) for p in mod.parameters())
    out = []
    for name, p in student.named_parameters():
        p.requires_grad_(id(p) not in frozen)
        if id(p) not in frozen:
            out.append((name, p))
    return out


def _save_state(path: Path, student: nn.Module, opt: torch.optim.Optimizer, step: int,
                meta: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in student.named_parameters():
        tensors[f"model.{name}"] = p.detach().to("cpu").contiguous().clone()
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = t.detach().to("cpu").contiguous().clone()
    tensors["rng.cpu"] = torch.get_rng_state()
    info = {"version": _FORMAT_VERSION, "step": step, "param_groups": sd["param_groups"], **meta}
    save_file(tensors, str(path), metadata={"modelpress": json.dumps(info)})


def _load_state(path: Path, student: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info: dict[str, Any] = json.loads(f.metadata()["modelpress"])
    if info.get("version") != _FORMAT_VERSION:
        raise CompressionError(f"unsupported distillation checkpoint version {info.get('version')}")
    tensors = load_file(str(path))
    params = dict(student.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            if key.startswith("model."):
                name = key[len("model."):]
                if name not in params or params[name].shape != t.shape:
                    raise CompressionError(f"checkpoint does not match the student ({name})")
                params[name].copy_(t.to(params[name].device, params[name].dtype))
    state: dict[int, dict[str, torch.Tensor]] = {}
    dev = next(student.parameters()).device
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t if k == "step" else t.to(dev)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    return info


def _forward(model: nn.Module, ids: torch.Tensor, hidden: bool) -> Any:  # a ModelOutput
    return model(input_ids=ids, use_cache=False, output_hidden_states=hidden)


# ----------------------------------------------------------------------------- apply


def apply(model: nn.Module, cfg: DistillConfig, ctx: Context) -> CompressionResult:
    t_start = time.monotonic()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    if ctx.tokenizer is None:
        raise CompressionError("distill needs the model's tokenizer")
    if not ctx.calibration_text:
        raise CompressionError("distill needs training text (the job's calibration text)")

    # ---- models
    if cfg.student_model_id:
        if ctx.load_model is None:
            raise CompressionError("student_model_id given but no model registry is available")
        model = ctx.load_model(cfg.student_model_id)
    if cfg.teacher_model_id:
        if ctx.load_model is None:
            raise CompressionError("teacher_model_id given but no model registry is available")
        teacher: nn.Module | None = ctx.load_model(cfg.teacher_model_id)
    else:
        teacher = ctx.original_model
    if teacher is None:
        raise CompressionError("distill has no teacher: give teacher_model_id or run it in a "
                               "pipeline (the source model is the default teacher)")
    if teacher is model:
        raise CompressionError("teacher and student are the same object")
    dev = ctx.device
    student = model.to(dev)
    teacher = teacher.to(dev).eval()
    teacher.requires_grad_(False)
    s_vocab = hf(student).get_output_embeddings().weight.shape[0]
    t_vocab = hf(teacher).get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise CompressionError(f"teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab})")

    use_hidden = cfg.hidden_loss_weight > 0
    layer_map: list[int] = []
    if use_hidden:
        s_cfg, t_cfg = hf_config(student), hf_config(teacher)
        ls: int = s_cfg.num_hidden_layers
        lt: int = t_cfg.num_hidden_layers
        if s_cfg.hidden_size != t_cfg.hidden_size:
            raise CompressionError("hidden_loss_weight needs equal hidden sizes")
        layer_map = list(cfg.layer_map) if cfg.layer_map else uniform_layer_map(ls, lt)
        if len(layer_map) != ls or any(not 1 <= i <= lt for i in layer_map):
            raise CompressionError(f"layer_map must list {ls} teacher layers in 1..{lt}")

    # ---- data: training text only (the job's calibration text; never the eval text)
    ids = tokenize(ctx.tokenizer, ctx.calibration_text)
    n_rows = ids.numel() // cfg.seq_len
    if n_rows < 1:
        raise CompressionError(f"training text has {ids.numel()} tokens, fewer than seq_len={cfg.seq_len}")
    rows = ids[: n_rows * cfg.seq_len].view(n_rows, cfg.seq_len)

    # ---- optimiser
    named = _trainable(student, cfg)
    if not named:
        raise CompressionError("nothing to train")
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    ac = _autocast_ctx(dev, cfg.autocast)

    # ---- resume
    step = 0
    elapsed_before = 0.0
    history: list[dict[str, float]] = []
    resumed_from = None
    work = Path(tempfile.mkdtemp(prefix="distill-", dir=ctx.work_dir))
    ckpt_path = work / CHECKPOINT_NAME
    if ctx.checkpoints is not None and ctx.checkpoints.load(CHECKPOINT_NAME, ckpt_path):
        info = _load_state(ckpt_path, student, opt)
        step = int(info["step"])
        elapsed_before = float(info.get("elapsed_s", 0.0))
        history = list(info.get("history", []))
        resumed_from = step
        ctx.event("resume", {"step": step})

    def frac_done(s: int) -> float:
        f = s / cfg.steps
        if budget_s:
            f = max(f, (elapsed_before + time.monotonic() - t_start) / budget_s)
        return min(1.0, f)

    def save_ckpt(s: int) -> None:
        if ctx.checkpoints is None:
            return
        _save_state(ckpt_path, student, opt, s, {
            "elapsed_s": elapsed_before + time.monotonic() - t_start, "history": history[-200:]})
        ctx.checkpoints.save(CHECKPOINT_NAME, ckpt_path)
        ctx.event("checkpoint", {"step": s})

    student.train()
    acc = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "hidden": 0.0, "n": 0}
    first_loss = history[0]["loss"] if history else None
    last_step_s = 0.0
    tokens_seen = 0
    stop_reason = "steps"
    while step < cfg.steps:
        ctx.check_cancelled()
        used = elapsed_before + time.monotonic() - t_start
        if budget_s is not None and used + last_step_s > budget_s:
            stop_reason = "max_minutes"
            break
        t_step = time.monotonic()
        lr = _lr_at(cfg, step, frac_done(step))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = rows[_batch_indices(n_rows, cfg.batch_size, step, cfg.seed)].to(dev)
        labels = next_token_labels(batch)
        with torch.no_grad(), ac:
            t_out = _forward(teacher, batch, use_hidden)
        with ac:
            s_out = _forward(student, batch, use_hidden)
        loss, kl, ce = distillation_loss(s_out.logits, t_out.logits, labels, cfg.temperature,
                                         cfg.alpha, return_parts=True)
        h = torch.zeros((), device=loss.device)
        if use_hidden:
            h = hidden_state_loss(s_out.hidden_states, t_out.hidden_states, layer_map)
            loss = loss + cfg.hidden_loss_weight * h
        del t_out
        if not torch.isfinite(loss):
            raise CompressionError(f"distillation diverged at step {step} (loss {loss.item()}); "
                                   "lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        opt.step()
        del s_out
        step += 1
        tokens_seen += batch.numel()
        last_step_s = time.monotonic() - t_step
        acc["loss"] += loss.item()
        acc["kl"] += kl.item()
        acc["ce"] += ce.item()
        acc["hidden"] += h.item()
        acc["n"] += 1
        if first_loss is None:
            first_loss = loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = acc["n"]
            rec = {"step": step, "loss": acc["loss"] / n, "kl": acc["kl"] / n, "ce": acc["ce"] / n,
                   "hidden": acc["hidden"] / n, "lr": lr,
                   "elapsed_s": round(elapsed_before + time.monotonic() - t_start, 2)}
            history.append(rec)
            ctx.event("train", rec)
            ctx.metric("train_loss", rec["loss"], None)
            acc = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "hidden": 0.0, "n": 0}
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_ckpt(step)
        ctx.progress(frac_done(step), f"step {step}/{cfg.steps} loss {loss.item():.4f}")
    if acc["n"]:
        n = acc["n"]
        rec = {"step": step, "loss": acc["loss"] / n, "kl": acc["kl"] / n, "ce": acc["ce"] / n,
               "hidden": acc["hidden"] / n, "lr": lr,
               "elapsed_s": round(elapsed_before + time.monotonic() - t_start, 2)}
        history.append(rec)
        ctx.event("train", rec)
        ctx.metric("train_loss", rec["loss"], None)

    if step != resumed_from:
        # a retry after this stage finished (a later stage failed) skips the training
        save_ckpt(step)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    student.zero_grad(set_to_none=True)
    opt.state.clear()  # the moments are not needed once training ends
    shutil.rmtree(work, ignore_errors=True)
    total_s = elapsed_before + time.monotonic() - t_start
    metrics = {
        "steps": float(step),
        "train_tokens": float(tokens_seen),
        "train_minutes": total_s / 60,
        "train_loss_first": float(first_loss) if first_loss is not None else float("nan"),
        "train_loss_last": float(history[-1]["loss"]) if history else float("nan"),
    }
    if resumed_from is not None:
        metrics["resumed_from_step"] = float(resumed_from)
    ctx.event("distill_done", {"steps": step, "stop_reason": stop_reason,
                               "minutes": round(total_s / 60, 3)})
    return CompressionResult(model=student, metrics=metrics)


def _validate(cfg: DistillConfig, model_config: Any) -> None:
    from ..models import CAUSAL, model_kind

    if model_config is not None and model_kind(model_config) != CAUSAL:
        raise CompressionError("distill trains causal language models (next-token logits); "
                               f"model type {getattr(model_config, 'model_type', None)!r} is not one")


METHOD = Method(
    name="distill",
    config=DistillConfig,
    apply=apply,
    description="Knowledge distillation (Hinton KD: T^2-scaled KL of the teacher distribution "
    "from the student's + next-token cross-entropy, optional hidden-state MSE) from the source "
    "model (or a registered teacher) into the model flowing into this stage, e.g. to heal a "
    "pruned model. Trains with AdamW on the job's calibration text; resumable checkpoints.",
    family="distillation",
    needs_calibration=True,
    prefers_gpu=True,
    validate=_validate,
)
