"""Quality of method variants on texts of several domains: each variant applied in memory to
SmolLM2-135M (float32) with ``compress`` (default calibration text), perplexity as a ratio to
the dense model on every text.

Texts: the shipped held-out eval text (``wiki``, the calibration domain), the shipped text of
another domain (``kjv``), and any ``--text NAME=PATH`` (e.g. ``gpl3=/usr/share/common-licenses/GPL-3``,
added by default where that file exists). Variants: ``--variants int8,fp8`` picks groups from
VARIANTS below.

    python benchmarks/domains.py [--windows 16] [--variants int8,fp8] [--text NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import time
from pathlib import Path

import torch
from testmodels import smollm2_dir

from modelpress.compression import Context, compress, parse_params
from modelpress.compression.data import default_eval_text
from modelpress.compression.evaluation import perplexity
from modelpress.compression.measure.quality import other_domain_text
from modelpress.compression.models import load_pretrained

PLAIN8 = {"bits": 8, "group_size": None, "awq_scaling": False, "mse_clip": False,
          "refit_scales": False}
VARIANTS = {
    "int8": [
        ("int8 default (symmetric, per channel)", "int8", {}),
        ("int8 symmetric, group 192", "int8", {"group_size": 192}),
        ("int8 symmetric, group 64", "int8", {"group_size": 64}),
        ("gptq 8 bits per channel, plain", "gptq", PLAIN8),
        ("gptq 8 bits per channel, plain, dampening 0.01", "gptq", {**PLAIN8, "dampening": 0.01}),
    ],
    "int8grid": [
        ("int8 asymmetric, per channel", "int8", {"symmetric": False}),
        ("int8 symmetric, per channel, MSE clipping", "int8", {"mse_clip": True}),
        ("int8 symmetric, group 32", "int8", {"group_size": 32}),
        ("int8 asymmetric, group 64", "int8", {"group_size": 64, "symmetric": False}),
        ("int8 asymmetric, group 32", "int8", {"group_size": 32, "symmetric": False}),
    ],
    "int8awq": [
        ("int8 default (symmetric, per channel)", "int8", {}),
        ("awq 8 bits per channel, no MSE clip", "awq",
         {"bits": 8, "group_size": None, "mse_clip": False}),
        ("awq 8 bits per channel, no MSE clip, search_clip 1.0", "awq",
         {"bits": 8, "group_size": None, "mse_clip": False, "search_clip": 1.0}),
    ],
    "fp8gptq": [
        ("fp8 gptq, dampening 0.01 (its default)", "fp8", {"gptq": True}),
        ("fp8 gptq, dampening 0.1", "fp8", {"gptq": True, "dampening": 0.1}),
        ("fp8 gptq, dampening 0.3", "fp8", {"gptq": True, "dampening": 0.3}),
        ("fp8 gptq, dampening 1.0", "fp8", {"gptq": True, "dampening": 1.0}),
    ],
    "fp8block": [
        ("fp8 block [64, 64] (activations per 64-group)", "fp8", {"block": [64, 64]}),
        ("fp8 block [64, 32] (activations per 32-group)", "fp8", {"block": [64, 32]}),
        ("fp8 block [1, 64]", "fp8", {"block": [1, 64]}),
    ],
    "fp8": [
        ("fp8 default (W8A8 dynamic)", "fp8", {}),
        ("fp8 gptq", "fp8", {"gptq": True}),
        ("fp8 kv_cache", "fp8", {"kv_cache": True}),
    ],
}
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def load_texts(specs: list[str]) -> dict[str, str]:
    """The shipped eval text (``wiki``), the shipped text of another domain (``kjv``), the GNU GPL 3
    where this machine has it (``gpl3``), and each ``NAME=PATH`` of ``specs``."""
    texts = {"wiki": default_eval_text(), "kjv": other_domain_text()}
    if GPL3.exists():
        texts["gpl3"] = GPL3.read_text(encoding="utf-8")
    for spec in specs:
        name, path = spec.split("=", 1)
        texts[name] = Path(path).read_text(encoding="utf-8")
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16, help="512-token windows per text (at most)")
    ap.add_argument("--variants", default="int8,fp8")
    ap.add_argument("--text", action="append", default=[], metavar="NAME=PATH")
    args = ap.parse_args()
    texts = load_texts(args.text)
    lm = load_pretrained(smollm2_dir())
    base, tok = lm.model.eval(), lm.tokenizer

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        out = {}
        for k, t in texts.items():
            n = min(args.windows, len(tok(t)["input_ids"]) // 512)
            out[k] = perplexity(model, tok, t, num_chunks=n)
        return out

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    print(f"domains benchmark: SmolLM2-135M float32, up to {args.windows} x 512 tokens per text, "
          f"{os.cpu_count()} CPUs, commit {commit}, {time.strftime('%Y-%m-%d %H:%M')} UTC, "
          f"load {os.getloadavg()[0]:.1f}")
    with torch.no_grad():
        dense = ppl(base)
    print("dense perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in dense.items()))
    head = f"{'variant':<50}{'time':>8}" + "".join(f"{k:>10}" for k in texts)
    print(head)
    print("-" * len(head))
    for group in args.variants.split(","):
        for label, name, params in VARIANTS[group]:
            t0 = time.time()
            res = compress(copy.deepcopy(base), parse_params(name, params), Context(tokenizer=tok))
            dt = time.time() - t0
            with torch.no_grad():
                p = ppl(res.model.eval())
            print(f"{label:<50}{dt:>7.1f}s" + "".join(f"{p[k] / dense[k]:>10.5f}" for k in texts),
                  flush=True)
    print(f"\nratios to dense; load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
