"""The formats GPUs serve (FP8, NVFP4, MXFP4, FP8 KV cache) on SmolLM2-135M fp32, beside
llm-compressor on the same calibration tokens and the same held-out text.

Calibration: ``--cal`` x 512 tokens of default_calibration_text (Wikipedia). Held-out: (a)
default_eval_text (Wikipedia, other articles), (b) text of another domain: the source of a fixed
set of Python standard-library modules (code and docstrings). Every row runs in a process of its
own; perplexity is measured on the artifact reloaded with plain ``from_pretrained`` (float32;
compressed-tensors decompresses FP4 weights to bfloat16, cast back to float32).

llm-compressor 0.14 pins compressed-tensors 0.19 (the project has 0.20): its rows run with a side
package folder first on PYTHONPATH, made without touching the project's venv:

    .venv/bin/pip install --no-deps --target .cache/llmc-site llmcompressor==0.14.0.1 \\
        compressed-tensors==0.19.0 auto-round==0.15.1 datasets==5.2.0 dill==0.4.1 \\
        multiprocess==0.70.19 nvidia-ml-py==13.615.71 pandas==3.1.1 py-cpuinfo==9.0.0 \\
        pyarrow==26.0.1 xxhash==4.1.0
    python benchmarks/gpu_formats.py [--only fp8 nvfp4 ...] [--chunks 8] [--cal 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
LLMC_SITE = REPO / ".cache" / "llmc-site"
#: the other-domain held-out text: these modules of the running Python's standard library
STDLIB = ("argparse.py", "textwrap.py", "inspect.py", "dataclasses.py", "shutil.py")

ROWS = {
    "dense": ("dense", {}),
    "fp8": ("fp8", {}),
    "fp8_static": ("fp8", {"activations": "static"}),
    # SmolLM2's 576 input features are not a multiple of 128: 128 x 64 blocks
    "fp8_block": ("fp8", {"block": [128, 64]}),
    "fp8_kv": ("fp8", {"kv_cache": True}),
    "nvfp4": ("nvfp4", {}),
    "nvfp4_nosearch": ("nvfp4", {"scale_search": False}),
    "nvfp4_gptq": ("nvfp4", {"gptq": True}),
    "nvfp4_gptq_nosearch": ("nvfp4", {"gptq": True, "scale_search": False}),
    "nvfp4_gptq_damp": ("nvfp4", {"gptq": True, "scale_search": False, "dampening": 0.1}),
    "nvfp4_awq": ("nvfp4", {"awq": True, "scale_search": False}),
    "nvfp4_awq_gptq": ("nvfp4", {"awq": True, "gptq": True, "scale_search": False,
                                 "dampening": 0.1}),
    "nvfp4_w4a4": ("nvfp4", {"activations": "dynamic"}),
    "mxfp4": ("mxfp4", {}),
    "mxfp4_nosearch": ("mxfp4", {"scale_search": False}),
    "llmc_fp8_dynamic": ("llmc", {"scheme": "FP8_DYNAMIC"}),
    "llmc_nvfp4a16": ("llmc", {"scheme": "NVFP4A16"}),
    "llmc_nvfp4a16_mse": ("llmc", {"scheme": "NVFP4A16", "observer": "memoryless_mse"}),
    "llmc_nvfp4a16_gptq": ("llmc", {"scheme": "NVFP4A16", "gptq": True}),
    "llmc_nvfp4a16_gptq_mse": ("llmc", {"scheme": "NVFP4A16", "gptq": True,
                                        "observer": "memoryless_mse"}),
    "llmc_nvfp4": ("llmc", {"scheme": "NVFP4"}),
    "llmc_mxfp4a16": ("llmc", {"scheme": "MXFP4A16"}),
}


def other_domain_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((lib / f).read_text("utf-8") for f in STDLIB)


def _llmc(model, tok, ids, scheme: str, observer: str | None, out: Path,
          gptq: bool = False) -> None:
    import uuid

    import datasets.fingerprint
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    # datasets 5.2 (llm-compressor's pin) cannot hash its own arrow schema with this Python's
    # dill ("Can't pickle MonthDayNano"): fingerprints are only cache keys, make them random
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
    preset = {k: v.model_copy() for k, v in PRESET_SCHEMES[scheme].items()}
    if observer:
        preset["weights"] = preset["weights"].model_copy(update={"observer": observer})
    modifier = GPTQModifier if gptq else QuantizationModifier  # GPTQ: dampening 0.01, as ours
    recipe = modifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **preset)},
        ignore=["lm_head"])
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)


def make_row(name: str, cal: int, out: Path) -> dict:
    """Compress SmolLM2 into ``out`` (the artifact); returns the row's time and bytes."""
    from modelpress.compression.base import Context
    from modelpress.compression.data import default_calibration_text, token_chunks
    from modelpress.compression.models import load_pretrained, save_model, weight_bytes
    from modelpress.compression.registry import get_method, parse_params

    sys.path.insert(0, str(REPO / "benchmarks"))
    from quantization import smollm2_dir

    lm = load_pretrained(smollm2_dir())
    model, tok = lm.model, lm.tokenizer
    method, params = ROWS[name]
    row: dict = {"name": name, "method": method, "params": params}
    t = time.perf_counter()
    if method == "dense":
        model.save_pretrained(out)
        tok.save_pretrained(out)
    elif method == "llmc":
        ids = token_chunks(tok, default_calibration_text(), cal, 512)
        _llmc(model, tok, ids, params["scheme"], params.get("observer"), out,
              params.get("gptq", False))
        tok.save_pretrained(out)
    else:
        cfg = parse_params(method, {**params, "num_samples": cal, "seq_len": 512}
                           if "num_samples" in get_method(method).config.model_fields
                           else params)
        res = get_method(method).apply(model, cfg, Context(
            tokenizer=tok, calibration_text=default_calibration_text()))
        row["metrics"] = {k: v for k, v in res.metrics.items() if k.startswith("kv")}
        save_model(res.model, tok, out, saver=res.saver)
    row["compress_s"] = time.perf_counter() - t
    row["bytes"] = weight_bytes(out)
    return row


def eval_row(out: Path, chunks: int) -> dict:
    """Held-out perplexity of the artifact in ``out`` reloaded with plain ``from_pretrained``,
    always in the project's environment (llm-compressor's pinned compressed-tensors 0.19 leaves
    its FP4 weights in bfloat16 inside a float32 model on reload)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelpress.compression.data import default_eval_text
    from modelpress.compression.evaluation import perplexity

    tok = AutoTokenizer.from_pretrained(out)
    kw = {}
    if "quantization_config" in json.loads((out / "config.json").read_text()):
        from transformers.utils.quantization_config import CompressedTensorsConfig

        # decompressed at load (llm-compressor's NVFP4 artifacts otherwise stay packed and
        # decompress to bfloat16 at each forward, which a float32 model cannot multiply)
        kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
    back = back.to(torch.float32)
    return {"ppl_wiki": perplexity(back, tok, default_eval_text(), num_chunks=chunks),
            "ppl_code": perplexity(back, tok, other_domain_text(), num_chunks=chunks)}


def run_row(name: str, chunks: int, cal: int) -> dict:
    """One row: compressed in a process of its own (llm-compressor's rows with its side package
    folder first on the path), evaluated in another with the project's packages."""
    env = dict(os.environ)
    if ROWS[name][0] == "llmc":
        if not LLMC_SITE.exists():
            return {"name": name, "error": f"llm-compressor not installed in {LLMC_SITE}"}
        env["PYTHONPATH"] = os.pathsep.join([str(LLMC_SITE), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "a"
        row = _child(["--row", name, "--out", str(out), "--cal", str(cal)], env, name)
        if "error" not in row:
            row.update(_child(["--eval", str(out), "--chunks", str(chunks)], dict(os.environ),
                              name))
    return row


def _child(args: list[str], env: dict, name: str) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("ROW ")), None)
    if line:
        return dict(json.loads(line[4:]))
    return {"name": name, "error": " ".join(p.stderr.strip().splitlines()[-1:])}


def table(rows: list[dict], chunks: int, cal: int) -> str:
    d = next(r for r in rows if r["name"] == "dense")
    lines = [f"SmolLM2-135M fp32; calibration {cal} x 512 tokens of default_calibration_text "
             f"(Wikipedia); held-out {chunks} x 512 tokens of default_eval_text (wiki) and of "
             f"Python stdlib source {', '.join(STDLIB)} (code, another domain); CPU.", "",
             "| row | method | params | ppl wiki | x dense | ppl code | x dense | bytes | x fp32 "
             "| compress s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |||||||||")
            continue
        ps = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['name']} | {r['method']} | {ps} | {r['ppl_wiki']:.3f} | "
                     f"{r['ppl_wiki'] / d['ppl_wiki']:.4f} | {r['ppl_code']:.3f} | "
                     f"{r['ppl_code'] / d['ppl_code']:.4f} | {r['bytes']} | "
                     f"{r['bytes'] / d['bytes']:.3f} | {r['compress_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help=f"rows (default all): {list(ROWS)}")
    ap.add_argument("--chunks", type=int, default=8, help="held-out 512-token chunks per text")
    ap.add_argument("--cal", type=int, default=16, help="calibration sequences of 512 tokens")
    ap.add_argument("--log", type=Path, help="append each row (JSON) to this file")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (in --log)")
    ap.add_argument("--table", type=Path, help="only print the table of a --log file")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--eval", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.row:
        print("ROW " + json.dumps(make_row(a.row, a.cal, a.out)))
        return
    if a.eval:
        print("ROW " + json.dumps(eval_row(a.eval, a.chunks)))
        return
    if a.table:
        rows = {r["name"]: r for r in map(json.loads, a.table.read_text().splitlines())}
        print(table([rows[n] for n in ROWS if n in rows], a.chunks, a.cal))
        return
    names = ([] if a.no_dense else ["dense"]) + [n for n in (a.only or ROWS) if n != "dense"]
    rows = []
    for name in names:
        row = run_row(name, a.chunks, a.cal)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.log:
            with a.log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if not a.no_dense:
        print(table(rows, a.chunks, a.cal))


if __name__ == "__main__":
    main()
