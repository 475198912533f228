"""Seconds per GRPO step in TRL: treegym's multi-turn rollouts vs TRL's own single-turn GRPO.

    .venv/bin/python benchmarks/integrations_trl.py                  # 1 + 5 steps per arm, 1 round
    .venv/bin/python benchmarks/integrations_trl.py --steps 10 --rounds 2

Three arms, the same `trl.GRPOTrainer` (trl 1.16) on the same model (the committed warm start
`train/warmstart`), the same prompts (`TreegymRollout.dataset`), batch (8 completions = 2
prompts × 4), optimizer and learning rate, all on CPU in one process:

- `trl single-turn`: TRL's own generation (`model.generate`, one completion of at most
  `--max-new-tokens` tokens per prompt); the reward is the env's reward for that one action.
  This is what GRPO in TRL costs without an environment.
- `treegym chain`: `TreegymRollout` (rollout_func) playing whole Search-R1 episodes (up to
  `--max-tool-calls` searches, then an answer; `--max-new-tokens` per turn) with the live model.
- `treegym tree_grpo`: `TreeGRPOTrainer` with Tree-GRPO trees (M=2, N=1, L=1: 4 leaves per
  prompt) and treegym's Tree-GRPO advantages.

A step's time is the time between two `on_step_end` callbacks (rollout + scoring + update), as
wall seconds and as this process's CPU seconds (with one torch thread, the steadier measure on a
shared machine, where other jobs stretch the wall time); the first step (lazy initialisation) is
dropped and the median of the rest is reported, with the ratio to `trl single-turn`, and the
CPU seconds of the rollout part (`GRPOTrainer._generate`: the rollout_func, or TRL's own
generation) — the rest is scoring, reward and the update. The
single-turn arm has no stop strings (TRL's generation stops at EOS only), so its completions run
to `--max-new-tokens`; treegym's stop at `</search>` / `</answer>` every turn. Arms run round-robin `--rounds` times (fresh trainers each time), the
median over rounds is kept: on a shared machine, interleaving keeps the ratios meaningful.
Multi-turn episodes are longer (prompt + several actions + observations) than one completion, so
the per-step token counts are printed too (prompt + completion ids as TRL gets them, and the
padded [B, T] TRL's forward passes compute; "model tokens" are the sampled ones only).
Results go to benchmarks/results/integrations_trl.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402

import treegym  # noqa: E402,F401  (registers the envs)
from treegym.integrations import trl as tg_trl  # noqa: E402
from treegym.train.bench import _git_commit, _machine  # noqa: E402
from treegym.train.sft import WARMSTART_DIR  # noqa: E402

ARMS = ("trl single-turn", "treegym chain", "treegym tree_grpo")
RESULTS = Path(__file__).resolve().parent / "results"


class _StepTimer:
    """A transformers TrainerCallback (duck-typed: Trainer calls the hooks by name) that stamps
    every optimizer step."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []  # (wall, this process's CPU seconds)

    def __getattr__(self, name):  # every other hook is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, *a, **k):
        self.stamps = [(time.perf_counter(), time.process_time())]

    def on_step_end(self, *a, **k):
        self.stamps.append((time.perf_counter(), time.process_time()))


def single_turn_reward(env):
    """The env's reward for a one-action episode: `completions` played as the first step."""
    rollout = tg_trl.TreegymRollout(env)

    def env_reward_single_turn(prompts, completions, **_):
        out = []
        for prompt, text in zip(prompts, completions):
            e = treegym.fork(env)
            e.reset(options={"task_id": rollout.task_id(prompt)})
            _, r, term, trunc, _ = e.step(text)
            out.append(float(r) if (term or trunc) else 0.0)
        return out

    return env_reward_single_turn


def run_arm(arm: str, env, steps: int, args) -> dict:
    from trl import GRPOConfig

    sampler = "tree_grpo" if arm == "treegym tree_grpo" else "chain"
    rollout = tg_trl.TreegymRollout(env, sampler=sampler, M=2, N=1, L=1,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    group = 4
    assert rollout.group_size in (None, group)
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="treegym-bench-trl-"),
                     per_device_train_batch_size=2 * group, num_generations=group,
                     max_completion_length=args.max_new_tokens, max_steps=steps + 1,
                     learning_rate=args.lr, logging_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", disable_tqdm=True, seed=args.seed, bf16=False)
    common = dict(model=str(WARMSTART_DIR), args=cfg, train_dataset=rollout.dataset(args.prompts))
    if arm == "trl single-turn":
        trainer = tg_trl.trl.GRPOTrainer(reward_funcs=single_turn_reward(env), **common)
    elif arm == "treegym chain":
        trainer = tg_trl.trl.GRPOTrainer(reward_funcs=tg_trl.env_reward, rollout_func=rollout, **common)
    else:
        trainer = tg_trl.TreeGRPOTrainer(reward_funcs=tg_trl.env_reward, rollout_func=rollout, **common)
    timer = _StepTimer()
    trainer.add_callback(timer)
    gen_times: list[tuple[float, float]] = []
    tokens: list[tuple[int, int]] = []  # (real, padded) prompt + completion tokens per step
    generate = trainer._generate  # rollout_func or TRL's own generation: the rollout part of a step

    def timed_generate(prompts):
        w, c = time.perf_counter(), time.process_time()
        out = generate(prompts)
        gen_times.append((time.perf_counter() - w, time.process_time() - c))
        prompt_ids, completion_ids = out[0], out[1]
        tokens.append((sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)),
                       len(prompt_ids) * (max(map(len, prompt_ids)) + max(map(len, completion_ids)))))
        return out

    trainer._generate = timed_generate
    trainer.train()
    pairs = list(zip(timer.stamps, timer.stamps[1:]))[1:]  # drop the first step
    times = [b[0] - a[0] for a, b in pairs]
    cpu = [b[1] - a[1] for a, b in pairs]
    logs = [h for h in trainer.state.log_history if "reward" in h][1:]
    return {"s_per_step": statistics.median(times), "step_times": times,
            "cpu_s_per_step": statistics.median(cpu), "step_cpu_times": cpu,
            "rollout_cpu_s_per_step": statistics.median(c for _, c in gen_times[1:]),
            "model_tokens_per_completion": statistics.mean(h["completions/mean_length"] for h in logs),
            "tokens_per_step": statistics.mean(t for t, _ in tokens[1:]),
            "padded_tokens_per_step": statistics.mean(t for _, t in tokens[1:]),
            "reward": statistics.mean(h["reward"] for h in logs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm (one more is run first)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--prompts", type=int, default=64, help="dataset size")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-tool-calls", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; do not write results/")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    env = gym.make("TreeSearchQA-v0", data="synthetic", max_tool_calls=a.max_tool_calls)
    per_arm: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for rnd in range(a.rounds):
        for arm in ARMS:
            r = run_arm(arm, env, a.steps, a)
            per_arm[arm].append(r)
            print(f"round {rnd + 1} {arm}: {r['s_per_step']:.3f} s/step wall, "
                  f"{r['cpu_s_per_step']:.3f} CPU", flush=True)
    rows = {}
    for arm in ARMS:
        rs = per_arm[arm]
        rows[arm] = {"s_per_step": statistics.median(r["s_per_step"] for r in rs),
                     "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in rs),
                     "rollout_cpu_s_per_step": statistics.median(r["rollout_cpu_s_per_step"] for r in rs),
                     "model_tokens_per_completion": statistics.mean(r["model_tokens_per_completion"] for r in rs),
                     "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in rs),
                     "padded_tokens_per_step": statistics.mean(r["padded_tokens_per_step"] for r in rs),
                     "reward": statistics.mean(r["reward"] for r in rs), "rounds": rs}
    base = rows["trl single-turn"]["s_per_step"]
    cbase = rows["trl single-turn"]["cpu_s_per_step"]
    lines = ["| arm | wall s/step (median) | × trl single-turn | CPU s/step | × trl single-turn | "
             "of which rollout CPU s | model tokens / completion | tokens / step (real / padded) "
             "| mean reward |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, r in rows.items():
        lines.append(f"| {arm} | {r['s_per_step']:.3f} | {r['s_per_step'] / base:.2f}× | "
                     f"{r['cpu_s_per_step']:.3f} | {r['cpu_s_per_step'] / cbase:.2f}× | "
                     f"{r['rollout_cpu_s_per_step']:.3f} | "
                     f"{r['model_tokens_per_completion']:.1f} | {r['tokens_per_step']:.0f} / "
                     f"{r['padded_tokens_per_step']:.0f} | "
                     f"{r['reward']:.3f} |")
    table = "\n".join(lines)
    print(table)
    meta = {"argv": sys.argv, "commit": _git_commit(), "machine": _machine(),
            "trl": tg_trl.trl.__version__, "batch": "8 completions = 2 prompts x 4",
            "model": "train/warmstart"}
    if not a.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "integrations_trl.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / "integrations_trl.md").write_text(
            "# benchmarks/integrations_trl.py: seconds per GRPO step in TRL\n\n"
            f"Command: `{' '.join(sys.argv)}`  \nCommit: `{meta['commit']}`  \n"
            f"Machine: {meta['machine']}  \ntrl {meta['trl']}; batch {meta['batch']}; "
            f"model {meta['model']}; {a.steps} timed steps per arm (first step dropped), "
            f"{a.rounds} round(s), median.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
