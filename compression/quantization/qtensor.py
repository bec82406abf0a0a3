"""Pure tensor functions for integer weight quantization (no modules, no I/O).

Conventions match the compressed-tensors format so the integers we compute are exactly what
``transformers`` dequantises on load:

* integers are signed: ``q in [-2**(b-1), 2**(b-1) - 1]`` (int4: -8..7, int8: -128..127);
* ``w ~= (q - zero_point) * scale``; symmetric schemes have ``zero_point == 0``;
* ``scale`` / ``zero_point`` have shape ``[out_features, n_groups]`` (``n_groups == 1`` for
  per-channel quantization), groups are consecutive runs of ``group_size`` input columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def effective_group(group_size: int | None, in_features: int) -> int:
    """``None`` (or <= 0) means one group per output channel."""
    return in_features if not group_size or group_size <= 0 else group_size


def check_group(group_size: int | None, in_features: int, name: str = "") -> None:
    g = effective_group(group_size, in_features)
    if in_features % g:
        raise ValueError(f"group_size {g} does not divide in_features {in_features} {name}".strip())


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    out, inf = w.shape
    return w.reshape(out, inf // g, g)


def minmax_qparams(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, float dtype) zero point that map ``[wmin, wmax]`` onto the
    integer grid. ``wmin <= 0 <= wmax`` is enforced so that zero is exactly representable."""
    qmin, qmax = qrange(bits)
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if symmetric:
        amax = torch.maximum(-wmin, wmax)
        scale = amax / ((qmax - qmin) / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    scale = (wmax - wmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(qmin - torch.round(wmin / scale), qmin, qmax)
    return scale, zp


def quantize_grouped(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int
                     ) -> torch.Tensor:
    """Integers (int8 tensor, ``w.shape``) for ``w`` given per-group ``scale``/``zp``."""
    qmin, qmax = qrange(bits)
    g = w.shape[1] // scale.shape[1]
    wg = _grouped(w.float(), g)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zp.unsqueeze(-1), qmin, qmax)
    return q.reshape(w.shape).to(torch.int8)


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = q.shape[1] // scale.shape[1]
    qg = _grouped(q.float(), g)
    return ((qg - zp.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape).to(dtype)


def _fq_error(wg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, norm: float,
              col_weight: torch.Tensor | None, blocks: bool = False) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    s, z = scale.unsqueeze(-1), zp.unsqueeze(-1)
    d = torch.div(wg, s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(wg)
    if blocks:  # col_weight: per-group blocks [n_groups, g, g] of H; error d^T H_gg d
        return (torch.einsum("...ng,ngh->...nh", d, col_weight) * d).sum(-1)
    err = d.square_() if norm == 2 else d.abs_().pow_(norm)
    if col_weight is not None:
        err.mul_(col_weight)
    return err.sum(-1)


#: elements of one batch of clipping trials' work tensor in :func:`search_qparams`. On a GPU the
#: search is bound by kernel launches: many trials per op (64 MB). On the CPU by memory traffic:
#: batching pays only while a batch stays in cache (1 MB); a whole SmolLM2 weight's trials ran
#: ~10% slower batched (one trial per op then, as before)
_TRIAL_ELEMS_GPU = 1 << 24
_TRIAL_ELEMS_CPU = 1 << 18


def _trial_steps(steps: list[float] | list[torch.Tensor], max_shrink: float, grid: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink steps stacked on a new first dim (``[k, 1, 1]`` for numbers, ``[k, out, groups]``
    for per-group tensors) and the fraction of min/max each keeps (for numbers worked out in
    double precision, as a Python scalar would be)."""
    if isinstance(steps[0], torch.Tensor):
        st = torch.stack(steps)
        return st, 1 - max_shrink * st / grid
    st = torch.tensor(steps, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    keep = torch.tensor([1 - max_shrink * i / grid for i in steps], dtype=torch.float32,
                        device=device).reshape(-1, 1, 1)
    return st, keep


def clipped_qparams(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point for min/max shrunk by the factor ``clip`` (no search)."""
    wg = _grouped(w.float(), effective_group(group_size, w.shape[1]))
    return minmax_qparams(wg.amin(-1) * clip, wg.amax(-1) * clip, bits, symmetric)


def search_qparams(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                   mse: bool = True, grid: int = 20, max_shrink: float = 0.4, norm: float = 2.0,
                   col_weight: torch.Tensor | None = None, asym_refine: int = 0,
                   coarse_to_fine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point for ``w`` (``[out, in]``).

    With ``mse`` the clipping range of every group is shrunk over ``grid`` steps down to
    ``1 - max_shrink`` of min/max and the one minimising ``sum(col_weight * |w - dq(w)|**norm)``
    is kept. ``col_weight``: optional per-input-column importance ``[in]`` (e.g. the Hessian
    diagonal), or a full ``[in, in]`` matrix ``H`` whose diagonal ``g x g`` blocks then weigh each
    group's error as ``d^T H_gg d`` (the group's own share of the layer's output error, cross-
    channel terms included; norm 2 only). ``coarse_to_fine``: every other step, then each group's
    two neighbours (about 60% of the trials, the same grid). ``asym_refine`` (asymmetric only):
    then move each end of the chosen range on its own by up to that many steps (the best range
    is rarely centred on the weights' own). Without ``mse`` plain min/max.
    """
    g = effective_group(group_size, w.shape[1])
    wg = _grouped(w.float(), g)
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    best_s, best_z = minmax_qparams(wmin, wmax, bits, symmetric)
    if not mse:
        return best_s, best_z
    cw, blocks = None, False
    if col_weight is not None and col_weight.dim() == 2:  # [in, in]: its diagonal g x g blocks
        ng = w.shape[1] // g
        idx = torch.arange(ng, device=w.device)
        cw, blocks = col_weight.float().reshape(ng, g, ng, g)[idx, :, idx, :], True
    elif col_weight is not None:
        cw = _grouped(col_weight.float().reshape(1, -1), g)
    best_err = _fq_error(wg, best_s, best_z, bits, norm, cw, blocks)
    best_i = torch.zeros_like(best_err)  # each group's chosen shrink step
    chunk = max(1, (_TRIAL_ELEMS_GPU if w.is_cuda else _TRIAL_ELEMS_CPU) // wg.numel())

    def trials(lo: list[float] | list[torch.Tensor], hi: list[torch.Tensor] | None = None) -> None:
        """Shrink min by ``lo[k]`` steps and max by ``hi[k]`` (default ``lo[k]``), each a number
        or a per-group tensor, ``chunk`` trials per tensor op (a few kernel launches instead of
        ~25 per trial: what bounds this search on a GPU); every group keeps its best trial, the
        earliest on ties (as one trial at a time would)."""
        nonlocal best_err, best_s, best_z, best_i
        for c in range(0, len(lo), chunk):
            steps_lo, keep_lo = _trial_steps(lo[c : c + chunk], max_shrink, grid, wmin.device)
            keep_hi = keep_lo if hi is None else \
                _trial_steps(hi[c : c + chunk], max_shrink, grid, wmin.device)[1]
            s, z = minmax_qparams(wmin * keep_lo, wmax * keep_hi, bits, symmetric)
            err = _fq_error(wg, s, z, bits, norm, cw, blocks)
            st = steps_lo.expand_as(s)
            if len(err) > 1:  # each group's best trial of the chunk
                err, k = err.min(0, keepdim=True)
                s, z, st = s.gather(0, k), z.gather(0, k), st.gather(0, k)
            better = err[0] < best_err
            best_err = torch.where(better, err[0], best_err)
            best_s = torch.where(better, s[0], best_s)
            best_z = torch.where(better, z[0], best_z)
            if hi is None:
                best_i = torch.where(better, st[0], best_i)

    if coarse_to_fine and grid >= 4:
        # every other step, then each group's own neighbours (the error is smooth in the shrink)
        trials([float(i) for i in range(2, grid + 1, 2)])
        centre = best_i.clone()
        trials([(centre + d).clamp(1, grid) for d in (-1, 1)])
    else:
        trials([float(i) for i in range(1, grid + 1)])
    if not symmetric and asym_refine > 0:
        # each end on its own around each group's common shrink (widening included), the
        # shrink kept under 95% of the range
        centre, top = best_i.clone(), 0.95 * grid / max_shrink
        pairs = [((centre + a).clamp(0, top), (centre + b).clamp(0, top))
                 for a in range(-asym_refine, asym_refine + 1)
                 for b in range(-asym_refine, asym_refine + 1) if a or b]
        trials([p[0] for p in pairs], [p[1] for p in pairs])
    return best_s, best_z


@dataclass
class QuantizedWeight:
    """The integer form of one Linear's weight, as it is written to the artifact."""

    q: torch.Tensor | None  # int8 [out, in]; None: derived from the float weight (codes_of)
    scale: torch.Tensor  # float [out, n_groups]
    zero_point: torch.Tensor  # float (integer-valued) [out, n_groups]
    bits: int
    group_size: int | None  # None: per channel
    symmetric: bool

    def kept_q(self) -> torch.Tensor:
        """The integer codes; raises when they were not kept."""
        if self.q is None:
            raise ValueError("integer codes not kept; use artifact.codes_of(module)")
        return self.q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_grouped(self.kept_q(), self.scale, self.zero_point, dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    mse: bool = True, col_weight: torch.Tensor | None = None,
                    grid: int = 20, max_shrink: float = 0.4, asym_refine: int = 0,
                    coarse_to_fine: bool = False) -> QuantizedWeight:
    """Round-to-nearest with (optionally) a per-group clipping search."""
    check_group(group_size, w.shape[1])
    scale, zp = search_qparams(w, bits, group_size, symmetric, mse=mse, col_weight=col_weight,
                               grid=grid, max_shrink=max_shrink, asym_refine=asym_refine,
                               coarse_to_fine=coarse_to_fine)
    q = quantize_grouped(w, scale, zp, bits)
    return QuantizedWeight(q, scale, zp, bits, group_size, symmetric)


@torch.no_grad()
def refit_scales(W: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor,
                 ridge: float = 1e-6) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """Least-squares scales for fixed integer codes.

    With the codes ``c = q - zero_point`` of every group held fixed, the layer's output error
    ``(W - Wq) H (W - Wq)^T`` (``H ~ X^T X`` of the calibration inputs) is a quadratic in each
    output row's per-group scales ``s``: ``s^T A s - 2 b^T s + const`` with
    ``A[g, h] = c_g^T H[g, h] c_h`` and ``b[g] = c_g^T (H w)_g``. Solving ``A s = b`` per row gives
    the scales that minimise the error exactly (cross-group terms included). A row keeps its old
    scales when the solution has a non-positive or non-finite scale or does not lower its error,
    so the error never grows. Returns ``(refitted, error_before, error_after)`` per row.
    """
    q = qw.kept_q()
    out, n = q.shape
    Hf = H.float().to(q.device)
    # rows are independent: a piece of rows at a time bounds the [rows, n] work tensors
    # (a stacked gate/up of Llama-3.2-1B is 16384 x 2048: 134 MB per float32 copy)
    step = max(1, _REFIT_ELEMS // n)
    parts = [_refit_rows(W[a : a + step].float(), q[a : a + step], qw.zero_point[a : a + step],
                         qw.scale[a : a + step], Hf, ridge) for a in range(0, out, step)]
    scale, e_before, e_after = (torch.cat(t) for t in zip(*parts))
    refitted = QuantizedWeight(qw.q, scale.to(qw.scale.dtype), qw.zero_point, qw.bits,
                               qw.group_size, qw.symmetric)
    return refitted, e_before, e_after


_REFIT_ELEMS = 2**22


def _refit_rows(Wf: torch.Tensor, q: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                Hf: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`refit_scales` for some rows: (scales, error before, error after) per row."""
    out, n = q.shape
    ng = scale.shape[1]
    g = n // ng
    c = q.float()
    c.view(out, ng, g).sub_(zero_point.float().unsqueeze(-1))
    HW = Wf @ Hf  # [out, n]
    b = (c * HW).reshape(out, ng, g).sum(-1)  # [out, ng]
    A = torch.empty(out, ng, ng, device=Wf.device)
    for h in range(ng):  # A is symmetric: the groups from h on, mirrored (half the work)
        # [out, n - h g]: c_h^T H[h, h:]
        cH = c[:, h * g : (h + 1) * g] @ Hf[h * g : (h + 1) * g, h * g :]
        A[:, h:, h] = cH.mul_(c[:, h * g :]).reshape(out, ng - h, g).sum(-1)
        A[:, h, h + 1 :] = A[:, h + 1 :, h]
    del cH
    s_old = scale.float()
    diag = torch.diagonal(A, dim1=1, dim2=2)
    degenerate = diag <= 1e-12 * diag.amax(dim=1, keepdim=True).clamp_min(1e-30)
    if degenerate.any():  # a group of all-zero codes: pin its scale to the old one
        A = torch.where(degenerate.unsqueeze(1) | degenerate.unsqueeze(2), 0.0, A)
        A.diagonal(dim1=1, dim2=2).copy_(torch.where(degenerate, 1.0, diag))
        b = torch.where(degenerate, s_old, b)
    reg = ridge * torch.diagonal(A, dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-30)
    A_reg = A + torch.diag_embed(reg.expand(out, ng))
    s_new = torch.linalg.solve(A_reg, b.unsqueeze(-1)).squeeze(-1)

    def err(s: torch.Tensor) -> torch.Tensor:  # error up to the constant w^T H w
        return (s.unsqueeze(1) @ A @ s.unsqueeze(-1)).reshape(out) - 2 * (b * s).sum(-1)

    ok = torch.isfinite(s_new).all(-1) & (s_new > 0).all(-1)
    s_new = torch.where(ok.unsqueeze(-1), s_new, s_old)
    e_old, e_new = err(s_old), err(s_new)
    better = e_new < e_old
    new_scale = torch.where(better.unsqueeze(-1), s_new, s_old)
    const = HW.mul_(Wf).sum(-1)
    return new_scale, e_old + const, torch.minimum(e_new, e_old) + const


@torch.no_grad()
def alternate_refit(W: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor, rounds: int = 3
                    ) -> QuantizedWeight:
    """Round-to-nearest codes and least-squares scales, alternately: re-round ``W`` on the
    refitted scales, refit the scales for the new codes, and keep a row's new codes and scales
    only where its output error (under ``H``) went down. ``rounds`` alternations at most."""
    best, _, best_err = refit_scales(W, qw, H)
    for _ in range(rounds - 1):
        q = quantize_grouped(W, best.scale, best.zero_point, best.bits)
        cand, _, err = refit_scales(W, QuantizedWeight(q, best.scale, best.zero_point, best.bits,
                                                       best.group_size, best.symmetric), H)
        better = err < best_err
        if not better.any():
            break
        best = QuantizedWeight(torch.where(better.unsqueeze(1), cand.kept_q(), best.kept_q()),
                               torch.where(better.unsqueeze(1), cand.scale, best.scale),
                               best.zero_point, best.bits, best.group_size, best.symmetric)
        best_err = torch.where(better, err, best_err)
    return best
