"""Speed as repeated, interleaved rounds of the dense and the compressed model.

Each round times one run of each model, alternating which goes first, so a change in the
machine's load hits both alike. The report gives each model's median and spread (min..max over
the rounds), the threads used and the load average around the rounds, and states a speed-up
only when the two spreads do not overlap; otherwise the verdict is "not measurable on this
machine now"."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..evaluation import decode_prompt, timed_decode

NOT_MEASURABLE = "not measurable on this machine now"

#: new tokens per timed decode: the report's rounds and ``benchmarks/int8_decode.py`` (a user's
#: fresh processes) time the same greedy decode, so their tokens/s compare directly
DECODE_NEW_TOKENS = 64
DECODE_PROMPT_LEN = 16


@torch.no_grad()
def decode_rate(model: nn.Module, new_tokens: int = DECODE_NEW_TOKENS,
                prompt_len: int = DECODE_PROMPT_LEN) -> float:
    """One timed greedy decode at batch 1 with the KV cache: generated tokens per second."""
    return timed_decode(model, decode_prompt(model, prompt_len), new_tokens)


@torch.no_grad()
def encoder_rate(model: nn.Module, seq_len: int = 128, batch: int = 8) -> float:
    dev = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 2000)
    ids = torch.arange(batch * seq_len, device=dev).remainder(vocab - 1).add(1).view(batch, -1)
    t = time.perf_counter()
    model(input_ids=ids)
    return ids.numel() / (time.perf_counter() - t)


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def spread(rates: list[float]) -> dict[str, float]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def verdict(dense: dict[str, float], compressed: dict[str, float]) -> dict[str, Any]:
    """``speedup`` (compressed median / dense median) only when the spreads are disjoint."""
    ratio = compressed["median"] / dense["median"]
    overlap = compressed["min"] <= dense["max"] and dense["min"] <= compressed["max"]
    if overlap:
        return {"measurable": False, "verdict": NOT_MEASURABLE, "median_ratio": ratio}
    word = "faster" if ratio > 1 else "slower"
    return {"measurable": True, "speedup": ratio,
            "verdict": f"{ratio:.2f}x ({word}; spreads do not overlap)"}


def compare(dense_rates: list[float], compressed_rates: list[float]) -> dict[str, Any]:
    """Two models' rates over the same rounds: each one's median, min..max and rates, the
    compressed / dense ratio per round, and the :func:`verdict` (the report's and the
    benchmark's summary)."""
    d, c = spread(dense_rates), spread(compressed_rates)
    return {"dense": {**d, "rates": list(dense_rates)},
            "compressed": {**c, "rates": list(compressed_rates)},
            "ratio_per_round": [b / a for a, b in zip(dense_rates, compressed_rates)],
            **verdict(d, c)}


def interleaved(dense: nn.Module, compressed: nn.Module, rate: Callable[[nn.Module], float],
                rounds: int = 5, check: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """``rounds`` interleaved timings of both models after one warm-up run each."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    load_before = _load()
    rate(dense)
    rate(compressed)
    d_rates: list[float] = []
    c_rates: list[float] = []
    for i in range(rounds):
        check()
        order = [(dense, d_rates), (compressed, c_rates)]
        for model, out in (order if i % 2 == 0 else order[::-1]):
            out.append(rate(model))
    return {"method": f"{rounds} interleaved rounds (order alternating) after a warm-up; "
                      "median and min..max per model",
            "rounds": rounds, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": _load(),
            **compare(d_rates, c_rates)}


# ------------------------------------------------------------------ rounds in fresh processes


class ProbeError(RuntimeError):
    """A speed probe process failed to load its model or to time it."""


class _Probe:
    """One model in a fresh process (``measure.probe``), timed on request."""

    def __init__(self, model_dir: str, causal: bool, runtime: tuple[str, dict[str, Any]] | None,
                 env: dict[str, str] | None = None):
        import json
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "modelpress.compression.measure.probe", str(model_dir),
               "--causal" if causal else "--encoder"]
        if runtime is not None:
            cmd += ["--runtime", runtime[0], "--params", json.dumps(runtime[1])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.threads = 0

    def wait_ready(self) -> None:
        self.threads = int(self._read("ready").get("threads", 0))

    def _read(self, key: str) -> dict[str, Any]:
        import json

        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        msg = json.loads(line) if line.strip() else {"error": "the probe process ended"}
        if key not in msg:
            raise ProbeError(str(msg.get("error", msg)))
        return dict(msg)

    def rate(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("rate\n")
        self.proc.stdin.flush()
        return float(self._read("rate")["rate"])

    def close(self) -> None:
        """Ask the probe to quit; kill it if it does not within 30 s or if anything (a job's
        time limit, a cancellation) interrupts the wait, which then goes on propagating."""
        import subprocess

        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
        except OSError:  # it has ended already
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def interleaved_processes(dense_dir: str, compressed_dir: str, causal: bool,
                          runtime: tuple[str, dict[str, Any]] | None = None, rounds: int = 5,
                          check: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """:func:`interleaved`, with each model in a fresh process of its own loaded as a user
    loads it (``runtime``: the compressed model's method and params, whose runtime serves it),
    the default thread count, one warm-up each, then ``rounds`` rounds in alternating order."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    probes: list[_Probe] = []
    try:
        probes.append(_Probe(dense_dir, causal, None))
        probes.append(_Probe(compressed_dir, causal, runtime))
        for p in probes:  # both load at once
            p.wait_ready()
        load_before = _load()
        for p in probes:
            p.rate()
        rates: tuple[list[float], list[float]] = ([], [])
        for i in range(rounds):
            check()
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                rates[j].append(probes[j].rate())
    finally:
        for p in probes:
            p.close()
    return {"method": f"{rounds} interleaved rounds (order alternating) after a warm-up, each "
                      "model in a fresh process as a user loads it; median and min..max per model",
            "processes": "fresh", "rounds": rounds, "threads": probes[0].threads,
            "cpu_count": os.cpu_count(), "load_average_before": load_before,
            "load_average_after": _load(), **compare(rates[0], rates[1])}
