"""The user's tasks, scored by log-likelihood (what lm-evaluation-harness's ``loglikelihood``
requests compute, done here without the harness or any hub access).

A task set is JSONL, one task per line, either

* multiple choice: ``{"question": ..., "choices": [...], "gold": <index>}`` (``context`` may
  stand for ``question``): correct when the gold choice has the highest log-likelihood as a
  continuation of the question (lm-eval's ``acc``), or
* prompt + expected completion: ``{"prompt": ..., "expected": ...}`` (or ``completion``):
  correct when every token of the expected completion is the model's greedy choice given
  what precedes it (lm-eval's ``is_greedy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .jsonl import DatasetFormatError, records, text_field

MAX_TASKS = 2000
MAX_CHOICES = 16
WHAT = "task set"


@dataclass(frozen=True)
class Task:
    context: str
    choices: tuple[str, ...] = ()
    gold: int = 0
    expected: str | None = None

    @property
    def kind(self) -> str:
        return "completion" if self.expected is not None else "multiple_choice"


def _choice_task(rec: dict[str, Any], n: int) -> Task:
    ctx = text_field(rec, ("question", "context"), WHAT, n)
    choices = rec["choices"]
    if (not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)):
        raise DatasetFormatError(f"{WHAT} line {n}: 'choices' must be a list of 2 to "
                                 f"{MAX_CHOICES} non-empty strings")
    gold = rec.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DatasetFormatError(f"{WHAT} line {n}: 'gold' must be the index of the right "
                                 f"choice (0 to {len(choices) - 1})")
    return Task(ctx, tuple(choices), gold)


def parse_tasks(text: str) -> list[Task]:
    """Parse a task set; :class:`DatasetFormatError` names the first bad line."""
    out: list[Task] = []
    for n, rec in records(text, WHAT, MAX_TASKS):
        if "choices" in rec:
            out.append(_choice_task(rec, n))
        elif "prompt" in rec:
            out.append(Task(text_field(rec, ("prompt",), WHAT, n),
                            expected=text_field(rec, ("expected", "completion"), WHAT, n)))
        else:
            raise DatasetFormatError(f"{WHAT} line {n}: a task has 'question' + 'choices' + "
                                     "'gold' (multiple choice) or 'prompt' + 'expected'")
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _join(context: str, continuation: str) -> str:
    """lm-eval's target delimiter: one space unless either side already has whitespace."""
    if continuation[:1].isspace() or context[-1:].isspace():
        return continuation
    return " " + continuation


@torch.no_grad()
def continuation_loglik(model: nn.Module, tokenizer: Any, context: str,
                        continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | preceding text), whether each is the argmax)."""
    ctx = _ids(tokenizer, context)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ctx = [bos] + ctx
    cont = _ids(tokenizer, continuation)
    if not cont:
        return 0.0, True
    max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    ids = (ctx + cont)[-max_len:]
    n = len(cont)
    dev = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0]
    logp = torch.log_softmax(logits[-n - 1:-1].float(), dim=-1)
    target = torch.tensor(ids[-n:], device=logp.device)
    ll = logp.gather(1, target[:, None]).sum().item()
    greedy = bool((logp.argmax(-1) == target).all().item())
    return ll, greedy


def task_correct(model: nn.Module, tokenizer: Any, task: Task) -> bool:
    if task.expected is not None:
        return continuation_loglik(model, tokenizer, task.context,
                                   _join(task.context, task.expected))[1]
    lls = [continuation_loglik(model, tokenizer, task.context, _join(task.context, c))[0]
           for c in task.choices]
    return max(range(len(lls)), key=lls.__getitem__) == task.gold


def evaluate(model: nn.Module, tokenizer: Any, tasks: list[Task]) -> dict[str, Any]:
    """Accuracy over the set and per kind, and which tasks were right (in order)."""
    was_training = model.training
    model.eval()
    correct = [task_correct(model, tokenizer, t) for t in tasks]
    model.train(was_training)
    out: dict[str, Any] = {"n": len(tasks), "accuracy": sum(correct) / len(tasks),
                           "correct": correct}
    for kind in ("multiple_choice", "completion"):
        sel = [c for c, t in zip(correct, tasks) if t.kind == kind]
        if sel:
            out[f"accuracy_{kind}"] = sum(sel) / len(sel)
    return out
