"""`treegym bench`: chain GRPO vs Tree-GRPO at matched and smaller rollout budgets, offline.

The study (issue 8, Tree-GRPO arXiv 2509.21240 Table "budget"): start every run from the same SFT
warm start of the tiny model on the synthetic world, train with the same number of RL steps and
prompts per step, and compare test EM against the rollout budget in "chains per prompt":
chain GRPO at G = 2/4/8/16, Tree-GRPO M1N2L1 / M2N2L1 / M4N2L1 with E[B] = M·(1 + N·L/2).

`--quick` (what `make run` runs): one seed, chain G4 and G16 against tree M2N2L1 (E[B] = 4): the
tree at the chain's matched budget (G4) and at a quarter of G16. It starts from the committed warm
start in `treegym/train/warmstart/` (rebuilt with `--from-scratch`).

The web-agent rows (issue 5) run the same samplers and trainer on `TreeWebAgent-v0` (search, visit,
click over the synthetic world rendered as a wiki), scored by token F1, the paper's web metric.
They start from `treegym/train/warmstart_web/`: the QA warm start with the web tool tags added and
fine-tuned on oracle browsing transcripts (`treegym sft --env TreeWebAgent-v0`). `--quick` adds a
web chain G4 vs tree M2N2L1 pair; `--env` picks the envs of a full study.

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
from treegym.train.sft import WARMSTART_DIR, run_sft
from treegym.train.trainer import Trainer

QA_ENV, WEB_ENV = "TreeSearchQA-v0", "TreeWebAgent-v0"
WARMSTART_WEB_DIR = WARMSTART_DIR.parent / "warmstart_web"
WARMSTARTS = {QA_ENV: WARMSTART_DIR, WEB_ENV: WARMSTART_WEB_DIR}
# Per-env generation budget: a web action carries a URL (~20 tokens with the tiny tokenizer).
MAX_NEW_TOKENS = {QA_ENV: 24, WEB_ENV: 32}
HEADLINE = {QA_ENV: "EM", WEB_ENV: "F1"}  # the paper's metric per setting (summary keys em_* / f1_*)
REPO_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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


def run_arm(arm: Arm, seed: int, model_dir: Path, out: Path, *, steps: int, prompts: int,
            lr: float, minibatch_prompts: int = 2, test_n: int, threads: int, max_new_tokens: int, log: Any,
            env_id: str = QA_ENV, rl_split: str = "train") -> dict:
    tag = "" if env_id == QA_ENV else "web-"
    cfg = TrainConfig(model=str(model_dir), env=env_id, data="synthetic", split=rl_split,
                      out=str(out / f"{tag}{arm.method}-{arm.config}-s{seed}"),
                      algo=arm.algo, advantage=arm.advantage, steps=steps, prompts_per_step=prompts,
                      minibatch_prompts=minibatch_prompts, seed=seed, eval_every=0, save_every=10 ** 9,
                      keep_checkpoints=1, save_trees_every=max(1, steps), threads=threads,
                      progress=True)
    for k, v in arm.rollout.items():
        setattr(cfg.rollout, k, v)
    cfg.rollout.max_new_tokens = max_new_tokens
    cfg.optim.lr = lr
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=log)
    records = trainer.train()
    train_wall = time.perf_counter() - t0
    m = test_metrics(trainer.policy, env_id, test_n, max_new_tokens)

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
            "wall_s": train_wall, "steps": steps}


def test_metrics(policy: Any, env_id: str, test_n: int, max_new_tokens: int) -> dict:
    """Greedy metrics on the same `test_n` test tasks (seeded choice) for every arm of an env,
    with each task's EM and F1 (`scores`): the intervals pair arms question by question."""
    env = make_env("synthetic", "test", env_id)
    tasks = select_tasks(env, test_n, seed=0)
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
        out.append({"env": env_id, "method": method, "config": config, "budget": budget, "n": len(rs),
                    "em_mean": statistics.fmean(ems), "em_std": statistics.stdev(ems) if len(ems) > 1 else 0.0,
                    "f1_mean": statistics.fmean(f1s), "f1_std": statistics.stdev(f1s) if len(f1s) > 1 else 0.0,
                    **{k: statistics.fmean(r[k] for r in rs) for k in
                       ("tokens_per_prompt", "tool_calls_per_prompt", "rollout_s", "update_s", "wall_s")}})
    return out


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
             f"{meta['prompts']} prompts · lr {meta['lr']} · greedy on {meta['test_n']} test tasks · "
             f"seeds {meta['seeds']}", ""]
    envs = list(dict.fromkeys(a["env"] for a in agg))
    for env_id in envs:
        name = HEADLINE[env_id]
        other = "F1" if name == "EM" else "EM"
        if len(envs) > 1 or env_id != QA_ENV:
            lines += [f"## {env_id} (test {name})", ""]
        lines += [f"| method | config | budget (chains/prompt) | test {name} (mean ± std) | test {other} | "
                  "tokens/prompt | tool calls/prompt | rollout s | update s | seeds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in sorted((a for a in agg if a["env"] == env_id),
                        key=lambda a: (a["method"] != "sft", a["method"], a["budget"])):
            head, std, oth = a[f"{name.lower()}_mean"], a[f"{name.lower()}_std"], a[f"{other.lower()}_mean"]
            lines.append(f"| {a['method']} | {a['config']} | {a['budget']:g} | {100 * head:.1f} ± "
                         f"{100 * std:.1f} | {100 * oth:.1f} | {a['tokens_per_prompt']:.0f} | "
                         f"{a['tool_calls_per_prompt']:.2f} | {a['rollout_s']:.0f} | {a['update_s']:.0f} | {a['n']} |")
        lines.append("")
    lines += ["Budget = expected chains per prompt: chain G, tree M·(1+N·L/2). tokens/prompt and tool "
              "calls/prompt are measured per RL step (generated tokens, executed tool calls); rollout s and "
              "update s are summed over the run's steps.", ""]
    found = findings(rows)
    lines += _findings_lines(found)
    md = out / f"{stem or 'results'}.md"
    md.write_text("\n".join(lines))
    js = out / f"{stem or 'results'}.json"
    js.write_text(json.dumps({**meta, "rows": rows, "summary": agg, "findings": found}, indent=1))
    png = out / f"{stem or 'budget'}.png"
    _plot(agg, png)
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


def cli_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treegym bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, chain G4/G16 vs tree M2N2L1 (~20 min on 2 cores)")
    p.add_argument("--ablations", action="store_true", help="add token-level nodes and inter/intra-only advantages")
    p.add_argument("--arms", default=None,
                   help="run only these arms: comma list of configs (G16, M2N2L1), methods (chain, "
                        "tree_grpo_token) or method:config (tree_grpo:M2N2L1); e.g. the full-scale "
                        "ablations alone: --ablations --arms tree_grpo:M2N2L1,tree_grpo_token,tree_grpo_inter,"
                        "tree_grpo_intra")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--from-scratch", action="store_true", help="rebuild the SFT warm start instead of using the committed one")
    p.add_argument("--warmstart", type=Path, default=None, help="start from this model dir instead of the committed warm start")
    p.add_argument("--seeds", type=int, default=None, help="default 1 (quick) / 3")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 12 quick / 30)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per RL step (default 8)")
    # Tiny-model RL defaults (ours). lr: the first quick run used 5e-4 (the GRPO lr in
    # ../shared/REFERENCE.md) and every arm fell *below* the SFT start (38.5% -> 15-24% test EM)
    # while KL to the start model rose from 0.0002 to 0.15-0.26 in 8 steps: the steps were too
    # large for 4-prompt gradients. 1e-4 and 2e-5 both kept or improved the start (all arms alike;
    # benchmarks/results/NOTES.md), so 1e-4 is the default. 2 prompts per minibatch; KL and
    # entropy coefficients 0.001 as in Tree-GRPO.
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--minibatch-prompts", type=int, default=2)
    p.add_argument("--test-n", type=int, default=None, help="test tasks for EM (default 400 quick / 800)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="per generation (default: QA 24, web 32 — a web action carries a URL)")
    p.add_argument("--env", nargs="+", choices=(QA_ENV, WEB_ENV), default=None,
                   help=f"envs to study (default: both with --quick — the web row is chain G4 vs tree "
                        f"M2N2L1 — and {QA_ENV} only for the full study)")
    p.add_argument("--rl-split", default="train",
                   help="split the RL prompts come from (default train, the questions the SFT warm start "
                        "was trained on; 'dev' gives RL questions the warm start never saw)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None,
                   help="write benchmarks/results/NAME.{json,md,png} with the exact command, commit, "
                        "machine and warm-start sha256 (default: bench_quick with --quick, else bench_full)")
    p.add_argument("--no-repo-results", "--no-repo-json", dest="no_repo_results", action="store_true",
                   help="do not write benchmarks/results/NAME.*")
    argv = list(argv) if argv is not None else sys.argv[1:]
    a = p.parse_args(argv)
    name = a.name or ("bench_quick" if a.quick else "bench_full")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        p.error(f"--name {name!r}: use letters, digits, '_', '-' and '.' only (it names files in {REPO_RESULTS})")
    commit, dirty = _git_commit(), _git_dirty()  # of the code that runs, read before it does
    torch.set_num_threads(max(1, a.threads))
    seeds = a.seeds or (1 if a.quick else 3)
    steps = a.steps or (12 if a.quick else 30)
    prompts = a.prompts or 8
    test_n = a.test_n or (400 if a.quick else 800)
    quick_envs = [QA_ENV, WEB_ENV] if (WARMSTART_WEB_DIR / "sft_meta.json").is_file() or a.from_scratch \
        else [QA_ENV]  # without a committed web warm start, `--quick` would first spend an hour on SFT
    envs = list(dict.fromkeys(a.env or (quick_envs if a.quick else [QA_ENV])))
    extra = list(ABLATION_ARMS) if a.ablations else []
    arms = {QA_ENV: list(QUICK_ARMS if a.quick else FULL_ARMS) + extra,
            WEB_ENV: list(WEB_QUICK_ARMS if a.quick else FULL_ARMS) + extra}
    if a.arms:
        select_arms([arm for env_id in envs for arm in arms[env_id]], a.arms)  # every name must match somewhere
        arms = {env_id: select_arms(env_arms, a.arms, check=False) for env_id, env_arms in arms.items()}
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    sft_kwargs = dict(lm_steps=2400, act_steps=600, batch=8, lr=2e-3, eval_every=300, eval_n=50, seed=0)
    starts: dict[str, Path] = {}
    rows: list[dict] = []
    for env_id in envs:
        if a.warmstart and env_id == QA_ENV:
            starts[env_id] = a.warmstart
        else:
            starts[env_id] = warm_start(out, from_scratch=a.from_scratch, log=log, sft_kwargs=sft_kwargs,
                                        env_id=env_id, qa_start=starts.get(QA_ENV) or a.warmstart)
        t0 = time.perf_counter()
        m = test_metrics(HFPolicy(starts[env_id]), env_id, test_n, a.max_new_tokens or MAX_NEW_TOKENS[env_id])
        rows.append({"env": env_id, "method": "sft", "config": "warmstart", "budget": 0.0, "seed": 0,
                     **_test_fields(m), "tokens_per_prompt": 0.0, "tool_calls_per_prompt": 0.0,
                     "rollout_s": 0.0, "update_s": 0.0, "wall_s": time.perf_counter() - t0})
        log(f"SFT start ({env_id}): test EM {m['greedy/em']:.3f}, F1 {m['greedy/f1']:.3f} "
            f"on {int(m['greedy/episodes'])} tasks")
    # which weights every row started from (results of different warm starts must not be mixed)
    start_sha = {k: hashlib.sha256((Path(v) / "model.safetensors").read_bytes()).hexdigest() for k, v in starts.items()}
    for seed in range(seeds):
        for env_id in envs:
            for arm in arms[env_id]:
                log(f"run {env_id} {arm.method} {arm.config} (budget {arm.budget:g}) seed {seed}: "
                    f"{steps} steps × {prompts} prompts")
                row = run_arm(arm, seed, starts[env_id], out, steps=steps, prompts=prompts, lr=a.lr,
                              minibatch_prompts=a.minibatch_prompts, test_n=test_n, threads=a.threads,
                              max_new_tokens=a.max_new_tokens or MAX_NEW_TOKENS[env_id], log=log,
                              env_id=env_id, rl_split=a.rl_split)
                log(f"  -> test EM {row['test_em']:.3f}, F1 {row['test_f1']:.3f}, "
                    f"{row['tokens_per_prompt']:.0f} tokens/prompt, rollout {row['rollout_s']:.0f}s, "
                    f"update {row['update_s']:.0f}s")
                rows.append(row)
                meta = {"argv": ["treegym", "bench", *argv], "command": shlex.join(["treegym", "bench", *argv]),
                        "commit": commit, "dirty": dirty, "machine": _machine(), "quick": a.quick, "steps": steps,
                        "prompts": prompts, "lr": a.lr, "minibatch_prompts": a.minibatch_prompts,
                        "test_n": test_n, "seeds": seeds, "envs": envs, "rl_split": a.rl_split,
                        "warmstarts": {k: str(v) for k, v in starts.items()},
                        "warmstart_sha256": start_sha,
                        "wall_s": time.perf_counter() - t_start}
                md, js, png = write_results(out, rows, meta)  # after every run: partial results survive
    if not a.no_repo_results and REPO_RESULTS.parent.is_dir():
        REPO_RESULTS.mkdir(exist_ok=True)
        published = write_results(REPO_RESULTS, rows, meta, stem=name)
        log("wrote " + ", ".join(str(f) for f in published))
    print(md.read_text())
    print(f"plot: {png.resolve()}\nresults: {js.resolve()}")
    return 0


__all__ = ["Arm", "QUICK_ARMS", "WEB_QUICK_ARMS", "WARMSTART_WEB_DIR", "warm_start", "test_metrics", "FULL_ARMS", "ABLATION_ARMS", "select_arms", "run_arm", "write_results", "cli_main"]
