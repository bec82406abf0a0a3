"""Greedy decode tokens/s at batch 1 of an int8_dynamic artifact served as a user serves it
(``modelpress.runtime.load``: plain ``from_pretrained`` + the int8 CPU runtime) vs the fp32
model it was made from (``evaluation.tokens_per_second``: plain ``generate``, KV cache,
``measure.speed.DECODE_NEW_TOKENS`` (64) new tokens after a 16-token prompt, the median of 3
after a warm-up; a job's report times the same decode in its interleaved rounds).

Every measurement is a fresh process with the default threads (``--threads`` to pin them); each
round runs every mode once, in the reverse order of the round before (timings on a shared CPU
move by +-10%, and the later process of a round meets a warmer machine), and the summary is what
a job's report gives (``measure.speed.compare``): each mode's median and min..max over the
rounds, int8 / fp32 per round, and a speed-up only where the spreads do not overlap; with the
load average before and after. Modes: ``fp32``; ``int8`` (the
runtime); ``plain`` (the artifact by plain ``from_pretrained``, weights dequantized to float);
``*-compile``: decode through ``torch.compile`` (static KV cache; the first call compiles).
Without ``--artifact`` the SmolLM2 test model is compressed once with ``modelpress compress
--method int8_dynamic`` (the job's defaults) into ``.cache/test-models``.

    python benchmarks/int8_decode.py [--rounds 3] [--modes fp32 int8 plain] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODES = ["fp32", "int8", "plain", "fp32-compile", "int8-compile"]
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "test-models"


def load_mode(mode: str, model_dir: str, artifact: str):
    import torch
    from transformers import AutoModelForCausalLM

    from modelpress import runtime
    from modelpress.compression.quantization import int8_dynamic

    compiled = mode.endswith("-compile")
    if mode.startswith("int8"):
        return runtime.load(artifact, compile=compiled)
    src = artifact if mode == "plain" else model_dir
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    return int8_dynamic.compile_decode(m) if compiled else m


def run_mode(mode: str, model_dir: str, artifact: str, threads: int | None) -> None:
    import torch

    from modelpress.compression.evaluation import tokens_per_second
    from modelpress.compression.measure.speed import DECODE_NEW_TOKENS

    if threads:
        torch.set_num_threads(threads)
    m = load_mode(mode, model_dir, artifact)
    with torch.inference_mode():
        t = time.perf_counter()
        tokens_per_second(m, new_tokens=DECODE_NEW_TOKENS, repeats=1)  # first call (compiles
        first = time.perf_counter() - t  # a compiled mode)
        rate = tokens_per_second(m, new_tokens=DECODE_NEW_TOKENS)
    print(json.dumps({"mode": mode, "first_s": first, "tokens_per_s": rate,
                      "threads": torch.get_num_threads()}), flush=True)


def make_artifact(model_dir: str) -> str:
    out = CACHE / "smollm2-135m-int8-dynamic"
    if not (out / "report.json").exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, "-m", "modelpress", "compress", model_dir, "--method",
                        "int8_dynamic", "-o", str(tmp), "-q"], check=True)
        tmp.rename(out)
    return str(out)


def child(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model,
           "--artifact", args.artifact] + (["--threads", str(args.threads)] if args.threads else [])
    r = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="float model folder (default: the SmolLM2 test model)")
    ap.add_argument("--artifact", help="int8_dynamic artifact (default: made from --model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--modes", nargs="+", default=["fp32", "int8"], choices=MODES)
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.mode:
        run_mode(args.mode, args.model, args.artifact, args.threads)
        return
    if args.model is None:
        from testmodels import smollm2_dir

        args.model = str(smollm2_dir())
    args.artifact = args.artifact or make_artifact(args.model)
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {m: [] for m in args.modes}
    print("| round | mode | threads | first call s | tok/s |\n|---|---|---|---|---|", flush=True)
    for r in range(args.rounds):
        for mode in round_order(args.modes, r):
            got = child(mode, args)
            rates[mode].append(got["tokens_per_s"])
            print(f"| {r + 1} | {mode} | {got['threads']} | {got['first_s']:.1f} | "
                  f"{got['tokens_per_s']:.2f} |", flush=True)
    for line in summary(rates):
        print(line, flush=True)
    print(f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def round_order(modes: list[str], r: int) -> list[str]:
    """The modes in round ``r``: as given in even rounds, reversed in odd ones."""
    return list(modes) if r % 2 == 0 else list(reversed(modes))


def summary(rates: dict[str, list[float]]) -> list[str]:
    """Per mode its median and min..max; against fp32 (when measured) the report's comparison:
    int8 / fp32 per round and the verdict (a speed-up only where the spreads do not overlap)."""
    from modelpress.compression.measure.speed import compare, spread

    out = []
    for m, v in rates.items():
        s = spread(v)
        line = f"{m}: median {s['median']:.2f} tok/s (min..max {s['min']:.2f}..{s['max']:.2f})"
        if "fp32" in rates and m != "fp32":
            c = compare(rates["fp32"], v)
            ratio = c["compressed"]["median"] / c["dense"]["median"]
            per = " ".join(f"{x:.2f}" for x in c["ratio_per_round"])
            line += f", {ratio:.2f}x fp32 median (per round {per}); {c['verdict']}"
        out.append(line)
    return out


if __name__ == "__main__":
    main()
