"""How much of int8's perplexity change on SmolLM2-135M is its rounding error's size, and how much
its sign: every Linear but the (tied) head moved by ``alpha`` times the error of the ``int8``
default (symmetric per-channel rounding), and by the error of finer per-channel grids.

For each text the perplexity ratio to dense and the mean KL divergence of the next-token
distributions (dense || moved) per token. From the +alpha and -alpha rows the change in log
perplexity splits into an even part (second order: what the error's size costs whatever its sign)
and an odd part (first order: the gradient of the text's loss along the error, which changes sign
with it). Texts as in ``domains.py``.

    python benchmarks/int8_sensitivity.py [--windows 16] [--text NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from domains import load_texts
from testmodels import smollm2_dir

from modelpress.compression.evaluation import token_chunks
from modelpress.compression.models import load_pretrained
from modelpress.compression.quantization.qtensor import quantize_weight

Move = Callable[[torch.Tensor], torch.Tensor]


def int8_error(alpha: float) -> Move:
    """``w`` plus ``alpha`` times the ``int8`` default's rounding error."""
    return lambda w: w + alpha * (quantize_weight(w, 8, None, True, mse=False).dequantize() - w)


def per_channel(bits: int) -> Move:
    """Symmetric per-channel rounding on ``2**(bits-1) - 1`` steps either side of zero."""
    def move(w: torch.Tensor) -> torch.Tensor:
        s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
        return torch.round(w / s) * s
    return move


ROWS: list[tuple[str, Move]] = [
    ("int8 default error x +1", int8_error(1.0)),
    ("int8 default error x -1", int8_error(-1.0)),
    ("int8 default error x +0.5", int8_error(0.5)),
    ("int8 default error x -0.5", int8_error(-0.5)),
    ("per channel, 8 bits on amax/127", per_channel(8)),
    ("per channel, 9 bits", per_channel(9)),
    ("per channel, 10 bits", per_channel(10)),
]


def window_logprobs(model: torch.nn.Module, chunks: torch.Tensor
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: the next-token log-probabilities ``[seq - 1, vocab]`` and the tokens."""
    for i in range(len(chunks)):
        with torch.no_grad():
            logits = model(input_ids=chunks[i : i + 1]).logits[0, :-1].float()
        yield F.log_softmax(logits, -1), chunks[i, 1:]


def nll(lp: torch.Tensor, y: torch.Tensor) -> float:
    return -lp.gather(1, y[:, None]).sum().item()


def moved(base: torch.nn.Module, move: Move) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            mod.weight.data = move(mod.weight.data)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16, help="512-token windows per text (at most)")
    ap.add_argument("--text", action="append", default=[], metavar="NAME=PATH")
    args = ap.parse_args()
    texts = load_texts(args.text)
    lm = load_pretrained(smollm2_dir())
    base, tok = lm.model.eval(), lm.tokenizer
    chunks = {k: token_chunks(tok, t, min(args.windows, len(tok(t)["input_ids"]) // 512), 512)
              for k, t in texts.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    print(f"int8 sensitivity: SmolLM2-135M float32, up to {args.windows} x 512 tokens per text, "
          f"{os.cpu_count()} CPUs, commit {commit}, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    dense: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dense_nll: dict[str, float] = {}
    tokens = {k: c[:, 1:].numel() for k, c in chunks.items()}
    for k, c in chunks.items():  # NLL in float32, the log-probabilities kept in bfloat16
        dense[k], total = [], 0.0
        for lp, y in window_logprobs(base, c):
            total += nll(lp, y)
            dense[k].append((lp.to(torch.bfloat16), y))
        dense_nll[k] = total / tokens[k]
    print("dense perplexity: " + ", ".join(f"{k} {math.exp(v):.3f}" for k, v in dense_nll.items()))
    head = f"{'moved by':<34}" + "".join(f"{k + ' ratio':>14}{'KL e-3':>8}" for k in texts)
    print(head + "\n" + "-" * len(head))
    delta: dict[str, dict[str, float]] = {}
    for label, move in ROWS:
        model = moved(base, move)
        cells = ""
        for k, c in chunks.items():
            total = kl = 0.0
            for (lq, y), (ld, _) in zip(window_logprobs(model, c), dense[k]):
                total += nll(lq, y)
                kl += (ld.float().exp() * (ld.float() - lq)).sum().item()
            delta.setdefault(label, {})[k] = total / tokens[k] - dense_nll[k]
            cells += f"{math.exp(delta[label][k]):>14.5f}{kl / tokens[k] * 1e3:>8.3f}"
        print(f"{label:<34}{cells}", flush=True)
    for a in ("1", "0.5"):
        plus, minus = delta[f"int8 default error x +{a}"], delta[f"int8 default error x -{a}"]
        print(f"x{a}: even part (second order), odd part (first order) of the log-perplexity "
              "change, e-3 nats: " + ", ".join(
                  f"{k} {(plus[k] + minus[k]) / 2 * 1e3:+.2f} / {(plus[k] - minus[k]) / 2 * 1e3:+.2f}"
                  for k in texts))


if __name__ == "__main__":
    main()
