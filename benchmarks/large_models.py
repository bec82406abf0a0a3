"""Models larger than memory: streamed jobs on random-weight models with real configs.

Each row is one job (``run_pipeline(..., stream=True)``) in its own process, so its peak RSS is
its own (sampled by the job, and the process's ``ru_maxrss``). The models are written first by
``benchmarks/make_random_model.py`` under .cache/bigmodels (git-ignored) or $MODELPRESS_BIGMODELS:

    python benchmarks/make_random_model.py llama-3.1-8b .cache/bigmodels/llama-3.1-8b-random
    python benchmarks/large_models.py --sizes 8b --methods int8 rtn
    python benchmarks/large_models.py --table results.json      # table + plot of saved rows

After each job the artifact is checked: every tensor's shape and dtype (each block's tensors
against block 0's in-memory quantized reference), loadable by transformers (``from_pretrained``
with ``num_hidden_layers=3``: the first blocks only), and those two blocks' outputs on a few
tokens equal to the block-wise reference (the source's blocks quantized in memory).
Perplexity runs on a short eval text (``--eval-tokens``, default 2 x 512) and as many tokens of
the shipped text of another domain, to bound the time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BIG = Path(os.environ.get("MODELPRESS_BIGMODELS",
                         Path(__file__).resolve().parents[1] / ".cache" / "bigmodels"))
SIZES = {"135m": BIG / "smollm2-135m-random", "1b": BIG / "llama-3.2-1b-random",
         "8b": BIG / "llama-3.1-8b-random"}
METHODS = {
    "int8": ("int8", {}),
    "rtn": ("rtn", {"bits": 4, "group_size": 128}),
    "gptq": ("gptq", {"bits": 4, "group_size": 128, "num_samples": 8, "seq_len": 512}),
    "wanda": ("wanda", {"sparsity": 0.5, "num_samples": 8, "seq_len": 512}),
}
#: weight-only twins of the calibrated methods (for the artifact check)
TWINS = {"gptq": lambda p: ("rtn", {"bits": p["bits"], "group_size": p["group_size"],
                                    "symmetric": p.get("symmetric", True)}),  # gptq's default
         "wanda": lambda p: ("magnitude", {"sparsity": p["sparsity"], "scope": "row"})}
GOALS_GB = {("8b", "int8"): 3.0, ("8b", "rtn"): 3.0, ("8b", "gptq"): 4.0,
            ("1b", "gptq"): 1.5, ("1b", "wanda"): 1.5}


def _eval_text(tokens: int) -> str:
    from transformers import AutoTokenizer

    from modelpress.compression.data import default_eval_text

    tok = AutoTokenizer.from_pretrained(str(SIZES["135m"]))
    text = default_eval_text()
    ids = tok(text[: tokens * 8], add_special_tokens=False)["input_ids"][: tokens + 8]
    return tok.decode(ids)


def _other_text(tokens: int) -> str:
    """The start of the shipped text of another domain, about ``tokens`` tokens long (the job
    measures it too; the whole text would be 16 windows per pass)."""
    from transformers import AutoTokenizer

    from modelpress.compression.measure.job import other_domain_text

    tok = AutoTokenizer.from_pretrained(str(SIZES["135m"]))
    ids = tok(other_domain_text()[: tokens * 8], add_special_tokens=False)["input_ids"]
    return tok.decode(ids[: tokens + 8])


def run_one(size: str, method: str, out: Path, eval_tokens: int, device: str = "cpu") -> dict:
    """One job in this process; returns its row."""
    import torch

    import modelpress.compression.measure.job as MJ
    from modelpress.compression.pipeline import run_pipeline

    other = _other_text(eval_tokens)
    MJ.other_domain_text = lambda: other  # this process only

    name, params = METHODS[method]
    if size == "135m" and params.get("group_size") == 128:  # 576 columns: 64 divides them
        params = {**params, "group_size": 64}
    from modelpress.compression.pipeline import JobHooks

    t0 = time.perf_counter()
    peak = _PeakAt()
    # measure='quality': a model that fits would otherwise be loaded whole for its decode speed
    with peak:
        outcome = run_pipeline(SIZES[size], [{"method": name, "params": params}], out,
                               device=device, stream=True, eval_text=_eval_text(eval_tokens),
                               measure="quality", hooks=JobHooks(progress=peak.progress))
    wall = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the checks
    rep = outcome.report
    row = {
        "size": size, "method": method, "method_params": params,
        "wall_s": wall, "compress_s": rep["stages"][0]["duration_s"],
        "peak_rss_gb": rep["summary"]["peak_rss_bytes"] / 2**30, "device": device,
        "peak_gpu_gb": (rep["summary"]["peak_gpu_bytes"] / 2**30
                        if "peak_gpu_bytes" in rep["summary"] else None),
        "ru_maxrss_gb": maxrss,
        "params": rep["before"]["params"],
        "ppl_before": rep["before"].get("perplexity"), "ppl_after": rep["after"].get("perplexity"),
        "ppl_other_before": rep["before"].get("perplexity_other"),
        "ppl_other_after": rep["after"].get("perplexity_other"),
        "timings": rep.get("timings"),
        "artifact_gb": rep["after"]["bytes"] / 1e9,
        "shards": len(list(out.glob("*.safetensors"))),
        "tokens_per_s_absent": rep["evaluation"].get("tokens_per_s_absent"),
        "torch_threads": torch.get_num_threads(),
        "peak_at": peak.label, "peak_sampled_gb": peak.rss / 2**30,
        "loadavg": list(os.getloadavg()),
    }
    row.update(check_artifact(SIZES[size], out, name, params))
    return row


class _PeakAt:
    """Samples this process's RSS every 0.1 s and keeps the job's progress label at the
    highest sample: where the peak is."""

    def __init__(self) -> None:
        import threading

        self.label, self.rss, self._now = "", 0, "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def progress(self, pct: int, label: str) -> None:
        self._now = f"{pct}% {label}"

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.1):
            rss = me.memory_info().rss
            if rss > self.rss:
                self.rss, self.label = rss, self._now

    def __enter__(self) -> _PeakAt:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _header(out: Path) -> dict[str, tuple[str, list[int]]]:
    import struct

    h: dict[str, tuple[str, list[int]]] = {}
    for f in out.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            for k, v in json.loads(fh.read(n)).items():
                if k != "__metadata__":
                    h[k] = (v["dtype"], v["shape"])
    return h


def check_artifact(src: Path, out: Path, method: str, params: dict) -> dict:
    """Shapes/dtypes of every tensor, a transformers load of the first two blocks, and their
    outputs against the block-wise reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelpress.compression.registry import get_method
    from modelpress.compression.streaming.compress import _BlockRoot, _Output
    from modelpress.compression.streaming.source import LazyCheckpoint, decoder_blocks

    header = _header(out)
    idx = json.loads((out / "model.safetensors.index.json").read_text()) \
        if (out / "model.safetensors.index.json").exists() else None
    # a calibrated method's layout is its weight-only twin's (same format, same bits/groups);
    # its blocks' outputs are compared with that twin's too (so not 0 for gptq/wanda)
    if method in TWINS:
        method, params = TWINS[method](params)
    m = get_method(method)
    cfg = m.config.model_validate(params)
    ids = torch.tensor([[1, 504, 2143, 28, 253, 9000, 77, 3]])
    with LazyCheckpoint(src) as ck, torch.no_grad():
        model = ck.skeleton()
        prefix, blocks = decoder_blocks(model)
        ck.materialize(model, "model.embed_tokens", "cpu", dtype=torch.float32)
        ck.materialize(model, "model.rotary_emb", "cpu")
        h = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        pe = model.model.rotary_emb(h, pos)
        expect: dict[str, tuple[str, list[int]]] = {}
        for i in range(2):
            path = f"{prefix}.{i}"
            block = ck.materialize(model, path, "cpu", dtype=torch.float32)
            root = _BlockRoot(model.config, path, block)
            res = m.apply(root, cfg, _ctx())
            for k, t in _Output.of(res, m.name).tensors(root):
                expect[k] = (_st(t.dtype), list(t.shape))
            h = block(h, position_embeddings=pe, attention_mask=None, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        ref = h
        n_blocks = len(blocks)
    bad = []
    for k, v in header.items():
        mm = re.match(rf"{re.escape(prefix)}\.(\d+)\.(.*)", k)
        if mm:
            want = expect.get(f"{prefix}.0.{mm.group(2)}")
            if want != v:
                bad.append(k)
    per_block = sum(1 for k in expect if k.startswith(f"{prefix}.0."))
    in_blocks = sum(1 for k in header if k.startswith(prefix + "."))
    # three blocks: hidden_states[2] is the second block's output (the last one is normed)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), num_hidden_layers=3,
                                                  dtype=torch.float32)
    with torch.no_grad():
        got = loaded(input_ids=ids, output_hidden_states=True).hidden_states[2]
    err = float(((got - ref).norm() / ref.norm()).item())
    return {"tensors": len(header), "bad_shape_dtype": bad[:5], "n_bad": len(bad),
            "tensors_per_block_ok": in_blocks == per_block * n_blocks,
            "index_ok": idx is None or set(idx["weight_map"]) == set(header),
            "first_two_blocks_rel_err": err}


def _st(dt) -> str:
    import torch

    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int32: "I32", torch.int64: "I64", torch.int8: "I8"}[dt]


def _ctx():
    from modelpress.compression.base import Context

    return Context()


def print_table(rows: list[dict]) -> None:
    print(f"{'size':>5} {'method':>6} {'params':>7} {'compress s':>10} {'job s':>7} "
          f"{'peak RSS GiB':>12} {'goal':>5} {'ppl before':>10} {'ppl after':>10} "
          f"{'artifact GB':>11} {'shards':>6} {'blocks err':>10} {'bad':>4}")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:>5} {r['method']:>6}  FAILED: {r['error'][-300:]}")
            continue
        goal = GOALS_GB.get((r["size"], r["method"]))
        print(f"{r['size']:>5} {r['method']:>6} {r['params'] / 1e9:6.2f}B {r['compress_s']:10.0f} "
              f"{r['wall_s']:7.0f} {r['peak_rss_gb']:12.2f} {goal or '-':>5} "
              f"{r['ppl_before'] or float('nan'):10.1f} {r['ppl_after'] or float('nan'):10.1f} "
              f"{r['artifact_gb']:11.2f} {r['shards']:6d} {r['first_two_blocks_rel_err']:10.1e} "
              f"{r['n_bad']:4d}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in rows if "error" not in r}):
        rs = sorted((r for r in rows if r["method"] == method and "error" not in r),
                    key=lambda r: r["params"])
        x = [r["params"] / 1e9 for r in rs]
        a.plot(x, [r["compress_s"] for r in rs], "o-", label=f"{method}: compress")
        a.plot(x, [r["wall_s"] for r in rs], "o--", label=f"{method}: whole job")
        b.plot(x, [r["peak_rss_gb"] for r in rs], "o-", label=f"{method}: job peak RSS")
    sizes = sorted({r["params"] for r in rows if "error" not in r})
    # what loading the model whole would take, for scale
    b.plot([p / 1e9 for p in sizes], [2 * p / 2**30 for p in sizes], ":", color="gray",
           label="the model whole in bf16")
    a.set(xlabel="parameters (billions)", ylabel="seconds", title="time")
    b.set(xlabel="parameters (billions)", ylabel="GiB", title="memory", ylim=(0, None))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=["int8", "rtn"], choices=list(METHODS))
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--results", type=Path, default=BIG / "large_models.json")
    ap.add_argument("--plot", type=Path, default=BIG / "large_models.png")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts")
    ap.add_argument("--table", type=Path, help="print the table and plot of saved rows")
    ap.add_argument("--device", default="cpu", help="the jobs' device (cpu, cuda, auto)")
    ap.add_argument("--one", nargs=3, metavar=("SIZE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        row = run_one(args.one[0], args.one[1], Path(args.one[2]), args.eval_tokens, args.device)
        print("ROW " + json.dumps(row))
        return 0
    if args.table:
        rows = json.loads(args.table.read_text())
        print_table(rows)
        plot(rows, args.plot)
        return 0
    rows = json.loads(args.results.read_text()) if args.results.exists() else []
    for size in args.sizes:
        for method in args.methods:
            out = BIG / f"out-{size}-{method}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            p = subprocess.run([sys.executable, __file__, "--one", size, method, str(out),
                                "--eval-tokens", str(args.eval_tokens), "--device", args.device],
                               capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("ROW ")), None)
            row = json.loads(line[4:]) if line else {
                "size": size, "method": method, "error": (p.stderr or p.stdout)[-2000:]}
            rows = [r for r in rows if (r["size"], r["method"]) != (size, method)] + [row]
            args.results.write_text(json.dumps(rows, indent=1))
            print_table([row])
            if "peak_at" in row:
                print(f"  peak {row['peak_sampled_gb']:.2f} GiB at: {row['peak_at']}")
            if row.get("peak_gpu_gb") is not None:
                print(f"  peak GPU memory {row['peak_gpu_gb']:.2f} GiB on {row['device']}")
            if not args.keep:
                subprocess.run(["rm", "-rf", str(out)], check=True)
    print_table(rows)
    plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
