"""Quality and time of every calibrated method on SmolLM2-135M, to compare two versions of the
calibration code (a change to the calibration engine should keep perplexity within 0.5% in at
most 1.1x the time).

Each row runs in a process of its own on the same calibration tokens and the same held-out
text; it prints one JSON line: held-out perplexity (of the artifact reloaded with plain
``from_pretrained``, on the eval text and on KJV Genesis, another domain; int8_dynamic: of the
smoothed model with its weights fake-quantized as the artifact stores them), compress seconds
and a SHA-256 of the compressed weights (equal hashes: bit-identical results).

    python benchmarks/calib_quality.py --rows wanda,gptq --log before.jsonl
    PYTHONPATH=<folder with a modelpress link to another checkout> python ...   # the old code
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import tempfile
import time
from pathlib import Path

from testmodels import smollm2_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: calibration and held-out sizes (env CAL_SAMPLES, CAL_SEQ, EVAL_CHUNKS: smaller on a busy machine)
CAL = {"num_samples": int(os.environ.get("CAL_SAMPLES", "16")),
       "seq_len": int(os.environ.get("CAL_SEQ", "512"))}
ROWS = {
    "wanda": ("wanda", {"sparsity": 0.5, **CAL}),
    "sparsegpt": ("sparsegpt", {"sparsity": 0.5, **CAL}),
    "gptq": ("gptq", {"bits": 4, "group_size": 64, **CAL}),
    "gptq_act_order": ("gptq", {"bits": 4, "group_size": 64, "act_order": True, **CAL}),
    "gptq_true_sequential": ("gptq", {"bits": 4, "group_size": 64, "true_sequential": True,
                                      **CAL}),
    "awq": ("awq", {"bits": 4, "group_size": 64, **CAL}),
    "int8_dynamic": ("int8_dynamic", {**CAL}),
}
EVAL_CHUNKS = int(os.environ.get("EVAL_CHUNKS", "8"))
#: held-out text of another domain (KJV Genesis, shipped with this checkout's package data; read
#: from here so that an older checkout under test is measured on the same text)
OTHER = Path(__file__).resolve().parents[1] / "compression" / "data" / "kjv_genesis.txt"


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().cpu().view(-1).view(
            __import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_row(name: str, q) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import modelpress.compression
    from modelpress.compression.base import Context
    from modelpress.compression.data import default_calibration_text, default_eval_text
    from modelpress.compression.evaluation import perplexity
    from modelpress.compression.models import load_pretrained, save_model
    from modelpress.compression.registry import get_method, parse_params

    torch.manual_seed(0)
    lm = load_pretrained(smollm2_dir())
    method_name, params = ROWS[name]
    ctx = Context(tokenizer=lm.tokenizer, calibration_text=default_calibration_text())
    t = time.perf_counter()
    res = get_method(method_name).apply(lm.model, parse_params(method_name, params), ctx)
    seconds = time.perf_counter() - t
    ev = default_eval_text()
    with tempfile.TemporaryDirectory() as td:
        save_model(res.model, lm.tokenizer, td, saver=res.saver)
        tensors = {}
        for f in sorted(Path(td).glob("*.safetensors")):
            tensors.update(load_file(f))
        digest = _digest(tensors)
        model = AutoModelForCausalLM.from_pretrained(td).eval()
        ppl = perplexity(model, lm.tokenizer, ev, seq_len=512, num_chunks=EVAL_CHUNKS)
        ppl_other = perplexity(model, lm.tokenizer, OTHER.read_text("utf-8"), seq_len=512,
                               num_chunks=EVAL_CHUNKS)
    q.put({"name": name, "cal": f"{CAL['num_samples']}x{CAL['seq_len']}",
           "eval_chunks": EVAL_CHUNKS, "ppl": ppl, "ppl_other": ppl_other,
           "compress_s": seconds, "sha": digest,
           "code": str(Path(modelpress.compression.__file__).parent)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(r for r in ROWS if not r.startswith("gptq_")),
                    help="rows to run (also gptq_act_order, gptq_true_sequential: this code's "
                    "gptq options)")
    ap.add_argument("--log", type=Path, help="append each row (JSON) to this file")
    a = ap.parse_args()
    smollm2_dir()
    ctx = mp.get_context("spawn")
    for name in a.rows.split(","):
        q = ctx.Queue()
        p = ctx.Process(target=run_row, args=(name, q))
        p.start()
        row = None
        while row is None:
            try:
                row = q.get(timeout=5)
            except queue.Empty:
                if not p.is_alive():
                    row = {"name": name, "error": f"exit code {p.exitcode}"}
        p.join()
        line = json.dumps(row)
        print(line, flush=True)
        if a.log:
            with a.log.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
