import pytest
import torch

from modelpress.compression import compress, parse_params
from modelpress.compression.evaluation import linear_sparsity, prunable_linears
from modelpress.compression.pruning.magnitude import MagnitudeConfig


@pytest.mark.parametrize("scope", ["layer", "row", "global"])
def test_magnitude_exact_sparsity(tiny_llama, scope):
    head_before = tiny_llama.lm_head.weight.detach().clone()
    res = compress(tiny_llama, MagnitudeConfig(sparsity=0.5, scope=scope))
    assert res.metrics["sparsity_linear"] == pytest.approx(0.5, abs=1e-3)
    if scope != "global":
        for lin in prunable_linears(tiny_llama).values():
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    # the output head (tied embedding) is untouched
    assert torch.equal(tiny_llama.lm_head.weight, head_before)


def test_magnitude_keeps_largest(tiny_llama):
    lin = prunable_linears(tiny_llama)["model.layers.0.mlp.up_proj"]
    before = lin.weight.detach().abs().clone()
    compress(tiny_llama, MagnitudeConfig(sparsity=0.3))
    kept = lin.weight != 0
    assert before[kept].min() >= before[~kept].max()


def test_magnitude_2_4(tiny_llama):
    compress(tiny_llama, MagnitudeConfig(pattern="2:4"))
    for lin in prunable_linears(tiny_llama).values():
        groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()
    assert linear_sparsity(tiny_llama) == pytest.approx(0.5)


@pytest.mark.parametrize("params", [{"sparsity": 1.0}, {"sparsity": 0}, {"sparsity": 0.5, "bogus": 1},
                                    {"pattern": "4:2"}])
def test_magnitude_rejects_bad_params(params):
    with pytest.raises(ValueError):
        parse_params("magnitude", params)
