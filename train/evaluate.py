"""Evaluation: run a policy on a split, batched across episodes, and report what it did.

`treegym eval --model DIR --data synthetic --split test` reports exact match / F1, the env reward,
tool calls, turns, invalid actions and generated tokens per episode, overall and per question
kind, greedy and (with `--k`) sampled pass@k.

Episodes run on the one episode engine (`agents.episode.Engine`): every live episode's next action
goes to the policy in one `generate` call per turn (each episode on its own fork of one env, which
shares the corpus and retriever). The numbers come from the env itself: the reward is the env's,
and EM/F1 are computed on the answer the env executed, so "eval EM" and "training reward" cannot
silently disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import torch

from treegym.agents.episode import Engine, Episode, env_stop_strings, play, start_episode
from treegym.agents.hf import HFPolicy
from treegym.envs.core import fork


def run_episodes(policy: Any, env: Any, tasks: Sequence[Any], *, samples: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 32,
                 seed: int = 0) -> list[Episode]:
    """Run `samples` episodes per task on the one episode engine (`agents.episode`), all live
    episodes batched into one generate call per turn.

    `env` is any treegym tool env (TreeSearchQA-v0 or TreeWebAgent-v0, wrapped or not); each
    episode runs on its own fork. Sample s of task i draws its turn-t tokens with seed
    ``derive_seed(seed, i, s, t)``. Returns episodes in (task, sample) order.
    """
    base = env.unwrapped
    max_turns = int(getattr(base, "max_tool_calls", 3)) + 2  # guard against a non-ending env
    engine = Engine(policy, stop=env_stop_strings(base), max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, max_turns=max_turns)
    slots = [start_episode(policy, fork(env), options={"task_id": task.id}, task=task,
                           sample_seed=(seed, ti, s), sample=s, index=ti * samples + s)
             for ti, task in enumerate(tasks) for s in range(samples)]
    return play(engine, slots)


def summarize(episodes: Sequence[Episode], prefix: str = "") -> dict[str, float]:
    """Means over episodes, per-kind EM and F1, and pass@k (any correct sample of a task) when k > 1.

    Besides the scores, what went wrong: ``invalid_actions`` (per episode), ``cut_actions`` (actions
    per episode that hit ``max_new_tokens`` before a stop string: a budget that cuts real actions
    shows here), ``out_of_budget`` (share of episodes the env truncated at the forced-answer turn:
    the tool-call budget ran out), ``context_exhausted`` (share the engine ended because the
    model's context was full) and ``answered`` (share that executed an answer)."""
    if not episodes:
        return {}
    n = len(episodes)
    m: dict[str, float] = {}
    for key in ("em", "f1", "reward", "tool_calls", "invalid_actions", "generated_tokens"):
        m[prefix + key] = sum(float(getattr(e, key)) for e in episodes) / n
    m[prefix + "turns"] = sum(len(e.turns) for e in episodes) / n
    m[prefix + "answered"] = sum(e.answer is not None for e in episodes) / n
    m[prefix + "out_of_budget"] = sum(bool(e.turns and e.turns[-1].truncated) for e in episodes) / n
    m[prefix + "context_exhausted"] = sum(bool(e.turns and e.turns[-1].info.get("context_exhausted"))
                                          for e in episodes) / n
    m[prefix + "cut_actions"] = sum(r == "length" for e in episodes for r in e.finish_reasons) / n
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in episodes:
        by_kind[e.kind].append((e.em, e.f1))
    for kind, v in sorted(by_kind.items()):
        m[f"{prefix}em/{kind}"] = sum(x[0] for x in v) / len(v)
        m[f"{prefix}f1/{kind}"] = sum(x[1] for x in v) / len(v)
    by_task: dict[str, list[float]] = defaultdict(list)
    for e in episodes:
        by_task[e.task_id].append(e.em)
    k = max(len(v) for v in by_task.values())
    if k > 1:
        m[f"{prefix}pass@{k}"] = sum(max(v) for v in by_task.values()) / len(by_task)
    m[prefix + "episodes"] = float(n)
    return m


def evaluate(policy: Any, env: Any, tasks: Sequence[Any], *, k: int = 0, temperature: float = 1.0,
             max_new_tokens: int = 32, seed: int = 0) -> dict[str, float]:
    """Greedy metrics (prefix ``greedy/``) and, when k > 0, k sampled episodes per task
    (prefix ``sampled/``, including ``sampled/pass@k``)."""
    t0 = time.perf_counter()
    out = summarize(run_episodes(policy, env, tasks, temperature=0.0,
                                 max_new_tokens=max_new_tokens, seed=seed), "greedy/")
    if k > 0:
        out.update(summarize(run_episodes(policy, env, tasks, samples=k, temperature=temperature,
                                          max_new_tokens=max_new_tokens, seed=seed), "sampled/"))
    out["eval_wall_s"] = time.perf_counter() - t0
    return out


ENV_IDS: tuple[str, ...] = ("TreeSearchQA-v0", "TreeWebAgent-v0")


def make_env(data: Any, split: str, env_id: str = "TreeSearchQA-v0", *, site: Any = "synthetic",
             **kwargs: Any) -> Any:
    """`gym.make(env_id, ...)` for a split of `data`, the one place train/eval/bench/sft build envs.

    Keyword arguments that are None are left out, so each env keeps its own default (the web env
    defaults to 5 tool calls and token-F1 reward, the QA env to 3 and EM). `site` is used by
    TreeWebAgent-v0 only ("synthetic" renders the world of `data` as a wiki).
    """
    if env_id not in ENV_IDS:
        raise ValueError(f"unknown env {env_id!r}; expected one of {', '.join(ENV_IDS)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if env_id == "TreeWebAgent-v0":
        kwargs["site"] = site
    return gym.make(env_id, data=data, split=split, **kwargs)


def select_tasks(env: Any, n: int = 0, seed: int = 0) -> list[Any]:
    """The first `n` tasks of the env's split in a fixed seeded order (all when n <= 0)."""
    tasks = list(env.unwrapped.tasks)
    if 0 < n < len(tasks):
        rng = random.Random(seed)
        tasks = rng.sample(tasks, n)
    return tasks


def cli_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treegym eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (or a checkpoint dir)")
    p.add_argument("--data", default="synthetic", help="dataset spec (default: synthetic)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=0, help="number of tasks (0 = the whole split)")
    p.add_argument("--k", type=int, default=0, help="sampled episodes per task for pass@k (0 = greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="for the sampled episodes")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--env", default="TreeSearchQA-v0", choices=ENV_IDS, help="which env to evaluate on")
    p.add_argument("--site", default="synthetic", help="TreeWebAgent-v0's site: 'synthetic' or a folder of HTML files")
    p.add_argument("--max-tool-calls", type=int, default=None, help="default: the env's own (QA 3, web 5)")
    p.add_argument("--reward", default=None, help="em | f1 | format_em (default: the env's own: QA em, web f1)")
    p.add_argument("--retriever", default="bm25")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        policy = HFPolicy(a.model)
        env = make_env(a.data, a.split, a.env, site=a.site, retriever=a.retriever,
                       max_tool_calls=a.max_tool_calls, reward=a.reward)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"treegym eval: {e}", file=sys.stderr)
        return 2
    tasks = select_tasks(env, a.n, a.seed)
    metrics = evaluate(policy, env, tasks, k=a.k, temperature=a.temperature,
                       max_new_tokens=a.max_new_tokens, seed=a.seed)
    width = max(map(len, metrics))
    for key, v in metrics.items():
        print(f"{key:<{width}}  {v:.4f}" if not math.isnan(v) else f"{key:<{width}}  nan")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return 0


__all__ = ["ENV_IDS", "Episode", "run_episodes", "summarize", "evaluate", "make_env", "select_tasks", "cli_main"]
