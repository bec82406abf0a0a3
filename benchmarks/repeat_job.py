"""What a repeated job on an already-measured model costs: the same job run twice through
``run_pipeline`` with one baseline cache (as a worker runs them), per phase.

For each method (default: magnitude 50 % and int8 on SmolLM2-135M, float32 on this CPU) the first
job measures the source model and stores its numbers; the second finds them in the cache. The
table gives each job's wall seconds per phase (``report["timings"]``: load, before, stages,
save, after, total) and the repeated job's ratio

    total / (stages + after)

where ``stages`` is the method's own time and ``after`` the artifact's measurement (reload,
quality, and with ``--measure full`` the interleaved speed rounds against the dense model).
Goal: <= 1.2 on the repeated job.

    python benchmarks/repeat_job.py [--methods magnitude,int8] [--measure full|quality]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from testmodels import smollm2_dir

PARAMS = {"magnitude": {"sparsity": 0.5}, "int8": {}, "rtn": {}, "int8_dynamic": {},
          "wanda": {}, "gptq": {}}
PHASES = ("load", "before", "stages", "save", "after", "total")


def one_job(src: Path, method: str, measure: str, cache: Path) -> dict[str, float]:
    from modelpress.compression.pipeline import run_pipeline

    with tempfile.TemporaryDirectory(prefix="repeat-job-") as d:
        out = run_pipeline(src, [{"method": method, "params": PARAMS.get(method, {})}],
                           Path(d) / "out", measure=measure, baseline_cache=cache, device="cpu")
    t = {k.removesuffix("_s"): v for k, v in out.report["timings"].items()}
    t["reused"] = float("baseline" in out.report["evaluation"]
                        and out.report["evaluation"]["baseline"].get("reused", False))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="magnitude,int8")
    ap.add_argument("--measure", default="full", choices=["full", "quality"])
    args = ap.parse_args()
    import torch

    src = smollm2_dir()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    print(f"repeat-job benchmark: SmolLM2-135M float32, measure={args.measure}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M')} UTC, load {os.getloadavg()[0]:.1f}")
    head = f"{'method':<12} {'job':<9}" + "".join(f"{p:>9}" for p in PHASES) + \
        f"{'reused':>8}{'ratio':>8}"
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory(prefix="repeat-job-cache-") as cache:
        for method in args.methods.split(","):
            for label in ("first", "repeated"):
                t = one_job(src, method, args.measure, Path(cache))
                ratio = t["total"] / max(1e-9, t.get("stages", 0) + t.get("after", 0))
                print(f"{method:<12} {label:<9}" + "".join(f"{t.get(p, 0):>9.1f}" for p in PHASES)
                      + f"{'yes' if t['reused'] else 'no':>8}{ratio:>8.2f}", flush=True)
    print(f"\nratio = total / (stages + after); goal <= 1.2 on the repeated job. "
          f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
