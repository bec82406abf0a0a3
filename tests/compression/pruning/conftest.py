"""Helpers shared by the calibrated-pruning tests (Wanda, SparseGPT, ADMM), as fixtures."""

import pytest
import torch

from modelpress.compression.calib.engine import find_blocks


def _block_linears(model):
    """Every Linear inside the transformer blocks, keyed ``"<block>.<name>"``."""
    _, blocks = find_blocks(model)
    return {f"{i}.{k}": lin for i, b in enumerate(blocks) for k, lin in b.named_modules()
            if isinstance(lin, torch.nn.Linear)}


def _correlated_inputs(n=512, d=32, seed=0):
    """``[n, d]`` inputs dominated by ``d/4`` directions (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d // 4, generator=g)
    mix = torch.randn(d // 4, d, generator=g)
    return base @ mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.fixture
def block_linears():
    return _block_linears


@pytest.fixture
def correlated_inputs():
    return _correlated_inputs
