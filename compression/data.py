"""Text for calibration and evaluation, and turning it into token batches.

The project ships two disjoint slices of WikiText-2 (validation split, CC BY-SA 3.0):
``calibration.txt`` (first ~55%) and ``eval.txt`` (the rest, a held-out text for perplexity).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import torch


@cache
def default_calibration_text() -> str:
    return resources.files(__package__).joinpath("data/calibration.txt").read_text("utf-8")


@cache
def default_eval_text() -> str:
    return resources.files(__package__).joinpath("data/eval.txt").read_text("utf-8")


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of token ids for ``text`` (tokenised in pieces to bound memory)."""
    ids: list[int] = []
    step = 200_000
    for i in range(0, len(text), step):
        ids.extend(tokenizer(text[i : i + step], add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    t = torch.tensor(ids, dtype=torch.long)
    return t[:max_tokens] if max_tokens is not None else t


def token_chunks(tokenizer: Any, text: str, num: int, seq_len: int) -> torch.Tensor:
    """``[num, seq_len]`` consecutive, non-overlapping chunks from the start of ``text``.
    Deterministic (no shuffling), so runs are comparable. Fewer rows if the text is short."""
    ids = tokenize(tokenizer, text, max_tokens=num * seq_len)
    n = min(num, ids.numel() // seq_len)
    if n == 0:
        raise ValueError(f"text too short for one chunk of {seq_len} tokens")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def self_generated_text(model: Any, tokenizer: Any, num: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """Data-free calibration: sample ``num`` sequences from the model itself."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 32000)
    bos = getattr(model.config, "bos_token_id", None)
    starts = torch.randint(0, vocab, (num, 1), generator=g)
    if bos is not None:
        starts = torch.cat([torch.full((num, 1), bos), starts], dim=1)
    out = model.generate(starts.to(dev), max_new_tokens=seq_len - starts.shape[1], do_sample=True,
                         top_k=50, min_new_tokens=seq_len - starts.shape[1], pad_token_id=0)
    ids: torch.Tensor = out[:, :seq_len].cpu()
    return ids
