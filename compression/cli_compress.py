"""``modelpress compress``: run a compression recipe offline, exactly as a worker runs a job.

    modelpress compress SOURCE (--method NAME [--set KEY=VALUE]... | --recipe FILE)
        [--calibration-file FILE] [--eval-file FILE] [--max-ppl-increase R]
        [--stream auto|always|never] --output DIR

Exit codes: 0 done, 2 bad input (unknown method, bad params, unreadable files, ...),
3 the quality gate (--max-ppl-increase) was missed (the artifact and report are still written),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_GATE = 3


class BadInput(Exception):
    pass


def parse_set(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON when they parse (0.5, true, [1,2], null), else
    strings (``scope=global``, ``pattern=2:4``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInput(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key] = value
    return out


def load_recipe(path: str | Path) -> list[dict[str, Any]]:
    """A JSON or YAML list of ``{"method": ..., "params": {...}}`` (or ``{"stages": [...]}``)."""
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise BadInput(f"cannot read recipe {p}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's
        raise BadInput(f"cannot parse recipe {p}: {e}") from None
    if isinstance(data, dict) and "stages" in data:
        data = data["stages"]
    if not isinstance(data, list):
        raise BadInput(f"recipe {p} must be a list of stages or {{\"stages\": [...]}}")
    return data


def _read_text(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {what} {path}: {e}") from None
    if not text.strip():
        raise BadInput(f"{what} {path} is empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelpress compress",
        description="Compress a model offline with one method or a recipe of stages; writes a "
        "Hugging Face directory plus report.json.",
    )
    p.add_argument("source", help="hub id, local Hugging Face directory, or .gguf file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--method", help="one compression method (see `modelpress methods`)")
    g.add_argument("--recipe", help="JSON or YAML list of {method, params} stages")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a param of --method (repeatable); values parse as JSON, else string")
    p.add_argument("--revision", help="hub revision (hub ids only)")
    p.add_argument("--calibration-file", help="UTF-8 text for calibration / distillation")
    p.add_argument("--eval-file", help="UTF-8 held-out text for perplexity")
    p.add_argument("--max-ppl-increase", type=float, metavar="R",
                   help="quality gate: perplexity after / before must be <= R (1.10 = +10%%)")
    p.add_argument("--device", help="cpu, cuda or auto (default: MODELPRESS_DEVICE or auto)")
    p.add_argument("--stream", choices=["auto", "always", "never"], default="auto",
                   help="run block by block, never holding the whole model (int8, rtn, "
                   "magnitude, gptq, awq, wanda, sparsegpt, admm on a safetensors or GGUF "
                   "source): auto = when the model in float32 is above "
                   "MODELPRESS_STREAM_ABOVE_BYTES (default: half this machine's memory) or would "
                   "not fit whole")
    p.add_argument("--keep-intermediate", action="store_true",
                   help="also save each stage's model under OUTPUT/stages/")
    p.add_argument("--checkpoint-dir", help="resumable training state (distill); rerun with the "
                   "same folder to resume")
    p.add_argument("--measure", choices=["full", "quality", "none"], default="full",
                   help="what to measure: quality and speed (full), quality only, or sizes only")
    p.add_argument("--eval-windows", type=int, default=16, metavar="N",
                   help="512-token windows of each text that perplexity reads (default 16; "
                   "fewer: faster and noisier)")
    p.add_argument("--baseline-cache", metavar="DIR",
                   help="keep the source model's numbers here and reuse them in later runs "
                   "(default: MODELPRESS_BASELINE_CACHE or ~/.cache/modelpress/baselines; "
                   "'off' for none)")
    p.add_argument("--tasks", metavar="JSONL", help="task set scored before and after "
                   "(multiple choice or prompt + expected completion)")
    p.add_argument("--prompts", metavar="JSONL", help="prompt set: behaviour diff before/after")
    p.add_argument("--max-accuracy-drop", type=float, metavar="D",
                   help="fail when task accuracy falls by more than D (0.02 = 2 points)")
    p.add_argument("--max-mean-kl", type=float, metavar="K",
                   help="fail when the mean KL on the prompt set exceeds K nats")
    p.add_argument("--output", "-o", required=True, help="output directory (must be empty)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return p


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_lines(report: dict[str, Any]) -> list[str]:
    b, a, s = report.get("before", {}), report.get("after", {}), report.get("summary", {})
    lines = [f"source: {report.get('source')}  ->  format {report.get('format')}",
             "recipe: " + " -> ".join(st["method"] for st in report.get("recipe", []))]

    def row(name: str, key: str, fmt: Callable[[Any], str]) -> None:
        if key in b or key in a:
            lines.append(f"  {name:<18} {fmt(b.get(key)):>14}  ->  {fmt(a.get(key)):>14}")

    num = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    flt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    row("params", "params", num)
    row("nonzero params", "nonzero_params", num)
    row("weights on disk", "bytes", _fmt_bytes)
    row("sparsity", "sparsity", flt)
    row("perplexity", "perplexity", flt)
    row("embedding fidelity", "embedding_fidelity", flt)
    row("perplexity (other text)", "perplexity_other", flt)
    row("task accuracy", "task_accuracy", flt)
    row("tokens/s (cpu)", "tokens_per_s", lambda v: "-" if v is None else f"{v:.1f}")
    row("tokens/s (gpu)", "tokens_per_s_gpu", lambda v: "-" if v is None else f"{v:.1f}")
    extras = []
    if "compression_ratio" in s:
        extras.append(f"compression {s['compression_ratio']:.2f}x")
    if "speedup" in s:
        extras.append(f"speed-up {s['speedup']:.2f}x")
    elif (report.get("evaluation") or {}).get("speed"):
        extras.append(f"speed-up {report['evaluation']['speed']['verdict']}")
    if (report.get("evaluation") or {}).get("baseline", {}).get("reused"):
        extras.append("source numbers reused from the baseline cache")
    if "accuracy_loss" in s and s["accuracy_loss"] is not None:
        extras.append(f"accuracy loss {100 * s['accuracy_loss']:+.1f}%")
    if "wall_time_s" in s:
        extras.append(f"{s['wall_time_s']:.0f} s")
    if "peak_rss_bytes" in s:
        extras.append(f"peak RSS {_fmt_bytes(s['peak_rss_bytes'])}")
    lines.append("  " + ", ".join(extras))
    gate = report.get("gate")
    if gate:
        if gate.get("skipped"):
            lines.append(f"quality gate: {gate['skipped']}")
        elif "max_ppl_increase" not in gate:
            lines.append("quality gate: " + ("passed" if gate["passed"]
                                             else f"MISSED: {gate.get('reason', '')}"))
        else:
            lines.append(f"quality gate (max_ppl_increase {gate['max_ppl_increase']:g}): "
                         + ("passed" if gate["passed"] else f"MISSED: {gate.get('reason', '')}"))
    return lines


def _baseline_dir(args: argparse.Namespace) -> Path | None:
    d = args.baseline_cache or os.environ.get("MODELPRESS_BASELINE_CACHE")
    if d == "off":
        return None
    return Path(d).expanduser() if d else Path.home() / ".cache" / "modelpress" / "baselines"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pydantic import ValidationError

    from .base import Cancelled, CompressionError
    from .pipeline import JobHooks, LocalCheckpoints, run_pipeline, validate_recipe

    def err(msg: str, code: int = EXIT_BAD_INPUT) -> int:
        print(f"modelpress compress: error: {msg}", file=sys.stderr)
        return code

    try:
        if args.method:
            stages = [{"method": args.method, "params": parse_set(args.sets)}]
        else:
            if args.sets:
                raise BadInput("--set applies to --method; put params in the recipe file")
            stages = load_recipe(args.recipe)
        src = args.source
        if not Path(src).expanduser().exists():
            if src.endswith(".gguf"):
                raise BadInput(f"GGUF file not found: {src}")
            if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", src) or src.startswith("."):
                raise BadInput(f"model directory not found: {src}")
        out = Path(args.output)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BadInput(f"output {out} exists and is not an empty directory")
        if args.max_ppl_increase is not None and not args.max_ppl_increase > 0:
            raise BadInput("--max-ppl-increase must be a positive ratio, e.g. 1.10")
        cal = _read_text(args.calibration_file, "calibration file")
        ev = _read_text(args.eval_file, "eval file")
        tasks = _read_text(args.tasks, "task set")
        prompts = _read_text(args.prompts, "prompt set")
        validate_recipe(stages)
    except BadInput as e:
        return err(str(e))
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'params'}: {x['msg']}" for x in e.errors())
        return err(f"invalid params: {msgs}")
    except CompressionError as e:
        return err(str(e))

    last = {"p": -1}

    def progress(p: int, label: str) -> None:
        if args.quiet or p == last["p"]:
            return
        last["p"] = p
        print(f"[{p:3d}%] {label}", file=sys.stderr, flush=True)

    def event(kind: str, data: dict[str, Any]) -> None:
        if args.quiet:
            return
        if kind == "train":
            print(f"       train step {data.get('step')}: loss {data.get('loss', float('nan')):.4f} "
                  f"(lr {data.get('lr', 0):.2e})", file=sys.stderr, flush=True)
        elif kind in ("warning", "resume"):
            print(f"       {kind}: {data}", file=sys.stderr, flush=True)

    hooks = JobHooks(progress=progress, event=event,
                     checkpoints=LocalCheckpoints(args.checkpoint_dir) if args.checkpoint_dir else None)
    try:
        outcome = run_pipeline(args.source, stages, Path(args.output), revision=args.revision,
                               calibration_text=cal, eval_text=ev,
                               max_ppl_increase=args.max_ppl_increase, hooks=hooks,
                               device=args.device, keep_intermediate=args.keep_intermediate,
                               stream={"auto": None, "always": True, "never": False}[args.stream],
                               measure=args.measure, baseline_cache=_baseline_dir(args),
                               tasks_text=tasks, prompts_text=prompts,
                               max_accuracy_drop=args.max_accuracy_drop,
                               max_mean_kl=args.max_mean_kl, eval_windows=args.eval_windows)
    except ValidationError as e:
        return err(f"invalid params: {e}")
    except (CompressionError, FileNotFoundError) as e:
        return err(str(e))
    except (Cancelled, KeyboardInterrupt):
        return err("interrupted", 130)
    except OSError as e:
        if "not a valid model identifier" in str(e) or "does not appear to have" in str(e):
            return err(str(e))
        raise
    print("\n".join(summary_lines(outcome.report)))
    print(f"wrote {outcome.output_dir} (report: {outcome.output_dir / 'report.json'})")
    if not outcome.gate_passed:
        print("modelpress compress: quality gate missed: "
              f"{(outcome.report.get('gate') or {}).get('reason', '')}", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
