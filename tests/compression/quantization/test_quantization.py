"""Quantization methods on a tiny llama: they run, pack, reload with plain from_pretrained, and
refuse bad params."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from modelpress.compression.base import CompressionError, Context
from modelpress.compression.quantization import gptq, int8_dynamic, int8_runtime
from modelpress.compression.quantization.artifact import (
    QUANT_ATTR,
    QuantizedLinear,
    codes_of,
    quantized_modules,
)
from modelpress.compression.quantization.qtensor import (
    dequantize_grouped,
    qrange,
    quantize_weight,
    search_qparams,
)
from modelpress.compression.registry import get_method, parse_params


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: one thread is faster than two (no OpenMP hand-offs, which cost
    most on a busy 2-core CI runner)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def _llama2():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the conftest tiny llama, with 2 layers instead of 4
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def llama(_llama2):
    """A 2-layer tiny llama (built once per module, a fresh copy per test)."""
    return copy.deepcopy(_llama2)


N_LAYERS = 2
CAL = dict(num_samples=2, seq_len=32)


def _ctx(tok):
    return Context(tokenizer=tok)


def _reload(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


def _tensors(d):
    out = {}
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(1))

# ------------------------------------------------------------------ pure tensor functions


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_weight_ranges_and_error(bits, sym):
    w = torch.randn(32, 128)
    qw = quantize_weight(w, bits, 32, sym, mse=False)
    lo, hi = qrange(bits)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape
    assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    assert qw.scale.shape == (32, 4)
    if sym:
        assert torch.all(qw.zero_point == 0)
    err = (qw.dequantize() - w).abs()
    # round-to-nearest with min/max never errs by more than half a step (plus the sym edge)
    assert torch.all(err <= qw.scale.repeat_interleave(32, 1) * (1.0 if sym else 0.5) + 1e-6)


def test_mse_clip_search_beats_minmax():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    # gaussian weights: clipping the rare extremes lowers the total rounding error
    s0, z0 = search_qparams(w, 4, 64, False, mse=False)
    s1, z1 = search_qparams(w, 4, 64, False, mse=True)
    from modelpress.compression.quantization.qtensor import quantize_grouped
    e0 = (dequantize_grouped(quantize_grouped(w, s0, z0, 4), s0, z0) - w).pow(2).sum()
    e1 = (dequantize_grouped(quantize_grouped(w, s1, z1, 4), s1, z1) - w).pow(2).sum()
    assert e1 < 0.95 * e0


def _group_errors(w, s, z, H, g):
    """Each group's own output error ``d^T H_gg d`` ([out, n_groups])."""
    from modelpress.compression.quantization.qtensor import quantize_grouped

    d = (dequantize_grouped(quantize_grouped(w, s, z, 4), s, z) - w).reshape(w.shape[0], -1, g)
    ng = d.shape[1]
    Hb = torch.stack([H[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(ng)])
    return (torch.einsum("ong,ngh->onh", d, Hb) * d).sum(-1)


def _correlated_gram(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, n, generator=gen) + torch.randn(2048, 4, generator=gen) @ torch.randn(
        4, n, generator=gen) * 2
    X[:, :3] *= 8  # salient channels
    return X.t() @ X


def test_clip_search_with_gram_blocks_minimises_each_groups_output_error():
    """col_weight as a full Gram matrix: every group's range is chosen on d^T H_gg d, so no group
    ends with a larger own output error than the diagonal-weighted choice (same candidates), and
    the identity matrix gives the unweighted search."""
    torch.manual_seed(0)
    w, H = torch.randn(48, 128), _correlated_gram(128)
    sd, zd = search_qparams(w, 4, 32, False, col_weight=torch.diag(H))
    sb, zb = search_qparams(w, 4, 32, False, col_weight=H)
    eb, ed = _group_errors(w, sb, zb, H, 32), _group_errors(w, sd, zd, H, 32)
    assert torch.all(eb <= ed * (1 + 1e-5) + 1e-6)
    assert eb.sum() < 0.99 * ed.sum()
    s1, z1 = search_qparams(w, 4, 32, True, col_weight=torch.eye(128))
    s2, z2 = search_qparams(w, 4, 32, True)
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_asymmetric_end_refinement_and_coarse_to_fine():
    """asym_refine moves the two ends of a range apart and never raises a group's error;
    coarse_to_fine tries a subset of the same grid: never better, and close to it."""
    from modelpress.compression.quantization.qtensor import clipped_qparams, minmax_qparams

    torch.manual_seed(1)
    w, H = torch.randn(64, 128), _correlated_gram(128, seed=1)
    w[:, 5] += 2.5  # skewed groups: the best range is not a centred shrink of min/max
    base = search_qparams(w, 4, 32, False, col_weight=H)
    ref = search_qparams(w, 4, 32, False, col_weight=H, asym_refine=2)
    e0, e1 = _group_errors(w, *base, H, 32), _group_errors(w, *ref, H, 32)
    assert torch.all(e1 <= e0 * (1 + 1e-5) + 1e-6) and e1.sum() < 0.98 * e0.sum()
    assert (ref[0] != base[0]).any()
    c2f = search_qparams(w, 4, 32, False, col_weight=H, coarse_to_fine=True)
    ec = _group_errors(w, *c2f, H, 32)
    assert e0.sum() <= ec.sum() * (1 + 1e-6) and ec.sum() < 1.02 * e0.sum()
    # the no-search quantizer AWQ scores its candidates with
    wg = w.reshape(64, 4, 32)
    assert all(torch.equal(a, b) for a, b in zip(
        clipped_qparams(w, 4, 32, False, 0.9),
        minmax_qparams(wg.amin(-1) * 0.9, wg.amax(-1) * 0.9, 4, False)))


@pytest.mark.parametrize("sym,refine,ctf,weighting", [
    (True, 0, False, None), (True, 0, True, "diag"), (False, 0, False, "block"),
    (False, 2, True, "block"), (False, 2, False, None), (True, 0, False, "diag"),
])
def test_clip_search_batched_trials_match_one_at_a_time(monkeypatch, sym, refine, ctf, weighting):
    """A GPU evaluates many clipping trials per tensor op, the CPU one at a time on large
    weights: both must choose exactly the same ranges (ties to the earliest trial)."""
    from modelpress.compression.quantization import qtensor

    torch.manual_seed(2)
    w, H = torch.randn(48, 128), _correlated_gram(128, seed=2)
    w[:, 7] += 3.0
    w[3, 32:64] = 0.0  # an all-zero group: every trial ties
    cw = {None: None, "diag": H.diagonal(), "block": H}[weighting]
    kw = dict(col_weight=cw, asym_refine=refine, coarse_to_fine=ctf)
    monkeypatch.setattr(qtensor, "_TRIAL_ELEMS_CPU", 1)  # one trial per op
    one = search_qparams(w, 4, 32, sym, **kw)
    monkeypatch.setattr(qtensor, "_TRIAL_ELEMS_CPU", 1 << 30)  # every trial in one op
    batched = search_qparams(w, 4, 32, sym, **kw)
    monkeypatch.setattr(qtensor, "_TRIAL_ELEMS_CPU", 3 * w.numel())  # chunks of 3
    chunked = search_qparams(w, 4, 32, sym, **kw)
    for got in (batched, chunked):
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])
    assert not torch.equal(one[0], search_qparams(w, 4, 32, sym, mse=False)[0])  # it searched


def _textbook_gptq(W, H, scale, zp, bits, g, dampening, perm=None):
    """GPTQ as written in the paper: one column at a time, every later column updated at once,
    on fixed grids; the reference for the blocked, in-place implementation."""
    qmin, qmax = qrange(bits)
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    perm = torch.arange(n) if perm is None else perm
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(dampening * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for j in range(n):
        s, z = scale[:, perm[j] // g].double(), zp[:, perm[j] // g].double()
        Q[:, j] = torch.clamp(torch.round(W[:, j] / s) + z, qmin, qmax)
        err = (W[:, j] - (Q[:, j] - z) * s) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(perm)].to(torch.int8)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_integers_match_the_textbook_algorithm(act_order, sym):
    """The blocked loop reads each block's integers back from the updated weights at its end
    (not stored per column); they must be the integers the textbook algorithm picks."""
    from modelpress.compression.quantization.gptq_math import gptq_quantize

    torch.manual_seed(0)
    X = torch.randn(512, 192) @ torch.randn(192, 192) / 8
    W, H = torch.randn(40, 192), X.t() @ X / 512
    grid = search_qparams(W, 4, 32, sym, mse=False)
    got = gptq_quantize(W, H, 4, 32, sym, act_order=act_order, refit=False, qparams=grid,
                        block_size=64)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    ref = _textbook_gptq(W, H, *grid, 4, 32, 0.01, perm)
    # the same codes (all of them here; one rounding flipped by float summation order would
    # change the error fed to every later column, hence not equality)
    assert (got.q == ref).float().mean() > 0.99
    assert torch.equal(got.scale, grid[0]) and torch.equal(got.zero_point, grid[1])


def test_gptq_math_beats_rtn_on_output_error():
    from modelpress.compression.quantization.gptq_math import gptq_quantize

    torch.manual_seed(0)
    X = torch.randn(2048, 64) @ torch.randn(64, 64)  # correlated inputs
    W = torch.randn(32, 64)
    H = 2 * X.t() @ X / X.shape[0]
    rtn_w = quantize_weight(W, 4, 32, True, mse=False).dequantize()
    g = gptq_quantize(W, H, 4, 32, True, mse=False).dequantize()
    g_ao = gptq_quantize(W, H, 4, 32, True, act_order=True).dequantize()
    err = lambda Wq: (X @ (W - Wq).t()).pow(2).sum().item()  # noqa: E731
    assert err(g) < 0.7 * err(rtn_w)
    assert err(g_ao) < 0.7 * err(rtn_w)


@pytest.mark.parametrize("sym", [True, False])
def test_refit_scales_is_the_least_squares_optimum(sym):
    """Refitting the group scales for fixed codes lowers the true output error ||X (W - Wq)^T||^2,
    reports it exactly, keeps the codes, and is a fixed point (refitting again changes nothing)."""
    from modelpress.compression.quantization.qtensor import refit_scales

    torch.manual_seed(0)
    X = (torch.randn(2048, 128) @ torch.randn(128, 128)) * torch.rand(128)
    W = torch.randn(48, 128) * 0.05
    H = X.t() @ X
    qw = quantize_weight(W, 4, 32, sym, mse=False)
    new, before, after = refit_scales(W, qw, H)
    err = lambda q: (X @ (W - q.dequantize()).t()).pow(2).sum(0)  # noqa: E731  (per row)
    assert torch.equal(new.q, qw.q) and torch.equal(new.zero_point, qw.zero_point)
    assert torch.all(new.scale > 0)
    assert torch.allclose(before, err(qw), rtol=1e-3) and torch.allclose(after, err(new), rtol=1e-3)
    assert torch.all(err(new) <= err(qw) * (1 + 1e-5))
    assert err(new).sum() < 0.97 * err(qw).sum()
    # perturbing any scale of the optimum only makes the error worse
    for _ in range(5):
        bumped = type(new)(new.q, new.scale * (1 + 0.01 * torch.randn_like(new.scale)),
                           new.zero_point, 4, 32, sym)
        assert err(bumped).sum() > err(new).sum()
    again = refit_scales(W, new, H)[0]
    assert torch.allclose(again.scale, new.scale, rtol=1e-3)


def test_refit_scales_keeps_rows_it_cannot_improve():
    """A group whose codes are all zero has no scale to fit: it keeps its scale."""
    from modelpress.compression.quantization.qtensor import refit_scales

    torch.manual_seed(1)
    X = torch.randn(256, 64)
    W = torch.randn(4, 64)
    W[0, :32] = 0  # all-zero group
    qw = quantize_weight(W, 4, 32, True, mse=False)
    new, _, after = refit_scales(W, qw, X.t() @ X)
    assert torch.isfinite(new.scale).all() and torch.all(new.scale > 0)
    assert new.scale[0, 0] == qw.scale[0, 0]


def test_alternate_refit_never_worse_than_one_refit():
    from modelpress.compression.quantization.qtensor import alternate_refit, refit_scales

    torch.manual_seed(2)
    X = (torch.randn(2048, 128) @ torch.randn(128, 128)) * torch.rand(128)
    W = torch.randn(64, 128) * 0.05
    H = X.t() @ X
    err = lambda q: (X @ (W - q.dequantize()).t()).pow(2).sum(0)  # noqa: E731  (per row)
    for sym in (True, False):
        qw = quantize_weight(W, 4, 32, sym, mse=False)
        once = refit_scales(W, qw, H)[0]
        alt = alternate_refit(W, qw, H, rounds=4)
        assert torch.all(err(alt) <= err(once) * (1 + 1e-4))
        assert err(alt).sum() < 0.98 * err(once).sum()
        lo, hi = qrange(4)
        assert lo <= int(alt.q.min()) and int(alt.q.max()) <= hi


def test_gptq_second_pass_on_refitted_grids_never_worse():
    from modelpress.compression.quantization.gptq_math import gptq_quantize_passes

    torch.manual_seed(0)
    X = (torch.randn(4096, 128) @ (torch.randn(128, 128) * 0.2 + torch.eye(128))) * torch.rand(128)
    W = torch.randn(64, 128) * 0.05
    H = 2 * X.t() @ X / X.shape[0]
    err = lambda q: (X @ (W - q.dequantize()).t()).pow(2).sum(0)  # noqa: E731  (per row)
    one = gptq_quantize_passes(W, H, 4, 32, True, passes=1)
    two = gptq_quantize_passes(W, H, 4, 32, True, passes=2)
    assert torch.all(err(two) <= err(one) * (1 + 1e-4))
    assert err(two).sum() < 0.99 * err(one).sum()


def test_gptq_refit_lowers_output_error():
    from modelpress.compression.quantization.gptq_math import gptq_quantize

    torch.manual_seed(0)
    X = torch.randn(2048, 64) @ torch.randn(64, 64)
    W = torch.randn(32, 64)
    H = 2 * X.t() @ X / X.shape[0]
    err = lambda q: (X @ (W - q.dequantize()).t()).pow(2).sum().item()  # noqa: E731
    for act_order in (False, True):
        plain = gptq_quantize(W, H, 4, 32, True, act_order=act_order, refit=False)
        refit = gptq_quantize(W, H, 4, 32, True, act_order=act_order)
        assert torch.equal(plain.q, refit.q)
        assert err(refit) < err(plain)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_rows_independent_so_stacking_is_exact(act_order):
    from modelpress.compression.quantization.gptq_math import gptq_quantize

    torch.manual_seed(0)
    X = torch.randn(512, 64) @ torch.randn(64, 64)
    H = 2 * X.t() @ X / X.shape[0]
    Ws = [torch.randn(32, 64), torch.randn(16, 64)]
    both = gptq_quantize(torch.cat(Ws), H, 4, 32, False, act_order=act_order)
    each = [gptq_quantize(w, H, 4, 32, False, act_order=act_order) for w in Ws]
    assert torch.equal(both.q, torch.cat([e.q for e in each]))
    assert torch.allclose(both.scale, torch.cat([e.scale for e in each]))


def test_awq_scale_search_never_worse_than_plain():
    from modelpress.compression.quantization.awq_math import search_scale
    from modelpress.compression.quantization.layerwise import _rtn_fake_quant

    torch.manual_seed(0)
    X = torch.randn(1024, 64)
    X[:, :4] *= 20  # salient channels
    W = torch.randn(48, 64)
    G = X.t() @ X
    s, alpha, best, base = search_scale(W, G, X.abs().mean(0), _rtn_fake_quant(4, 32, True))
    assert best < base and alpha > 0 and s.shape == (64,)
    assert s[:4].mean() > s[4:].mean()  # salient channels are scaled up


def test_low_rank_output_error_close_to_exact():
    from modelpress.compression.quantization.awq_math import (
        gram_factor,
        output_error,
        output_error_lr,
    )

    torch.manual_seed(0)
    X = torch.randn(2048, 96) * 0.1
    X += torch.randn(2048, 4) @ torch.randn(4, 96) * 3  # a few dominant directions
    G = X.t() @ X
    W = torch.randn(40, 96)
    Wq = quantize_weight(W, 3, 32, True, mse=False).dequantize()
    exact = output_error(W, Wq, G).item()
    assert output_error_lr(W, Wq, gram_factor(G, None)) == pytest.approx(exact, rel=1e-4)
    assert output_error_lr(W, Wq, gram_factor(G, 16)) == pytest.approx(exact, rel=0.05)


def test_int8_dynamic_kernel_matches_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    m = int8_dynamic.Int8DynamicLinear.from_linear(lin)
    x = torch.randn(3, 5, 64)
    y, ref = m(x), lin(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


def _cpu_kernels(eager: bool = False) -> list[str]:
    """The kernels a CPU group may run here (``float``: eager only; compiled it is ``_int_mm``)."""
    return ["int_mm"] + (["float"] if eager else []) + (
        ["onednn"] if int8_runtime.onednn_exact() else [])


@pytest.mark.parametrize("kernel", _cpu_kernels(eager=True))
@pytest.mark.parametrize("tokens", [1, 7])
def test_int8_dynamic_cpu_group_matches_reference(kernel, tokens):
    """Three Linears reading one tensor, run as one CPU group (one input quantization, fused
    matmul) give what the reference int8 function gives each of them, in any call order, and an
    input changed in place is quantized again."""
    torch.manual_seed(0)
    lins = [torch.nn.Linear(64, n, bias=b) for n, b in ((96, True), (32, False), (32, True))]
    mods = [int8_dynamic.Int8DynamicLinear.from_linear(lin) for lin in lins]
    int8_runtime.group_for_cpu(mods)
    qs = [m.qweight.clone() for m in mods]
    x = torch.randn(1, tokens, 64)
    mods[0](x)  # first use chooses a kernel; force the one under test
    group = mods[0]._cpu
    # the members' integers now live in one tensor (no second copy), unchanged, and the
    # QuantizedWeight the saver writes reads the same tensors
    for m, q in zip(mods, qs):
        assert torch.equal(m.qweight, q) and m.qweight._base is group.qweight
        assert getattr(m, QUANT_ATTR).q is m.qweight
    group.use(kernel)
    group._reset_cache()

    def ref(m, inp):
        return int8_runtime.int8_linear(inp, m.qweight, m.w_scale, m.bias)

    for order in ([0, 1, 2], [2, 0, 1]):
        x = torch.randn(1, tokens, 64)
        for i in order:
            y = mods[i](x)
            assert y.shape == (1, tokens, mods[i].out_features) and y.is_contiguous()
            torch.testing.assert_close(y, ref(mods[i], x), rtol=1e-5, atol=1e-5)
            if kernel == "int_mm" and tokens > 1:  # same operations in the same order
                assert torch.equal(y, ref(mods[i], x))
        assert group.cache[0] is None  # every member served: the input is not kept alive
        x.mul_(3)  # same tensor object, new values: the cached outputs must not be reused
        torch.testing.assert_close(mods[1](x), ref(mods[1], x), rtol=1e-5, atol=1e-5)
    # a deep copy (the opaque oneDNN weight cannot be copied) keeps the group, repacks on use
    twins = copy.deepcopy(torch.nn.ModuleList(mods))
    assert twins[0]._cpu is twins[2]._cpu is not group and twins[2]._cpu.members[2] is twins[2]
    torch.testing.assert_close(twins[2](x), ref(mods[2], x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twins[0](x), ref(mods[0], x), rtol=1e-5, atol=1e-5)


def _force_kernel(model, kernel):
    """Switch every prepared CPU group of ``model`` to ``kernel`` (on tiny shapes the timing may
    choose either)."""
    groups = {id(m._cpu): m._cpu for m in model.modules()
              if isinstance(m, int8_dynamic.Int8DynamicLinear) and m._cpu is not None}
    for g in groups.values():
        assert g.kernel is not None  # prepared by an eager call
        g.use(kernel)


@pytest.mark.slow  # torch.compile: seconds per case
@pytest.mark.parametrize("kernel", _cpu_kernels())
@pytest.mark.parametrize("tokens", [1, 5])
def test_int8_dynamic_compiled_group_matches_reference(kernel, tokens):
    """Under torch.compile (inductor, one graph: no host sync) the groups (one fused oneDNN or
    ``_int_mm`` matmul each) give what the reference int8 function gives each member: q/k/v
    reading one tensor, then a single Linear reading their sum."""
    torch.manual_seed(0)
    lins = [torch.nn.Linear(64, n, bias=b) for n, b in ((96, True), (32, False), (32, True))]
    mods = torch.nn.ModuleList(int8_dynamic.Int8DynamicLinear.from_linear(lin) for lin in lins)
    int8_runtime.group_for_cpu(list(mods))
    out = int8_dynamic.Int8DynamicLinear.from_linear(torch.nn.Linear(32, 48))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = mods, out

        def forward(self, x):
            q, k, v = (m(x) for m in self.qkv)
            return q, k, v, self.out(q[..., :32] + k + v)

    block = Block()
    block(torch.randn(1, tokens, 64))  # eager first use chooses the kernels and packs
    _force_kernel(block, kernel)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(1, tokens, 64)
            q, k, v, y = compiled(x)
            for m, got in zip(mods, (q, k, v)):
                ref = int8_runtime.int8_linear(x, m.qweight, m.w_scale, m.bias)
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            ref = int8_runtime.int8_linear(q[..., :32] + k + v, out.qweight, out.w_scale, out.bias)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("kernel", _cpu_kernels())
def test_int8_dynamic_compiled_generate_matches_eager(tiny_llama, kernel):
    """``to_runtime(compile=True)``: plain ``generate`` decodes through torch.compile with a
    static cache and gives the eager runtime's tokens and scores."""
    from torch._dynamo.utils import counters

    int8_dynamic.to_runtime(tiny_llama)
    prompt = torch.arange(1, 9).unsqueeze(0)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    tiny_llama.generate(prompt, max_new_tokens=1, pad_token_id=0)  # prepares every group
    _force_kernel(tiny_llama, kernel)
    eager = tiny_llama.generate(prompt, **kw)
    int8_dynamic.compile_decode(tiny_llama)
    torch._dynamo.reset()
    counters.clear()
    compiled = tiny_llama.generate(prompt, **kw)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode steps did run compiled
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores),
                               rtol=1e-3, atol=1e-3)


def test_int8_dynamic_one_token_quantization_is_per_token():
    x = torch.randn(1, 64) * 5
    q1, s1 = int8_runtime.quantize_per_tensor_int8(x)
    q2, s2 = int8_runtime.quantize_per_token_int8(x)
    assert isinstance(s1, float) and s1 == pytest.approx(s2.item(), rel=1e-6)
    assert (q1.int() - q2.int()).abs().max() <= 1 and q1.abs().max() == 127


# ------------------------------------------------------------------ methods on a tiny llama

WEIGHT_ONLY = [
    ("rtn", dict(bits=4, group_size=32, symmetric=False), 4),
    ("rtn", dict(bits=3, group_size=None, symmetric=True), 3),
    ("rtn", dict(bits=2, group_size=16, symmetric=True), 2),
    ("int8", dict(), 8),
    ("int8", dict(group_size=32, symmetric=True), 8),
    ("gptq", dict(bits=4, group_size=32, **CAL), 4),
    ("gptq", dict(bits=4, group_size=32, symmetric=False, act_order=True, awq_scaling=False,
                  dense_dtype="float32", **CAL), 4),
    ("gptq", dict(bits=4, group_size=32, true_sequential=True, **CAL), 4),
    ("awq", dict(bits=4, group_size=32, grid=5, **CAL), 4),
]


@pytest.mark.parametrize("name,params,bits", WEIGHT_ONLY)
def test_weight_only_methods_pack_and_reload(name, params, bits, llama, tiny_tokenizer,
                                             tmp_path):
    method = get_method(name)
    cfg = parse_params(name, params)
    dense = _logits(copy.deepcopy(llama), IDS)
    res = method.apply(llama, cfg, _ctx(tiny_tokenizer))
    assert res.packed and res.format == "compressed-tensors" and res.saver is not None
    lins = {n: m for n, m in quantized_modules(res.model).items() if not n.endswith("lm_head")}
    assert len(lins) == N_LAYERS * 7
    for lin in lins.values():
        qw = getattr(lin, QUANT_ATTR)
        q = codes_of(lin)
        # done Linears keep only their integer form (memory), the float weight on demand
        assert isinstance(lin, QuantizedLinear) and qw.q is q
        assert lin.weight.dtype == torch.float32
        lo, hi = qrange(bits)
        assert q.shape == lin.weight.shape and q.dtype == torch.int8
        assert lo <= int(q.min()) and int(q.max()) <= hi
        # the float weight is exactly the dequantised integers (what the artifact reloads to)
        assert torch.equal(lin.weight.data, dequantize_grouped(q, qw.scale, qw.zero_point))
        assert len(torch.unique(q)) <= 2**bits
    mem = _logits(res.model, IDS)
    if bits >= 3:  # still the same model, roughly (2 bits on random weights is noise)
        assert (mem - dense).abs().mean() < 0.5 * dense.abs().mean()

    res.saver(res.model, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "compressed-tensors"
    assert conf["format"] == "pack-quantized"
    (grp,) = conf["config_groups"].values()
    assert grp["weights"]["num_bits"] == bits
    t = _tensors(tmp_path)
    n_q = sum(lin.weight.numel() for lin in lins.values())
    if bits == 8:
        q_bytes = sum(v.numel() * v.element_size() for k, v in t.items()
                      if k.endswith((".weight", ".weight_packed")) and not v.is_floating_point())
        assert q_bytes == n_q  # one byte per weight, int8 on disk
    else:
        packed = sum(v.numel() * 4 for k, v in t.items() if k.endswith("weight_packed"))
        assert packed == pytest.approx(n_q * bits / 8, rel=0.02)
    assert not any(k.endswith(".weight") and v.dtype == torch.float32 and "proj" in k
                   for k, v in t.items())
    reloaded = _reload(tmp_path)
    assert next(reloaded.parameters()).dtype == torch.float32
    out = _logits(reloaded, IDS)
    dense_dtype = params.get("dense_dtype", "float16")
    assert t["model.embed_tokens.weight"].dtype == getattr(torch, dense_dtype)
    if dense_dtype == "float32":  # integers, scales and dense tensors all exact: same logits
        assert torch.allclose(out, mem, atol=1e-5, rtol=1e-5)
    else:  # embeddings and norms rounded to float16: tiny differences only
        assert (out - mem).abs().max() < 1e-2 * mem.abs().max()


def test_int8_dynamic_runs_packs_and_reloads(llama, tiny_tokenizer, tmp_path):
    cfg = parse_params("int8_dynamic", CAL)
    dense = _logits(copy.deepcopy(llama), IDS)
    res = int8_dynamic.apply(llama, cfg, _ctx(tiny_tokenizer))
    n_int8 = sum(isinstance(m, int8_dynamic.Int8DynamicLinear) for m in res.model.modules())
    assert n_int8 == N_LAYERS * 7 + 1  # every Linear and the head
    assert res.metrics["smoothed_groups"] == N_LAYERS * 3
    mem = _logits(res.model, IDS)
    assert (mem - dense).abs().mean() < 0.1 * dense.abs().mean()
    res.saver(res.model, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    qc = conf["quantization_config"]
    assert qc["format"] == "int-quantized"
    (grp,) = qc["config_groups"].values()
    assert grp["input_activations"]["dynamic"] is True
    assert grp["input_activations"]["strategy"] == "token"
    t = _tensors(tmp_path)
    # the head ran in int8 in memory but is not written quantized (vLLM's output head takes no
    # quantized weights): ignored, and tied to the embeddings again as it was
    assert qc["ignore"] == ["lm_head"] and not any(k.startswith("lm_head") for k in t)
    assert conf["tie_word_embeddings"] is True
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    for name in ("self_attn.k_proj", "mlp.up_proj"):  # members of fused CPU groups (views)
        mod = res.model.model.layers[0].get_submodule(name)
        assert torch.equal(t[f"model.layers.0.{name}.weight"], mod.qweight)
    reloaded = _reload(tmp_path)
    out = _logits(reloaded, IDS)
    assert (out - mem).abs().max() < 0.05 * mem.abs().max()
    # the reloaded artifact converts back to the int8 runtime path with the same integers
    int8_dynamic.to_runtime(reloaded)
    q0 = reloaded.model.layers[0].mlp.down_proj
    assert isinstance(q0, int8_dynamic.Int8DynamicLinear)
    assert torch.equal(q0.qweight, res.model.model.layers[0].mlp.down_proj.qweight)
    out2 = _logits(reloaded, IDS)
    assert (out2 - mem).abs().max() < 2e-2 * mem.abs().max()


def test_int8_dynamic_untied_head_is_written_in_float(llama, tiny_tokenizer, tmp_path):
    llama.config.tie_word_embeddings = False
    llama.lm_head.weight = torch.nn.Parameter(llama.lm_head.weight.detach().clone() * 0.5)
    cfg = parse_params("int8_dynamic", {"smoothing_alpha": None})
    res = int8_dynamic.apply(llama, cfg, _ctx(tiny_tokenizer))
    head = res.model.lm_head
    assert isinstance(head, int8_dynamic.Int8DynamicLinear)  # int8 in memory
    res.saver(res.model, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["tie_word_embeddings"] is False
    assert conf["quantization_config"]["ignore"] == ["lm_head"]
    t = _tensors(tmp_path)
    assert "lm_head.weight_scale" not in t and t["lm_head.weight"].dtype == torch.float16
    torch.testing.assert_close(t["lm_head.weight"].float(),
                               (head.qweight.float() * head.w_scale[:, None]).half().float())
    reloaded = _reload(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()


def test_int8_dynamic_keep_float(llama, tiny_tokenizer):
    cfg = parse_params("int8_dynamic", {"smoothing_alpha": None, "quantize_lm_head": False,
                                        "keep_float": ["down_proj"]})
    res = int8_dynamic.apply(llama, cfg, _ctx(tiny_tokenizer))
    assert isinstance(res.model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(res.model.lm_head, torch.nn.Linear)
    assert sum(isinstance(m, int8_dynamic.Int8DynamicLinear) for m in res.model.modules()) == N_LAYERS * 6


def test_true_sequential_stats_see_quantized_earlier_groups(llama, tiny_tokenizer):
    from modelpress.compression.calib import engine
    from modelpress.compression.quantization.artifact import attach

    tokens = torch.randint(4, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    layer = llama.model.layers[0]
    inputs = engine.capture_inputs(llama, engine.InMemoryBlocks(llama), tokens,
                                   torch.device("cpu"), 2)
    groups = engine.Step(0, 1, layer, inputs, engine.family_of(llama)).groups()
    assert groups[0].linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    full = engine.input_stats(layer, inputs, groups, hessian=True)
    assert full["self_attn.q_proj"] is full["self_attn.v_proj"]  # one tensor, one accumulator
    # a cut-short forward sees exactly the same inputs
    first = engine.input_stats(layer, inputs, [groups[0]], hessian=True)
    assert torch.allclose(first["self_attn.q_proj"].H, full["self_attn.q_proj"].H)
    o_before = engine.input_stats(layer, inputs, [groups[1]], hessian=True)["self_attn.o_proj"].H
    assert torch.allclose(o_before, full["self_attn.o_proj"].H, atol=1e-6)
    for name in groups[0].linears:  # 2-bit q/k/v: o_proj's inputs must change
        lin = layer.get_submodule(name)
        attach(lin, quantize_weight(lin.weight, 2, 16, True, mse=False))
    o_after = engine.input_stats(layer, inputs, [groups[1]], hessian=True)["self_attn.o_proj"].H
    assert not torch.allclose(o_after, o_before, rtol=1e-3)


def test_gptq_progress_and_cancel(llama, tiny_tokenizer):
    seen = []
    fresh = copy.deepcopy(llama)
    ctx = Context(tokenizer=tiny_tokenizer, progress=lambda f, m: seen.append(f))
    gptq.apply(llama, gptq.GPTQConfig(num_samples=2, seq_len=32, group_size=32), ctx)
    assert seen[-1] == 1.0 and len(seen) >= N_LAYERS + 1
    from modelpress.compression.base import Cancelled

    ctx = Context(tokenizer=tiny_tokenizer, should_stop=lambda: True)
    with pytest.raises(Cancelled):
        gptq.apply(fresh, gptq.GPTQConfig(num_samples=2, seq_len=32), ctx)


def test_gptq_self_calibration(llama, tiny_tokenizer):
    cfg = gptq.GPTQConfig(num_samples=2, seq_len=16, group_size=32, calibration_source="self")
    res = gptq.apply(llama, cfg, _ctx(tiny_tokenizer))
    assert res.metrics["calibration_tokens"] == 32


# ------------------------------------------------------------------ bad params


@pytest.mark.parametrize("name,params", [
    ("rtn", {"bits": 1}), ("rtn", {"bits": 9}), ("rtn", {"group_size": 4}),
    ("rtn", {"nonsense": 1}), ("gptq", {"dampening": 0}), ("gptq", {"num_samples": 0}),
    ("awq", {"grid": 1}), ("awq", {"clip_error": "full"}), ("awq", {"search_clip": 0.2}),
    ("awq", {"clip_refine": -1}), ("int8", {"bits": 4}), ("int8_dynamic", {"smoothing_alpha": 2}),
])
def test_bad_params_rejected(name, params):
    with pytest.raises(ValidationError):
        parse_params(name, params)


def test_group_size_none_and_minus_one_mean_per_channel():
    assert parse_params("rtn", {"group_size": -1}).group_size is None
    assert parse_params("gptq", {"group_size": None}).group_size is None


@pytest.mark.parametrize("name", ["rtn", "gptq", "awq", "int8"])
def test_group_size_validated_at_submission(name):
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64)
    m = get_method(name)
    with pytest.raises(CompressionError, match=r"group_size 128 .*576.*valid.*64"):
        m.check_model(parse_params(name, {"group_size": 128}), smol)
    m.check_model(parse_params(name, {"group_size": 64}), smol)
    m.check_model(parse_params(name, {"group_size": None}), smol)


def test_bad_group_size_refused_before_work(llama, tiny_tokenizer):
    calls = []
    ctx = Context(tokenizer=tiny_tokenizer, progress=lambda f, m: calls.append(f))
    with pytest.raises(CompressionError):
        gptq.apply(llama, gptq.GPTQConfig(group_size=48), ctx)  # 48 does not divide 64
    assert calls == []


def test_calibrated_methods_refuse_encoders():
    from transformers import BertConfig

    for name in ("gptq", "awq"):
        with pytest.raises(CompressionError):
            get_method(name).check_model(parse_params(name, {}), BertConfig())


def test_configs_have_descriptions():
    for name in ("int8", "int8_dynamic", "rtn", "gptq", "awq"):
        schema = get_method(name).config.model_json_schema()
        for field, spec in schema["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_write_safetensors_streams_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    from modelpress.compression.quantization.artifact import write_safetensors

    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
          "c": torch.randn(2, 2).half(), "d": torch.randn(4).bfloat16(),
          "e": torch.tensor(3, dtype=torch.int32), "f": torch.zeros(0, dtype=torch.int8),
          "g": torch.randint(-5, 5, (9,), dtype=torch.int8)}
    write_safetensors(tmp_path / "x.safetensors", lambda: iter(ts.items()), {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == ts.keys()
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    calls = []

    def changing():  # a producer that is not deterministic is refused, not written wrongly
        calls.append(1)
        yield "a", torch.zeros(len(calls))

    with pytest.raises(RuntimeError, match="changed between the two passes"):
        write_safetensors(tmp_path / "y.safetensors", changing)
