"""D3PO loss against hand-computed values and gradients (Eq. 14 with the official clip band).

The loss computes in fp32 (inputs are promoted), so values are compared to 1e-7.
"""

import math

import pytest
import torch

from prefdiff.training.losses import d3po_loss

LOG_11, LOG_09 = math.log(1.1), math.log(0.9)


def _run(policy, ref, h, **kw):
    policy = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    out = d3po_loss(policy, torch.tensor(ref, dtype=torch.float64), torch.tensor(h, dtype=torch.float64), **kw)
    out.loss.backward()
    return out, policy.grad


def test_policy_equals_reference_gives_ln2_and_half_beta_gradient():
    out, grad = _run([[-1.3, -0.7]], [[-1.3, -0.7]], [1.0])
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    # dL/dl_w = -beta * sigmoid(0) = -0.05, dL/dl_l = +0.05
    assert grad.flatten().tolist() == pytest.approx([-0.05, 0.05], abs=1e-7)
    assert out.clip_frac.item() == 0.0


def test_inside_band_hand_values():
    # log-ratios 0.05 (winner) and -0.05 (loser): z = 0.1 * 0.1 = 0.01
    out, grad = _run([[0.05, -0.05]], [[0.0, 0.0]], [1.0])
    assert out.loss.item() == pytest.approx(0.6881596, abs=1e-6)  # log(1 + e^-0.01)
    assert grad.flatten().tolist() == pytest.approx([-0.0497500, 0.0497500], abs=1e-7)  # beta * sigmoid(-0.01)
    assert out.implicit_acc.item() == 1.0
    assert out.mean_log_ratio.item() == pytest.approx(0.0)


def test_outside_band_is_clipped_with_zero_gradient():
    out, grad = _run([[0.2, -0.3]], [[0.0, 0.0]], [1.0])
    z = 0.1 * (LOG_11 - LOG_09)  # both ratios at the band edges: 0.0200671
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-z)), abs=1e-7)
    assert out.loss.item() == pytest.approx(0.6831640, abs=1e-6)  # ln2 - z/2 + z^2/8
    assert grad.tolist() == [[0.0, 0.0]]
    assert out.clip_frac.item() == 1.0


def test_one_side_clipped():
    # winner inside (0.05), loser below the band (-0.5 -> log 0.9): only the winner gets gradient
    out, grad = _run([[0.05, -0.5]], [[0.0, 0.0]], [1.0])
    z = 0.1 * (0.05 - LOG_09)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-z)), abs=1e-7)
    assert grad[0, 0].item() == pytest.approx(-0.1 / (1 + math.exp(z)), abs=1e-7)
    assert grad[0, 1].item() == 0.0
    assert out.clip_frac.item() == 0.5


def test_tie_gives_ln2_and_no_gradient():
    out, grad = _run([[0.05, -0.05]], [[0.0, 0.0]], [0.0])
    assert out.loss.item() == pytest.approx(math.log(2))
    assert grad.tolist() == [[0.0, 0.0]]
    assert math.isnan(out.implicit_acc.item())  # no decided pair


def test_swapping_preference_mirrors_the_loss():
    a, ga = _run([[0.03, -0.02]], [[0.0, 0.0]], [1.0])
    b, gb = _run([[-0.02, 0.03]], [[0.0, 0.0]], [-1.0])
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-7)
    assert ga.flatten().tolist() == pytest.approx(gb.flip(1).flatten().tolist(), abs=1e-7)


def test_batch_mean_and_beta():
    out, grad = _run([[0.05, -0.05], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0], beta=1.0)
    expected = (math.log1p(math.exp(-0.1)) + math.log(2)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)
    # each pair's gradient is divided by the batch size 2
    assert grad[1].tolist() == pytest.approx([-0.25, 0.25], abs=1e-7)
    assert out.implicit_acc.item() == 0.5  # second pair has margin 0, not > 0


def test_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        d3po_loss(torch.zeros(3), torch.zeros(3), torch.ones(3))
