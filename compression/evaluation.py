"""Independent measurements of a model: size, sparsity, perplexity, speed.

These are the numbers every job records before and after compression, and the numbers the
benchmarks print. They take a model and measure it; they never trust what a method claims.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .base import hf, hf_config
from .data import token_chunks

#: parameters a quantized (compressed-tensors) model carries besides its weights: quantization
#: metadata, not model parameters
QUANT_AUX_SUFFIXES = ("_scale", "_zero_point", "_shape", "_g_idx", "_global_scale")


def _model_params(model: nn.Module) -> Iterator[nn.Parameter]:
    """Each distinct parameter once (tied weights count once), quantization metadata excluded."""
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.endswith(QUANT_AUX_SUFFIXES):
            continue
        seen.add(id(p))
        yield p


def param_count(model: nn.Module) -> int:
    """Parameters, counting tied weights once. Measure quantized artifacts decompressed
    (models.load_pretrained does that) so weights count by their logical size."""
    return sum(p.numel() for p in _model_params(model))


def nonzero_count(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach()).item()) for p in _model_params(model))


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` except the output head (``lm_head`` / tied embeddings)."""
    out_emb = hf(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not out_emb and not name.endswith("lm_head")
    }


def zeros(t: torch.Tensor) -> int:
    """How many elements of ``t`` are zero (``(t == 0).sum()`` sums an int64 copy of the mask:
    4.2 GB for Llama-3.1-8B's output head)."""
    return t.numel() - int(torch.count_nonzero(t.detach()).item())


def linear_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the weights of the prunable Linear layers."""
    total = n_zeros = 0
    for m in prunable_linears(model).values():
        w = m.weight.detach()
        total += w.numel()
        n_zeros += zeros(w)
    return n_zeros / total if total else 0.0


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int = 512,
               num_chunks: int = 16, batch_size: int = 4) -> float:
    """Perplexity over ``num_chunks`` consecutive non-overlapping windows of ``seq_len`` tokens
    from the start of ``text`` (every token predicted once, from the same window)."""
    chunks = token_chunks(tokenizer, text, num_chunks, seq_len)
    dev = model_device(model)
    nll = 0.0
    count = 0
    was_training = model.training
    model.eval()
    for i in range(0, chunks.shape[0], batch_size):
        batch = chunks[i : i + batch_size].to(dev)
        logits = model(input_ids=batch, use_cache=False).logits
        # one window at a time: the log-softmax (and a float copy of half-precision logits)
        # holds one window's [seq_len, vocab], not the batch's (SmolLM2: 100 MB, not 400)
        for j in range(batch.shape[0]):
            nll += torch.nn.functional.cross_entropy(
                logits[j, :-1].float(), batch[j, 1:], reduction="sum").item()
        count += batch[:, 1:].numel()
        del logits
    model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def embedding_fidelity(model: nn.Module, reference: nn.Module, tokenizer: Any, text: str,
                       num: int = 16, seq_len: int = 128) -> float:
    """Mean cosine similarity between mean-pooled hidden states of ``model`` and ``reference``
    (for encoders, where perplexity does not apply). 1.0 means identical embeddings."""
    chunks = token_chunks(tokenizer, text, num, seq_len)
    a = model(input_ids=chunks.to(model_device(model))).last_hidden_state.mean(1).float().cpu()
    b = reference(input_ids=chunks.to(model_device(reference))).last_hidden_state.mean(1).float().cpu()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


@torch.no_grad()
def tokens_per_second(model: nn.Module, tokenizer: Any = None, new_tokens: int = 64,
                      prompt_len: int = 16, repeats: int = 3) -> float:
    """Greedy decode speed at batch 1 with the KV cache: the median of ``repeats`` runs after a
    warm-up (what ``benchmarks/int8_decode.py`` reports per process; a best-of on a shared CPU
    favours whichever model met a quiet moment)."""
    prompt = decode_prompt(model, prompt_len)
    # warm-up; a model that compiles its decode (static cache) compiles once per length, so it
    # warms up at the measured length
    gc = getattr(model, "generation_config", None)
    warm = new_tokens if getattr(gc, "compile_config", None) is not None else 4
    hf(model).generate(prompt, max_new_tokens=warm, min_new_tokens=warm, do_sample=False,
                       pad_token_id=0)
    return statistics.median(timed_decode(model, prompt, new_tokens) for _ in range(repeats))


def decode_prompt(model: nn.Module, prompt_len: int = 16) -> torch.Tensor:
    """A fixed ``[1, prompt_len]`` prompt of token ids on the model's device."""
    vocab: int = hf_config(model).vocab_size
    return torch.arange(1, prompt_len + 1, device=model_device(model)).remainder(vocab)[None]


@torch.no_grad()
def timed_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """One greedy decode of exactly ``new_tokens`` after ``prompt`` with the KV cache: tokens/s."""
    cuda = prompt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out: torch.Tensor = hf(model).generate(prompt, max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if cuda:
        torch.cuda.synchronize()
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t)


@torch.no_grad()
def encoder_throughput(model: nn.Module, seq_len: int = 128, batch: int = 8,
                       repeats: int = 3) -> float:
    """Tokens per second through an encoder forward pass."""
    dev = model_device(model)
    vocab = getattr(model.config, "vocab_size", 2000)
    ids = torch.randint(min(100, vocab - 1), vocab, (batch, seq_len), device=dev)
    model(input_ids=ids)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids)
        best = max(best, ids.numel() / (time.perf_counter() - t))
    return best


class PeakMemory:
    """Peak resident memory of this process (and peak CUDA allocation) while the ``with`` block
    runs. RSS is sampled by a background thread (``ru_maxrss`` alone would be the peak over the
    whole process life, e.g. over all jobs a worker ran); the sampled peak is at least the RSS
    at entry and exit.

        with PeakMemory() as pm:
            ...
        pm.peak_rss_bytes, pm.peak_gpu_bytes
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_rss_bytes = 0
        self.peak_gpu_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def sample(self) -> int:
        self.peak_rss_bytes = max(self.peak_rss_bytes, self._rss())
        return self.peak_rss_bytes

    def __enter__(self) -> PeakMemory:
        self.sample()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self._thread = threading.Thread(target=run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()
        if torch.cuda.is_available():
            self.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())
