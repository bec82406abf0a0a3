"""Pure tensor functions for the floating-point formats GPUs serve (no modules, no I/O).

Conventions are compressed-tensors' (what vLLM reads and ``from_pretrained`` dequantizes):

* FP8 E4M3 (``torch.float8_e4m3fn``, max 448): ``w ~= q * scale``;
* NVFP4: FP4 E2M1 values (max 6) in groups of 16; each group's scale is stored in FP8 E4M3
  *multiplied by* a per-tensor fp32 ``global_scale``: ``w ~= q * scale / global_scale``;
  ``global_scale = 448 * 6 / amax(tensor)`` puts the largest group scale at the top of E4M3;
* MXFP4: E2M1 values in groups of 32 with power-of-two scales stored as E8M0 (a biased
  exponent, uint8): ``w ~= q * 2 ** (e - 127)``;
* E2M1 codes are 4-bit sign-magnitude indices into :data:`E2M1_VALUES`, two per uint8, the
  first value of a pair in the low nibble.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
#: the non-negative E2M1 values, index = the code's low three bits
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
_TINY = torch.finfo(torch.float32).tiny


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest FP8 E4M3 value (saturating at +-448), in float32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, sign in bit 3) of ``x`` rounded to the nearest E2M1 value, ties to
    the even mantissa (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4:
    compressed-tensors' ``cast_to_fp4``; ties are frequent in bfloat16), saturating at +-6."""
    a = x.float().abs()
    mag = torch.zeros_like(a, dtype=torch.uint8)
    for i, m in enumerate(_E2M1_MIDS.tolist()):
        mag += (a >= m) if i % 2 else (a > m)
    return mag | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 ``codes``."""
    mag = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -mag, mag)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    return e2m1_values(e2m1_codes(x))


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``[m, n]`` codes -> ``[m, n // 2]`` uint8 (compressed-tensors' ``weight_packed``)."""
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), -1).reshape(packed.shape[0], -1)


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    if w.shape[-1] % g:
        raise ValueError(f"group size {g} does not divide {w.shape[-1]} columns")
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // g, g)


# ------------------------------------------------------------------------------------ FP8


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale mapping ``amax`` onto E4M3's largest value (1 where amax is 0)."""
    s = amax.float() / E4M3_MAX
    return torch.where(s > 0, s, torch.ones_like(s))


def fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes ``[out, in]``, fp32 scale ``[out, 1]``): one scale per output channel."""
    scale = fp8_scale(w.float().abs().amax(1, keepdim=True))
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(w, (0, -w.shape[1] % cols, 0, -w.shape[0] % rows))


def fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes ``[out, in]``, fp32 scale ``[ceil(out/bh), ceil(in/bw)]``): one scale per
    ``bh x bw`` block (the edges padded with zeros, as compressed-tensors does)."""
    bh, bw = block
    p = _pad_to(w.float(), bh, bw)
    rb, cb = p.shape[0] // bh, p.shape[1] // bw
    amax = p.reshape(rb, bh, cb, bw).abs().amax((1, 3))
    scale = fp8_scale(amax)
    full = scale.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: w.shape[0], : w.shape[1]]
    return (w.float() / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """float32 weight of codes ``q`` with a per-channel (``[out, 1]``) or, given ``block``, a
    per-block ``scale``."""
    if block is not None:
        bh, bw = block
        scale = scale.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * scale.float()


def fake_fp8_tokens(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Dynamic FP8 fake quantization of activations: one scale per token (``group`` None) or per
    ``group`` consecutive features of a token (block-wise FP8's 1 x 128)."""
    shape = x.shape
    xf = x.float() if group is None else _groups(x, group)
    s = fp8_scale(xf.abs().amax(-1, keepdim=True))
    return (round_e4m3(xf / s) * s).reshape(shape).to(x.dtype)


def fake_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 fake quantization with a calibrated ``scale``."""
    return (round_e4m3(x.float() / scale) * scale).to(x.dtype)


# ------------------------------------------------------------------------------------ NVFP4


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """``448 * 6 / amax`` (1 where amax is 0), a 1-element fp32 tensor."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1).clamp_min(_TINY)
    g = E4M3_MAX * E2M1_MAX / a
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def _e2m1_err(wg: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (round_e2m1(wg / s.unsqueeze(-1)) * s.unsqueeze(-1) - wg).square().sum(-1)


def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor | None = None,
                   search: tuple[float, ...] = (1.0,)
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes ``[out, in]`` uint8, E4M3 group scales ``[out, in/16]`` as float32, global scale
    ``[1]``). ``search``: candidate fractions of each group's max mapped to 6 (1.0 = plain
    min/max); each group keeps the candidate with the smallest squared rounding error after its
    scale is itself rounded to E4M3."""
    wg = _groups(w, 16)
    gs = global_scale if global_scale is not None else nvfp4_global_scale(w.float().abs().amax())
    gs = gs.to(w.device)
    amax = wg.abs().amax(-1)
    best_s: torch.Tensor | None = None
    best_e: torch.Tensor | None = None
    for frac in search:
        s = round_e4m3(amax * frac / E2M1_MAX * gs)  # stored scale (multiplied by gs)
        s = torch.where(s > 0, s, torch.full_like(s, 2.0**-9))  # smallest E4M3 subnormal
        e = _e2m1_err(wg, s / gs)
        if best_s is None or best_e is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.minimum(e, best_e)
    if best_s is None:
        raise ValueError("search needs at least one candidate fraction")
    codes = e2m1_codes(wg / (best_s / gs).unsqueeze(-1)).reshape(w.shape)
    return codes, best_s, gs


def nvfp4_dequant(codes: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor
                  ) -> torch.Tensor:
    v = _groups(e2m1_values(codes), 16)
    return (v * (scale.float() / global_scale.float()).unsqueeze(-1)).reshape(codes.shape)


def fake_nvfp4_act(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation fake quantization: dynamic group-of-16 E4M3 scales under a calibrated
    per-tensor ``global_scale`` (compressed-tensors' ``dynamic: local``)."""
    xg = _groups(x, 16)
    gs = global_scale.to(x.device)
    s = round_e4m3(xg.abs().amax(-1) / E2M1_MAX * gs)
    s = torch.where(s > 0, s, torch.full_like(s, 2.0**-9)) / gs
    return (round_e2m1(xg / s.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


# ------------------------------------------------------------------------------------ MXFP4


def mxfp4_quantize(w: torch.Tensor, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[out, in]`` uint8, E8M0 biased exponents ``[out, in/32]`` uint8). The OCP rule
    takes ``floor(log2 amax) - 2`` (the group max may clip to 6x the scale); ``search`` also
    tries one exponent up and keeps the lower squared error per group."""
    wg = _groups(w, 32)
    amax = wg.abs().amax(-1).clamp_min(2.0**-126)
    e = torch.floor(torch.log2(amax)) - 2
    cands = [e, e + 1] if search else [e]
    errs = [_e2m1_err(wg, torch.exp2(c)) for c in cands]
    best = cands[0] if not search else torch.where(errs[1] < errs[0], cands[1], cands[0])
    best = best.clamp(-127, 127)
    codes = e2m1_codes(wg / torch.exp2(best).unsqueeze(-1)).reshape(w.shape)
    return codes, (best + 127).to(torch.uint8)


def mxfp4_dequant(codes: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    v = _groups(e2m1_values(codes), 32)
    return (v * torch.exp2(exps.float() - 127).unsqueeze(-1)).reshape(codes.shape)
