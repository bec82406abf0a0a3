"""compression/streaming/estimate.py: a job's peak memory from its config alone."""

from __future__ import annotations

import pytest
import torch

from modelpress.compression.streaming.estimate import (
    STREAM_ENV,
    describe,
    estimate_job,
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
    m8 = estimate_peak_bytes(LLAMA_8B, "heads", {})  # not streamable: the whole model
    assert m8 > 2 * 4 * 8_030_261_248
    g = estimate_peak_bytes(LLAMA_8B, "gptq", {"num_samples": 8, "seq_len": 512})
    # a Hessian and its inverse more (down_proj's: 2 x 822 MB)
    assert g - s8 > 2 * 4 * 14336**2
    assert "needs about" in describe(g, 2**30) and "a worker has 1.0 GiB" in describe(g, 2**30)


GIB = 2**30
GPTQ = {"method": "gptq", "params": {"num_samples": 8, "seq_len": 512}}


def test_job_estimate_streams_where_the_worker_would(monkeypatch):
    monkeypatch.delenv(STREAM_ENV, raising=False)
    e = estimate_job(LLAMA_8B, [GPTQ], 23 * GIB)
    assert e.streamed and e.peak_bytes < 8 * GIB  # six float32 copies of down_proj's 822 MB Hessian
    assert e.peak_bytes == estimate_peak_bytes(LLAMA_8B, "gptq", GPTQ["params"], streamed=True)
    # a method that cannot stream, or a recipe of two stages: the model whole
    whole = estimate_job(LLAMA_8B, [{"method": "heads", "params": {}}], 23 * GIB)
    assert not whole.streamed and whole.peak_bytes > 23 * GIB
    two = estimate_job(LLAMA_8B, [{"method": "magnitude", "params": {}}, GPTQ], 23 * GIB)
    assert not two.streamed and two.peak_bytes >= whole.peak_bytes
    # under the threshold (half the memory) but too big whole: streamed all the same
    fp32 = 4 * param_count(LLAMA_8B)
    assert estimate_job(LLAMA_8B, [GPTQ], int(2.1 * fp32)).streamed
    assert not estimate_job(LLAMA_8B, [GPTQ], 4 * fp32).streamed  # fits whole: runs whole
    monkeypatch.setenv(STREAM_ENV, str(fp32 - 1))
    assert estimate_job(LLAMA_8B, [GPTQ], 4 * fp32).streamed


def test_encoders_never_stream():
    bert = dict(model_type="bert", architectures=["BertModel"], hidden_size=1024,
                intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                vocab_size=30522)
    assert not estimate_job(bert, [{"method": "int8", "params": {}}], 2 * GIB).streamed
