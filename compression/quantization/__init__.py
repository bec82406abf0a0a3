"""Quantization methods. ``METHODS`` is this family's part of the explicit registry."""

from ..base import Method
from . import awq, gptq, int8, int8_dynamic, rtn

METHODS: list[Method] = [
    int8.METHOD,
    int8_dynamic.METHOD,
    rtn.METHOD,
    gptq.METHOD,
    awq.METHOD,
]
