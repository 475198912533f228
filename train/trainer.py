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
4. the batch is packed: each prompt group (its G chains, or its M trees) becomes one sequence in
   which every shared prefix appears once, under a tree attention mask (`tree.batch.pack`,
   `train.logprobs`); "old" log-probs are recomputed with the same weights (verl does the same;
   the sampler's log-probs are logged as a check) and reference log-probs come from the frozen
   start model when KL is on;
5. minibatches of whole prompts (all leaves of a prompt stay together), dual-clip PPO + k3 KL -
   entropy (`train.loss`) on the duplicated per-leaf layout (packed log-probs are gathered back
   into it, so the loss is the unpacked one), AdamW, grad-norm clip, linear warm-up;
6. metrics to `metrics.jsonl` and TensorBoard; dev eval every `eval_every` steps; atomic
   checkpoint every `save_every` steps and at the end; Ctrl-C saves one before exiting.

Work whose result is known is skipped (`TrainConfig.update`, each switch tested to change no
number): the first minibatch takes its old log-probs from its own training forward (same
weights), and the reference pass is skipped while the policy still equals the reference.

Why prompts are never split across minibatches: a prompt's advantages are relative to its own
group; updating on half a group would push the shared prefix in one direction only.

There is one path: a single process is world size 1 of the data-parallel loop (every collective
is the identity without a process group). Under torchrun (WORLD_SIZE > 1; `torchrun
--nproc_per_node N -m treegym.cli train ...`) it takes — by construction — the same steps as one
process on the same global batch (tests/test_train_distributed.py checks the final weights):

- every rank draws the same `prompts_per_step` prompts; prompt i is rolled out by rank
  i % world_size, with the seeds and uid it would have in one process (`prompt_index`), so a
  prompt's whole group (all its trees and leaves) lives on one rank and its advantages are the
  single-process ones;
- generation needs full weights: with `strategy="ddp"` every rank holds them; with FSDP2 each rank
  keeps an unsharded *rollout copy*, refreshed from the shards (all-gather) before a rollout or an
  eval that follows an update — the same weight sync an inference engine needs, at the cost of
  one extra full copy per rank;
- old and reference log-probs come from `distributed.rank_logprobs` (FSDP2-safe forwards in
  lockstep); the reference model is sharded like the policy (FSDP2) or a plain copy (DDP);
- the minibatch order is drawn from the same seed on every rank; each minibatch is one
  `distributed.policy_update_step` over the ranks' rows of its prompts, with the global
  token-mean denominator, so loss, gradient, clipping and AdamW step are the global ones;
- rank 0 alone writes config.yaml, metrics.jsonl, TensorBoard, trees (gathered from all ranks)
  and checkpoints (`save_checkpoint_rank0`); metrics are computed from all ranks' data, so they
  equal the single-process numbers; dev eval runs on rank 0 and is broadcast.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from treegym.agents.episode import derive_seed as _derive  # the one seed derivation
from treegym.train import checkpoint as ckpt
from treegym.train import distributed as D
from treegym.train.config import TrainConfig, parse_args, save_yaml, to_dict, validate
from treegym.train.logprobs import check_context, check_model_takes_tree_mask
from treegym.train.modeling import warmup_lambda
from treegym.tree import Budget, save_jsonl, to_batch
from treegym.tree.serialize import forest_from_json, forest_to_json

ADVANTAGE_OF_ALGO = {"grpo": "grpo", "tree_grpo": "tree_grpo", "treerl": "treerl", "gigpo": "gigpo"}




class Trainer:
    """Owns the policy, the reference model, the optimizer and the run directory.

    Under torchrun it joins the process group itself (`distributed.init_distributed`); with one
    process (no torchrun, or WORLD_SIZE=1) nothing distributed runs and the numbers are those of
    the plain single-process loop."""

    def __init__(self, config: TrainConfig, *, dataset: Any = None, log: Any = None):
        from treegym.agents.hf import HFPolicy
        from treegym.train.evaluate import make_env

        self.cfg = validate(config)
        if not self.cfg.model:
            raise ValueError("TrainConfig.model: give the model directory to train (e.g. the SFT warm start)")
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.dist = D.init_distributed("gloo" if self.cfg.device == "cpu" else None) \
            if _under_torchrun() else D.DistInfo()
        self.is_main = self.dist.is_main
        if self.dist.distributed:
            self._check_distributed_config()
        self.out = Path(self.cfg.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        quiet = lambda msg: None  # noqa: E731  (ranks other than 0 stay silent)
        self.log = log or ((lambda msg: print(msg, file=sys.stderr)) if self.is_main else quiet)
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        self.device = self.dist.device if self.dist.distributed else torch.device(self.cfg.device)
        # under torchrun the trained weights are fp32 masters (FSDP2 computes in bf16 on CUDA
        # through its MixedPrecisionPolicy); one process keeps HFPolicy's device default
        self.policy = HFPolicy(self.cfg.model, device=str(self.device),
                               dtype="float32" if self.dist.distributed else None)
        self.model = self.policy.model
        if self.cfg.update.packed:  # before any rollout: name the setting, not a kernel error
            check_model_takes_tree_mask(self.model)
        self.ref_model = None
        # True while the policy provably holds the reference's weights (a fresh run before its
        # first optimizer step): then reference log-probs equal the old ones
        self._policy_is_ref = True
        if self.cfg.loss.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self._rollout_stale = False
        # who generates: the trainer's own weights, or an SGLang server synced to them every step
        self.rollout_policy: Any = self.policy
        self._server_step: int | None = None  # the step whose weights the server holds
        if self.cfg.rollout_server:
            from treegym.agents.sglang import SGLangPolicy

            self.rollout_policy = SGLangPolicy(self.cfg.rollout_server, tokenizer=self.policy.tokenizer,
                                               eos_token_ids=self.policy.eos_ids,
                                               **self.cfg.sglang.client_kwargs())
        if self.dist.distributed:
            self._shard()
        data = dataset if dataset is not None else self.cfg.data
        env_kw = dict(retriever=self.cfg.retriever, topk=self.cfg.topk,
                      max_tool_calls=self.cfg.max_tool_calls, reward=self.cfg.reward)
        env_kw = dict(env_kw, env_id=self.cfg.env, site=self.cfg.site)
        self.env = make_env(data, self.cfg.split, **env_kw)
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
        if self.is_main:
            save_yaml(self.cfg, self.out / "config.yaml")

    # -- distributed setup ------------------------------------------------------------------

    def _check_distributed_config(self) -> None:
        world = self.dist.world_size
        if self.cfg.prompts_per_step < world:
            raise ValueError(f"prompts_per_step={self.cfg.prompts_per_step} is below the "
                             f"{world} ranks: each rank rolls out whole prompts, give it >= 1")
        if (self.cfg.advantage or "") == "treepo":
            raise ValueError("advantage 'treepo' whitens over the whole batch, which spans ranks; "
                             "use a per-prompt estimator under torchrun")

    def _shard(self) -> None:
        """Wrap the policy (and reference) for data-parallel training, before the optimizer is
        built. FSDP2 turns the policy's parameters into shards, so rollouts and eval get their
        own unsharded copy (`self.policy.model`), refreshed by `_sync_rollout_weights`."""
        strategy = self.cfg.strategy
        if strategy == "fsdp":
            rollout_model = copy.deepcopy(self.model).eval()
            if self.device.type == "cuda":  # generation only: bf16 halves the copy
                rollout_model = rollout_model.to(torch.bfloat16)
            for p in rollout_model.parameters():
                p.requires_grad_(False)
            self.policy.model = rollout_model
            if self.ref_model is not None:
                self.ref_model = D.shard_model(self.ref_model, self.dist, strategy="fsdp")
        # DDP: `self.policy.model` stays the wrapped module itself (full weights on every rank,
        # no collective in its forward); the reference stays a plain per-rank copy.
        self.model = D.shard_model(self.model, self.dist, strategy=strategy)
        self._rollout_stale = True  # sharding broadcast rank 0's weights: copy them before use

    def _sync_rollout_weights(self) -> None:
        """FSDP2: all-gather the updated shards into the rollout copy (collective; every rank
        reaches it at the same point because all ranks run the same steps)."""
        if self._rollout_stale and self.dist.distributed and self.cfg.strategy == "fsdp":
            D.copy_full_weights(self.model, self.policy.model)
        self._rollout_stale = False

    def _sync_server_weights(self) -> None:
        """Give the rollout server this step's weights, once per step (also after `--resume`,
        when the server still holds whatever it was started with). Under torchrun every rank
        takes part in the gather; rank 0 writes and tells the server; all wait for it."""
        if not self.cfg.rollout_server or self._server_step == self.step:
            return
        where = self.out / "rollout_weights"
        if self.dist.distributed:
            D.save_pretrained_rank0(self.model, where)
        else:
            self.model.save_pretrained(where, safe_serialization=True)
        if self.is_main:
            self.rollout_policy.update_weights_from_disk(str(where.resolve()))
        if self.dist.distributed:
            D.barrier()
        self._server_step = self.step

    def close(self) -> None:
        """Leave the process group (ranks meet at a barrier first, so none tears gloo down while
        a peer still works). A no-op with one process."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.dist.distributed:
            D.barrier()
            D.cleanup_distributed()

    # -- state ------------------------------------------------------------------------------

    def _resume(self) -> None:
        if self.dist.distributed:  # rank 0 picks the checkpoint, so all ranks load the same one
            path = D.broadcast_object(ckpt.latest_checkpoint(self.out, warn=self.log)
                                      if self.is_main else None)
        else:
            path = ckpt.latest_checkpoint(self.out, warn=self.log)
        if path is None:
            self.log(f"--resume: no checkpoint in {self.out}/checkpoints, starting from step 0")
            return
        if self.dist.distributed:  # also reads a one-process checkpoint (positional optimizer)
            state = D.load_checkpoint_distributed(path, self.model, self.optimizer, self.scheduler)
            if state.get("rng") is not None:
                ckpt.set_rng_state(state["rng"])
            self._rollout_stale = True
        else:
            state = ckpt.restore(path, self.model, None, self.scheduler)
            if state.get("optimizer") is not None:  # name-keyed when written under torchrun
                self.optimizer.load_state_dict(
                    D.optimizer_state_by_position(state["optimizer"], self.model))
        self.step = int(state["step"])
        self.cursor = int(state["extra"].get("cursor", 0))
        self._policy_is_ref = False
        self.log(f"resumed from {path} (step {self.step})")

    def save(self) -> Path | None:
        """Write a checkpoint; under torchrun a collective (rank 0 writes, returns None elsewhere)."""
        extra = {"cursor": self.cursor, "config": to_dict(self.cfg)}
        if self.dist.distributed:
            return D.save_checkpoint_rank0(self.out, self.step, self.model, self.optimizer,
                                           self.scheduler, tokenizer=self.policy.tokenizer.tokenizer,
                                           extra=extra, keep=self.cfg.keep_checkpoints)
        return ckpt.save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler,
                                    tokenizer=self.policy.tokenizer.tokenizer,
                                    extra=extra, keep=self.cfg.keep_checkpoints)

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

    def rollout(self, tasks: Sequence[Any], prompt_index: Sequence[int] | None = None
                ) -> tuple[list, Any]:
        """Sample the forests of `tasks`; `prompt_index` gives their positions in the step's
        batch (a rank's share under torchrun), so seeds and uids do not depend on the rank."""
        from treegym.tree import rollout as R

        r = self.cfg.rollout
        gen = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                   max_turns=int(self.env.unwrapped.max_tool_calls) + 2)
        if prompt_index is not None:
            gen["prompt_index"] = list(prompt_index)
        seed = _derive(self.cfg.seed, "rollout", self.step)
        if self.cfg.rollout_server:
            self._sync_server_weights()
        else:
            self._sync_rollout_weights()
        self.model.eval()
        policy = self.rollout_policy
        with torch.no_grad():
            if self.cfg.algo in ("grpo", "gigpo"):
                return R.chain(policy, self.env, tasks, G=r.G, seed=seed, **gen)
            if self.cfg.algo == "treerl":  # TreeRL's EPTree: fork at the most uncertain tokens
                return R.entropy(policy, self.env, tasks, M=r.M, N=r.N, L=r.L, T=r.T, K=r.K,
                                 seed=seed, granularity="token", **gen)
            return R.tree_grpo(policy, self.env, tasks, M=r.M, N=r.N, L=r.L, K=r.K, seed=seed,
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

    def update(self, batch: Any, uid_order: Sequence[str] | None = None) -> dict[str, float]:
        """PPO epochs over minibatches of whole prompts; returns averaged metrics.

        `batch` holds this process's rows (all of them with one process; under torchrun this
        rank's prompts) and `uid_order` the uids of the whole step's batch in prompt order (every
        rank passes the same list; default: the batch's own). Every minibatch is one
        `distributed.policy_update_step` over the ranks' rows of its prompts, with the global
        token-mean denominator, so a single process is simply world size 1.

        Old and reference log-probs come from no-grad passes over the same layout the update
        trains on (packed by default); `cfg.update` skips the passes whose result is known."""
        cfg, u = self.cfg, self.cfg.update
        local = D.StepBatch.from_any(batch, packed=u.packed)
        check_context(self.model, local.fwd)
        uids_here = list(dict.fromkeys(batch.uids))
        order_all = list(uid_order) if uid_order is not None else uids_here
        rows_of = {x: [i for i, y in enumerate(batch.uids) if y == x] for x in uids_here}
        rng = random.Random(_derive(cfg.seed, "minibatch", self.step))
        epochs = []
        for _ in range(cfg.epochs):
            order = order_all[:]
            rng.shuffle(order)
            epochs.append([order[s:s + cfg.minibatch_prompts]
                           for s in range(0, len(order), cfg.minibatch_prompts)])
        first = set(epochs[0][0]) if u.old_from_update else set()
        ref_is_old = self.ref_model is not None and u.ref_while_unchanged and self._policy_is_ref
        micro = cfg.micro_batch_rows
        self.model.eval()
        # the old pass: every prompt but those of the first minibatch (when they reuse theirs)
        rest = [i for i in range(local.rows) if batch.uids[i] not in first]
        old = torch.zeros(local.loss_mask.shape, dtype=torch.float32)
        lp, _ = D.rank_logprobs(self.model, local.take(rest), micro_batch_rows=micro)
        old[rest, :lp.shape[1]] = lp
        ref = None
        if self.ref_model is not None:
            ref = old if ref_is_old else D.rank_logprobs(self.ref_model, local,
                                                         micro_batch_rows=micro)[0]
        behaviour = local.old_logprobs
        local = local.with_logprobs(old=old, ref=ref)
        keys = ("loss", "pg_loss", "kl", "entropy", "clipfrac", "clipfrac_lower", "approx_kl",
                "grad_norm")
        acc: dict[str, list[float]] = {}
        skipped = 0
        for e, minibatches in enumerate(epochs):
            for j, mb in enumerate(minibatches):
                rows = [i for x in mb for i in rows_of.get(x, [])]
                part = local.take(rows)
                (tokens,) = D.all_reduce_floats([float(part.loss_mask[:, 1:].sum())])
                if tokens == 0:  # no prompt of the minibatch has a sampled token: nothing to learn
                    skipped += 1
                    continue
                reuse = bool(first) and e == 0 and j == 0
                st = D.policy_update_step(
                    self.model, self.optimizer, part, info=self.dist, clip=cfg.loss.clip,
                    dual_clip=cfg.loss.dual_clip, kl_coef=cfg.loss.kl_coef,
                    entropy_coef=cfg.loss.entropy_coef, agg=cfg.loss.agg,
                    grad_clip=cfg.optim.grad_clip, micro_batch_rows=micro,
                    scheduler=self.scheduler, compute_entropy=True, old_from_forward=reuse,
                    ref_from_forward=reuse and ref_is_old)
                self._policy_is_ref = False
                if reuse:  # later epochs (and the log) read them like the passed ones
                    got = st.pop("old_logprobs")
                    old[rows, :got.shape[1]] = got  # `ref` is `old` while they coincide
                if not math.isfinite(st["grad_norm"]):
                    raise FloatingPointError(f"step {self.step}: non-finite gradient norm")
                for k in keys:
                    if k in st:
                        acc.setdefault(k, []).append(st[k])
        m = local.loss_mask.float()
        diff, n_tok = D.all_reduce_floats([float(((old - behaviour).abs() * m).sum()),
                                           float(m.sum())])
        fwd_tokens, leaf_tokens = D.all_reduce_floats([float(local.fwd.num_tokens),
                                                       float(batch.attention_mask.sum())])
        self._rollout_stale = True
        self.model.eval()
        stats: dict[str, float] = {"rollout_logprob_diff": diff / max(n_tok, 1.0)}
        stats.update({k: float(np.mean(v)) for k, v in acc.items()})
        stats.update({"skipped_minibatches": float(skipped), "forward_tokens": fwd_tokens,
                      "leaf_tokens": leaf_tokens, "lr": float(self.scheduler.get_last_lr()[0])})
        return stats

    def train_step(self) -> dict[str, float]:
        """One RL step: this process rolls out prompts rank, rank + W, ... of the step's batch
        (all of them with one process), with the seeds and uids they have in one process; the
        metrics are computed from every rank's rows, in prompt order, so they are the numbers
        one process logs."""
        t0 = time.perf_counter()
        tasks = self.next_tasks()
        mine = list(range(self.dist.rank, len(tasks), self.dist.world_size))
        forests, budget = self.rollout([tasks[i] for i in mine], prompt_index=mine)
        t1 = time.perf_counter()
        advs = self.advantages(forests)
        batch = to_batch(forests, advs, pad_id=self.policy.pad_id)
        index_of = {f.uid: int(f.meta["prompt_index"]) for f in forests}
        local_uids = list(dict.fromkeys(batch.uids))
        uid_order = [x for _, x in sorted((i, x) for part in D.all_gather_objects(
            [(index_of[x], x) for x in local_uids]) for i, x in part)]
        stats = self.update(batch, uid_order)
        t2 = time.perf_counter()
        self.step += 1
        save_trees = bool(self.cfg.save_trees_every and self.step % self.cfg.save_trees_every == 0)
        # forests cross process boundaries as JSON; one process keeps its objects
        ship = forest_to_json if self.dist.distributed else (lambda f: f)
        mask = batch.loss_mask > 0
        per_prompt = [(index_of[f.uid],
                       [float(batch.rewards[i]) for i, x in enumerate(batch.uids) if x == f.uid],
                       bool(max((l.reward or 0.0) for l in f.leaves()) > 0),
                       ship(f) if save_trees else None) for f in forests]
        mine_stats = {"prompts": per_prompt, "leaves": sum(len(f.leaves()) for f in forests),
                      "budget": budget.to_dict(),
                      "adv_abs": (float(np.abs(batch.advantages[mask]).sum()), int(mask.sum())),
                      "rollout_s": t1 - t0, "update_s": t2 - t1}
        ranks = D.all_gather_objects(mine_stats)
        prompts = sorted((p for r in ranks for p in r["prompts"]), key=lambda p: p[0])
        rewards = np.asarray([x for p in prompts for x in p[1]], dtype=batch.rewards.dtype)
        b = {k: sum(r["budget"][k] for r in ranks) for k in budget.to_dict()}
        b["wall_s"] = max(r["budget"]["wall_s"] for r in ranks)
        n = len(tasks)
        adv_sum, adv_n = sum(r["adv_abs"][0] for r in ranks), sum(r["adv_abs"][1] for r in ranks)
        stats.update({
            "step": self.step, "reward": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "solved_prompts": float(np.mean([p[2] for p in prompts])),
            "leaves_per_prompt": sum(r["leaves"] for r in ranks) / n,
            "tokens_per_prompt": b.get("generated_tokens", 0) / n,
            "tool_calls_per_prompt": b.get("tool_calls", 0) / n,
            "llm_calls": b.get("llm_calls", 0),
            "adv_abs_mean": adv_sum / adv_n if adv_n else 0.0,
            "train_tokens": int(adv_n),
            "rollout_s": max(r["rollout_s"] for r in ranks),
            "update_s": max(r["update_s"] for r in ranks),
        })
        if save_trees and self.is_main:
            meta = {"step": self.step, "algo": self.cfg.algo}
            if self.dist.distributed:
                meta["world_size"] = self.dist.world_size
            save_jsonl(self.out / "trees" / f"step_{self.step:06d}.jsonl",
                       [forest_from_json(p[3]) if isinstance(p[3], dict) else p[3] for p in prompts],
                       Budget(**b), meta=meta)
        return stats

    # -- eval / logging ---------------------------------------------------------------------

    def dev_env(self) -> Any:
        if self._dev_env is None:
            from treegym.train.evaluate import make_env

            data, kw = self._dev_env_args
            self._dev_env = make_env(data, self.cfg.eval_split, **kw)
        return self._dev_env

    def evaluate(self, split_env: Any = None, n: int | None = None) -> dict[str, float]:
        """Dev (or `split_env`) evaluation with the current weights. Under torchrun a collective:
        every rank refreshes its rollout weights, rank 0 evaluates, the others receive its
        numbers (so every rank logs and returns the same record)."""
        from treegym.train.evaluate import evaluate, select_tasks

        self._sync_rollout_weights()
        self.model.eval()
        out = None
        if self.is_main:
            env = split_env or self.dev_env()
            tasks = select_tasks(env, self.cfg.eval_tasks if n is None else n, seed=self.cfg.seed)
            out = evaluate(self.policy, env, tasks, max_new_tokens=self.cfg.rollout.max_new_tokens,
                           seed=self.cfg.seed)
        return D.broadcast_object(out)

    def _emit(self, rec: dict) -> None:
        self.history.append(rec)
        if not self.is_main:
            return
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

    def train(self, on_step: Callable[["Trainer", dict], dict | None] | None = None) -> list[dict]:
        """Run until `cfg.steps`; returns the metric records of this call.

        `on_step(trainer, record)` runs after each step (after the periodic dev eval) and may
        return extra fields for the record: how `treegym bench` takes its learning curves on a
        fixed set of test questions without a second training loop."""
        from tqdm.auto import tqdm

        start = self.step
        records = []
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"{self.cfg.algo}",
                   disable=not (self.cfg.progress and self.is_main), dynamic_ncols=True,
                   file=sys.stderr)
        try:
            while self.step < self.cfg.steps:
                rec = self.train_step()
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    rec.update({"dev/" + k: v for k, v in self.evaluate().items()})
                if on_step is not None:
                    rec.update(on_step(self, rec) or {})
                self._emit(rec)
                records.append(rec)
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.2f}", loss=f"{rec.get('loss', 0):.3f}",
                                roll=f"{rec['rollout_s']:.1f}s", upd=f"{rec['update_s']:.1f}s")
                if self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            if self.dist.distributed:
                # saving is a collective; a rank interrupted mid-step would wait forever for
                # peers that are elsewhere, so resume from the last periodic checkpoint instead
                self.log(f"interrupted at step {self.step}: not saving under torchrun; --resume "
                         "continues from the last periodic checkpoint")
                raise
            path = self.save()
            self.log(f"interrupted: saved {path} at step {self.step}")
            raise
        bar.close()
        need_final = self.step > start or not ckpt.list_checkpoints(self.out)
        if self.dist.distributed:
            need_final = bool(D.broadcast_object(need_final))
        if need_final:
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
    if trainer.is_main:
        print(json.dumps({"step": trainer.step, **{"dev/" + k: v for k, v in final.items()}},
                         indent=1))
    distributed = trainer.dist.distributed
    trainer.close()
    if distributed:
        # A torchrun worker whose run is complete (checkpoint written, group destroyed) leaves
        # without interpreter teardown: there gloo's background threads sometimes abort the
        # process ("terminate called without an active exception", SIGABRT; 1 of 8 CPU launches
        # here), and torchrun would report a finished run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _under_torchrun() -> bool:
    """torchrun (or a launcher setting the same variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


__all__ = ["Trainer", "cli_main"]
