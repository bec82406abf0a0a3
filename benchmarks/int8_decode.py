"""Greedy decode tokens/s at batch 1 (``evaluation.tokens_per_second``: plain ``generate``, KV
cache, 64 new tokens, best of 2) of SmolLM2-135M: fp32 vs the int8_dynamic CPU runtime, each
eager and with ``compile_decode`` (torch.compile of the decode step, static KV cache).

Each mode runs in its own process; the rounds alternate the modes (timings on a shared CPU move
by +-10%). The first ``tokens_per_second`` call of a compiled mode includes compiling (once:
its warm-up runs at the measured length, so that the static cache keeps one size).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/int8_decode.py [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODES = ["fp32", "int8", "fp32-compile", "int8-compile"]


def run_mode(mode: str, model_dir: str, threads: int, repeats: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from modelpress.compression.evaluation import tokens_per_second
    from modelpress.compression.quantization import int8_dynamic

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    compiled = mode.endswith("-compile")
    if mode.startswith("int8"):
        int8_dynamic.to_runtime(m, compile=compiled)
    elif compiled:
        int8_dynamic.compile_decode(m)
    with torch.no_grad():
        t = time.perf_counter()
        tokens_per_second(m)
        first = time.perf_counter() - t
        rates = [tokens_per_second(m) for _ in range(repeats)]
    print(f"| {mode} | {first:.1f} | {' '.join(f'{r:.2f}' for r in rates)} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", ".cache",
                                                    "test-models", "smollm2-135m-fp32"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.mode:
        run_mode(args.mode, args.model, args.threads, args.repeats)
        return
    print("| mode | first call s (incl. compile) | tok/s |\n|---|---|---|", flush=True)
    for _ in range(args.rounds):
        for mode in args.modes:
            subprocess.run([sys.executable, __file__, "--mode", mode, "--model", args.model,
                            "--threads", str(args.threads), "--repeats", str(args.repeats)],
                           check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
