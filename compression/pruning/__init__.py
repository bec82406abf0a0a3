"""Pruning methods. ``METHODS`` is this family's part of the explicit registry."""

from ..base import Method
from . import admm, lottery, magnitude, sparsegpt, structured, wanda

METHODS: list[Method] = [
    magnitude.METHOD,
    wanda.METHOD,
    sparsegpt.METHOD,
    admm.METHOD,
    lottery.METHOD,
    *structured.METHODS,
]
