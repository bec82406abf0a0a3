"""Decode-time matmul kernels on the CPU, one token, weights that do not fit the cache.

Every decoder layer of SmolLM2-135M has Linears of these (out, in) shapes: q/k/v fused 960x576,
o 576x576, gate/up fused 3072x576, down 576x1536. The script makes ``--layers`` separate copies
of them (30 by default: more bytes than the last-level cache, as in a real decode step) and
cycles through them, timing each kernel per "token" (one pass over every layer):

- fp32 ``F.linear`` (the float model),
- oneDNN ``qlinear_pointwise`` on weights reordered by ``qlinear_prepack`` (int8_dynamic's CPU
  runtime where it is faster),
- ``torch._int_mm`` on the [out, in] int8 weight read transposed (its fallback).

    python benchmarks/int8_matmul.py [--threads 1] [--layers 30]

Prints a markdown table: ms per token, weight bytes streamed per second, x fp32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def _time_per_token(objs: list[list[Any]], call: Callable[[Any, int], Any], reps: int) -> float:
    for _ in range(2):  # warm-up (first-call allocations, oneDNN primitive creation)
        for layer in objs:
            for (_, k), o in zip(SHAPES, layer):
                call(o, k)
    t = time.perf_counter()
    for _ in range(reps):
        for layer in objs:
            for (_, k), o in zip(SHAPES, layer):
                call(o, k)
    return (time.perf_counter() - t) / reps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_weights = args.layers * sum(n * k for n, k in SHAPES)
    xf = {k: torch.randn(1, k) for _, k in SHAPES}
    xq = {k: torch.randint(-127, 128, (1, k), dtype=torch.int8) for _, k in SHAPES}

    def int8_weights() -> list[list[torch.Tensor]]:
        return [[torch.randint(-127, 128, (n, k), dtype=torch.int8) for n, k in SHAPES]
                for _ in range(args.layers)]

    rows = []
    fp32 = [[torch.randn(n, k) for n, k in SHAPES] for _ in range(args.layers)]
    t = _time_per_token(fp32, lambda w, k: torch.nn.functional.linear(xf[k], w), args.reps)
    rows.append(("fp32 F.linear", t, 4))
    del fp32
    if hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack"):
        packed = [[(torch.ops.onednn.qlinear_prepack(w, [1, w.shape[1]]),
                    torch.rand(w.shape[0]) / 100, torch.zeros(w.shape[0], dtype=torch.int64))
                   for w in layer] for layer in int8_weights()]
        t = _time_per_token(packed, lambda o, k: torch.ops.onednn.qlinear_pointwise(
            xq[k], 0.01, 0, o[0], o[1], o[2], None, 1.0, 0, torch.float32, "none", [], ""),
            args.reps)
        rows.append(("int8 oneDNN qlinear_pointwise", t, 1))
        del packed
    q = int8_weights()
    t = _time_per_token(q, lambda w, k: torch._int_mm(xq[k], w.t()), args.reps)
    rows.append(("int8 torch._int_mm", t, 1))
    base = rows[0][1]
    print(f"{args.layers} layers x {len(SHAPES)} matmuls, {n_weights / 1e6:.0f}M weights, "
          f"{args.threads} thread(s), batch 1")
    print("| kernel | ms per token | GB/s of weights | x fp32 speed |")
    print("|---|---:|---:|---:|")
    for name, t, nbytes in rows:
        print(f"| {name} | {t * 1e3:.2f} | {n_weights * nbytes / t / 1e9:.1f} | {base / t:.2f} |")


if __name__ == "__main__":
    main()
