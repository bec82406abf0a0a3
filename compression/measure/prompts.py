"""Behaviour diff on the user's prompts: how the compressed model's next-token distribution
and greedy continuation differ from the dense model's, prompt by prompt.

A prompt set is JSONL, one ``{"prompt": "..."}`` per line. Per prompt the report gives the KL
divergence KL(dense || compressed) of the next-token distributions after the prompt, whether
the two models' top-1 next tokens agree, and the greedy continuations before and after where
they differ; the most changed prompts first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base import hf
from .jsonl import records, text_field

MAX_PROMPTS = 200
NEW_TOKENS = 24
WHAT = "prompt set"


def parse_prompts(text: str) -> list[str]:
    return [text_field(rec, ("prompt",), WHAT, n) for n, rec in records(text, WHAT, MAX_PROMPTS)]


@dataclass
class Behaviour:
    """One model's answers: next-token log-probs ``[n, vocab]`` and greedy continuations."""

    logprobs: torch.Tensor
    continuations: list[str]


def _prompt_ids(tokenizer: Any, prompt: str, dev: torch.device) -> torch.Tensor:
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos] + ids
    return torch.tensor([ids], device=dev)


@torch.no_grad()
def behaviour(model: nn.Module, tokenizer: Any, prompts: list[str],
              new_tokens: int = NEW_TOKENS) -> Behaviour:
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows, conts = [], []
    for p in prompts:
        ids = _prompt_ids(tokenizer, p, dev)
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        rows.append(torch.log_softmax(logits, -1).cpu())
        out = hf(model).generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
        conts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return Behaviour(torch.stack(rows), conts)


def diff(prompts: list[str], before: Behaviour, after: Behaviour) -> dict[str, Any]:
    """Per-prompt KL, top-1 agreement and changed continuations; most changed first."""
    p, q = before.logprobs, after.logprobs
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)
    agree = p.argmax(-1) == q.argmax(-1)
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt, "kl": float(kl[i]), "top1_agree": bool(agree[i]),
                               "continuation_changed": before.continuations[i]
                               != after.continuations[i]}
        if row["continuation_changed"]:
            row["before"] = before.continuations[i]
            row["after"] = after.continuations[i]
        rows.append(row)
    rows.sort(key=lambda r: (-r["kl"], r["top1_agree"]))
    return {"n": len(prompts), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(agree.float().mean()),
            "continuations_changed": sum(r["continuation_changed"] for r in rows),
            "kl_definition": "KL(dense || compressed) of the next-token distribution after "
                             "the prompt, in nats",
            "prompts": rows}
