import math

import pytest
import torch

from modelpress.compression.distillation.losses import (
    distillation_loss,
    hidden_state_loss,
    next_token_labels,
    uniform_layer_map,
)


def _hand(student, teacher, labels, T, alpha):
    """The Hinton loss written out with plain Python floats, position by position."""
    n, v = student.shape
    kl_sum = ce_sum = 0.0
    count = 0
    for i in range(n):
        if labels[i] == -100:
            continue
        count += 1
        zs = [student[i, j].item() / T for j in range(v)]
        zt = [teacher[i, j].item() / T for j in range(v)]
        ls = math.log(sum(math.exp(z) for z in zs))
        lt = math.log(sum(math.exp(z) for z in zt))
        ps = [z - ls for z in zs]  # log softmax
        pt = [z - lt for z in zt]
        kl_sum += sum(math.exp(pt[j]) * (pt[j] - ps[j]) for j in range(v))
        raw = [student[i, j].item() for j in range(v)]
        lse = math.log(sum(math.exp(z) for z in raw))
        ce_sum += lse - raw[labels[i]]
    kl, ce = kl_sum / count, ce_sum / count
    return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_matches_hand_computation(T, alpha):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g)
    t = torch.randn(5, 7, generator=g) * 2
    labels = torch.tensor([3, 0, -100, 6, 2])
    loss, kl, ce = distillation_loss(s, t, labels, T, alpha, return_parts=True)
    want, want_kl, want_ce = _hand(s, t, labels.tolist(), T, alpha)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # a part that does not apply (alpha 0 or 1) is reported as 0
    assert kl.item() == pytest.approx(want_kl if alpha > 0 else 0.0, rel=1e-5)
    assert ce.item() == pytest.approx(want_ce if alpha < 1 else 0.0, rel=1e-5)


def test_direction_is_teacher_from_student():
    """KL(p_t || p_s), not KL(p_s || p_t): they differ for asymmetric distributions."""
    s = torch.tensor([[4.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 2.0]])
    ps, pt = s.softmax(-1), t.softmax(-1)
    forward = (pt * (pt.log() - ps.log())).sum().item()
    reverse = (ps * (ps.log() - pt.log())).sum().item()
    assert abs(forward - reverse) > 0.1
    got = distillation_loss(s, t, None, T=1.0, alpha=1.0).item()
    assert got == pytest.approx(forward, rel=1e-6)


def test_edge_cases():
    s = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    # identical logits: no KL; alpha=1 -> exactly zero
    assert distillation_loss(s, s.clone(), labels, 3.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # alpha=0 is plain cross-entropy and needs no teacher
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 11), labels.reshape(-1))
    assert distillation_loss(s, None, labels, 2.0, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    # alpha=1 needs no labels
    assert distillation_loss(s, s + 1.0, None, 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        distillation_loss(s, s, labels, 0.0, 0.5)
    with pytest.raises(ValueError):
        distillation_loss(s, s, labels, 1.0, 1.5)
    with pytest.raises(ValueError):
        distillation_loss(s, None, labels, 1.0, 0.5)
    with pytest.raises(ValueError):
        distillation_loss(s, s[:, :2], labels, 1.0, 0.5)


def test_gradient_matches_softmax_difference():
    """d/dz_s of T^2 KL(p_t||p_s(z/T)) is T (p_s - p_t): the gradient scale is T-independent."""
    s = torch.randn(1, 6, requires_grad=True)
    t = torch.randn(1, 6)
    T = 3.0
    distillation_loss(s, t, None, T=T, alpha=1.0).backward()
    want = T * ((s.detach() / T).softmax(-1) - (t / T).softmax(-1))
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-6)


def test_next_token_labels_and_layer_map():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert next_token_labels(ids).tolist() == [[6, 7, 8, -100]]
    assert uniform_layer_map(3, 6) == [2, 4, 6]
    assert uniform_layer_map(22, 30)[-1] == 30
    assert uniform_layer_map(4, 4) == [1, 2, 3, 4]


def test_hidden_state_loss():
    t = [torch.randn(2, 3, 4) for _ in range(5)]  # embeddings + 4 blocks
    s = [t[0], t[2], t[4]]  # a 2-block student that equals teacher blocks 2 and 4
    assert hidden_state_loss(s, t, [2, 4]).item() == pytest.approx(0.0, abs=1e-7)
    s2 = [t[0], t[2], t[4] * 2]
    want = ((t[4] * 2 - t[4]).pow(2).mean() / t[4].pow(2).mean()).item() / 2
    assert hidden_state_loss(s2, t, [2, 4]).item() == pytest.approx(want, rel=1e-5)
