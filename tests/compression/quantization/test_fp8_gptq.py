"""FP8 weights rounded with GPTQ's error feedback: same format, lower output error."""

from __future__ import annotations

import torch

from modelpress.compression.quantization import fpformats as F
from modelpress.compression.quantization.fp_gptq import gptq_fp8_channel


def test_gptq_fp8_lowers_output_error_and_keeps_the_format() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g)
    # correlated inputs with a few large features: where error feedback pays
    x = torch.randn(512, 96, generator=g) @ (torch.eye(96) + 0.3 * torch.randn(96, 96, generator=g))
    x[:, :4] *= 8
    h = 2 * x.T @ x / x.shape[0]
    codes, scale = gptq_fp8_channel(w, h)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (48, 1)
    q_rtn, s_rtn = F.fp8_channel(w)
    assert torch.equal(scale, s_rtn)  # the same per-channel scales: only the rounding moves

    def out_err(wq: torch.Tensor) -> float:
        return float(((x @ (w - wq).T) ** 2).mean())

    gptq_err = out_err(F.fp8_dequant(codes, scale))
    rtn_err = out_err(F.fp8_dequant(q_rtn, s_rtn))
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)
