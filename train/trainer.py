"""The RL loop: prompts -> tree/chain rollout -> rewards -> advantages -> PPO updates -> logs.

`treegym train --model DIR --algo tree_grpo --steps 20 --out runs/x` (see `TrainConfig` for every
flag; `--config file.yaml` for a base). One step:

1. take the next `prompts_per_step` training tasks (a seeded permutation per epoch; the cursor is
   checkpointed, so a resumed run sees the same prompts);
2. sample experience with the chosen sampler under the current weights, no grad (`grpo`/`gigpo`:
   `rollout.chain(G)`; `tree_grpo`: `rollout.tree_grpo(M, N, L, K)`; `treerl`: `rollout.entropy`
   (EPTree, token-level forks)); every generation
   is seeded from (seed, step), so a run is reproducible;
3. advantages from the forest (`tree.advantages.<algo>`), expanded to tokens by `to_batch`;
4. "old" log-probs recomputed with the same weights (verl does the same; the sampler's log-probs
   are logged as a check) and reference log-probs from the frozen start model when KL is on;
5. minibatches of whole prompts (all leaves of a prompt stay together), dual-clip PPO + k3 KL -
   entropy (`train.loss`), AdamW, grad-norm clip, linear warm-up;
6. metrics to `metrics.jsonl` and TensorBoard; dev eval every `eval_every` steps; atomic
   checkpoint every `save_every` steps and at the end; Ctrl-C saves one before exiting.

Why prompts are never split across minibatches: a prompt's advantages are relative to its own
group; updating on half a group would push the shared prefix in one direction only.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from treegym.train import checkpoint as ckpt
from treegym.train.config import TrainConfig, parse_args, save_yaml, to_dict, validate
from treegym.train.loss import total_loss
from treegym.train.modeling import warmup_lambda

ADVANTAGE_OF_ALGO = {"grpo": "grpo", "tree_grpo": "tree_grpo", "treerl": "treerl", "gigpo": "gigpo"}


def masked_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    mask: torch.Tensor, want_entropy: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(input_ids[t] | input_ids[<t]) (and the predictive entropy) at positions where
    `mask` is 1, zero elsewhere; shaped like `input_ids`.

    Only the masked (sampled-action) positions go through the LM head: with a few action tokens
    per several hundred observation tokens and a vocabulary of thousands, this is most of a tiny
    model's step time saved, and the values are identical to a full forward.
    """
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    sel = mask[:, 1:].bool()
    targets = input_ids[:, 1:][sel]
    if base is not None and head is not None:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][sel]).float()
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits[:, :-1][sel].float()
    logsm = torch.log_softmax(logits, dim=-1)
    lp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    full_sel = torch.zeros_like(mask, dtype=torch.bool)
    full_sel[:, 1:] = sel
    out = out.masked_scatter(full_sel, lp)
    ent = None
    if want_entropy:
        e = -(logsm.exp() * logsm).sum(-1)
        ent = torch.zeros_like(out).masked_scatter(full_sel, e)
    return out, ent


def _derive(*parts: Any) -> int:
    import hashlib

    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class Trainer:
    """Owns the policy, the reference model, the optimizer and the run directory."""

    def __init__(self, config: TrainConfig, *, dataset: Any = None, log: Any = None):
        from treegym.agents.hf import HFPolicy
        from treegym.train.evaluate import make_env

        self.cfg = validate(config)
        if not self.cfg.model:
            raise ValueError("TrainConfig.model: give the model directory to train (e.g. the SFT warm start)")
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.out = Path(self.cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        self.device = torch.device(self.cfg.device)
        self.policy = HFPolicy(self.cfg.model, device=self.cfg.device)
        self.model = self.policy.model
        self.ref_model = None
        if self.cfg.loss.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        data = dataset if dataset is not None else self.cfg.data
        env_kw = dict(retriever=self.cfg.retriever, topk=self.cfg.topk,
                      max_tool_calls=self.cfg.max_tool_calls, reward=self.cfg.reward)
        env_kw = dict(env_kw, env_id=self.cfg.env, site=self.cfg.site)
        self.env = make_env(data, "train", **env_kw)
        self._dev_env_args = (data, env_kw)
        self._dev_env = None
        self.tasks = list(self.env.unwrapped.tasks)
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(o.warmup_steps))
        self.step = 0
        self.cursor = 0
        self.history: list[dict] = []
        self._tb = None
        if self.cfg.resume:
            self._resume()
        save_yaml(self.cfg, self.out / "config.yaml")

    # -- state ------------------------------------------------------------------------------

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out, warn=self.log)
        if path is None:
            self.log(f"--resume: no checkpoint in {self.out}/checkpoints, starting from step 0")
            return
        state = ckpt.restore(path, self.model, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        self.cursor = int(state["extra"].get("cursor", 0))
        self.log(f"resumed from {path} (step {self.step})")

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler,
                                    tokenizer=self.policy.tokenizer.tokenizer,
                                    extra={"cursor": self.cursor, "config": to_dict(self.cfg)},
                                    keep=self.cfg.keep_checkpoints)

    def next_tasks(self) -> list[Any]:
        """The next prompts: a seeded permutation of the training split per epoch."""
        n, k = len(self.tasks), self.cfg.prompts_per_step
        out = []
        for c in range(self.cursor, self.cursor + k):
            epoch, i = divmod(c, n)
            perm = np.random.default_rng(_derive(self.cfg.seed, "epoch", epoch)).permutation(n)
            out.append(self.tasks[int(perm[i])])
        self.cursor += k
        return out

    # -- one step ---------------------------------------------------------------------------

    def rollout(self, tasks: Sequence[Any]) -> tuple[list, Any]:
        from treegym.tree import rollout as R

        r = self.cfg.rollout
        gen = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                   max_turns=int(self.env.unwrapped.max_tool_calls) + 2)
        seed = _derive(self.cfg.seed, "rollout", self.step)
        self.model.eval()
        with torch.no_grad():
            if self.cfg.algo in ("grpo", "gigpo"):
                return R.chain(self.policy, self.env, tasks, G=r.G, seed=seed, **gen)
            if self.cfg.algo == "treerl":  # TreeRL's EPTree: fork at the most uncertain tokens
                return R.entropy(self.policy, self.env, tasks, M=r.M, N=r.N, L=r.L, T=r.T, K=r.K,
                                 seed=seed, granularity="token", **gen)
            return R.tree_grpo(self.policy, self.env, tasks, M=r.M, N=r.N, L=r.L, K=r.K, seed=seed,
                               granularity=r.granularity, **gen)

    def advantages(self, forests: list) -> dict:
        from treegym.tree import advantages as A

        name = self.cfg.advantage or ADVANTAGE_OF_ALGO[self.cfg.algo]
        if name == "tree_grpo_inter":
            return A.grpo(forests)  # inter-tree only = GRPO over all leaves of the prompt
        if name == "tree_grpo_intra":
            return _intra_only(forests)
        fn = getattr(A, name, None)
        if fn is None:
            raise ValueError(f"advantage: unknown estimator {name!r}")
        return fn(forests)

    def update(self, batch: Any) -> dict[str, float]:
        """PPO epochs over minibatches of whole prompts; returns averaged metrics."""
        cfg = self.cfg
        dev = self.device
        ids = torch.as_tensor(batch.input_ids, device=dev)
        att = torch.as_tensor(batch.attention_mask, device=dev)
        mask = torch.as_tensor(batch.loss_mask, device=dev)
        adv = torch.as_tensor(batch.advantages, dtype=torch.float32, device=dev)
        behaviour = torch.as_tensor(batch.old_logprobs, dtype=torch.float32, device=dev)
        want_ent = True  # logged even when its coefficient is 0
        self.model.eval()
        with torch.no_grad(), self._autocast():
            old, _ = masked_logprobs(self.model, ids, att, mask)
            ref = masked_logprobs(self.ref_model, ids, att, mask)[0] if self.ref_model is not None else None
        m = mask.float()
        n_tok = m.sum().clamp_min(1)
        stats: dict[str, float] = {
            "rollout_logprob_diff": float(((old - behaviour).abs() * m).sum() / n_tok),
        }
        uids = list(dict.fromkeys(batch.uids))
        rows_of = {u: [i for i, x in enumerate(batch.uids) if x == u] for u in uids}
        rng = random.Random(_derive(cfg.seed, "minibatch", self.step))
        self.model.train()
        acc: dict[str, list[float]] = {}
        for _ in range(cfg.epochs):
            order = uids[:]
            rng.shuffle(order)
            for s in range(0, len(order), cfg.minibatch_prompts):
                rows = [i for u in order[s:s + cfg.minibatch_prompts] for i in rows_of[u]]
                idx = torch.tensor(rows, device=dev)
                width = int(att[idx].sum(1).max())
                b_ids, b_att, b_mask = ids[idx, :width], att[idx, :width], mask[idx, :width]
                if b_mask[:, 1:].sum() == 0:
                    continue
                with self._autocast():
                    logp, ent = masked_logprobs(self.model, b_ids, b_att, b_mask, want_entropy=want_ent)
                loss, st = total_loss(logp, old[idx, :width], adv[idx, :width], b_mask,
                                      ref_logp=None if ref is None else ref[idx, :width],
                                      entropy=ent, clip=cfg.loss.clip,
                                      dual_clip=cfg.loss.dual_clip, kl_coef=cfg.loss.kl_coef,
                                      entropy_coef=cfg.loss.entropy_coef, agg=cfg.loss.agg)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                st["grad_norm"] = float(gn)
                if not math.isfinite(st["grad_norm"]):
                    raise FloatingPointError(f"step {self.step}: non-finite gradient norm")
                self.optimizer.step()
                self.scheduler.step()
                for k, v in st.items():
                    acc.setdefault(k, []).append(v)
        self.model.eval()
        stats.update({k: float(np.mean(v)) for k, v in acc.items()})
        stats["lr"] = float(self.scheduler.get_last_lr()[0])
        return stats

    def _autocast(self):
        """bf16 autocast on CUDA (log-probs are still taken in fp32); a no-op on CPU, where fp32
        keeps resume and the distributed-equivalence checks bit-exact."""
        import contextlib

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        from treegym.tree import to_batch

        t0 = time.perf_counter()
        tasks = self.next_tasks()
        forests, budget = self.rollout(tasks)
        t1 = time.perf_counter()
        advs = self.advantages(forests)
        batch = to_batch(forests, advs, pad_id=self.policy.pad_id)
        stats = self.update(batch)
        t2 = time.perf_counter()
        self.step += 1
        leaves = [l for f in forests for l in f.leaves()]
        b = budget.to_dict()
        n = len(tasks)
        stats.update({
            "step": self.step, "reward": float(np.mean(batch.rewards)),
            "reward_std": float(np.std(batch.rewards)),
            "solved_prompts": float(np.mean([max((l.reward or 0.0) for l in f.leaves()) > 0 for f in forests])),
            "leaves_per_prompt": len(leaves) / n,
            "tokens_per_prompt": b.get("generated_tokens", 0) / n,
            "tool_calls_per_prompt": b.get("tool_calls", 0) / n,
            "llm_calls": b.get("llm_calls", 0),
            "adv_abs_mean": float(np.abs(batch.advantages[batch.loss_mask > 0]).mean()) if batch.loss_mask.any() else 0.0,
            "train_tokens": int(batch.loss_mask.sum()),
            "rollout_s": t1 - t0, "update_s": t2 - t1,
        })
        if self.cfg.save_trees_every and self.step % self.cfg.save_trees_every == 0:
            from treegym.tree import save_jsonl

            save_jsonl(self.out / "trees" / f"step_{self.step:06d}.jsonl", forests, budget,
                       meta={"step": self.step, "algo": self.cfg.algo})
        return stats

    # -- eval / logging ---------------------------------------------------------------------

    def dev_env(self) -> Any:
        if self._dev_env is None:
            from treegym.train.evaluate import make_env

            data, kw = self._dev_env_args
            self._dev_env = make_env(data, "dev", **kw)
        return self._dev_env

    def evaluate(self, split_env: Any = None, n: int | None = None) -> dict[str, float]:
        from treegym.train.evaluate import evaluate, select_tasks

        env = split_env or self.dev_env()
        tasks = select_tasks(env, self.cfg.eval_tasks if n is None else n, seed=self.cfg.seed)
        self.model.eval()
        return evaluate(self.policy, env, tasks, max_new_tokens=self.cfg.rollout.max_new_tokens,
                        seed=self.cfg.seed)

    def _emit(self, rec: dict) -> None:
        self.history.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.cfg.tensorboard:
            try:
                if self._tb is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.out / "tb"))
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self._tb.add_scalar(k, v, rec.get("step", self.step))
            except ImportError:
                self.cfg.tensorboard = False

    def train(self) -> list[dict]:
        """Run until `cfg.steps`; returns the metric records of this call."""
        from tqdm.auto import tqdm

        start = self.step
        records = []
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"{self.cfg.algo}",
                   disable=not self.cfg.progress, dynamic_ncols=True, file=sys.stderr)
        try:
            while self.step < self.cfg.steps:
                rec = self.train_step()
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    rec.update({"dev/" + k: v for k, v in self.evaluate().items()})
                self._emit(rec)
                records.append(rec)
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.2f}", loss=f"{rec.get('loss', 0):.3f}",
                                roll=f"{rec['rollout_s']:.1f}s", upd=f"{rec['update_s']:.1f}s")
                if self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            path = self.save()
            self.log(f"interrupted: saved {path} at step {self.step}")
            raise
        bar.close()
        if self.step > start or not ckpt.list_checkpoints(self.out):
            self.save()
        if self._tb is not None:
            self._tb.flush()
        return records


def _intra_only(forests: list) -> dict:
    """Tree-GRPO ablation: the intra-tree term alone (normalised over the leaves of each tree)."""
    from treegym.tree import advantages as A

    both, inter = A.tree_grpo(forests), A.grpo(forests)
    return {leaf: both[leaf] - inter[leaf] for leaf in both}


def cli_main(argv: Sequence[str] | None = None) -> int:
    from treegym.train.config import ConfigError

    try:
        cfg = parse_args(list(argv) if argv is not None else sys.argv[1:], TrainConfig)
        trainer = Trainer(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"treegym train: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except KeyboardInterrupt:
        return 130
    final = trainer.evaluate()
    print(json.dumps({"step": trainer.step, **{"dev/" + k: v for k, v in final.items()}}, indent=1))
    return 0


__all__ = ["Trainer", "masked_logprobs", "cli_main"]
