"""The benchmark's intervals on simulated studies whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treegym.train import stats


def _gaussian_study(rng, S, Q, mu, sd_seed, sd_q, sd_e):
    return mu + rng.normal(0, sd_seed, (S, 1)) + rng.normal(0, sd_q, (1, Q)) + rng.normal(0, sd_e, (S, Q))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _binary_arms(rng, S, Q, delta, sd_seed=0.3, sd_q=2.0):
    """Two arms scored 0/1 on the same Q questions: question difficulty shared, each arm's seeds
    independent training runs (a logit shift per seed), arm A better by `delta` in logit."""
    base = rng.normal(0.0, sd_q, (1, Q))
    pa = _sigmoid(base + delta + rng.normal(0, sd_seed, (S, 1)))
    pb = _sigmoid(base + rng.normal(0, sd_seed, (S, 1)))
    return (rng.random((S, Q)) < pa).astype(float), (rng.random((S, Q)) < pb).astype(float)


def _true_binary_difference(delta, sd_seed=0.3, sd_q=2.0, n=1_000_000):
    rng = np.random.default_rng(12345)
    base = rng.normal(0.0, sd_q, n)
    return float(np.mean(_sigmoid(base + delta + rng.normal(0, sd_seed, n))
                         - _sigmoid(base + rng.normal(0, sd_seed, n))))


@pytest.mark.parametrize("S,Q,sd_seed", [(3, 200, 0.15), (5, 100, 0.12), (8, 300, 0.08)])
def test_coverage_of_a_known_mean_gaussian(S, Q, sd_seed):
    """Seeds matter (as in the benchmark): close to 95%."""
    rng = np.random.default_rng(S * 1000 + Q)
    n, hit = 600, 0
    for _ in range(n):
        y = _gaussian_study(rng, S, Q, mu=0.02, sd_seed=sd_seed, sd_q=0.3, sd_e=0.4)
        iv = stats.interval(y)
        hit += iv.lo <= 0.02 <= iv.hi
    assert abs(hit / n - 0.95) < 0.03, hit / n


@pytest.mark.parametrize("S,sd_seed", [(3, 0.6), (5, 0.6), (8, 0.3)])
def test_coverage_of_a_known_paired_difference_binary(S, sd_seed):
    """EM-like 0/1 scores, the setting of the benchmark: the paired interval of A - B covers the
    population difference (seeds and questions redrawn each study) about 95% of the time."""
    truth = _true_binary_difference(0.25, sd_seed=sd_seed)
    rng = np.random.default_rng(7 + S)
    n, hit = 400, 0
    for _ in range(n):
        a, b = _binary_arms(rng, S=S, Q=300, delta=0.25, sd_seed=sd_seed)
        iv = stats.paired(a, b)
        hit += iv.lo <= truth <= iv.hi
    assert abs(hit / n - 0.95) < 0.035, (hit / n, truth)


@pytest.mark.parametrize("sd_seed", [0.0, 0.15])
def test_coverage_is_conservative_when_seeds_barely_matter(sd_seed):
    """The price of S - 1 degrees of freedom: wider than needed when the seed effect is small,
    never narrower (a verdict from it errs towards 'inconclusive', not towards a false claim)."""
    truth = _true_binary_difference(0.25, sd_seed=sd_seed)
    rng = np.random.default_rng(99)
    n, hit = 300, 0
    for _ in range(n):
        a, b = _binary_arms(rng, S=3, Q=300, delta=0.25, sd_seed=sd_seed)
        iv = stats.paired(a, b)
        hit += iv.lo <= truth <= iv.hi
    assert hit / n >= 0.94, hit / n


def test_ignoring_seeds_would_under_cover():
    """The reason for the crossed model: a per-score binomial interval (seeds ignored) misses a
    known difference far more often than 5% when seeds vary. Guards against a regression to it."""
    rng = np.random.default_rng(3)
    n, hit_naive, hit = 400, 0, 0
    for _ in range(n):
        y = _gaussian_study(rng, 3, 400, mu=0.0, sd_seed=0.05, sd_q=0.3, sd_e=0.3)
        naive = 1.96 * y.std(ddof=1) / math.sqrt(y.size)
        hit_naive += abs(y.mean()) <= naive
        iv = stats.interval(y)
        hit += iv.lo <= 0.0 <= iv.hi
    assert hit_naive / n < 0.8
    assert hit / n >= 0.94


def test_components_recover_known_values():
    rng = np.random.default_rng(0)
    y = _gaussian_study(rng, 200, 500, mu=0.5, sd_seed=0.1, sd_q=0.3, sd_e=0.2)
    c = stats.components(y)
    assert c.seed == pytest.approx(0.01, rel=0.25)
    assert c.question == pytest.approx(0.09, rel=0.1)
    assert c.resid == pytest.approx(0.04, rel=0.05)


def test_one_seed_needs_a_pilot_for_a_verdict():
    rng = np.random.default_rng(1)
    a, b = _binary_arms(rng, 1, 800, delta=3.0)
    alone = stats.paired(a, b)
    assert not alone.seed_var_known and alone.lo > 0
    assert stats.verdict(alone) == stats.INCONCLUSIVE  # clear on questions, silent on seeds
    with_pilot = stats.paired(a, b, seed_var=1e-4)
    assert with_pilot.seed_var_known and with_pilot.hi - with_pilot.lo > alone.hi - alone.lo
    assert stats.verdict(with_pilot) == stats.CONFIRMED


def test_verdicts():
    c = stats.Components(0, 0, 0, 3, 10)

    def iv(lo, hi):
        return stats.Interval((lo + hi) / 2, lo, hi, 5.0, 0.95, c, True)

    assert stats.verdict(iv(0.1, 2.0)) == stats.CONFIRMED
    assert stats.verdict(iv(-2.0, -0.1)) == stats.REFUTED
    assert stats.verdict(iv(-0.5, 0.5)) == stats.INCONCLUSIVE
    assert stats.verdict(iv(-0.5, 0.5), margin=1.0) == stats.EQUIVALENT
    assert stats.verdict(iv(-0.5, 1.5), margin=1.0) == stats.INCONCLUSIVE


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired(np.zeros((3, 10)), np.zeros((2, 10)))
    with pytest.raises(ValueError, match=">= 2 questions"):
        stats.interval(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="NaN"):
        stats.interval([[0.0, math.nan]])


@settings(max_examples=60, deadline=None)
@given(S=st.integers(2, 6), Q=st.integers(2, 40), seed=st.integers(0, 10_000), shift=st.floats(-5, 5))
def test_interval_is_shift_equivariant_and_contains_the_mean(S, Q, seed, shift):
    y = np.random.default_rng(seed).random((S, Q))
    iv, moved = stats.interval(y), stats.interval(y + shift)
    assert iv.lo <= iv.mean <= iv.hi
    assert moved.mean == pytest.approx(iv.mean + shift)
    assert moved.half_width == pytest.approx(iv.half_width, rel=1e-9, abs=1e-12)


def test_choose_design_meets_the_target_when_it_can():
    c = stats.Components(seed=1e-5, question=0.0, resid=0.25, n_seeds=3, n_questions=800)
    d = stats.choose_design(c, target_half_width=0.01, train_minutes_per_seed_arm=2.0,
                            eval_minutes_per_question_arm=0.001, arms=6, max_minutes=10_000)
    assert d.feasible and d.half_width <= 0.01
    assert stats.expected_half_width(c, d.seeds, d.questions) == pytest.approx(d.half_width)
    tight = stats.choose_design(c, target_half_width=0.01, train_minutes_per_seed_arm=2.0,
                                eval_minutes_per_question_arm=0.001, arms=6, max_minutes=40)
    assert not tight.feasible and tight.minutes <= 40


def test_choose_designs_shares_one_budget_between_parts():
    """Two envs, one budget: every part meets the target when the budget allows, the total stays
    inside it, and a part whose difference is noisier is given more seeds or questions."""
    quiet = stats.Components(seed=0.0, question=0.0, resid=0.05, n_seeds=3, n_questions=800)
    noisy = stats.Components(seed=5e-6, question=0.0, resid=0.15, n_seeds=3, n_questions=800)
    parts = [stats.Part(quiet, 1.0, 0.001, 6, 4000), stats.Part(noisy, 1.0, 0.001, 2, 4000)]
    a, b = stats.choose_designs(parts, target_half_width=0.01, max_minutes=500)
    assert a.feasible and b.feasible and a.half_width <= 0.01 and b.half_width <= 0.01
    assert a.minutes + b.minutes <= 500 and b.seeds * b.questions > a.seeds * a.questions
    # a budget too small for the target: the widest interval is made as narrow as the budget allows
    tight = stats.choose_designs(parts, target_half_width=0.001, max_minutes=60)
    assert not any(d.feasible for d in tight) and sum(d.minutes for d in tight) <= 60
    with pytest.raises(ValueError, match="no design fits"):
        stats.choose_designs(parts, target_half_width=0.01, max_minutes=1)
