"""Pruning methods. ``METHODS`` is this family's part of the explicit registry."""

from ..base import Method
from . import magnitude

METHODS: list[Method] = [
    magnitude.METHOD,
]
