"""Losses against hand-computed values and gradients: D3PO (Eq. 14 with the official clip band),
Diffusion-DPO (Eq. 14 of Wallace et al., both beta conventions), the SFT and reward-weighted baselines,
DDPO's clipped surrogate and its per-prompt advantages.

The losses compute in fp32 (inputs are promoted), so values are compared to 1e-7 .. 1e-6.
"""

import math

import pytest
import torch

from prefdiff.training.losses import (
    convert_beta,
    d3po_loss,
    ddpo_loss,
    diffusion_dpo_loss,
    per_prompt_advantages,
    per_sample_mse,
    reward_weighted_loss,
    sft_loss,
)

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


# ---------------------------------------------------------------------------------------------------------
# Diffusion-DPO: z = -(beta/2) * [(m_w - m_l) - (r_w - r_l)] (official), loss = mean(-log sigmoid(z))
# ---------------------------------------------------------------------------------------------------------


def _dpo(m_w, m_l, r_w, r_l, **kw):
    mw = torch.tensor(m_w, dtype=torch.float32, requires_grad=True)
    ml = torch.tensor(m_l, dtype=torch.float32, requires_grad=True)
    out = diffusion_dpo_loss(mw, ml, torch.tensor(r_w), torch.tensor(r_l), **kw)
    out.loss.backward()
    return out, mw.grad, ml.grad


def test_dpo_policy_equals_reference():
    out, g_w, g_l = _dpo([0.3], [0.5], [0.3], [0.5], beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)  # 0.693147
    assert out.implicit_acc.item() == 0.5  # z = 0 is a tie: half right
    assert out.implicit_acc_strict.item() == 0.0  # official count: a tie is wrong
    assert out.margin.item() == 0.0
    # dL/dm_w = (beta/2) * sigmoid(0) = beta/4 = 1250; dL/dm_l = -beta/4
    assert g_w.item() == pytest.approx(1250.0, rel=1e-7)
    assert g_l.item() == pytest.approx(-1250.0, rel=1e-7)
    assert out.model_mse.item() == pytest.approx(0.4) and out.ref_mse.item() == pytest.approx(0.4)


def test_dpo_scalar_case_both_conventions():
    # z = -25 * ((0.10 - 0.20) - (0.12 - 0.18)) = -25 * (-0.04) = 1; loss = softplus(-1)
    official, _, _ = _dpo([0.10], [0.20], [0.12], [0.18], beta=50.0)
    diffusers, _, _ = _dpo([0.10], [0.20], [0.12], [0.18], beta=25.0, convention="diffusers")
    for out in (official, diffusers):
        assert out.margin.item() == pytest.approx(1.0, abs=1e-6)
        assert out.loss.item() == pytest.approx(0.3132617, abs=1e-6)
        assert out.implicit_acc.item() == 1.0 and out.implicit_acc_strict.item() == 1.0


def test_dpo_sign_check():
    # z = -25 * ((0.14 - 0.18) - (-0.06)) = -0.5; loss = softplus(0.5)
    out, _, _ = _dpo([0.14], [0.18], [0.12], [0.18], beta=50.0)
    assert out.margin.item() == pytest.approx(-0.5, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.9740770, abs=1e-6)
    assert out.implicit_acc.item() == 0.0 and out.implicit_acc_strict.item() == 0.0


def test_dpo_tiny_tensor_case_through_per_sample_mse():
    eps = torch.tensor([[1.0, -1.0]])
    pred_w = torch.tensor([[1.5, -1.0]], requires_grad=True)
    pred_l = torch.tensor([[1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[1.0, -0.5]])
    m_w, m_l = per_sample_mse(pred_w, eps), per_sample_mse(pred_l, eps)
    r = per_sample_mse(ref, eps)
    assert (m_w.item(), m_l.item(), r.item()) == (0.125, 0.5, 0.125)
    out = diffusion_dpo_loss(m_w, m_l, r, r, beta=4.0)
    out.loss.backward()
    assert out.margin.item() == pytest.approx(0.75, abs=1e-7)  # -2 * (0.125 - 0.5)
    assert out.loss.item() == pytest.approx(0.3868710, abs=1e-7)
    assert out.implicit_acc.item() == 1.0
    # dL/dm_w = 2 sigmoid(-0.75) = 0.6416426; dm_w/dpred_w = (pred_w - eps) = [0.5, 0]
    assert pred_w.grad.flatten().tolist() == pytest.approx([0.3208213, 0.0], abs=1e-7)
    assert pred_l.grad.flatten().tolist() == pytest.approx([0.0, -0.6416426], abs=1e-7)


def test_per_sample_mse_means_over_non_batch_dims_in_fp32():
    pred = torch.zeros(2, 3, 2, 2, dtype=torch.float16)
    target = torch.ones(2, 3, 2, 2, dtype=torch.float16)
    target[1] = 2.0
    mse = per_sample_mse(pred, target)
    assert mse.dtype == torch.float32 and mse.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="same shape"):
        per_sample_mse(pred, target[:1])


def test_dpo_swapping_winner_and_loser_flips_z():
    a, _, _ = _dpo([0.10, 0.3], [0.20, 0.25], [0.12, 0.3], [0.18, 0.3], beta=50.0)
    b, _, _ = _dpo([0.20, 0.25], [0.10, 0.3], [0.18, 0.3], [0.12, 0.3], beta=50.0)
    assert b.margin.item() == pytest.approx(-a.margin.item(), abs=1e-6)


def test_dpo_shared_constant_leaves_loss_unchanged():
    a, _, _ = _dpo([0.10], [0.20], [0.12], [0.18], beta=50.0)
    b, _, _ = _dpo([0.35], [0.45], [0.12], [0.18], beta=50.0)  # +0.25 on both policy MSEs
    c, _, _ = _dpo([0.10], [0.20], [0.62], [0.68], beta=50.0)  # +0.5 on both reference MSEs
    assert b.loss.item() == pytest.approx(a.loss.item(), abs=1e-6)
    assert c.loss.item() == pytest.approx(a.loss.item(), abs=1e-6)


def test_dpo_mean_after_logsigmoid():
    # pairs with z = 1 and z = -0.5: loss is the mean of the two softplus values, not softplus of the mean z
    out, _, _ = _dpo([0.10, 0.14], [0.20, 0.18], [0.12, 0.12], [0.18, 0.18], beta=50.0)
    assert out.loss.item() == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    assert out.implicit_acc.item() == 0.5 and out.margin.item() == pytest.approx(0.25, abs=1e-6)


def test_convert_beta():
    assert convert_beta(5000.0, "official", "diffusers") == 2500.0
    assert convert_beta(2500.0, "diffusers", "official") == 5000.0
    assert convert_beta(convert_beta(123.0, "official", "diffusers"), "diffusers", "official") == 123.0
    with pytest.raises(ValueError, match="allowed: diffusers, official"):
        convert_beta(1.0, "official", "paper")
    with pytest.raises(ValueError, match="allowed: diffusers, official"):
        diffusion_dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, convention="x")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dpo_large_z_is_finite(sign):
    # z = -(2/2) * sign * (-200) = 200 * sign: log(sigmoid(-200)) would be -inf in fp32
    out, g_w, _ = _dpo([0.0], [sign * 200.0], [0.0], [0.0], beta=2.0)
    expected = 0.0 if sign > 0 else 200.0
    assert math.isfinite(out.loss.item()) and out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert math.isfinite(g_w.item())


def test_dpo_shape_error():
    with pytest.raises(ValueError, match=r"\[B\]"):
        diffusion_dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)


# ---------------------------------------------------------------------------------------------------------
# Supervised baselines
# ---------------------------------------------------------------------------------------------------------


def test_sft_is_plain_mean_of_winner_mse():
    m_w = torch.tensor([0.2, 0.4, 0.9], requires_grad=True)
    loss = sft_loss(m_w)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-7)
    assert m_w.grad.tolist() == pytest.approx([1 / 3] * 3, abs=1e-7)


def test_reward_weighted_softmax_weights():
    mse = torch.tensor([0.2, 0.4], requires_grad=True)
    # softmax([0, ln 3]) = [1/4, 3/4]; times N = 2 -> [0.5, 1.5]
    out = reward_weighted_loss(mse, torch.tensor([0.0, math.log(3)]))
    out.loss.backward()
    assert out.weights.tolist() == pytest.approx([0.5, 1.5], abs=2e-7)  # fp32 rounding of ln 3
    assert out.loss.item() == pytest.approx((0.5 * 0.2 + 1.5 * 0.4) / 2, abs=1e-7)  # 0.35
    assert mse.grad.tolist() == pytest.approx([0.25, 0.75], abs=1e-7)
    assert not out.weights.requires_grad
    # temperature 2 on rewards [0, 2 ln 3] gives the same weights
    hot = reward_weighted_loss(mse, torch.tensor([0.0, 2 * math.log(3)]), temperature=2.0)
    assert hot.weights.tolist() == pytest.approx([0.5, 1.5], abs=1e-6)


def test_reward_weighted_raw_rewards():
    out = reward_weighted_loss(torch.tensor([0.2, 0.4]), torch.tensor([1.0, 3.0]), normalize="none")
    assert out.loss.item() == pytest.approx((0.2 + 1.2) / 2, abs=1e-7)  # 0.7
    with pytest.raises(ValueError, match=">= 0"):
        reward_weighted_loss(torch.tensor([0.2, 0.4]), torch.tensor([-1.0, 3.0]), normalize="none")
    with pytest.raises(ValueError, match="allowed: none, softmax"):
        reward_weighted_loss(torch.tensor([0.2]), torch.tensor([1.0]), normalize="rank")


# ---------------------------------------------------------------------------------------------------------
# DDPO
# ---------------------------------------------------------------------------------------------------------


def test_ddpo_clipped_surrogate_by_hand():
    ratios = [1.5, 0.5, 1.05, 1.5, 0.5]
    adv = torch.tensor([1.0, 1.0, -2.0, -10.0, -1.0])  # -10 is clipped to -5
    logp = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    out = ddpo_loss(logp, torch.zeros(5), adv, clip_range=0.1)
    out.loss.backward()
    # per sample max(-A r, -A clip(r, 0.9, 1.1)):
    #   A=+1, r=1.5:  max(-1.5, -1.1) = -1.1  clipped  (grad 0)
    #   A=+1, r=0.5:  max(-0.5, -0.9) = -0.5  unclipped (grad -A r = -0.5)
    #   A=-2, r=1.05: max( 2.1,  2.1) =  2.1  inside band (grad 2.1)
    #   A=-5, r=1.5:  max( 7.5,  5.5) =  7.5  unclipped (grad 7.5)
    #   A=-1, r=0.5:  max( 0.5,  0.9) =  0.9  clipped  (grad 0)
    assert out.loss.item() == pytest.approx((-1.1 - 0.5 + 2.1 + 7.5 + 0.9) / 5, abs=1e-6)  # 1.78
    assert logp.grad.tolist() == pytest.approx([0.0, -0.1, 0.42, 1.5, 0.0], abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(0.8)
    assert out.approx_kl.item() == pytest.approx(0.1292090, abs=1e-6)  # 0.5 * mean(log r ^ 2)


def test_ddpo_on_policy_value_and_default_clip():
    # ratio 1 (logp == old_logp), A = -1: loss 1 (the TRL test case); gradient -A * ratio / N
    logp = torch.tensor([-0.7, -0.7], requires_grad=True)
    out = ddpo_loss(logp, torch.tensor([-0.7, -0.7]), torch.tensor([-1.0, 3.0]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx((1.0 - 3.0) / 2, abs=1e-7)
    assert logp.grad.tolist() == pytest.approx([0.5, -1.5], abs=1e-7)
    assert out.clip_frac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_per_prompt_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 5.0])
    ids = ["a", "a", "b", "b", "c"]
    adv = per_prompt_advantages(rewards, ids)
    # a: mean 2, population std 1; b: std 0 -> 0; c: single sample -> batch mean 5.8, std sqrt(13.36)
    expected = [-1 / (1 + 1e-6), 1 / (1 + 1e-6), 0.0, 0.0, (5.0 - 5.8) / (math.sqrt(13.36) + 1e-6)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert adv[4].item() == pytest.approx(-0.2188703, abs=1e-6)
    # min_count=1: a lone prompt is its own group -> 0
    assert per_prompt_advantages(rewards, ids, min_count=1)[4].item() == 0.0
    # min_count=3: every prompt falls back to the batch statistics
    glob = per_prompt_advantages(rewards, ids, min_count=3)
    assert glob.tolist() == pytest.approx([-1.3132216, -0.7660459, 1.1490689, 1.1490689, -0.2188703], abs=1e-6)
    with pytest.raises(ValueError, match="4 prompt ids for 5 rewards"):
        per_prompt_advantages(rewards, ids[:4])
