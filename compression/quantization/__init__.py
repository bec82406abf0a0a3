"""Quantization methods. ``METHODS`` is this family's part of the explicit registry."""

from ..base import Method
from . import awq, fp4, fp8, gptq, int8, int8_dynamic, rtn

METHODS: list[Method] = [
    int8.METHOD,
    int8_dynamic.METHOD,
    rtn.METHOD,
    gptq.METHOD,
    awq.METHOD,
    fp8.METHOD,
    fp4.NVFP4,
    fp4.MXFP4,
]
