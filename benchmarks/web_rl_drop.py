"""Why does RL lower the web warm start's test F1? (issue 15, point 5)

`treegym bench --quick` trains chain GRPO G4 on TreeWebAgent-v0 from the committed web warm start
(SFT, 43.2 test F1) and has ended below the start in every run. This script separates the
candidate causes by measuring greedy test episodes before and after RL, side by side in one run:

- *how* episodes fail: no answer because the tool budget ran out (`out_of_budget`), actions cut
  by `max_new_tokens` (`cut_actions`: if real actions — URLs — were cut, it would rise and the
  actions would be invalid), invalid actions, the context full (`context_exhausted`);
- F1 per question kind (which skills RL breaks);
- the drift from the start: k3 KL to the start model and entropy at the last RL step, and the
  mean sampled training reward;
- per learning rate and seed, with the paired difference to the start over the same questions.

    python benchmarks/web_rl_drop.py --lrs 1e-4 2e-5 --seeds 1 --threads 1   # ~5 min, 1 core
    python benchmarks/web_rl_drop.py --lrs 1e-4 2e-5 --seeds 3 --write web_rl_drop

All numbers are measured in the run that prints them; `--write NAME` also writes
benchmarks/results/NAME.md headed by the exact command, commit and machine.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

KEYS = ("answered", "out_of_budget", "cut_actions", "invalid_actions", "context_exhausted")


def test_row(policy, n: int, max_new_tokens: int) -> dict:
    from treegym.train.bench import WEB_ENV, test_metrics

    m = test_metrics(policy, WEB_ENV, n, max_new_tokens)
    return {"f1": m["greedy/f1"], "scores": m["scores"]["f1"],
            **{k: m[f"greedy/{k}"] for k in KEYS},
            "by_kind": {k.split("/")[-1]: v for k, v in m.items() if k.startswith("greedy/f1/")}}


def rl_run(model: Path, out: Path, *, lr: float, seed: int, a: argparse.Namespace) -> tuple[dict, dict]:
    from treegym.train.bench import WEB_ENV
    from treegym.train.config import TrainConfig
    from treegym.train.trainer import Trainer

    cfg = TrainConfig(model=str(model), env=WEB_ENV, data="synthetic", split=a.rl_split, out=str(out),
                      algo=a.algo, steps=a.steps, prompts_per_step=a.prompts, minibatch_prompts=2,
                      seed=seed, eval_every=0, save_every=10 ** 9, keep_checkpoints=1,
                      save_trees_every=0, threads=a.threads, progress=False, tensorboard=False)
    cfg.rollout.G, cfg.rollout.M, cfg.rollout.N, cfg.rollout.L = 4, 2, 2, 1  # bench's G4 / M2N2L1
    cfg.rollout.max_new_tokens = a.max_new_tokens
    cfg.optim.lr = lr
    trainer = Trainer(cfg, log=lambda *_: None)
    recs = trainer.train()
    train = {"kl_last": recs[-1].get("kl", float("nan")), "entropy_first": recs[0].get("entropy", float("nan")),
             "entropy_last": recs[-1].get("entropy", float("nan")),
             "reward": statistics.fmean(r["reward"] for r in recs)}
    return train, test_row(trainer.policy, a.test_n, a.max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the committed web warm start")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 2e-5])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--algo", default="grpo", choices=["grpo", "tree_grpo"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rl-split", default="dev", help="RL prompts (dev: questions the warm start never saw)")
    p.add_argument("--test-n", type=int, default=400)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: bench's web budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", default=None, metavar="NAME", help="also write benchmarks/results/NAME.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from treegym.agents.hf import HFPolicy
    from treegym.train.bench import MAX_NEW_TOKENS, WARMSTART_WEB_DIR, WEB_ENV, _git_commit, _git_dirty, _machine

    torch.set_num_threads(a.threads)
    a.max_new_tokens = a.max_new_tokens or MAX_NEW_TOKENS[WEB_ENV]
    model = a.model or WARMSTART_WEB_DIR
    lines = [f"`python benchmarks/web_rl_drop.py {shlex.join(argv)}` · commit `{_git_commit()}`"
             f"{' (uncommitted changes)' if _git_dirty() else ''} · {_machine()}", "",
             f"{a.algo} on {WEB_ENV}, {a.steps} steps × {a.prompts} prompts from `{a.rl_split}`, "
             f"max_new_tokens {a.max_new_tokens}; greedy on {a.test_n} test tasks. Columns after F1: "
             "share of episodes answered / out of tool budget; cut actions and invalid actions per "
             "episode; context-exhausted share. Δ: paired over the same questions (95% CI, normal).", "",
             "| run | lr | seed | test F1 | Δ vs start | won/lost | answered | out of budget | cut act. | "
             "invalid | ctx full | F1 by kind | KL@last | entropy first→last | train reward |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]

    def row(name: str, lr: str, seed: str, t: dict, start: dict | None, train: dict | None) -> str:
        kinds = " ".join(f"{k} {100 * v:.1f}" for k, v in sorted(t["by_kind"].items()))
        delta = won = "–"
        if start is not None:
            d = np.asarray(t["scores"]) - np.asarray(start["scores"])
            half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
            delta = f"{100 * d.mean():+.1f} [{100 * (d.mean() - half):+.1f}, {100 * (d.mean() + half):+.1f}]"
            won = f"{int((d > 0).sum())}/{int((d < 0).sum())}"
        tr = ("–", "–", "–") if train is None else (
            f"{train['kl_last']:.3f}", f"{train['entropy_first']:.2f}→{train['entropy_last']:.2f}",
            f"{train['reward']:.3f}")
        return (f"| {name} | {lr} | {seed} | {100 * t['f1']:.1f} | {delta} | {won} | {t['answered']:.3f} | "
                f"{t['out_of_budget']:.3f} | {t['cut_actions']:.3f} | {t['invalid_actions']:.3f} | "
                f"{t['context_exhausted']:.3f} | {kinds} | {tr[0]} | {tr[1]} | {tr[2]} |")

    start = test_row(HFPolicy(model), a.test_n, a.max_new_tokens)
    lines.append(row("SFT start", "–", "–", start, None, None))
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for lr in a.lrs:
            for seed in range(a.seeds):
                train, t = rl_run(model, Path(tmp) / f"lr{lr}-s{seed}", lr=lr, seed=seed, a=a)
                lines.append(row(a.algo, f"{lr:g}", str(seed), t, start, train))
                print(lines[-1], flush=True)
    if a.write:
        path = Path(__file__).resolve().parent / "results" / f"{a.write}.md"
        path.write_text("# Why RL lowers the web F1 (issue 15.5)\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
