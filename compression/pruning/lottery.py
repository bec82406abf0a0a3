"""Lottery ticket: iterative magnitude pruning with rewinding (Frankle & Carbin 2019; rewinding
to an early step as in Frankle et al. 2020), on a causal language model.

Round r: train the network (masks enforced after every optimizer step) for ``steps_per_round``
steps on the job's text, prune ``prune_per_round`` of the *remaining* weights of every prunable
Linear by magnitude (globally or per layer), then rewind the survivors to the saved weights (the
starting weights, or those after ``rewind_step`` training steps of the first round). After the
last round the final sparse network is trained. Everything is bounded by ``max_minutes``: when
time runs out the method stops cleanly and returns the most advanced fully trained sparse state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from ..base import CompressionError, CompressionResult, Context, Method, MethodConfig
from ..data import default_calibration_text, default_eval_text, tokenize
from ..evaluation import linear_sparsity, nonzero_count, param_count, perplexity, prunable_linears
from .masks import global_threshold_masks, topk_mask


class LotteryTicketConfig(MethodConfig):
    rounds: int = Field(3, ge=1, le=30, description="Prune-and-rewind rounds.")
    prune_per_round: float = Field(0.2, gt=0, lt=1, description="Fraction of the remaining "
                                   "weights pruned each round (final sparsity 1-(1-p)^rounds).")
    scope: Literal["global", "layer"] = Field("global", description="One magnitude threshold "
                                              "over all Linears, or the same fraction in each.")
    steps_per_round: int = Field(50, ge=1, le=1_000_000, description="Training steps per round.")
    final_steps: int | None = Field(None, ge=0, le=1_000_000, description="Training steps of the "
                                    "final sparse network (default: steps_per_round).")
    rewind_step: int = Field(0, ge=0, description="Rewind to the weights after this many steps of "
                             "the first round (0: the starting weights).")
    lr: float = Field(5e-5, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    batch_size: int = Field(4, ge=1, le=1024)
    seq_len: int = Field(256, ge=8, le=8192)
    max_minutes: float = Field(60.0, gt=0, le=7 * 24 * 60, description="Wall-clock budget.")
    eval_chunks: int = Field(4, ge=1, le=1024, description="Held-out windows of seq_len tokens "
                             "for the per-round perplexity.")

    @model_validator(mode="after")
    def _rewind_inside_round(self) -> Self:
        if self.rewind_step > self.steps_per_round:
            raise ValueError("rewind_step must not exceed steps_per_round")
        return self

    @property
    def target_sparsity(self) -> float:
        return 1 - (1 - self.prune_per_round) ** self.rounds


# ---------------------------------------------------------------- pure tensor functions

def magnitude_prune_step(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                         fraction: float, scope: str) -> dict[str, torch.Tensor]:
    """New keep-masks: prune ``fraction`` of the weights still kept by ``masks`` (smallest |w|
    first, globally or per tensor). Already pruned weights stay pruned."""
    scores = {k: torch.where(masks[k], w.detach().abs().float(), torch.full_like(w, -1.0, dtype=torch.float))
              for k, w in weights.items()}
    if scope == "global":
        total = sum(s.numel() for s in scores.values())
        kept = sum(int(m.sum()) for m in masks.values())
        target = (total - kept + round(kept * fraction)) / total
        return global_threshold_masks(scores, target)
    out = {}
    for k, s in scores.items():
        kept = int(masks[k].sum())
        out[k] = topk_mask(s, (s.numel() - kept + round(kept * fraction)) / s.numel())
    return out


def apply_masks(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, lin in linears.items():
            lin.weight.mul_(masks[k].to(lin.weight.dtype))


# ---------------------------------------------------------------- orchestration

class _OutOfTime(Exception):
    pass


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_tokens(ctx: Context, cfg: LotteryTicketConfig) -> torch.Tensor:
    text = ctx.calibration_text or default_calibration_text()
    ids = tokenize(ctx.tokenizer, text, max_tokens=4096 * cfg.seq_len)
    n = ids.numel() // cfg.seq_len
    if n < 1:
        raise CompressionError(f"training text has fewer than seq_len={cfg.seq_len} tokens")
    return ids[: n * cfg.seq_len].view(n, cfg.seq_len)


def _train(model: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
           data: torch.Tensor, cfg: LotteryTicketConfig, steps: int, gen: torch.Generator,
           device: torch.device, deadline: float, ctx: Context,
           on_step: Callable[[int], None] | None = None) -> list[float]:
    """AdamW on the causal LM loss; masked weights get no gradient and are re-zeroed after every
    step. Returns the per-step losses. Raises _OutOfTime past the deadline."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    dev_masks = {k: m.to(device) for k, m in masks.items()}
    model.train()
    losses = []
    for step in range(steps):
        if time.monotonic() > deadline:
            raise _OutOfTime
        ctx.check_cancelled()
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
        batch = data[idx].to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for k, lin in linears.items():
            if lin.weight.grad is not None:
                lin.weight.grad.mul_(dev_masks[k])
        opt.step()
        apply_masks(linears, dev_masks)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return losses


def apply(model: nn.Module, cfg: LotteryTicketConfig, ctx: Context) -> CompressionResult:
    if ctx.tokenizer is None:
        raise CompressionError("lottery_ticket needs the model's tokenizer to train on text")
    t0 = time.monotonic()
    deadline = t0 + cfg.max_minutes * 60
    device = ctx.device
    home = next(model.parameters()).device
    model.to(device)
    gen = torch.Generator().manual_seed(ctx.seed)
    data = _train_tokens(ctx, cfg)
    eval_text = ctx.eval_text or default_eval_text()

    def held_out() -> float:
        return perplexity(model, ctx.tokenizer, eval_text, seq_len=cfg.seq_len, num_chunks=cfg.eval_chunks)

    linears = prunable_linears(model)
    masks = {k: torch.ones_like(lin.weight, dtype=torch.bool) for k, lin in linears.items()}
    final_steps = cfg.steps_per_round if cfg.final_steps is None else cfg.final_steps
    total_steps = cfg.rounds * cfg.steps_per_round + final_steps
    done_steps = 0
    ppl0 = held_out()
    ctx.event("round", {"round": 0, "phase": "start", "sparsity": linear_sparsity(model), "ppl": ppl0})

    rewind = _snapshot(model) if cfg.rewind_step == 0 else None
    best: dict[str, Any] | None = None  # most advanced fully trained sparse state
    history = []
    stopped_early = False

    def progress(step_in_phase: int) -> None:
        ctx.progress(min(1.0, (done_steps + step_in_phase) / total_steps), None)

    try:
        for r in range(cfg.rounds + 1):
            final = r == cfg.rounds
            steps = final_steps if final else cfg.steps_per_round
            t_round = time.monotonic()
            sparsity_trained = linear_sparsity(model)

            def on_step(s: int, _r: int = r) -> None:
                nonlocal rewind
                if _r == 0 and rewind is None and s == cfg.rewind_step:
                    rewind = _snapshot(model)
                progress(s)

            losses = _train(model, linears, masks, data, cfg, steps, gen, device, deadline, ctx, on_step)
            done_steps += steps
            ppl = held_out()
            rec = {
                "round": r + 1 if not final else "final",
                "sparsity": sparsity_trained,
                "steps": steps,
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "loss_mean_first10": sum(losses[:10]) / max(1, len(losses[:10])) if losses else None,
                "loss_mean_last10": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
                "ppl": ppl,
                "seconds": time.monotonic() - t_round,
            }
            best = {"state": _snapshot(model), "sparsity": sparsity_trained, "ppl": ppl,
                    "round": rec["round"]}
            if final:
                history.append(rec)
                ctx.event("round", rec)
                break
            # prune p of the remaining weights by the trained magnitudes, rewind the survivors
            masks = magnitude_prune_step({k: lin.weight for k, lin in linears.items()}, masks,
                                         cfg.prune_per_round, cfg.scope)
            assert rewind is not None
            model.load_state_dict(rewind)
            apply_masks(linears, masks)
            rec["sparsity_after_prune"] = linear_sparsity(model)
            history.append(rec)
            ctx.event("round", rec)
    except _OutOfTime:
        stopped_early = True
        ctx.event("stopped", {"reason": "max_minutes", "minutes": cfg.max_minutes,
                              "kept_round": best["round"] if best else 0})
    if stopped_early:
        if best is not None:
            model.load_state_dict(best["state"])
        else:  # not even the first round finished: the rewound starting weights, unpruned
            if rewind is not None:
                model.load_state_dict(rewind)
    model.eval()
    model.to(home)
    metrics = {
        "sparsity_linear": linear_sparsity(model),
        "params": float(param_count(model)),
        "nonzero_params": float(nonzero_count(model)),
        "ppl_before": ppl0,
        "ppl_after": best["ppl"] if best else ppl0,
        "rounds_completed": float(sum(1 for h in history if h["round"] != "final")),
        "stopped_early": float(stopped_early),
        "train_seconds": time.monotonic() - t0,
    }
    for k, v in metrics.items():
        ctx.metric(k, v, None)
    return CompressionResult(model=model, metrics=metrics)


def _validate(cfg: LotteryTicketConfig, model_config: Any) -> None:
    from ..models import CAUSAL, model_kind

    if model_config is not None and model_kind(model_config) != CAUSAL:
        raise CompressionError("lottery_ticket trains with a causal language-model loss: it needs a "
                               "causal LM (decoder), not an encoder (model type "
                               f"{getattr(model_config, 'model_type', None)!r})")
    if not math.isfinite(cfg.target_sparsity):
        raise CompressionError("bad sparsity schedule")


METHOD = Method(
    name="lottery_ticket",
    config=LotteryTicketConfig,
    apply=apply,
    description="Lottery ticket: iterative magnitude pruning with rewinding; trains the model on "
    "the job's text each round (causal LM loss), then trains the final sparse network.",
    family="pruning",
    needs_calibration=True,
    prefers_gpu=True,
    validate=_validate,
)
