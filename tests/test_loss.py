"""Loss terms against values computed by hand (numbers written out below)."""

import math

import pytest
import torch

from treegym.train.logprobs import entropy
from treegym.train.loss import agg_loss, kl_k3, policy_loss, total_loss

LN = math.log


def _batch():
    # Row 0: ratios 1.5, 0.5, 1.1, 5.0 with advantages +1, +1, -1, -1, all tokens sampled.
    # Row 1: ratios 0.7, 1.0 on sampled tokens (A = -2, +0.5); two observation tokens whose
    #        log-ratio (+10) and advantages would dominate the loss if the mask leaked.
    old = torch.zeros(2, 4, dtype=torch.float64)
    logp = torch.tensor([[LN(1.5), LN(0.5), LN(1.1), LN(5.0)],
                         [LN(0.7), 0.0, 10.0, 10.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-2.0, 0.5, 0.5, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return logp, old, adv, mask


# Per-token dual-clip losses, by hand (eps = 0.2, c = 3):
#  r=1.5, A=+1: max(-1.5, -1.2)           = -1.2  (clipped)
#  r=0.5, A=+1: max(-0.5, -0.8)           = -0.5
#  r=1.1, A=-1: max(1.1, 1.1) ; min(3, .) =  1.1
#  r=5.0, A=-1: max(5.0, 1.2) ; min(3, .) =  3.0  (dual clip)
#  r=0.7, A=-2: max(1.4, 1.6) ; min(6, .) =  1.6  (clipped)
#  r=1.0, A=.5: -0.5
# sum = 3.5 over 6 tokens; row sums 2.4 and 1.1; row means 0.6 and 0.55.
@pytest.mark.parametrize("agg,expected", [
    ("token-mean", 3.5 / 6),
    ("seq-mean-token-sum", (2.4 + 1.1) / 2),
    ("seq-mean-token-mean", (0.6 + 0.55) / 2),
    ("seq-mean-token-sum-norm", 3.5 / 4),
])
def test_policy_loss_hand_values(agg, expected):
    logp, old, adv, mask = _batch()
    assert float(policy_loss(logp, old, adv, mask, agg=agg)) == pytest.approx(expected, abs=1e-9)


def test_policy_loss_stats_and_gradient():
    logp, old, adv, mask = _batch()
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, return_stats=True)
    # ratio-clipped (l2 > l1): r=1.5 and r=0.7 -> 2 of 6; dual-clipped (A<0, L > 3|A|): r=5 -> 1/6
    assert stats["clipfrac"] == pytest.approx(2 / 6)
    assert stats["clipfrac_lower"] == pytest.approx(1 / 6)
    # approx_kl = mean(old - new) over the masked tokens
    assert stats["approx_kl"] == pytest.approx(-(LN(1.5) + LN(0.5) + LN(1.1) + LN(5) + LN(0.7)) / 6)
    loss.backward()
    # d/dlogp of -A*r = -A*r on unclipped tokens, 0 on clipped ones and on masked ones; /6 tokens
    expected = torch.tensor([[0.0, -0.5 / 6, 1.1 / 6, 0.0], [0.0, -0.5 / 6, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_dual_clip_off_and_log_ratio_clamp():
    logp = torch.tensor([[30.0]], dtype=torch.float64)  # log-ratio 30 -> clamped to 20
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([[-1.0]], dtype=torch.float64)
    mask = torch.ones(1, 1)
    # without the dual clip: max(e^20, 1.2) = e^20 (clamped ratio); with it: 3.0
    assert float(policy_loss(logp, old, adv, mask, dual_clip=None)) == pytest.approx(math.exp(20))
    assert float(policy_loss(logp, old, adv, mask)) == pytest.approx(3.0)


def test_masked_tokens_never_matter():
    logp, old, adv, mask = _batch()
    base = policy_loss(logp, old, adv, mask)
    logp2, adv2 = logp.clone(), adv.clone()
    logp2[1, 2:] = -50.0
    adv2[1, 2:] = 1e6
    assert float(policy_loss(logp2, old, adv2, mask)) == pytest.approx(float(base))
    ref = logp.clone()
    ref[1, 2:] = 123.0
    assert float(agg_loss(kl_k3(logp, ref), mask)) == pytest.approx(float(agg_loss(kl_k3(logp, logp), mask)))


def test_kl_k3_hand_values():
    logp = torch.tensor([[LN(0.5), LN(0.2), -30.0, -1.0]])
    ref = torch.tensor([[LN(0.25), LN(0.6), 0.0, -1.0]])
    # r = ref/pi: 0.5 -> 0.5 + ln2 - 1 = 0.193147; 3 -> 3 - ln3 - 1 = 0.901388;
    # log r = 30 -> clamped to 20 -> e^20 - 21 -> clamped to 10; equal -> 0
    expected = torch.tensor([[0.5 + LN(2) - 1, 3 - LN(3) - 1, 10.0, 0.0]])
    torch.testing.assert_close(kl_k3(logp, ref), expected, atol=1e-6, rtol=1e-6)
    assert float(expected[0, 0]) == pytest.approx(0.193147, abs=1e-6)
    mask = torch.tensor([[1, 1, 0, 1]])
    assert float(agg_loss(kl_k3(logp, ref), mask)) == pytest.approx((0.193147 + 0.901388) / 3, abs=1e-5)


def test_entropy_hand_values():
    logits = torch.tensor([[[0.0, 0.0], [0.0, LN(3)], [0.0, -float("inf")]]])
    # uniform over 2 -> ln 2; p = (1/4, 3/4) -> 0.25 ln 4 + 0.75 ln(4/3) = 0.562335; a token with
    # probability 0 adds nothing (0 log 0 = 0), not NaN
    torch.testing.assert_close(entropy(logits), torch.tensor([[LN(2), 0.562335, 0.0]]),
                               atol=1e-6, rtol=0)


def test_total_loss_combines_terms():
    logp, old, adv, mask = _batch()
    ref = logp.clone()
    ref[0, 0] = logp[0, 0] + LN(0.5)  # k3 = 0.193147 on one of 6 tokens
    ent = torch.full_like(logp, 2.0)
    loss, stats = total_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, kl_coef=0.1,
                             entropy_coef=0.01)
    assert stats["kl"] == pytest.approx(0.193147 / 6, abs=1e-6)
    assert stats["entropy"] == pytest.approx(2.0)
    assert float(loss) == pytest.approx(3.5 / 6 + 0.1 * 0.193147 / 6 - 0.01 * 2.0, abs=1e-6)


def test_empty_mask_and_bad_input():
    logp, old, adv, _ = _batch()
    zero = torch.zeros(2, 4)
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert float(policy_loss(logp, old, adv, zero, agg=agg)) == 0.0
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, old, adv, zero, agg="mean")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:, :3], zero)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, zero, dual_clip=0.5)
