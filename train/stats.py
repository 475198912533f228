"""Intervals, verdicts and power for the offline benchmark: seeds x test questions, crossed.

A benchmark score is the mean of a (seeds x questions) table: every training seed of an arm is
scored on the same test questions (EM is 0/1, web F1 in [0, 1]). Two things vary if the study is
run again: the training seeds (a new seed trains a different model) and the test questions (a new
draw from the same world asks other questions). Treating the S*Q scores as independent (the
binomial "±1.7 points" of earlier notes) ignores the first and overstates what one seed shows;
treating only the S seed means as the data ignores that a paired comparison on the same questions
cancels most of the question difficulty. The standard answer is the two-way crossed
random-effects model (Searle, Casella & McCulloch, *Variance Components*, 1992, ch. 4; its use for
ML evaluations: Bouthillier et al., "Accounting for variance in machine learning benchmarks",
MLSys 2021; Miller, "Adding error bars to evals", arXiv 2411.00640, 2024, clustered errors):

    y[s, q] = mu + a[s] + b[q] + e[s, q],   a ~ (0, var_seed), b ~ (0, var_question), e ~ (0, var_resid)

For a paired comparison of arms A and B, y is the per-question difference A - B on the same seed
index and question (seed index s of both arms shares the warm start and the test set; the pairing
is over questions, the seeds of the two arms are independent runs). The mean's variance is

    var(mean) = var_seed / S + var_question / Q + var_resid / (S * Q)

estimated from the ANOVA mean squares (components truncated at 0, the usual convention), with a
t quantile at the seeds' S - 1 degrees of freedom (`interval` says why not Satterthwaite's). With one seed the seed component cannot
be estimated: the interval then takes `var_seed` from a pilot (`seed_var=`) or says that it covers
the question sampling only (`Interval.seed_var_known` is False and no verdict is reached from it).

Why not a bootstrap: with the 2-5 seeds a CPU study can afford, a percentile bootstrap over seeds
under-covers badly (it cannot see more spread than its few clusters show), and the crossed
"resample rows and columns" bootstrap double-counts the residual. The analytic interval is what
the coverage test in tests/test_stats.py checks against simulated studies with a known effect.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _st


@dataclass(frozen=True)
class Components:
    """Variance components of a (seeds x questions) table, in squared score units."""

    seed: float
    question: float
    resid: float
    n_seeds: int
    n_questions: int

    def var_of_mean(self, n_seeds: int | None = None, n_questions: int | None = None) -> float:
        S = self.n_seeds if n_seeds is None else n_seeds
        Q = self.n_questions if n_questions is None else n_questions
        return self.seed / S + self.question / Q + self.resid / (S * Q)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% (or `level`) interval, in the table's units (x100 for EM points)."""

    mean: float
    lo: float
    hi: float
    df: float
    level: float
    components: Components
    seed_var_known: bool  # False: one seed and no pilot value, the interval ignores seed spread

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def as_dict(self) -> dict:
        out = asdict(self)
        out["half_width"] = self.half_width
        return out


def _table(scores: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    y = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[None, :]
    if y.ndim != 2 or y.shape[0] < 1 or y.shape[1] < 2:
        raise ValueError(f"scores must be a (seeds x questions) table with >= 2 questions, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("scores contain NaN or inf")
    return y


def components(scores: Sequence[Sequence[float]] | np.ndarray) -> Components:
    """ANOVA estimates of the crossed model's variance components (each truncated at 0).

    E[MS_seed] = Q var_seed + var_resid, E[MS_question] = S var_question + var_resid,
    E[MS_resid] = var_resid (one observation per cell, so interaction and noise are one term)."""
    y = _table(scores)
    S, Q = y.shape
    grand = y.mean()
    row, col = y.mean(axis=1), y.mean(axis=0)
    if S == 1:  # no seed replication: rows carry nothing, the residual is the question spread
        ms_c = float(((col - grand) ** 2).sum() / (Q - 1))
        return Components(seed=math.nan, question=ms_c, resid=0.0, n_seeds=1, n_questions=Q)
    ms_r = Q * float(((row - grand) ** 2).sum()) / (S - 1)
    ms_c = S * float(((col - grand) ** 2).sum()) / (Q - 1)
    resid = y - row[:, None] - col[None, :] + grand
    ms_e = float((resid ** 2).sum()) / ((S - 1) * (Q - 1))
    return Components(seed=max(0.0, (ms_r - ms_e) / Q), question=max(0.0, (ms_c - ms_e) / S),
                      resid=ms_e, n_seeds=S, n_questions=Q)


def interval(scores: Sequence[Sequence[float]] | np.ndarray, *, level: float = 0.95,
             seed_var: float | None = None) -> Interval:
    """Mean of a (seeds x questions) table and its `level` interval under the crossed model.

    Pass a paired difference table (A - B) to compare two arms. The variance of the mean is the
    components' var_seed/S + var_question/Q + var_resid/(SQ); the t quantile takes S - 1 degrees of
    freedom, the seed factor's. That is conservative when seeds barely matter (coverage up to ~100%
    at 3 seeds) and close to nominal when they dominate, which is the benchmark's case; the
    Satterthwaite (1946) df covered only 88-93% of simulated 3-8 seed studies with a real seed
    effect (tests/test_stats.py keeps the simulation).

    With one seed, `seed_var` (a pilot's estimate of the seed component, same units) stands in for
    the missing seed spread and the normal quantile is used; without it the interval covers the
    question sampling only and `seed_var_known` is False."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y = _table(scores)
    S, Q = y.shape
    c = components(y)
    known = S > 1 or seed_var is not None
    if S == 1:
        sv = float(seed_var) if seed_var is not None else math.nan
        c = Components(seed=sv, question=c.question, resid=0.0, n_seeds=1, n_questions=Q)
        var, df = (0.0 if math.isnan(sv) else sv) + c.question / Q, math.inf
    else:
        var, df = c.var_of_mean(), float(S - 1)
    mean = float(y.mean())
    quantile = float(_st.t.ppf(0.5 + level / 2, df)) if math.isfinite(df) else float(_st.norm.ppf(0.5 + level / 2))
    half = quantile * math.sqrt(max(var, 0.0))
    return Interval(mean=mean, lo=mean - half, hi=mean + half, df=df, level=level, components=c,
                    seed_var_known=known)


def paired(a: Sequence[Sequence[float]] | np.ndarray, b: Sequence[Sequence[float]] | np.ndarray, *,
           level: float = 0.95, seed_var: float | None = None) -> Interval:
    """Interval of mean(A) - mean(B) paired over the same test questions (and seed indices).

    Both tables are (seeds x questions) with the questions in the same order; the seed counts must
    match (seed index i of each arm starts from the same warm start and is scored on the same
    questions)."""
    ya, yb = _table(a), _table(b)
    if ya.shape != yb.shape:
        raise ValueError(f"paired tables differ in shape: {ya.shape} vs {yb.shape} "
                         f"(both arms need the same seeds and the same test questions)")
    return interval(ya - yb, level=level, seed_var=seed_var)


CONFIRMED, REFUTED, EQUIVALENT, INCONCLUSIVE = "confirmed", "refuted", "equivalent", "inconclusive"


def verdict(diff: Interval, *, margin: float = 0.0) -> str:
    """The verdict on the claim "A beats B" from the interval of A - B.

    confirmed: the whole interval is above 0; refuted: the whole interval is below 0 (B beats A);
    equivalent: the interval lies inside (-margin, +margin) (a tie shown, with margin > 0);
    inconclusive otherwise, and always when the seed spread was unknown (one seed, no pilot)."""
    if not diff.seed_var_known:
        return INCONCLUSIVE
    if diff.lo > 0:
        return CONFIRMED
    if diff.hi < 0:
        return REFUTED
    if margin > 0 and -margin < diff.lo and diff.hi < margin:
        return EQUIVALENT
    return INCONCLUSIVE


@dataclass(frozen=True)
class Design:
    """A study design chosen by `choose_design` and what it is expected to give."""

    seeds: int
    questions: int
    half_width: float  # expected half-width of a paired difference's interval
    minutes: float     # expected wall minutes of the whole study
    feasible: bool


def expected_half_width(c: Components, seeds: int, questions: int, level: float = 0.95) -> float:
    """The paired interval's expected half-width for a design, from a pilot's components (the t
    quantile at seeds - 1 df, the seed term's df dominating when few seeds are run)."""
    if seeds < 2:
        return math.inf
    var = c.var_of_mean(seeds, questions)
    return float(_st.t.ppf(0.5 + level / 2, seeds - 1)) * math.sqrt(var)


@dataclass(frozen=True)
class Part:
    """One independently designed part of a study (an env): its pilot components, its arms and
    what an arm-seed costs, in the same minutes as the study's budget."""

    components: Components
    train_minutes_per_seed_arm: float
    eval_minutes_per_question_arm: float
    arms: int
    max_questions: int = 4000


def _candidates(part: Part, max_seeds: int, level: float) -> list[Design]:
    qs = sorted({q for q in (50, 100, 200, 400, 800, 1200, 1600, 2400, 3200) if q <= part.max_questions}
                | {part.max_questions})
    return [Design(S, Q, expected_half_width(part.components, S, Q, level),
                   part.arms * S * (part.train_minutes_per_seed_arm + Q * part.eval_minutes_per_question_arm), False)
            for S in range(2, max_seeds + 1) for Q in qs]


def choose_designs(parts: Sequence[Part], *, target_half_width: float, max_minutes: float,
                   max_seeds: int = 10, level: float = 0.95) -> list[Design]:
    """One (seeds, questions) per part, sharing `max_minutes`: the cheapest combination whose
    every expected paired half-width reaches the target; else, within the budget, the one whose
    widest interval is narrowest (each Design then has feasible=False). Exhaustive over the
    candidates (a few dozen per part; a study has one part per env)."""
    if not parts:
        raise ValueError("choose_designs needs at least one part")
    best, fallback = None, None
    for combo in itertools.product(*(_candidates(p, max_seeds, level) for p in parts)):
        minutes = sum(d.minutes for d in combo)
        if minutes > max_minutes:
            continue
        widest = max(d.half_width for d in combo)
        if widest <= target_half_width and (best is None or minutes < best[0]):
            best = (minutes, combo)
        if fallback is None or (widest, minutes) < fallback[0]:
            fallback = ((widest, minutes), combo)
    if best is not None:
        return [Design(d.seeds, d.questions, d.half_width, d.minutes, True) for d in best[1]]
    if fallback is not None:
        return list(fallback[1])
    cheapest = sum(min(d.minutes for d in _candidates(p, max_seeds, level)) for p in parts)
    raise ValueError(f"no design fits {max_minutes:g} minutes: the cheapest (2 seeds, fewest questions) "
                     f"costs {cheapest:.0f} minutes")


def choose_design(c: Components, *, target_half_width: float, train_minutes_per_seed_arm: float,
                  eval_minutes_per_question_arm: float, arms: int, max_minutes: float,
                  max_seeds: int = 10, max_questions: int = 4000, level: float = 0.95) -> Design:
    """The cheapest (seeds, questions) whose expected paired half-width reaches the target within
    `max_minutes`; else the design with the narrowest interval that fits (feasible=False).

    Cost of one arm-seed: training minutes + questions x evaluation minutes per question."""
    part = Part(c, train_minutes_per_seed_arm, eval_minutes_per_question_arm, arms, max_questions)
    return choose_designs([part], target_half_width=target_half_width, max_minutes=max_minutes,
                          max_seeds=max_seeds, level=level)[0]
