"""Does the RL update move the policy the way its advantages say? An overfitting check.

Why this exists: the budget study (`treegym bench`) trains on 8 fresh prompts per step and
measures held-out test EM, where a few points of signal sit inside a few points of noise. When
RL does not improve test EM, that alone cannot tell "the update is wrong" (advantage signs, loss
masks, KL, learning rate) from "the signal is too weak to generalise". This script separates
the two: it trains on a *fixed* small set of training prompts, every prompt in every step, and
measures the policy on those same prompts before and after (greedy EM and the mean reward of
sampled episodes, the quantity the policy gradient actually ascends), next to held-out test EM.
If the machinery is right, the reward on the trained prompts must climb well above its start.

    python benchmarks/rl_signal.py                       # chain GRPO G4 and Tree-GRPO M2N2L1
    python benchmarks/rl_signal.py --algos grpo --steps 30 --lr 1e-4

Prints one table row per algorithm; all numbers are measured in this run.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


def measure(policy, env, tasks, *, k: int, max_new_tokens: int) -> dict[str, float]:
    from treegym.train.evaluate import evaluate

    m = evaluate(policy, env, tasks, k=k, temperature=1.0, max_new_tokens=max_new_tokens, seed=123)
    return {"greedy_em": m["greedy/em"], "sampled_reward": m.get("sampled/reward", float("nan"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="start model (default: the committed QA warm start)")
    p.add_argument("--algos", nargs="+", default=["grpo", "tree_grpo"], choices=["grpo", "tree_grpo"])
    p.add_argument("--prompts", type=int, default=16, help="size of the fixed training set (all used every step)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--k", type=int, default=8, help="sampled episodes per prompt for the mean reward")
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    import torch

    from treegym.agents.hf import HFPolicy
    from treegym.train.config import TrainConfig
    from treegym.train.evaluate import make_env, select_tasks
    from treegym.train.sft import WARMSTART_DIR
    from treegym.train.trainer import Trainer

    torch.set_num_threads(a.threads)
    model = a.model or WARMSTART_DIR
    train_env, test_env = make_env("synthetic", "train"), make_env("synthetic", "test")
    fixed = random.Random(7).sample(list(train_env.unwrapped.tasks), a.prompts)
    test = select_tasks(test_env, a.test_n, seed=0)
    start = HFPolicy(model)
    before = measure(start, train_env, fixed, k=a.k, max_new_tokens=24)
    before_test = measure(start, test_env, test, k=0, max_new_tokens=24)["greedy_em"]
    rows = []
    for algo in a.algos:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(model=str(model), data="synthetic", out=tmp, algo=algo, steps=a.steps,
                              prompts_per_step=a.prompts, minibatch_prompts=2, eval_every=0,
                              save_every=10 ** 9, save_trees_every=0, threads=a.threads,
                              progress=False, tensorboard=False)
            cfg.rollout.G, cfg.rollout.M = 4, 2
            cfg.rollout.max_new_tokens = 24
            cfg.optim.lr = a.lr
            tr = Trainer(cfg, log=lambda *_: None)
            tr.tasks = fixed  # every step trains on exactly these prompts (a permutation of them)
            t0 = time.perf_counter()
            recs = tr.train()
            wall = time.perf_counter() - t0
            after = measure(tr.policy, train_env, fixed, k=a.k, max_new_tokens=24)
            after_test = measure(tr.policy, test_env, test, k=0, max_new_tokens=24)["greedy_em"]
        first, last = recs[: max(1, len(recs) // 4)], recs[-max(1, len(recs) // 4):]
        rows.append((algo, before, after, sum(r["reward"] for r in first) / len(first),
                     sum(r["reward"] for r in last) / len(last), recs[-1]["kl"], before_test, after_test, wall))
    print(f"fixed set: {a.prompts} training prompts, {a.steps} steps (every prompt every step), lr {a.lr}, "
          f"sampled reward over k={a.k} episodes per prompt; test EM on {len(test)} held-out tasks\n")
    print("| algo | fixed-set greedy EM before → after | fixed-set sampled reward before → after | "
          "train reward first ¼ → last ¼ of steps | final KL | test EM before → after | wall s |")
    print("|---|---|---|---|---:|---|---:|")
    for algo, b, af, r0, r1, kl, t0_, t1_, wall in rows:
        print(f"| {algo} | {100 * b['greedy_em']:.1f} → {100 * af['greedy_em']:.1f} | "
              f"{b['sampled_reward']:.3f} → {af['sampled_reward']:.3f} | {r0:.3f} → {r1:.3f} | {kl:.4f} | "
              f"{100 * t0_:.1f} → {100 * t1_:.1f} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
