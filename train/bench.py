"""`treegym bench`: chain GRPO vs Tree-GRPO at matched and smaller rollout budgets, offline.

The study (issue 8, Tree-GRPO arXiv 2509.21240 Table "budget"): start every run from the same SFT
warm start of the tiny model on the synthetic world, train with the same number of RL steps and
prompts per step, and compare test EM against the rollout budget in "chains per prompt":
chain GRPO at G = 2/4/8/16, Tree-GRPO M1N2L1 / M2N2L1 / M4N2L1 with E[B] = M·(1 + N·L/2).

Three disjoint question pools (issue 15): the warm start trained on `train`, RL prompts come from
`dev` (never in a warm start's gradient; a seeded permutation, so no prompt repeats within a run),
every score from `test`. An overlap, RL on test questions or a run that would repeat prompts is
refused before anything trains, as is a design whose estimated time exceeds `--max-minutes`.

Modes:
- `--quick` (what `make run` runs): one seed, chain G4 and G16 against tree M2N2L1 (E[B] = 4):
  the tree at the chain's matched budget (G4) and at a quarter of G16, on both envs' warm starts.
- `--pilot`: the matched-budget pair, 3 seeds, at two ways of spending the same RL prompts;
  measures the variance components of the paired difference and each env's costs, and chooses the
  study design (prompts per step, steps, seeds, test questions) for a ±1-point interval within a
  budget (`stats.choose_designs`). Writes `benchmarks/results/bench_pilot*.{md,json}`.
- `--study`: every arm of the three findings ((a) tree at ≤ ¼ and at the matched chain budget,
  (b) agent-step vs token-level nodes, (c) inter+intra vs inter-only / intra-only advantages) with
  a pilot's design (`--design`).
- default: the budget sweep (FULL_ARMS), `--ablations` adds the ablation arms.

Every report gives each arm's mean with a 95% interval over seeds × questions, a findings table
(paired differences over the same questions and seeds, with verdicts), and learning curves
(held-out score every few steps against cumulative generated tokens and update seconds).

The web-agent rows (issue 5) run the same samplers and trainer on `TreeWebAgent-v0` (search, visit,
click over the synthetic world rendered as a wiki), scored by token F1, the paper's web metric.
They start from `treegym/train/warmstart_web/`: the QA warm start with the web tool tags added and
fine-tuned on oracle browsing transcripts (`treegym sft --env TreeWebAgent-v0`).

Cost is reported as it is paid: generated tokens and tool calls per prompt (what the paper's
budget measures) *and* the wall time of rollouts and of updates separately — for a tiny model on
CPU the update, not the rollout, dominates (../shared/REFERENCE.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from treegym.agents.hf import HFPolicy
from treegym.envs.data import resolve_dataset
from treegym.train import stats
from treegym.train.config import TrainConfig
from treegym.train.evaluate import make_env, run_episodes, select_tasks, summarize
from treegym.train.sft import SFT_POOLS, WARMSTART_DIR, run_sft
from treegym.train.trainer import Trainer

QA_ENV, WEB_ENV = "TreeSearchQA-v0", "TreeWebAgent-v0"
WARMSTART_WEB_DIR = WARMSTART_DIR.parent / "warmstart_web"
WARMSTARTS = {QA_ENV: WARMSTART_DIR, WEB_ENV: WARMSTART_WEB_DIR}
# Per-env generation budget: a web action carries a URL (~20 tokens with the tiny tokenizer).
MAX_NEW_TOKENS = {QA_ENV: 24, WEB_ENV: 32}
# Per-env RL learning rate. QA: 1e-4 (see `--lr`). Web: 2e-5, because at 1e-4 the web policy drifts
# from its start 5-15x faster than the QA one (KL 0.19-0.29 vs 0.04 after 12 steps; its start's
# per-token entropy is 0.9 vs 0.45) and loses comparison questions it held only barely: chain G4
# fell to 38.8 F1 (3 seeds) from the start's 43.2, while 2e-5 keeps 43.0 (KL 0.01-0.02);
# benchmarks/results/web_rl_drop.md and benchmarks/web_rl_drop.py.
LR = {QA_ENV: 1e-4, WEB_ENV: 2e-5}
HEADLINE = {QA_ENV: "EM", WEB_ENV: "F1"}  # the paper's metric per setting (summary keys em_* / f1_*)
REPO_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# Three disjoint question pools of the synthetic world (issue 15): the warm start's gradients come
# from TRAIN_POOL (`treegym sft`), RL prompts from RL_POOL (never in a warm start's gradient), and
# every test score, learning-curve point and SFT row from TEST_POOL.
RL_POOL, TEST_POOL = "dev", "test"


@dataclass(frozen=True)
class Arm:
    method: str   # "chain" | "tree_grpo" | ablation names
    config: str   # "G4", "M2N2L1", ...
    budget: float  # expected chains per prompt
    algo: str
    rollout: dict
    advantage: str = ""


def chain_arm(G: int) -> Arm:
    return Arm("chain", f"G{G}", float(G), "grpo", {"G": G})


def tree_arm(M: int, N: int = 2, L: int = 1, method: str = "tree_grpo", advantage: str = "",
             granularity: str = "step") -> Arm:
    cfg = f"M{M}N{N}L{L}" + ("-token" if granularity == "token" else "")
    return Arm(method, cfg, M * (1 + N * L / 2), "tree_grpo",
               {"M": M, "N": N, "L": L, "granularity": granularity}, advantage)


QUICK_ARMS = (chain_arm(4), chain_arm(16), tree_arm(2))
WEB_QUICK_ARMS = (chain_arm(4), tree_arm(2))  # the web row: matched budget
FULL_ARMS = (chain_arm(2), chain_arm(4), chain_arm(8), chain_arm(16), tree_arm(1), tree_arm(2), tree_arm(4))
ABLATION_ARMS = (tree_arm(2, method="tree_grpo_token", granularity="token"),
                 tree_arm(2, method="tree_grpo_inter", advantage="tree_grpo_inter"),
                 tree_arm(2, method="tree_grpo_intra", advantage="tree_grpo_intra"))


def select_arms(arms: Sequence[Arm], spec: str, *, check: bool = True) -> list[Arm]:
    """The arms named in `spec` (comma list of config, method or method:config), in `arms` order;
    with `check`, a name that matches no arm is an error listing the names there are."""
    names = [t.strip() for t in spec.split(",") if t.strip()]

    def matches(arm: Arm, name: str) -> bool:
        return name in (arm.config, arm.method, f"{arm.method}:{arm.config}")

    unknown = [n for n in names if not any(matches(arm, n) for arm in arms)]
    if check and (unknown or not names):
        known = ", ".join(f"{arm.method}:{arm.config}" for arm in arms)
        raise SystemExit(f"treegym bench: --arms {spec!r}: no arm named {', '.join(unknown) or '(empty)'}; "
                         f"the arms of this study are {known} (--ablations adds the ablation arms)")
    return [arm for arm in arms if any(matches(arm, n) for n in names)]


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None outside a git checkout): a result made
    from uncommitted code says so."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _machine() -> str:
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")


def _committed(env_id: str, log: Any) -> Path | None:
    """The committed warm start of `env_id` after checking its sha256, or None when absent."""
    where = WARMSTARTS[env_id]
    meta_path = where / "sft_meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    weights = where / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta.get("model_sha256"):
        raise RuntimeError(f"{weights} does not match its recorded sha256 in {meta_path}; "
                           f"rebuild it with `treegym bench --from-scratch`")
    log(f"warm start ({env_id}): {where} (sha256 {digest[:12]}, built by: {meta.get('command')})")
    return where


def _replan(env_id: str, sft_kwargs: dict) -> dict:
    """Repeat the committed run of `env_id`: same plan, cut at the same steps."""
    meta_path = WARMSTARTS[env_id] / "sft_meta.json"
    if not meta_path.is_file():
        return sft_kwargs
    meta = json.loads(meta_path.read_text())
    return {**sft_kwargs, "lm_steps": meta["lm_steps_planned"], "act_steps": meta["act_steps_planned"],
            "lm_stop": meta.get("lm_steps"), "act_stop": meta.get("act_steps", 0),
            "batch": meta["batch"], "lr": meta["lr"], "seed": meta["seed"]}


def warm_start(out: Path, *, from_scratch: bool, sft_kwargs: dict, log: Any,
               env_id: str = QA_ENV, qa_start: Path | None = None, data: Any = "synthetic",
               replan: bool = True) -> Path:
    """The committed warm start of `env_id` (hash-checked), or a fresh SFT run when asked or when
    missing. The web warm start grows from the QA one (`qa_start`, else the QA warm start).

    A fresh run repeats the committed run's plan (`replan`; steps, batch, lr, seed from its
    `sft_meta.json`); `replan=False` uses `sft_kwargs` as given (tests, other worlds)."""
    if not from_scratch:
        found = _committed(env_id, log)
        if found is not None:
            return found
        log(f"no committed warm start in {WARMSTARTS[env_id]}: building one (this takes a while)")
    base = None
    if env_id == WEB_ENV:
        base = qa_start or warm_start(out, from_scratch=from_scratch, log=log, sft_kwargs=sft_kwargs,
                                      data=data, replan=replan)
    target = out / ("sft" if env_id == QA_ENV else "sft_web")
    dataset = resolve_dataset(data) if isinstance(data, str) else data
    run_sft(dataset, target, log=log, model_dir=base, env_id=env_id,
            **(_replan(env_id, sft_kwargs) if replan else sft_kwargs))
    return target


def warmstart_pools(where: Path | None) -> dict | None:
    """The pools a warm start touched, from its `sft_meta.json` (None: not a `treegym sft` warm
    start, pools unknown). Warm starts older than the record have SFT_POOLS: `run_sft` has read
    no other split."""
    meta_path = Path(where) / "sft_meta.json" if where is not None else None
    if meta_path is None or not meta_path.is_file():
        return None
    return json.loads(meta_path.read_text()).get("pools") or SFT_POOLS


def check_pools(rl_split: str, starts: dict[str, Path | None], *, steps: int, prompts: int) -> dict:
    """Refuse, before anything trains, RL prompts from the test pool, from a pool a warm start
    trained on, or from a pool so small that a prompt would repeat within a run (the trainer draws
    a seeded permutation per epoch). `starts[env] = None` is a warm start still to be built by
    `treegym sft` (SFT_POOLS). Returns each env's warm-start pools for the results' metadata."""
    if rl_split == TEST_POOL:
        raise SystemExit(f"treegym bench: --rl-split {TEST_POOL}: the test questions score every arm; "
                         f"RL prompts must come from another pool (use --rl-split {RL_POOL})")
    pools = {}
    for env_id, where in starts.items():
        seen = warmstart_pools(where) if where is not None else SFT_POOLS
        pools[env_id] = seen
        if seen is not None and rl_split in seen["trained_on"]:
            raise SystemExit(f"treegym bench: --rl-split {rl_split}: the {env_id} warm start ({where or 'to be built'}) "
                             f"was trained on the {rl_split!r} questions, so RL on them measures memory, not "
                             f"search; use --rl-split {RL_POOL} (questions it never trained on)")
        try:
            size = len(make_env("synthetic", rl_split, env_id).unwrapped.tasks)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"treegym bench: --rl-split {rl_split}: {e}") from None
        if steps * prompts > size:
            raise SystemExit(f"treegym bench: {steps} steps x {prompts} prompts = {steps * prompts} RL prompts, but "
                             f"the {rl_split!r} pool of {env_id} has {size} questions: prompts would repeat within a "
                             f"run; use --steps x --prompts <= {size}")
    return pools


# What a run costs, in CPU seconds (of its process) at 1 torch thread: an RL step costs `train_s` x (budget +
# PROMPT_OVERHEAD) per prompt (the rollout and update of `budget` chains, plus the per-prompt work
# that does not grow with them: prompt encoding, scoring, packing), a greedy test question
# `eval_s`. PROMPT_OVERHEAD is from the quick run's chain G4 / G16 times (9.2 / 28.4 s for 96
# prompts at budgets 4 / 16); `treegym bench --pilot` measures `train_s` and `eval_s` per env and
# writes them to benchmarks/results/bench_pilot.json, which replaces these first guesses.
PROMPT_OVERHEAD = 1.7
FALLBACK_COSTS = {QA_ENV: {"train_s": 0.03, "eval_s": 0.013}, WEB_ENV: {"train_s": 0.1, "eval_s": 0.065}}
PILOT_FILE = REPO_RESULTS / "bench_pilot.json"


def read_pilots(files: Sequence[Path]) -> tuple[dict, dict]:
    """(design, costs) per env from pilot result files (`--pilot` writes them; a later file's env
    replaces an earlier one's); missing files are skipped."""
    design: dict = {}
    costs: dict = {}
    for f in files:
        if Path(f).is_file():
            data = json.loads(Path(f).read_text())
            design.update(data.get("design", {}))
            costs.update(data.get("costs", {}))
    return design, costs


def run_costs(files: Sequence[Path] = (PILOT_FILE,)) -> dict[str, dict[str, float]]:
    """Per-env cost constants: the pilots' measurements where present, else FALLBACK_COSTS."""
    measured = read_pilots(files)[1]
    return {env_id: measured.get(env_id, c) for env_id, c in FALLBACK_COSTS.items()}


@dataclass(frozen=True)
class Job:
    """One RL run of a study: an arm, a seed and everything its cost depends on."""

    env_id: str
    arm: Arm
    seed: int
    steps: int
    prompts: int
    test_n: int
    curve_every: int
    curve_n: int

    @property
    def curve_points(self) -> int:
        return len(curve_steps(self.steps, self.curve_every))

    def cpu_seconds(self, costs: dict[str, dict[str, float]]) -> float:
        c = costs[self.env_id]
        train = self.steps * self.prompts * (self.arm.budget + PROMPT_OVERHEAD) * c["train_s"]
        return train + (self.test_n + self.curve_points * self.curve_n) * c["eval_s"]


def default_curve_every(steps: int) -> int:
    """A study's learning-curve spacing: a point after every quarter of the run."""
    return max(1, steps // 4)


def curve_steps(steps: int, every: int) -> list[int]:
    """The steps after which a run's learning curve is taken (the last step is the run's final
    test score, step 0 the SFT row's: neither is evaluated twice)."""
    return [s for s in range(every, steps, every)] if every > 0 else []


def estimate_minutes(jobs: Sequence[Job], sft_evals: dict[str, int], costs: dict, workers: int) -> float:
    """Expected wall minutes of a study: its CPU seconds spread over `workers` single-thread
    processes, each with a core to itself (the runs are independent and of similar length; a
    machine shared with other work takes longer)."""
    total = sum(j.cpu_seconds(costs) for j in jobs) + sum(n * costs[e]["eval_s"] for e, n in sft_evals.items())
    return total / max(1, workers) / 60


def run_arm(arm: Arm, seed: int, model_dir: Path, out: Path, *, steps: int, prompts: int,
            lr: float, minibatch_prompts: int = 2, test_n: int, threads: int, max_new_tokens: int, log: Any,
            env_id: str = QA_ENV, rl_split: str = RL_POOL, curve_every: int = 0, curve_n: int = 0,
            progress: bool = True) -> dict:
    """Train `arm` from `model_dir` for `steps` x `prompts` RL prompts of `rl_split`, then score it
    greedily on the env's `test_n` test questions. With `curve_every`, the first `curve_n` of those
    questions are also scored after every `curve_every` steps: the learning curve, against the
    cumulative generated tokens and update seconds at that step."""
    tag = "" if env_id == QA_ENV else "web-"
    cfg = TrainConfig(model=str(model_dir), env=env_id, data="synthetic", split=rl_split,
                      out=str(out / f"{tag}{arm.method}-{arm.config}-s{seed}"),
                      algo=arm.algo, advantage=arm.advantage, steps=steps, prompts_per_step=prompts,
                      minibatch_prompts=minibatch_prompts, seed=seed, eval_every=0, save_every=10 ** 9,
                      keep_checkpoints=1, save_trees_every=max(1, steps), threads=threads,
                      progress=progress)
    for k, v in arm.rollout.items():
        setattr(cfg.rollout, k, v)
    cfg.rollout.max_new_tokens = max_new_tokens
    cfg.optim.lr = lr
    metric = HEADLINE[env_id].lower()
    test_env = make_env("synthetic", TEST_POOL, env_id)
    tasks = select_tasks(test_env, test_n, seed=0)
    curve: list[dict] = []
    spent = {"tokens": 0.0, "update_s": 0.0, "curve_s": 0.0, "curve_cpu_s": 0.0}
    at = set(curve_steps(steps, curve_every))

    def on_step(trainer: Trainer, rec: dict) -> dict:
        spent["tokens"] += rec["tokens_per_prompt"] * prompts
        spent["update_s"] += rec["update_s"]
        if trainer.step not in at:
            return {}
        t, c = time.perf_counter(), time.process_time()
        m = test_metrics(trainer.policy, test_env, tasks[:curve_n], max_new_tokens)
        spent["curve_s"] += time.perf_counter() - t
        spent["curve_cpu_s"] += time.process_time() - c
        curve.append({"step": trainer.step, "tokens": spent["tokens"], "update_s": spent["update_s"],
                      metric: m[f"greedy/{metric}"]})
        return {f"curve/{metric}": m[f"greedy/{metric}"]}

    # Wall seconds say what a run took here; CPU seconds (this process, all its threads) are what
    # it costs, whatever else the machine was doing: the pilot's cost model uses those.
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg, log=log)
    records = trainer.train(on_step=on_step)
    train_wall = time.perf_counter() - t0 - spent["curve_s"]
    train_cpu = time.process_time() - c0 - spent["curve_cpu_s"]
    t1, c1 = time.perf_counter(), time.process_time()
    m = test_metrics(trainer.policy, test_env, tasks, max_new_tokens)
    eval_s, eval_cpu = time.perf_counter() - t1, time.process_time() - c1
    if curve_every:  # the final point: the same questions' scores in the final test run
        curve.append({"step": steps, "tokens": spent["tokens"], "update_s": spent["update_s"],
                      metric: float(statistics.fmean(m["scores"][metric][:curve_n]))})

    def mean(key: str) -> float:
        return float(statistics.fmean(r[key] for r in records)) if records else 0.0

    return {"env": env_id, "method": arm.method, "config": arm.config, "budget": arm.budget, "seed": seed,
            **_test_fields(m),
            "tokens_per_prompt": mean("tokens_per_prompt"),
            "tool_calls_per_prompt": mean("tool_calls_per_prompt"),
            "leaves_per_prompt": mean("leaves_per_prompt"),
            "train_reward": mean("reward"), "last_reward": records[-1]["reward"] if records else 0.0,
            "rollout_s": sum(r["rollout_s"] for r in records),
            "update_s": sum(r["update_s"] for r in records),
            "wall_s": train_wall, "eval_s": eval_s, "curve_s": spent["curve_s"], "threads": threads,
            "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu, "curve_cpu_s": spent["curve_cpu_s"],
            "steps": steps, "prompts": prompts, "curve": curve, "curve_n": curve_n if curve_every else 0}


def test_metrics(policy: Any, env: Any, tasks: Sequence[Any] | int, max_new_tokens: int) -> dict:
    """Greedy metrics on test tasks with each task's EM and F1 (`scores`): the intervals pair arms
    question by question. `env` is a test env or an env id, `tasks` a list or a count (the seeded
    choice every arm of an env shares)."""
    if isinstance(env, str):
        env = make_env("synthetic", TEST_POOL, env)
    if isinstance(tasks, int):
        tasks = select_tasks(env, tasks, seed=0)
    episodes = run_episodes(policy, env, tasks, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    return {**summarize(episodes, "greedy/"),
            "scores": {"task_ids": [e.task_id for e in episodes], "em": [float(e.em) for e in episodes],
                       "f1": [float(e.f1) for e in episodes]}}


def _test_fields(m: dict) -> dict:
    return {"test_em": m["greedy/em"], "test_f1": m["greedy/f1"], "test_n": int(m["greedy/episodes"]),
            "test_em_by_kind": {k.split("/")[-1]: v for k, v in m.items() if k.startswith("greedy/em/")},
            "test_scores": m["scores"]}


# The findings a study can decide (issue 15), each "A beats B" on the env's headline metric:
# (a) Tree-GRPO at <= 1/4 of a chain arm's budget vs that chain arm, and at the matched budget;
# (b) agent-step nodes vs token-level nodes; (c) inter+intra advantages vs inter-only / intra-only.
EQUIVALENCE_MARGIN = 0.01  # +-1 point: a tie this tight is reported as one, not as "inconclusive"


def _finding_pairs(arms: Sequence[tuple[str, str, float]]) -> list[tuple[str, tuple, tuple]]:
    """(finding, arm A, arm B) for every comparison the arms present allow; arm = (method, config, budget)."""
    pairs = []
    trees = [a for a in arms if a[0] == "tree_grpo"]
    for t in trees:
        for c in (a for a in arms if a[0] == "chain"):
            if t[2] <= c[2] / 4:
                pairs.append(("(a) tree at <= 1/4 of the chain budget", t, c))
            elif t[2] == c[2]:
                pairs.append(("(a) tree vs chain, matched budget", t, c))
        base = t[1]
        for other, finding in (("tree_grpo_token", "(b) agent-step vs token-level nodes"),
                               ("tree_grpo_inter", "(c) inter+intra vs inter-only advantages"),
                               ("tree_grpo_intra", "(c) inter+intra vs intra-only advantages")):
            for o in (a for a in arms if a[0] == other and a[1].split("-")[0] == base):
                pairs.append((finding, t, o))
    return pairs


def findings(rows: list[dict]) -> list[dict]:
    """Per-arm means with 95% intervals and the paired difference + verdict of every finding the
    arms allow, from each run's per-question scores (`treegym.train.stats`: seeds x questions,
    crossed). Runs without per-question scores (files from before issue 15) are left out."""
    out: list[dict] = []
    by_arm: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if "test_scores" in r and r["method"] != "sft":
            by_arm.setdefault((r.get("env", QA_ENV), r["method"], r["config"], r["budget"]), {})[r["seed"]] = r
    for env_id in dict.fromkeys(k[0] for k in by_arm):
        metric = HEADLINE[env_id].lower()
        arms = [k[1:] for k in by_arm if k[0] == env_id]

        def table(arm: tuple, seeds: Sequence[int]) -> list[list[float]]:
            runs = by_arm[(env_id, *arm)]
            return [runs[s]["test_scores"][metric] for s in seeds]

        for finding, a, b in _finding_pairs(arms):
            ra, rb = by_arm[(env_id, *a)], by_arm[(env_id, *b)]
            seeds = sorted(set(ra) & set(rb))
            if not seeds:
                continue
            if any(ra[s]["test_scores"]["task_ids"] != rb[s]["test_scores"]["task_ids"] for s in seeds):
                raise ValueError(f"{env_id}: {a} and {b} were scored on different test questions; "
                                 "a paired interval needs the same questions in the same order")
            diff = stats.paired(table(a, seeds), table(b, seeds))
            ia, ib = stats.interval(table(a, seeds)), stats.interval(table(b, seeds))
            out.append({"env": env_id, "finding": finding, "a": f"{a[0]}:{a[1]}", "b": f"{b[0]}:{b[1]}",
                        "metric": metric, "seeds": seeds, "questions": len(ra[seeds[0]]["test_scores"][metric]),
                        "a_interval": ia.as_dict(), "b_interval": ib.as_dict(), "diff": diff.as_dict(),
                        "verdict": stats.verdict(diff, margin=EQUIVALENCE_MARGIN)})
    return out


def _findings_lines(found: list[dict]) -> list[str]:
    if not found:
        return []
    lines = ["## Findings (paired over the same test questions and seeds; 95% intervals)", "",
             "| env | finding | A | B | A (95% CI) | B (95% CI) | A − B (95% CI) | seeds × questions | verdict |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]

    def ci(i: dict) -> str:
        return f"{100 * i['mean']:.1f} [{100 * i['lo']:.1f}, {100 * i['hi']:.1f}]"

    for f in found:
        verdict = f["verdict"] + ("" if f["diff"]["seed_var_known"] else " (1 seed: seed spread unknown)")
        lines.append(f"| {f['env']} | {f['finding']} | {f['a']} | {f['b']} | {ci(f['a_interval'])} | "
                     f"{ci(f['b_interval'])} | {ci(f['diff'])} | {len(f['seeds'])} × {f['questions']} | {verdict} |")
    lines += ["", "Intervals: crossed seeds × questions random effects (`treegym.train.stats`), t at seeds − 1 "
              "degrees of freedom. With one seed an interval covers the question sampling only and no "
              "verdict is reached. Verdict of \"A beats B\": confirmed (interval above 0), refuted (below 0), "
              f"equivalent (inside ±{100 * EQUIVALENCE_MARGIN:g} point), else inconclusive.", ""]
    return lines


def _agg(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("env", QA_ENV), r["method"], r["config"], r["budget"]), []).append(r)
    out = []
    for (env_id, method, config, budget), rs in groups.items():
        ems = [r["test_em"] for r in rs]
        f1s = [r["test_f1"] for r in rs]
        metric = HEADLINE[env_id].lower()
        ci = None  # 95% interval over seeds x questions, when every run kept its per-question scores
        if all("test_scores" in r for r in rs) and len({len(r["test_scores"][metric]) for r in rs}) == 1:
            ci = stats.interval([r["test_scores"][metric] for r in sorted(rs, key=lambda r: r["seed"])]).as_dict()
        out.append({"env": env_id, "method": method, "config": config, "budget": budget, "n": len(rs),
                    "em_mean": statistics.fmean(ems), "em_std": statistics.stdev(ems) if len(ems) > 1 else 0.0,
                    "f1_mean": statistics.fmean(f1s), "f1_std": statistics.stdev(f1s) if len(f1s) > 1 else 0.0,
                    "interval": ci,
                    **{k: statistics.fmean(r[k] for r in rs) for k in
                       ("tokens_per_prompt", "tool_calls_per_prompt", "rollout_s", "update_s", "wall_s")}})
    return out


def _lr_text(lr: Any) -> str:
    if isinstance(lr, dict):
        return ", ".join(f"{v:g} ({'QA' if e == QA_ENV else 'web'})" for e, v in lr.items())
    return f"{lr:g}"


def write_results(out: Path, rows: list[dict], meta: dict, stem: str | None = None
                  ) -> tuple[Path, Path, Path]:
    """The table (md), every row with the run's metadata (json) and the budget plot (png), as
    `out/results.{md,json}` + `out/budget.png`, or `out/STEM.{md,json,png}` when `stem` is given
    (how `--name` publishes into benchmarks/results/). Only this function writes them."""
    agg = _agg(rows)
    command = f"`{meta['command']}` · " if meta.get("command") else ""
    dirty = " (uncommitted changes)" if meta.get("dirty") else ""
    lines = [f"# treegym bench{' --quick' if meta.get('quick') else ''}", "",
             f"{command}commit `{meta['commit']}`{dirty} · {meta['machine']} · {meta['steps']} RL steps × "
             f"{meta['prompts']} prompts · lr {_lr_text(meta['lr'])} · greedy on {meta['test_n']} test tasks · "
             f"seeds {meta['seeds']}" + (f" · RL prompts from `{meta['rl_split']}`, test from `{TEST_POOL}`"
                                         if meta.get("rl_split") else "")
             + (f" · {meta['cpu_minutes']:.0f} CPU-minutes, {meta['wall_s'] / 60:.0f} wall minutes on "
                f"{meta.get('jobs', 1)} worker(s)" if "cpu_minutes" in meta else ""), ""]
    envs = list(dict.fromkeys(a["env"] for a in agg))
    plan = meta.get("plan") or {}
    if len(plan) > 1:  # each env's own design
        lines += [f"- {e}: {p['steps']} RL steps × {p['prompts']} prompts, {p['seeds']} seeds, greedy on "
                  f"{p['test_n']} test questions, learning curve every {p.get('curve_every', 0)} steps on "
                  f"{p['curve_n']}" for e, p in plan.items()]
        lines.append("")
    if meta.get("design"):
        lines += [f"Design: chosen by `stats.choose_designs` from the pilots' variance components and costs for "
                  f"{meta['study_cpu_minutes']:.0f} CPU-minutes; expected 95% half-width of a paired difference: "
                  + ", ".join(f"{e} ±{100 * d['expected_half_width']:.2f} ({d['seeds']} seeds × {d['test_n']})"
                              for e, d in meta["design"].items()), ""]
    for env_id in envs:
        name = HEADLINE[env_id]
        other = "F1" if name == "EM" else "EM"
        if len(envs) > 1 or env_id != QA_ENV:
            lines += [f"## {env_id} (test {name})", ""]
        lines += [f"| method | config | budget (chains/prompt) | test {name} (mean ± seed std) | 95% CI | "
                  f"test {other} | tokens/prompt | tool calls/prompt | rollout s | update s | seeds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in sorted((a for a in agg if a["env"] == env_id),
                        key=lambda a: (a["method"] != "sft", a["method"], a["budget"])):
            head, std, oth = a[f"{name.lower()}_mean"], a[f"{name.lower()}_std"], a[f"{other.lower()}_mean"]
            ci = a["interval"]
            ci_txt = (f"[{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]" + ("" if ci["seed_var_known"] else "*")) if ci else ""
            lines.append(f"| {a['method']} | {a['config']} | {a['budget']:g} | {100 * head:.1f} ± "
                         f"{100 * std:.1f} | {ci_txt} | {100 * oth:.1f} | {a['tokens_per_prompt']:.0f} | "
                         f"{a['tool_calls_per_prompt']:.2f} | {a['rollout_s']:.0f} | {a['update_s']:.0f} | {a['n']} |")
        lines.append("")
    lines += ["Budget = expected chains per prompt: chain G, tree M·(1+N·L/2). tokens/prompt and tool "
              "calls/prompt are measured per RL step (generated tokens, executed tool calls); rollout s and "
              "update s are summed over the run's steps (means over seeds). 95% CI: crossed seeds × questions "
              "(`treegym.train.stats.interval`); * = one seed, the interval covers the question sampling only.", ""]
    found = findings(rows)
    lines += _findings_lines(found)
    md = out / f"{stem or 'results'}.md"
    md.write_text("\n".join(lines))
    js = out / f"{stem or 'results'}.json"
    js.write_text(json.dumps({**meta, "rows": rows, "summary": agg, "findings": found}, indent=1))
    png = out / f"{stem or 'budget'}.png"
    _plot(agg, png)
    if any(r.get("curve") for r in rows):
        _plot_curves(rows, out / f"{stem or 'results'}_curves.png")
    return md, js, png


def _plot(agg: list[dict], png: Path) -> None:
    # Deferred on purpose: selecting the Agg backend at import time would change the backend of
    # any program that merely imports this module.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(a["env"] for a in agg))
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        name = HEADLINE[env_id]
        mean, std = f"{name.lower()}_mean", f"{name.lower()}_std"
        rows = [a for a in agg if a["env"] == env_id]
        for method in sorted({a["method"] for a in rows} - {"sft"}):
            pts = sorted((a["budget"], a[mean], a[std]) for a in rows if a["method"] == method)
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=3,
                        label=method)
        for a in rows:
            if a["method"] == "sft":
                ax.axhline(100 * a[mean], color="gray", linestyle="--", label="SFT start")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rollout budget (expected chains per prompt)")
        ax.set_ylabel(f"test {name} (%)")
        ax.set_title(f"chain GRPO vs Tree-GRPO: {env_id} (tiny model)", fontsize=10)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# The study of issue 15: every arm its three findings compare. The web env runs the matched-budget
# pair only (its chain G16 alone would cost as much as the whole QA part).
STUDY_ARMS = {QA_ENV: (chain_arm(4), chain_arm(16), tree_arm(2), *ABLATION_ARMS),
              WEB_ENV: (chain_arm(4), tree_arm(2))}
# The pilot: the matched-budget pair, 3 seeds, at two ways of spending the same 320 RL prompts
# (fewer, larger steps average more prompts into each gradient). QA runs both; the web env runs
# the one QA chooses. Its test sets: QA's whole pool, half of the web env's (the web eval is 5x
# dearer per question; the components are per question and do not depend on the count).
PILOT_ARMS = (chain_arm(4), tree_arm(2))
PILOT_SETTINGS = ((8, 40), (16, 20))  # (prompts per step, steps)
PILOT_SEEDS = 3
PILOT_TEST_N = {QA_ENV: 800, WEB_ENV: 400}
TARGET_HALF_WIDTH = 0.01  # the issue's +-1.0 EM point for a paired difference


def _worker_log(job: Job) -> Any:
    def log(msg: str) -> None:
        print(f"[{job.env_id} {job.arm.method}:{job.arm.config} seed {job.seed}] {msg}", file=sys.stderr, flush=True)
    return log


def _run_job(job: Job, start: str, out: str, opts: dict) -> dict:
    """One run, in a worker process when the study runs in parallel (top level: picklable)."""
    torch.set_num_threads(opts["threads"])
    return run_arm(job.arm, job.seed, Path(start), Path(out), steps=job.steps, prompts=job.prompts,
                   lr=opts["lr"][job.env_id], minibatch_prompts=opts["minibatch_prompts"], test_n=job.test_n,
                   threads=opts["threads"], max_new_tokens=opts["max_new_tokens"][job.env_id],
                   log=opts.get("log") or _worker_log(job), env_id=job.env_id, rl_split=opts["rl_split"],
                   curve_every=job.curve_every, curve_n=job.curve_n, progress=opts["progress"])


def run_jobs(jobs: Sequence[Job], starts: dict[str, Path], out: Path, opts: dict, *, workers: int,
             log: Any, on_row: Any = None) -> list[dict]:
    """Every job's row, in job order. With `workers` > 1 the runs go to that many single-thread
    worker processes (spawned: no forked torch state); a run's numbers do not depend on it (each
    run is seeded by its own seed, and 1 vs 2 torch threads gave the same rows, NOTES.md)."""
    rows: dict[int, dict] = {}

    def done(i: int, row: dict) -> None:
        rows[i] = row
        j = jobs[i]
        log(f"{len(rows)}/{len(jobs)} {j.env_id} {j.arm.method}:{j.arm.config} seed {j.seed}: "
            f"test {HEADLINE[j.env_id]} {row['test_' + HEADLINE[j.env_id].lower()]:.3f}, "
            f"{row['tokens_per_prompt']:.0f} tokens/prompt, rollout {row['rollout_s']:.0f}s, "
            f"update {row['update_s']:.0f}s")
        if on_row is not None:
            on_row([rows[k] for k in sorted(rows)])

    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            log(f"run {job.env_id} {job.arm.method} {job.arm.config} (budget {job.arm.budget:g}) seed {job.seed}: "
                f"{job.steps} steps × {job.prompts} prompts")
            done(i, _run_job(job, str(starts[job.env_id]), str(out), {**opts, "log": log}))
        return [rows[k] for k in sorted(rows)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_job, job, str(starts[job.env_id]), str(out), {**opts, "progress": False}): i
                   for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            done(futures[fut], fut.result())
    return [rows[k] for k in sorted(rows)]


def _costs_from(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per-env cost constants (CPU seconds) measured on a pilot's rows: see `Job.cpu_seconds`."""
    out = {}
    for env_id in dict.fromkeys(r["env"] for r in rows):
        rs = [r for r in rows if r["env"] == env_id and r["method"] != "sft"]
        units = sum(r["steps"] * r["prompts"] * (r["budget"] + PROMPT_OVERHEAD) for r in rs)
        out[env_id] = {"train_s": sum(r["train_cpu_s"] for r in rs) / units,
                       "eval_s": sum(r["eval_cpu_s"] for r in rs) / sum(r["test_n"] for r in rs)}
    return out


def _pair_table(rows: list[dict], env_id: str, a: Arm, b: Arm) -> tuple[list, list]:
    metric = HEADLINE[env_id].lower()

    def runs(arm: Arm) -> dict[int, dict]:
        return {r["seed"]: r for r in rows if r["env"] == env_id and r["method"] == arm.method
                and r["config"] == arm.config}

    ra, rb = runs(a), runs(b)
    seeds = sorted(set(ra) & set(rb))
    return ([ra[s]["test_scores"][metric] for s in seeds], [rb[s]["test_scores"][metric] for s in seeds])


def _study_part(env_id: str, c: stats.Components, costs: dict, steps: int, prompts: int, curve_n: int,
                test_pool: int) -> stats.Part:
    """An env's share of the study for `stats.choose_designs`, in CPU-minutes."""
    jobs = [Job(env_id, arm, 0, steps, prompts, 0, default_curve_every(steps), curve_n) for arm in STUDY_ARMS[env_id]]
    train = statistics.fmean(j.cpu_seconds(costs) for j in jobs) / 60
    return stats.Part(c, train, costs[env_id]["eval_s"] / 60, len(jobs), test_pool)


def design_study(settings: dict[str, tuple[int, int]], comps: dict[str, stats.Components], costs: dict, *,
                 cpu_minutes: float, curve_n: int) -> dict:
    """Seeds and test questions for every env of a study, chosen together for one budget of
    `cpu_minutes` (SFT rows' evals included) by `stats.choose_designs`, from each env's paired
    variance components and costs at its (prompts per step, steps) setting, for STUDY_ARMS."""
    envs = list(settings)
    pools = {e: len(make_env("synthetic", TEST_POOL, e).unwrapped.tasks) for e in envs}
    parts = [_study_part(e, comps[e], costs, settings[e][1], settings[e][0], curve_n, pools[e]) for e in envs]
    sft = sum(pools[e] * costs[e]["eval_s"] for e in envs) / 60
    designs = stats.choose_designs(parts, target_half_width=TARGET_HALF_WIDTH, max_minutes=cpu_minutes - sft)
    return {e: {"prompts": settings[e][0], "steps": settings[e][1], "seeds": d.seeds, "test_n": d.questions,
                "curve_every": default_curve_every(settings[e][1]), "curve_n": min(curve_n, d.questions),
                "expected_half_width": d.half_width, "cpu_minutes": d.minutes, "feasible": d.feasible,
                "components": comps[e].as_dict()}
            for e, d in zip(envs, designs)}


def pilot_design(rows: list[dict], envs: Sequence[str], setting: tuple[int, int], costs: dict, *,
                 cpu_minutes: float, curve_n: int) -> dict:
    """The study design from a pilot's rows: each env's paired (tree - chain G4) variance
    components at `setting`, then `design_study`."""
    comps = {}
    for env_id in envs:
        sel = [r for r in rows if r["env"] == env_id and (r["prompts"], r["steps"]) == setting]
        comps[env_id] = stats.paired(*_pair_table(sel, env_id, PILOT_ARMS[1], PILOT_ARMS[0])).components
    return design_study({e: setting for e in envs}, comps, costs, cpu_minutes=cpu_minutes, curve_n=curve_n)


def _meta(argv: list[str], a: argparse.Namespace, commit: str, dirty: bool | None, **extra: Any) -> dict:
    return {"argv": ["treegym", "bench", *argv], "command": shlex.join(["treegym", "bench", *argv]),
            "commit": commit, "dirty": dirty, "machine": _machine(), "quick": a.quick, "lr": {e: a.lr or LR[e] for e in LR},
            "minibatch_prompts": a.minibatch_prompts, "rl_split": a.rl_split, "test_pool": TEST_POOL,
            "jobs": a.jobs, **extra}


def curve_means(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Each (env, arm)'s learning curve averaged over its seeds, from step 0 (the SFT row's score on
    the same curve questions) to the last step: points with step, tokens, update_s and the metric."""
    sft = {r["env"]: r for r in rows if r["method"] == "sft"}
    out: dict[tuple[str, str], list[dict]] = {}
    for env_id, arm in dict.fromkeys((r["env"], f"{r['method']}:{r['config']}") for r in rows if r.get("curve")):
        metric = HEADLINE[env_id].lower()
        runs = [r for r in rows if r["env"] == env_id and f"{r['method']}:{r['config']}" == arm and r.get("curve")]
        n = min(len(r["curve"]) for r in runs)
        pts = [{k: statistics.fmean(r["curve"][i][k] for r in runs) for k in ("step", "tokens", "update_s", metric)}
               for i in range(n)]
        if env_id in sft and "test_scores" in sft[env_id]:
            first = sft[env_id]["test_scores"][metric][:runs[0]["curve_n"]]
            pts.insert(0, {"step": 0, "tokens": 0.0, "update_s": 0.0, metric: statistics.fmean(first)})
        out[(env_id, arm)] = pts
    return out


def _plot_curves(rows: list[dict], png: Path) -> None:
    """One figure per study: held-out score against cumulative generated tokens (left) and
    cumulative update seconds (right), one row per env, one line per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curve_means(rows)
    envs = list(dict.fromkeys(e for e, _ in curves))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {arm: palette[i % len(palette)] for i, arm in enumerate(dict.fromkeys(a for _, a in curves))}
    fig, axes = plt.subplots(len(envs), 2, figsize=(12, 4 * len(envs)), squeeze=False)
    for (ax_tok, ax_upd), env_id in zip(axes, envs):
        name = HEADLINE[env_id]
        for (e, arm), pts in curves.items():
            if e != env_id:
                continue
            ys = [100 * p[name.lower()] for p in pts]
            ax_tok.plot([p["tokens"] for p in pts], ys, marker="o", label=arm, color=color[arm])
            ax_upd.plot([p["update_s"] for p in pts], ys, marker="o", label=arm, color=color[arm])
        n = next(r["curve_n"] for r in rows if r["env"] == env_id and r.get("curve"))
        for ax, xlabel in ((ax_tok, "generated tokens (cumulative, per run)"), (ax_upd, "update seconds (cumulative)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"test {name} on {n} held-out questions (%)")
            ax.set_title(f"{env_id}: learning curves (mean over seeds)", fontsize=10)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def cli_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treegym bench", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 seed, chain G4/G16 vs tree M2N2L1 (what `make run` runs)")
    mode.add_argument("--pilot", action="store_true",
                      help="measure the variance components and costs, choose the study design "
                           "(benchmarks/results/bench_pilot.*)")
    mode.add_argument("--study", action="store_true",
                      help="every arm of the three findings with the design of the committed pilot "
                           "(benchmarks/results/bench_study.*)")
    p.add_argument("--design", type=Path, nargs="+", default=None,
                   help="pilot result files whose designs (--study) and measured costs (every estimate) to use "
                        "(default benchmarks/results/bench_pilot.json)")
    p.add_argument("--ablations", action="store_true", help="add token-level nodes and inter/intra-only advantages")
    p.add_argument("--arms", default=None,
                   help="run only these arms: comma list of configs (G16, M2N2L1), methods (chain, "
                        "tree_grpo_token) or method:config (tree_grpo:M2N2L1); e.g. the full-scale "
                        "ablations alone: --ablations --arms tree_grpo:M2N2L1,tree_grpo_token,tree_grpo_inter,"
                        "tree_grpo_intra")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--from-scratch", action="store_true", help="rebuild the SFT warm start instead of using the committed one")
    p.add_argument("--warmstart", type=Path, default=None, help="start from this model dir instead of the committed warm start")
    p.add_argument("--seeds", type=int, default=None, help="default 1 (quick) / 3 / the pilot's design (--study)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 12 quick / 30 / the pilot's)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per RL step (default 8 / the pilot's)")
    # Tiny-model RL defaults (ours). lr: the first quick run used 5e-4 (the GRPO lr in
    # ../shared/REFERENCE.md) and every arm fell *below* the SFT start (38.5% -> 15-24% test EM)
    # while KL to the start model rose from 0.0002 to 0.15-0.26 in 8 steps: the steps were too
    # large for 4-prompt gradients. 1e-4 and 2e-5 both kept or improved the start (all arms alike;
    # benchmarks/results/NOTES.md), so 1e-4 is the QA default (LR; the web env's is 2e-5). 2 prompts per minibatch; KL and
    # entropy coefficients 0.001 as in Tree-GRPO.
    p.add_argument("--lr", type=float, default=None, help="RL learning rate for every env (default: LR, "
                   "1e-4 QA and 2e-5 web)")
    p.add_argument("--minibatch-prompts", type=int, default=2)
    p.add_argument("--test-n", type=int, default=None, help="test tasks for EM (default 400 quick / 800 / the pilot's)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="per generation (default: QA 24, web 32 — a web action carries a URL)")
    p.add_argument("--env", nargs="+", choices=(QA_ENV, WEB_ENV), default=None,
                   help=f"envs to study (default: both with --quick/--pilot/--study — the web env runs the "
                        f"matched-budget pair — and {QA_ENV} only for the full study)")
    p.add_argument("--rl-split", default=RL_POOL,
                   help=f"the pool RL prompts come from (default {RL_POOL}: questions the warm start never "
                        f"trained on; its own pool and the test pool are refused)")
    p.add_argument("--curve-every", type=int, default=None,
                   help="learning curve: score --curve-n test questions every this many steps "
                        "(default steps/4; 0 = none)")
    p.add_argument("--curve-n", type=int, default=None, help="test questions per curve point (default 100 quick / 200)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel, each in its own process with --threads/--jobs torch threads "
                        "(default --threads: one thread per run, as the tiny model uses a second thread poorly)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="refuse, before training, a run whose estimated wall time exceeds this (0 = no limit)")
    p.add_argument("--study-minutes", type=float, default=60.0,
                   help="--pilot / --study: the wall minutes the designed study may take on --jobs workers "
                        "(default 60: 120 CPU-minutes on 2 cores); --study shares it between its envs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None,
                   help="write benchmarks/results/NAME.{json,md,png} with the exact command, commit, "
                        "machine and warm-start sha256 (default: bench_quick / bench_pilot / bench_study / bench_full)")
    p.add_argument("--no-repo-results", "--no-repo-json", dest="no_repo_results", action="store_true",
                   help="do not write benchmarks/results/NAME.*")
    argv = list(argv) if argv is not None else sys.argv[1:]
    a = p.parse_args(argv)
    name = a.name or ("bench_quick" if a.quick else "bench_pilot" if a.pilot else "bench_study" if a.study
                      else "bench_full")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        p.error(f"--name {name!r}: use letters, digits, '_', '-' and '.' only (it names files in {REPO_RESULTS})")
    if a.pilot and a.arms:
        p.error("--pilot runs its own pair (chain G4, Tree-GRPO M2N2L1); --arms does not apply")
    if (a.jobs is not None and a.jobs < 1) or a.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    commit, dirty = _git_commit(), _git_dirty()  # of the code that runs, read before it does
    a.jobs = workers = a.jobs or a.threads
    threads = max(1, a.threads // workers)
    torch.set_num_threads(max(1, a.threads))
    have_web = (WARMSTART_WEB_DIR / "sft_meta.json").is_file() or a.from_scratch
    # without a committed web warm start, --quick would first spend an hour on SFT
    envs = list(dict.fromkeys(a.env or ([QA_ENV, WEB_ENV] if (a.quick or a.pilot or a.study) and have_web
                                        else [QA_ENV])))
    extra = list(ABLATION_ARMS) if a.ablations else []
    if a.study:
        arms = {e: list(STUDY_ARMS[e]) for e in envs}
    elif a.pilot:
        arms = {e: list(PILOT_ARMS) for e in envs}
    else:
        arms = {QA_ENV: list(QUICK_ARMS if a.quick else FULL_ARMS) + extra,
                WEB_ENV: list(WEB_QUICK_ARMS if a.quick else FULL_ARMS) + extra}
    if a.arms:
        select_arms([arm for env_id in envs for arm in arms[env_id]], a.arms)  # every name must match somewhere
        arms = {env_id: select_arms(env_arms, a.arms, check=False) for env_id, env_arms in arms.items()}

    # -- the plan: every run, known before anything trains ----------------------------------
    def knob(given: int | None, default: int) -> int:
        return given if given is not None else default

    pilot_files = a.design or [PILOT_FILE]
    costs = run_costs(pilot_files)
    if a.study:
        design = read_pilots(pilot_files)[0]
        missing = [e for e in envs if e not in design]
        if missing:
            raise SystemExit(f"treegym bench --study: no pilot design for {', '.join(missing)} in "
                             f"{', '.join(map(str, pilot_files))}; run `treegym bench --pilot --env {' '.join(missing)}` "
                             f"first (or name its result file with --design)")
        # the pilots measured each env's components and costs; one budget is shared between the envs
        design = design_study({e: (design[e]["prompts"], design[e]["steps"]) for e in envs},
                              {e: stats.Components(**design[e]["components"]) for e in envs}, costs,
                              cpu_minutes=a.study_minutes * workers, curve_n=max(design[e]["curve_n"] for e in envs))
        plan = {e: {k: design[e][k] for k in ("seeds", "steps", "prompts", "test_n", "curve_n")} for e in envs}
        for e in envs:
            plan[e].update({k: v for k, v in (("seeds", a.seeds), ("steps", a.steps), ("prompts", a.prompts),
                                               ("test_n", a.test_n), ("curve_n", a.curve_n)) if v is not None})
    else:
        plan = {e: {"seeds": knob(a.seeds, 1 if a.quick else PILOT_SEEDS), "steps": knob(a.steps, 12 if a.quick else 30),
                    "prompts": knob(a.prompts, 8), "curve_n": knob(a.curve_n, 100 if a.quick else 200),
                    "test_n": knob(a.test_n, 400 if a.quick else PILOT_TEST_N[e] if a.pilot else 800)} for e in envs}
    for e in envs:
        every = a.curve_every if a.curve_every is not None else (0 if a.pilot else default_curve_every(plan[e]["steps"]))
        plan[e]["curve_every"] = every
        plan[e]["curve_n"] = min(plan[e]["curve_n"], plan[e]["test_n"])
    settings = PILOT_SETTINGS if a.pilot and a.steps is None and a.prompts is None \
        else [(plan[envs[0]]["prompts"], plan[envs[0]]["steps"])]

    def jobs_for(env_list: Sequence[str], setting: tuple[int, int] | None = None) -> list[Job]:
        out = []
        for e in env_list:
            pe = plan[e]
            prompts, steps = setting or (pe["prompts"], pe["steps"])
            out += [Job(e, arm, seed, steps, prompts, pe["test_n"], pe["curve_every"], pe["curve_n"])
                    for seed in range(pe["seeds"]) for arm in arms[e]]
        return sorted(out, key=lambda j: j.seed)  # seed-major: partial results cover every arm

    if a.pilot:  # the first env tries every setting; the others run the one it chooses (estimated at the first)
        first = [envs[0]]
        all_jobs = [j for s in settings for j in jobs_for(first, s)] + jobs_for(envs[1:], settings[0])
    else:
        all_jobs = jobs_for(envs)
    sft_evals = {} if a.pilot else {e: plan[e]["test_n"] for e in envs}
    est = estimate_minutes(all_jobs, sft_evals, costs, workers)
    for s in settings:
        check_pools(a.rl_split, {e: (a.warmstart if a.warmstart and e == QA_ENV else
                                     None if a.from_scratch else WARMSTARTS[e]) for e in envs},
                    steps=s[1], prompts=s[0])
    if a.max_minutes and est > a.max_minutes:
        raise SystemExit(f"treegym bench: this design is estimated at {est:.0f} wall minutes ({len(all_jobs)} runs on "
                         f"{workers} worker(s), costs from {', '.join(str(f) for f in pilot_files if Path(f).is_file()) or 'FALLBACK_COSTS'}), "
                         f"over --max-minutes {a.max_minutes:g}: use fewer --seeds, --steps, --prompts or --test-n, "
                         f"more --jobs, or raise --max-minutes")
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    log(f"{len(all_jobs)} runs on {workers} worker(s) x {threads} thread(s), estimated {est:.0f} min")
    sft_kwargs = dict(lm_steps=2400, act_steps=600, batch=8, lr=2e-3, eval_every=300, eval_n=50, seed=0)
    starts: dict[str, Path] = {}
    rows: list[dict] = []
    for env_id in envs:
        if a.warmstart and env_id == QA_ENV:
            starts[env_id] = a.warmstart
        else:
            starts[env_id] = warm_start(out, from_scratch=a.from_scratch, log=log, sft_kwargs=sft_kwargs,
                                        env_id=env_id, qa_start=starts.get(QA_ENV) or a.warmstart)
        if a.pilot:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        m = test_metrics(HFPolicy(starts[env_id]), env_id, plan[env_id]["test_n"],
                         a.max_new_tokens or MAX_NEW_TOKENS[env_id])
        rows.append({"env": env_id, "method": "sft", "config": "warmstart", "budget": 0.0, "seed": 0,
                     **_test_fields(m), "tokens_per_prompt": 0.0, "tool_calls_per_prompt": 0.0,
                     "rollout_s": 0.0, "update_s": 0.0, "wall_s": 0.0, "eval_s": time.perf_counter() - t0,
                     "curve_s": 0.0, "threads": a.threads, "train_cpu_s": 0.0,
                     "eval_cpu_s": time.process_time() - c0, "curve_cpu_s": 0.0})
        log(f"SFT start ({env_id}): test EM {m['greedy/em']:.3f}, F1 {m['greedy/f1']:.3f} "
            f"on {int(m['greedy/episodes'])} tasks")
    # which weights every row started from (results of different warm starts must not be mixed)
    start_sha = {k: hashlib.sha256((Path(v) / "model.safetensors").read_bytes()).hexdigest() for k, v in starts.items()}
    pools = {e: warmstart_pools(starts[e]) for e in envs}
    opts = {"threads": threads, "lr": {e: a.lr or LR[e] for e in envs}, "minibatch_prompts": a.minibatch_prompts, "rl_split": a.rl_split,
            "max_new_tokens": {e: a.max_new_tokens or MAX_NEW_TOKENS[e] for e in envs}, "progress": True}

    def meta_now(done_rows: list[dict], **extra: Any) -> dict:
        cpu = sum(r["train_cpu_s"] + r["eval_cpu_s"] + r["curve_cpu_s"] for r in done_rows)
        first = plan[envs[0]]
        return _meta(argv, a, commit, dirty, steps=first["steps"], prompts=first["prompts"], test_n=first["test_n"],
                     seeds=first["seeds"], plan=plan, envs=envs, warmstarts={k: str(v) for k, v in starts.items()},
                     warmstart_sha256=start_sha, warmstart_pools=pools, estimated_minutes=est,
                     wall_s=time.perf_counter() - t_start, cpu_minutes=cpu / 60, **extra)

    if a.pilot:
        return _pilot(a, envs, settings, jobs_for, starts, out, opts, workers, log, meta_now, name)

    study = {"design": design, "study_cpu_minutes": a.study_minutes * workers} if a.study else {}

    def on_row(done: list[dict]) -> None:  # after every run: partial results survive
        write_results(out, rows + done, meta_now(rows + done, **study))

    rows += run_jobs(all_jobs, starts, out, opts, workers=workers, log=log, on_row=on_row)
    meta = meta_now(rows, **study)
    md, js, png = write_results(out, rows, meta)
    if not a.no_repo_results and REPO_RESULTS.parent.is_dir():
        REPO_RESULTS.mkdir(exist_ok=True)
        published = write_results(REPO_RESULTS, rows, meta, stem=name)
        log("wrote " + ", ".join(str(f) for f in published))
    print(md.read_text())
    curves_png = png.parent / f"{js.stem}_curves.png"
    print(f"plot: {png.resolve()}" + (f"\nlearning curves: {curves_png.resolve()}" if curves_png.is_file() else "")
          + f"\nresults: {js.resolve()}")
    return 0


def _pilot(a: argparse.Namespace, envs: list[str], settings: Sequence[tuple[int, int]], jobs_for: Any,
           starts: dict, out: Path, opts: dict, workers: int, log: Any, meta_now: Any, name: str) -> int:
    """`--pilot`: the matched-budget pair at each setting on the first env, the chosen setting on
    the others; then costs, variance components and the study design (`pilot_design`)."""
    budget = a.study_minutes * workers  # CPU-minutes for the study
    rows: list[dict] = []

    first = envs[0]
    rows += run_jobs([j for s in settings for j in jobs_for([first], s)], starts, out, opts, workers=workers, log=log)
    costs = _costs_from(rows)
    curve_n = a.curve_n or 200
    by_setting = {s: pilot_design(rows, [first], s, costs, cpu_minutes=budget / len(envs), curve_n=curve_n)[first]
                  for s in settings}
    chosen = min(settings, key=lambda s: (not by_setting[s]["feasible"], by_setting[s]["expected_half_width"],
                                          by_setting[s]["cpu_minutes"]))
    log(f"setting: {chosen[0]} prompts x {chosen[1]} steps")
    if envs[1:]:
        rows += run_jobs(jobs_for(envs[1:], chosen), starts, out, opts, workers=workers, log=log)
        costs = _costs_from(rows)
    design = pilot_design(rows, envs, chosen, costs, cpu_minutes=budget, curve_n=curve_n)
    study_cmd = shlex.join(["treegym", "bench", "--study", "--env", *envs, "--design",
                            f"benchmarks/results/{name}.json", "--jobs", str(workers), "--threads",
                            str(a.threads), "--max-minutes",
                            f"{1.15 * sum(d['cpu_minutes'] for d in design.values()) / workers:.0f}"])
    meta = meta_now(rows, pilot={"settings": [list(s) for s in settings], "chosen": list(chosen),
                                 "by_setting": {f"{s[0]}x{s[1]}": by_setting[s] for s in settings},
                                 "budget_cpu_minutes": budget, "target_half_width": TARGET_HALF_WIDTH},
                    costs=costs, design=design, study_command=study_cmd)
    lines = _pilot_lines(rows, meta, envs, settings, by_setting, chosen, design, costs, study_cmd)
    md = out / f"{name}.md"
    md.write_text("\n".join(lines))
    js = out / f"{name}.json"
    js.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    if not a.no_repo_results and REPO_RESULTS.parent.is_dir():
        REPO_RESULTS.mkdir(exist_ok=True)
        for f in (md, js):
            (REPO_RESULTS / f.name).write_text(f.read_text())
        log(f"wrote {REPO_RESULTS / md.name}, {REPO_RESULTS / js.name}")
    print(md.read_text())
    return 0


def _pilot_lines(rows: list[dict], meta: dict, envs: list[str], settings: Sequence[tuple[int, int]],
                 by_setting: dict, chosen: tuple[int, int], design: dict, costs: dict, study_cmd: str) -> list[str]:
    dirty = " (uncommitted changes)" if meta.get("dirty") else ""
    pts = 100 * 100  # squared points per squared unit
    lines = ["# treegym bench --pilot", "",
             f"`{meta['command']}` · commit `{meta['commit']}`{dirty} · {meta['machine']} · "
             f"{meta['jobs']} worker(s) · {meta['cpu_minutes']:.1f} CPU-minutes, {meta['wall_s'] / 60:.1f} wall minutes", "",
             f"Pairs: {PILOT_ARMS[1].method}:{PILOT_ARMS[1].config} − {PILOT_ARMS[0].method}:{PILOT_ARMS[0].config} "
             f"(matched budget), {len({r['seed'] for r in rows})} seeds, RL prompts from `{meta['rl_split']}`, test questions from "
             f"`{TEST_POOL}`. Variance components of the paired difference per question (squared EM/F1 points; "
             "`treegym.train.stats.components`): seed = between-seed spread of the seed means, question = "
             "question-to-question spread of the difference, resid = seed × question.", "",
             "| env | prompts × steps | arm means (per seed) | paired diff | seed SD of diff | seed var | question var | resid var | design at this setting (seeds × questions) | expected ± |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for env_id in envs:
        metric = HEADLINE[env_id].lower()
        for s in (settings if env_id == envs[0] else [chosen]):
            sel = [r for r in rows if r["env"] == env_id and (r["prompts"], r["steps"]) == s]
            ya, yb = _pair_table(sel, env_id, PILOT_ARMS[1], PILOT_ARMS[0])
            seed_means = lambda t: "/".join(f"{100 * statistics.fmean(x):.1f}" for x in t)  # noqa: E731
            diff = stats.paired(ya, yb)
            c = diff.components
            d = design[env_id] if s == chosen else by_setting[s] if env_id == envs[0] else None
            chosen_txt = (f"{d['seeds']} × {d['test_n']}" + ("" if d["feasible"] else " (target out of budget)")) if d else ""
            lines.append(f"| {env_id} | {s[0]} × {s[1]}{' (chosen)' if s == chosen else ''} | "
                         f"tree {seed_means(ya)}; G4 {seed_means(yb)} | {100 * diff.mean:+.2f} | "
                         f"{100 * c.seed ** 0.5:.2f} | {pts * c.seed:.2f} | {pts * c.question:.1f} | {pts * c.resid:.1f} | "
                         f"{chosen_txt} | {100 * d['expected_half_width']:.2f} |" if d else "|")
    lines += ["", "Costs (CPU seconds of the run's process at 1 thread; an RL step costs train_s × (budget + "
              f"{PROMPT_OVERHEAD}) per prompt, a greedy test question eval_s):", "",
              "| env | train_s | eval_s |", "|---|---:|---:|"]
    lines += [f"| {e} | {c['train_s']:.4f} | {c['eval_s']:.4f} |" for e, c in costs.items()]
    lines += ["", f"## The design (target ±{100 * TARGET_HALF_WIDTH:.1f} point, budget "
              f"{meta['pilot']['budget_cpu_minutes']:.0f} CPU-minutes for every arm of the three findings)", "",
              "| env | arms | prompts × steps | seeds | test questions | curve every / questions | expected ± (95%) | CPU-minutes | target met |",
              "|---|---|---|---:|---:|---|---:|---:|---|"]
    for e in envs:
        d = design[e]
        lines.append(f"| {e} | {', '.join(f'{x.method}:{x.config}' for x in STUDY_ARMS[e])} | {d['prompts']} × {d['steps']} | "
                     f"{d['seeds']} | {d['test_n']} | {d['curve_every']} / {d['curve_n']} | {100 * d['expected_half_width']:.2f} | "
                     f"{d['cpu_minutes']:.0f} | {'yes' if d['feasible'] else 'no'} |")
    lines += ["", f"Run it: `{study_cmd}` (`--design` reads this design and these costs).", ""]
    return lines


__all__ = ["Arm", "Job", "STUDY_ARMS", "PILOT_ARMS", "RL_POOL", "TEST_POOL", "check_pools", "warmstart_pools", "estimate_minutes", "run_jobs", "pilot_design", "QUICK_ARMS", "WEB_QUICK_ARMS", "WARMSTART_WEB_DIR", "warm_start", "test_metrics", "FULL_ARMS", "ABLATION_ARMS", "select_arms", "run_arm", "write_results", "cli_main"]
