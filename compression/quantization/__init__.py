"""Quantization methods. ``METHODS`` is this family's part of the explicit registry."""

from ..base import Method

METHODS: list[Method] = []
