"""Policy-update seconds per step, packed vs duplicated, on the quick benchmark's own batches.

    .venv/bin/python benchmarks/update.py                       # G16, G4, M2N2L1; writes results
    .venv/bin/python benchmarks/update.py --arms G16 --repeats 1 --no-write

For each arm of `treegym bench --quick` (chain G16, chain G4, Tree-GRPO M2N2L1; same settings as
`train/bench.py`: the committed warm start, 8 prompts per step, 24 new tokens, minibatches of 2
prompts, lr 1e-4, KL and entropy 0.001, 2 threads) a trainer takes one real step (rollout +
update, so the policy no longer equals the reference, as on every later step), then samples the
next step's batch with the real sampler. On that one batch, from the same weights and optimizer
state, `Trainer.update` is timed in three layouts, alternating, `--repeats` times each:

- **duplicated**: one padded row per leaf, every pass computed (the trainer before packing);
- **packed**: each prompt group one packed sequence under a tree mask (`TrainConfig.update.packed`);
- **packed+skips**: packed, plus the old-log-prob pass skipped for the first minibatch
  (`update.old_from_update`) — the default.

Reported: the fastest of the repeats per layout (timeit's rule: on a shared machine the slower
repeats measure other jobs) and the ratios duplicated ÷ packed, plus the median over repeats of
the ratio measured back to back (layouts in rotating order); tokens through the
transformer per pass (packed ÷ duplicated); and that the numbers are the same: the update's
loss / KL / entropy / grad norm per layout, the largest weight difference after the update, and
the largest gradient difference of one minibatch's loss (packed vs duplicated, fp32).
Writes benchmarks/results/update.{json,md} with argv, commit and machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from treegym.train import distributed as D
from treegym.train.bench import QA_ENV, MAX_NEW_TOKENS, _git_commit, _machine, chain_arm, tree_arm
from treegym.train.config import TrainConfig
from treegym.train.sft import WARMSTART_DIR
from treegym.train.trainer import Trainer
from treegym.tree import to_batch

ARMS = {a.config: a for a in (chain_arm(16), chain_arm(4), tree_arm(2))}
LAYOUTS = {"duplicated": dict(packed=False, old_from_update=False),
           "packed": dict(packed=True, old_from_update=False),
           "packed+skips": dict(packed=True, old_from_update=True)}
RESULTS = Path(__file__).resolve().parent / "results"


def make_trainer(arm, out: Path, threads: int, prompts: int) -> Trainer:
    """The trainer `train/bench.py::run_arm` builds for this arm (quick settings)."""
    cfg = TrainConfig(model=str(WARMSTART_DIR), env=QA_ENV, data="synthetic", split="train",
                      out=str(out), algo=arm.algo, advantage=arm.advantage, steps=2,
                      prompts_per_step=prompts, minibatch_prompts=2, seed=0, eval_every=0,
                      save_every=10 ** 9, save_trees_every=0, threads=threads, progress=False,
                      tensorboard=False)
    for k, v in arm.rollout.items():
        setattr(cfg.rollout, k, v)
    cfg.rollout.max_new_tokens = MAX_NEW_TOKENS[QA_ENV]
    cfg.optim.lr = 1e-4
    return Trainer(cfg, log=lambda *_: None)


def snapshot(tr: Trainer) -> dict:
    return {"model": copy.deepcopy(tr.model.state_dict()),
            "optim": copy.deepcopy(tr.optimizer.state_dict()),
            "sched": copy.deepcopy(tr.scheduler.state_dict()), "flag": tr._policy_is_ref}


def restore(tr: Trainer, snap: dict) -> None:
    # copies again: Optimizer.load_state_dict keeps AdamW's `step` tensors by reference, and the
    # next update would advance the snapshot's own counters in place
    tr.model.load_state_dict(snap["model"])
    tr.optimizer.load_state_dict(copy.deepcopy(snap["optim"]))
    tr.scheduler.load_state_dict(copy.deepcopy(snap["sched"]))
    tr._policy_is_ref = snap["flag"]


def set_layout(tr: Trainer, name: str) -> None:
    for k, v in LAYOUTS[name].items():
        setattr(tr.cfg.update, k, v)


def grads_of_one_minibatch(tr: Trainer, batch, packed: bool) -> dict[str, torch.Tensor]:
    """Gradient of the loss of the batch's first two prompts (old log-probs = the batch's), one
    `policy_update_step` with a zero learning rate."""
    uids = list(dict.fromkeys(batch.uids))[:2]
    rows = [i for i, u in enumerate(batch.uids) if u in uids]
    sb = D.StepBatch.from_any(batch, packed=packed).take(rows)
    model = copy.deepcopy(tr.model)
    c = tr.cfg.loss
    D.policy_update_step(model, torch.optim.SGD(model.parameters(), lr=0.0), sb, clip=c.clip,
                         dual_clip=c.dual_clip, entropy_coef=c.entropy_coef, grad_clip=None,
                         compute_entropy=True)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def measure(config: str, repeats: int, threads: int, prompts: int, log) -> dict:
    arm = ARMS[config]
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(arm, Path(tmp) / config, threads, prompts)
        tr.train_step()  # step 0 (real): afterwards the policy differs from the reference
        forests, _ = tr.rollout(tr.next_tasks(), prompt_index=list(range(prompts)))
        batch = to_batch(forests, tr.advantages(forests), pad_id=tr.policy.pad_id)
        snap = snapshot(tr)
        times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
        cpu: dict[str, list[float]] = {k: [] for k in LAYOUTS}  # process time, kept in the JSON
        stats: dict[str, dict] = {}
        weights: dict[str, dict] = {}
        names = list(LAYOUTS)
        for rep in range(repeats):
            for name in names[rep % 3:] + names[:rep % 3]:  # rotate the order: no layout always first
                restore(tr, snap)
                set_layout(tr, name)
                t0, c0 = time.perf_counter(), time.process_time()
                st = tr.update(batch)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                stats[name] = st
                weights[name] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
            log(f"{config}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        restore(tr, snap)
        g_dup, g_pk = grads_of_one_minibatch(tr, batch, False), grads_of_one_minibatch(tr, batch, True)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratios within a repeat (the layouts ran back to back, under the same load), then the median
    paired = {k: statistics.median(d / p for d, p in zip(times["duplicated"], times[k]))
              for k in ("packed", "packed+skips")}
    dup_tokens, pk_tokens = stats["duplicated"]["forward_tokens"], stats["packed"]["forward_tokens"]
    keys = ("loss", "pg_loss", "kl", "entropy", "grad_norm", "clipfrac", "approx_kl")
    return {
        "config": config, "prompts": prompts, "leaves": len(batch.uids),
        "seconds": best, "median_seconds": med, "all_seconds": times, "all_cpu_seconds": cpu,
        "speedup_packed": best["duplicated"] / best["packed"],
        "speedup_packed_skips": best["duplicated"] / best["packed+skips"],
        "speedup_paired_median": paired,
        "tokens_per_pass": {"duplicated": dup_tokens, "packed": pk_tokens,
                            "packed_over_duplicated": pk_tokens / dup_tokens},
        "stats": {k: {n: stats[k].get(n) for n in keys} for k in LAYOUTS},
        "max_abs_diff": {
            "weights_packed_vs_duplicated": max(float((weights["packed"][k] - w).abs().max())
                                                for k, w in weights["duplicated"].items()),
            "weights_skips_vs_duplicated": max(float((weights["packed+skips"][k] - w).abs().max())
                                               for k, w in weights["duplicated"].items()),
            "grads_one_minibatch": max(float((g_pk[k] - g).abs().max()) for k, g in g_dup.items()),
            "grad_scale": max(float(g.abs().max()) for g in g_dup.values()),
            **{f"{n}": max(abs(stats[k][n] - stats["duplicated"][n]) for k in LAYOUTS
                           if stats[k].get(n) is not None)
               for n in keys if stats["duplicated"].get(n) is not None}},
    }


def to_markdown(res: dict) -> str:
    lines = ["# benchmarks/update.py: policy update, packed vs duplicated", "",
             f"`{' '.join(res['argv'])}` · commit `{res['commit']}` · {res['machine']}", "",
             "| batch | leaves | duplicated s | packed s | packed+skips s | speed-up packed | "
             "speed-up packed+skips | (paired median) | tokens/pass packed ÷ dup | max |Δloss| | "
             "max |Δgrad| |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        s, d = r["seconds"], r["max_abs_diff"]
        lines.append(f"| {r['config']} | {r['leaves']} | {s['duplicated']:.2f} | {s['packed']:.2f} | "
                     f"{s['packed+skips']:.2f} | {r['speedup_packed']:.2f}× | "
                     f"{r['speedup_packed_skips']:.2f}× | "
                     f"{r['speedup_paired_median']['packed+skips']:.2f}× | "
                     f"{r['tokens_per_pass']['packed_over_duplicated']:.3f} | {d.get('loss', 0):.1e} | "
                     f"{d['grads_one_minibatch']:.1e} |")
    lines += ["", "Seconds: the fastest of the repeats of one `Trainer.update` (old pass, reference "
              "pass, 4 minibatch steps) on the same batch and starting weights (timeit's rule: on a "
              "shared machine slower repeats measure interference); speed-up: duplicated ÷ packed "
              "of those, and in brackets the median over repeats of the ratio measured back to back. "
              "Δ: packed vs duplicated (the update's mean loss; the gradient of one minibatch's "
              "loss, fp32)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default="G16,G4,M2N2L1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = [measure(c.strip(), a.repeats, a.threads, a.prompts, log) for c in a.arms.split(",")]
    res = {"argv": ["benchmarks/update.py", *(argv if argv is not None else sys.argv[1:])],
           "commit": _git_commit(), "machine": _machine(), "rows": rows}
    md = to_markdown(res)
    print(md)
    if not a.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "update.json").write_text(json.dumps(res, indent=1) + "\n")
        (RESULTS / "update.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
