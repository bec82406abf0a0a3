"""A speed probe: one model loaded in a fresh Python process, timed on request.

A job's speed rounds run the dense model and the artifact each in a process of its own, the way
a user serves them (plain ``from_pretrained``, the method's runtime where it has one, the
default thread count), not inside the worker that has just compressed the model. The parent
(:func:`speed.interleaved_processes`) starts two probes and asks them in turn for one timing.

Protocol, one JSON object per line: the probe prints ``{"ready": true, "threads": n}`` once the
model is loaded (or ``{"error": "..."}`` and exits); then for every ``rate`` line on its stdin it
prints ``{"rate": tokens_per_s}``; ``quit`` or end of input ends it.

    python -m modelpress.compression.measure.probe MODEL_DIR [--causal|--encoder]
                                                   [--runtime METHOD --params JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _load(args: argparse.Namespace) -> Any:
    from ..models import load_pretrained

    model = load_pretrained(args.model_dir).model.eval()
    if args.runtime:
        from ..registry import get_method, parse_params

        method = get_method(args.runtime)
        if method.runtime is not None:
            model = method.runtime(model, parse_params(args.runtime, json.loads(args.params)))
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modelpress-speed-probe")
    ap.add_argument("model_dir")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--causal", dest="causal", action="store_true", default=True)
    kind.add_argument("--encoder", dest="causal", action="store_false")
    ap.add_argument("--runtime", default=None, help="a method whose runtime serves the model")
    ap.add_argument("--params", default="{}", help="that method's params (JSON)")
    args = ap.parse_args(argv)
    import torch

    from .speed import decode_rate, encoder_rate

    try:
        model = _load(args)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the rounds
        _emit({"error": f"{type(e).__name__}: {e}"})
        return 1
    rate = decode_rate if args.causal else encoder_rate
    _emit({"ready": True, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "rate":
            try:
                _emit({"rate": rate(model)})
            except Exception as e:  # noqa: BLE001
                _emit({"error": f"{type(e).__name__}: {e}"})
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
