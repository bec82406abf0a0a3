"""compression/evaluation.py: the measurements every job records."""

from __future__ import annotations

import math

import pytest
import torch

from modelpress.compression import evaluation as E
from modelpress.compression.data import default_eval_text, token_chunks


def test_perplexity_is_the_mean_token_nll_whatever_the_batch(tiny_llama, tiny_tokenizer):
    """exp(mean NLL of every next token over the windows), computed here token by token in
    float64, and the same for any batch size (the loss is taken one window at a time)."""
    torch.manual_seed(0)
    model = tiny_llama.eval()
    text = default_eval_text()
    chunks = token_chunks(tiny_tokenizer, text, 6, 64)
    with torch.no_grad():
        logp = model(input_ids=chunks).logits.double().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, chunks[:, 1:, None]).sum().item()
    ref = math.exp(nll / chunks[:, 1:].numel())
    for bs in (1, 4, 6):
        got = E.perplexity(model, tiny_tokenizer, text, seq_len=64, num_chunks=6, batch_size=bs)
        assert got == pytest.approx(ref, rel=1e-5)
