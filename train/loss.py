"""Policy-gradient loss terms for GRPO / Tree-GRPO, as in verl (which Tree-GRPO trains with).

Why these exact formulas: Tree-GRPO's numbers come from verl's `compute_policy_loss` (dual-clip
PPO, log-ratio clamped to +-20, token-mean), `kl_penalty(..., "low_var_kl")` (the k3 estimator,
clamped to +-10) and `entropy_from_logits` (its value: `treegym.train.logprobs.entropy`).
Reproducing a paper's claim with a different loss would not test the claim, so the functions
below follow verl line by line (verl/trainer/ppo/core_algos.py) and the unit tests pin them to
hand-computed values.

All functions take per-token tensors of shape (batch, seq) and a 0/1 `mask` of the same shape: the
mask is 1 on tokens the policy sampled and 0 on prompt, observation and padding tokens, so the
policy gradient, the KL and the entropy never see text the model did not write.
"""

from __future__ import annotations

from typing import Literal

import torch

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                              "seq-mean-token-sum-norm")

LOG_RATIO_CLAMP = 20.0   # verl clamps log(pi/pi_old) to +-20 before exp
KL_CLAMP = 10.0          # verl clamps the k3 estimate to +-10


def _check(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(like.shape)} (same as logp)")


def agg_loss(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce per-token values to a scalar over the masked tokens.

    - ``token-mean``: sum over all masked tokens / their count (every token weighs the same; what
      Tree-GRPO uses);
    - ``seq-mean-token-sum``: per sequence the sum over its tokens, then the mean over sequences;
    - ``seq-mean-token-mean``: per sequence the mean over its tokens, then the mean over sequences
      (sequences without a masked token are left out rather than producing NaN);
    - ``seq-mean-token-sum-norm``: the total sum divided by the padded length (Dr. GRPO).
    A batch with no masked token gives 0 (with a gradient path), never NaN.
    """
    _check("mask", mask, values)
    mask = mask.to(values.dtype)
    if agg == "token-mean":
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    if agg == "seq-mean-token-sum":
        return (values * mask).sum(-1).mean() if values.shape[0] else values.sum() * 0
    if agg == "seq-mean-token-mean":
        count = mask.sum(-1)
        rows = count > 0
        per_seq = (values * mask).sum(-1) / count.clamp_min(1.0)
        return per_seq[rows].sum() / rows.sum().clamp_min(1)
    if agg == "seq-mean-token-sum-norm":
        return (values * mask).sum() / max(values.shape[-1], 1)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2, dual_clip: float | None = 3.0,
                agg: str = "token-mean", clip_high: float | None = None,
                return_stats: bool = False):
    """Dual-clip PPO surrogate (Ye et al. 2020; verl `compute_policy_loss`).

    ratio = exp(clamp(logp - old_logp, +-20)); per token
    L = max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps_high)); for A < 0 additionally
    L = min(L, -A*c) (the dual clip: bounds how hard a very unlikely negative-advantage token can
    be pushed down). Returns the aggregated loss; with ``return_stats`` also a dict with the clip
    fractions and the approximate KL(old || new) (masked means, detached floats).
    """
    _check("old_logp", old_logp, logp)
    _check("advantages", advantages, logp)
    _check("mask", mask, logp)
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    clip_high = clip if clip_high is None else clip_high
    neg_kl = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_kl)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip_high)
    clipped = torch.maximum(losses1, losses2)
    if dual_clip is not None:
        losses3 = -advantages * dual_clip
        dual = torch.minimum(losses3, clipped)
        losses = torch.where(advantages < 0, dual, clipped)
    else:
        losses = clipped
    loss = agg_loss(losses, mask, agg)
    if not return_stats:
        return loss
    with torch.no_grad():
        m = mask.to(logp.dtype)
        n = m.sum().clamp_min(1.0)
        stats = {
            "clipfrac": float(((losses2 > losses1).to(m.dtype) * m).sum() / n),
            "clipfrac_lower": float((((clipped > -advantages * (dual_clip or float("inf")))
                                      & (advantages < 0)).to(m.dtype) * m).sum() / n),
            "approx_kl": float((-neg_kl * m).sum() / n),
        }
    return loss, stats


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (Schulman's "low variance" estimator, verl's
    ``low_var_kl``): with r = pi_ref/pi, k3 = r - log r - 1 >= 0, log r clamped to +-20 and the
    result clamped to +-10. Aggregate it with :func:`agg_loss` and the same mask as the PG term."""
    _check("ref_logp", ref_logp, logp)
    kl = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = torch.exp(kl) - kl - 1.0
    return torch.clamp(k3, -KL_CLAMP, KL_CLAMP)


def total_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
               entropy: torch.Tensor | None = None, clip: float = 0.2,
               dual_clip: float | None = 3.0, kl_coef: float = 0.0, entropy_coef: float = 0.0,
               agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, float]]:
    """PG loss + kl_coef * KL_k3 - entropy_coef * entropy, all masked and aggregated alike
    (verl's actor loss with ``use_kl_loss``). Returns the loss and float metrics."""
    pg, stats = policy_loss(logp, old_logp, advantages, mask, clip=clip, dual_clip=dual_clip,
                            agg=agg, return_stats=True)
    loss = pg
    stats["pg_loss"] = float(pg.detach())
    if ref_logp is not None and kl_coef:
        kl = agg_loss(kl_k3(logp, ref_logp), mask, agg)
        loss = loss + kl_coef * kl
        stats["kl"] = float(kl.detach())
    if entropy is not None:
        ent = agg_loss(entropy, mask, agg)
        stats["entropy"] = float(ent.detach())
        if entropy_coef:
            loss = loss - entropy_coef * ent
    stats["loss"] = float(loss.detach())
    return loss, stats
