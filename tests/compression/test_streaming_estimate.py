"""compression/streaming/estimate.py: a job's peak memory from its config alone."""

from __future__ import annotations

import pytest
import torch

from modelpress.compression.streaming.estimate import (
    describe,
    estimate_peak_bytes,
    param_count,
)

from ..conftest import make_tiny_llama

LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                vocab_size=128256, tie_word_embeddings=False, dtype="bfloat16")


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False},
                                       {"num_key_value_heads": 4, "intermediate_size": 96}])
def test_param_count_matches_the_model(overrides):
    model = make_tiny_llama(**overrides)
    n = sum(p.numel() for p in model.parameters())  # tied weights once
    assert param_count(model.config) == n


def test_param_count_of_llama_3_1_8b():
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**LLAMA_8B)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    assert param_count(LLAMA_8B) == sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_streamed_estimate_is_flat_in_depth_and_in_memory_is_not():
    deep = {**LLAMA_8B, "num_hidden_layers": 64}
    s8, s16 = estimate_peak_bytes(LLAMA_8B, "int8"), estimate_peak_bytes(deep, "int8")
    assert s8 == s16 < 3 * 2**30  # one block at a time: the 8B goal is 3 GB
    m8 = estimate_peak_bytes(LLAMA_8B, "wanda", {})  # not streamable: the whole model
    assert m8 > 2 * 4 * 8_030_261_248
    g = estimate_peak_bytes(LLAMA_8B, "gptq", {"num_samples": 8, "seq_len": 512})
    # a Hessian and its inverse more (down_proj's: 2 x 822 MB)
    assert g - s8 > 2 * 4 * 14336**2
    assert "needs about" in describe(g, 2**30) and "a worker has 1.0 GiB" in describe(g, 2**30)
