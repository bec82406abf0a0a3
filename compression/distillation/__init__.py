"""Distillation methods. ``METHODS`` is this family's part of the explicit registry."""

from ..base import Method
from . import distill

METHODS: list[Method] = [
    distill.METHOD,
]
