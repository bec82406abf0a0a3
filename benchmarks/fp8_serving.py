"""FP8 W8A8 served with real FP8 matmuls (``torch._scaled_mm``) against bfloat16, on one device.

Two tables:

1. **Matmuls** at Llama-3.1-8B's Linear shapes (4096 -> 6144 q/k/v, 4096 -> 4096 o,
   4096 -> 28672 gate/up, 14336 -> 4096 down) for 1, 16, 256 and 2048 rows: the bfloat16
   ``F.linear`` against ``fp8_runtime.Fp8Linear`` (activation quantization included), median
   microseconds over ``--reps`` calls after a warm-up, and their ratio.
2. **SmolLM2-135M end to end**: greedy decode tokens/s at batch 1 (16-token prompt, 64 new
   tokens, KV cache) and prefill tokens/s (``--batch`` x 512 tokens, one forward) of the dense
   model in bfloat16, of the ``fp8`` artifact in ``modelpress.runtime.load`` (FP8 matmuls where
   the device has them) and of the same artifact by plain ``from_pretrained`` (compressed-tensors:
   weights dequantized at every forward); rounds alternate the order, median and min..max.

The device is CUDA where there is one, else the CPU; a CPU has no FP8 matmul units
(``torch._scaled_mm`` is emulated there, far slower than bfloat16), so CPU rows say what the
runtime would cost there, not what it is for. Without ``--artifact`` the SmolLM2 test model is
compressed once with ``fp8`` (its defaults: W8A8 dynamic) into ``.cache/test-models``.

    python benchmarks/fp8_serving.py [--rounds 3] [--reps 50] [--batch 8] [--rows 1,16,256,2048]
                                     [--skip-model]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from testmodels import smollm2_dir  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "test-models"
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
ROWS = (1, 16, 256, 2048)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, reps: int) -> float:
    """Median seconds of one call of ``fn``."""
    fn()
    _sync(dev)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def matmul_table(dev: torch.device, reps: int, rows: tuple[int, ...]) -> None:
    from modelpress.compression.quantization import fp8_runtime as R
    from modelpress.compression.quantization import fpformats as F

    print(f"\nmatmuls, {dev} (median of {reps}; fp8 includes quantizing the activations)")
    print(f"{'shape':<22}{'rows':>6}{'bf16 us':>12}{'fp8 us':>12}{'bf16/fp8':>10}")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device=dev) * 0.02
        q, s = F.fp8_channel(w)
        lin = R.Fp8Linear(q, s, always_scaled_mm=True)
        wb = w.bfloat16()
        del w
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            tb = _time(lambda x=x, wb=wb: torch.nn.functional.linear(x, wb), dev, reps)
            tf = _time(lambda x=x, lin=lin: lin(x), dev, reps)
            print(f"{name + f' {k}x{n}':<22}{m:>6}{tb * 1e6:>12.1f}{tf * 1e6:>12.1f}"
                  f"{tb / tf:>10.2f}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def make_artifact() -> Path:
    from modelpress.compression import Context, compress, parse_params
    from modelpress.compression.models import load_pretrained, save_model

    out = CACHE / "smollm2-fp8"
    if (out / "config.json").is_file():
        return out
    lm = load_pretrained(smollm2_dir())
    res = compress(lm.model, parse_params("fp8", {}), Context(tokenizer=lm.tokenizer))
    save_model(res.model, lm.tokenizer, out, saver=res.saver)
    return out


def _load(mode: str, artifact: Path, dev: torch.device):
    from transformers import AutoModelForCausalLM

    from modelpress import runtime

    if mode == "fp8 runtime":
        return runtime.load(artifact, dtype=torch.bfloat16, device=dev)
    src = smollm2_dir() if mode == "bf16 dense" else artifact
    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval().to(dev)


def model_table(dev: torch.device, artifact: Path, rounds: int, batch: int) -> None:
    from modelpress.compression.quantization import fp8_runtime as R

    modes = ["bf16 dense", "fp8 runtime", "fp8 from_pretrained"]
    models = {m: _load(m, artifact, dev) for m in modes}
    print(f"\nSmolLM2-135M, {dev}: fp8 runtime Linears on torch._scaled_mm: "
          f"{R.runtime_linears(models['fp8 runtime'])}")
    prompt = torch.randint(100, 20000, (1, 16), device=dev)
    block = torch.randint(100, 20000, (batch, 512), device=dev)
    decode: dict[str, list[float]] = {m: [] for m in modes}
    prefill: dict[str, list[float]] = {m: [] for m in modes}
    with torch.inference_mode():
        for r in range(rounds):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                model = models[m]
                decode[m].append(64 / _time(lambda model=model: model.generate(
                    input_ids=prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False),
                    dev, 1))
                prefill[m].append(batch * 512 / _time(lambda model=model: model(input_ids=block),
                                                      dev, 1))
    print(f"{'mode':<22}{'decode tok/s':>14}{'(min..max)':>20}{'prefill tok/s':>15}{'(min..max)':>22}")
    for m in modes:
        d, p = decode[m], prefill[m]
        print(f"{m:<22}{statistics.median(d):>14.1f}{f'{min(d):.1f}..{max(d):.1f}':>20}"
              f"{statistics.median(p):>15.0f}{f'{min(p):.0f}..{max(p):.0f}':>22}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="prefill sequences of 512 tokens")
    ap.add_argument("--artifact", type=Path, help="an fp8 artifact of SmolLM2 (default: made once)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="matmul rows to time")
    ap.add_argument("--skip-model", action="store_true", help="matmul table only")
    a = ap.parse_args()
    from modelpress.compression.quantization.fp8_runtime import native_fp8

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    print(f"fp8 serving: {name}, native FP8 matmuls: {native_fp8(dev)}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, commit {commit}, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    matmul_table(dev, a.reps, tuple(int(r) for r in a.rows.split(",")))
    if not a.skip_model:
        model_table(dev, a.artifact or make_artifact(), a.rounds, a.batch)


if __name__ == "__main__":
    main()
