"""Train on treegym envs with TRL's `GRPOTrainer`: multi-turn episodes, and Tree-GRPO, in TRL.

    from trl import GRPOConfig
    from treegym.integrations.trl import TreegymRollout, TreeGRPOTrainer, env_reward

    rollout = TreegymRollout(gym.make("TreeSearchQA-v0"), sampler="tree_grpo", M=2, N=2, L=1)
    trainer = TreeGRPOTrainer(model=path, reward_funcs=env_reward, train_dataset=rollout.dataset(64),
                              args=GRPOConfig(num_generations=rollout.group_size, ...),
                              rollout_func=rollout)

`TreegymRollout` is a TRL `rollout_func` (trl >= 1.16, experimental there). TRL hands it the
prompts of this process — each dataset prompt repeated `num_generations` times, one entry per
completion it expects — and the trainer. It plays treegym episodes with the trainer's *live*
model through `HFPolicy` (token ids are the truth: the prompt is encoded once, every observation
once, sampled ids are never re-tokenized) and returns, per completion:

- `prompt_ids`: the env's reset prompt, as encoded by treegym;
- `completion_ids`: every action and observation after it, exactly the ids of the episode;
- `logprobs`: the behaviour log-probs (0.0 on observation tokens);
- `env_mask`: 1 on sampled tokens, 0 on observation tokens — TRL's multi-turn mask, so the loss
  never trains on what the env wrote;
- `env_reward`: the env's reward; the reward function `env_reward` below passes it to TRL.

`sampler="chain"` (default) plays one independent episode per entry (GRPO with TRL's group
advantages). `sampler="tree_grpo"` grows Tree-GRPO trees (arXiv 2509.21240) per prompt whose
leaves are the group (`num_generations` must equal `group_size` = M·K, K = 1 + N·L by default),
and also returns `treegym_advantage`: per-token advantages from `treegym.tree.advantages`
(`tree_grpo` by default). `TreeGRPOTrainer` is `GRPOTrainer` with one override that puts those
advantages in place of TRL's: TRL's loss accepts per-token [B, T] advantages from subclasses
(`GRPOTrainer._compute_loss`: "To support subclasses that provide advantages with shape (B, T)").

What TRL 1.16 does not offer (so the subclass exists): a hook for the advantage alone — the group
advantage is computed inline in `GRPOTrainer._generate_and_score_completions`, so the override
calls it and replaces `output["advantages"]`; TRL's own computation still runs and is what TRL
logs under "advantages". Shared tree prefixes are trained once per leaf (TRL pads one row per
completion; no tree-packed forward). Each process must hold whole groups, because treegym's
advantages are computed where the trees were grown.

Generation runs on the trainer's Hugging Face model (`HFPolicy`), not on TRL's vLLM; every
episode ends at a stop string, not at EOS, so TRL logs them all under
"completions/clipped_ratio", and `mask_truncated_completions=True` is refused.

Behaviour log-probs: TRL uses `logprobs` only for vLLM importance-sampling correction; with
on-policy steps (the default) its loss takes the old log-probs from its own forward pass, which
equals ours at the same temperature and precision (`treegym.agents.sampling` reports
the log-probability under the temperature-scaled distribution, as TRL computes it; TRL's default `bf16=True` autocasts its forward
to bf16 while the rollout samples in the model's dtype).
"""

from __future__ import annotations

from typing import Any, Sequence

from treegym.integrations._requires import require

TRL_SPEC = ">=1.16.0,<1.17"
trl = require("trl", "trl", TRL_SPEC, "trl")

import numpy as np  # noqa: E402  (after the version guard)

from treegym.envs.core import unwrapped_forkable  # noqa: E402
from treegym.tree import advantages as _advantages  # noqa: E402
from treegym.tree import rollout as _rollout  # noqa: E402
from treegym.tree import to_batch  # noqa: E402

SAMPLERS = ("chain", "tree_grpo")
ESTIMATORS = ("grpo", "tree_grpo", "treerpo", "treerl", "gigpo")


def env_reward(completions: Sequence[Any], env_reward: Sequence[float], **_: Any) -> list[float]:
    """A TRL reward function: the env's own reward of each episode (from `TreegymRollout`)."""
    return [float(r) for r in env_reward]


class TreegymRollout:
    """A `rollout_func` for `trl.GRPOTrainer` that plays treegym episodes. See the module docstring.

    Args:
        env: a treegym env (`gym.make("TreeSearchQA-v0", ...)`); forked, never stepped itself.
        sampler: "chain" (one episode per completion) or "tree_grpo" (Tree-GRPO trees).
        M, N, L, K: Tree-GRPO's trees per prompt, expansions per tree, rounds, leaves kept per
            tree (None keeps all 1 + N·L). Ignored by "chain".
        estimator: the `treegym.tree.advantages` function for `treegym_advantage` ("tree_grpo").
        max_new_tokens: per generation (one action), not per episode.
        seed: base seed; each call derives its own from (seed, global step, process, call).
        Sampling temperature and top-p come from the trainer's `GRPOConfig`.
    """

    def __init__(self, env: Any, *, sampler: str = "chain", M: int = 2, N: int = 2, L: int = 1,
                 K: int | None = None, estimator: str = "tree_grpo", max_new_tokens: int = 32,
                 seed: int = 0):
        unwrapped_forkable(env)  # TypeError unless this is a treegym env
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        for name, value, low in (("M", M, 1), ("N", N, 1), ("L", L, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if K is not None and (isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= 1 + N * L):
            raise ValueError(f"K must be None or an int in [1, 1 + N·L = {1 + N * L}], got {K!r}")
        self.env, self.sampler, self.estimator = env, sampler, estimator
        self.M, self.N, self.L, self.K = M, N, L, K
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self._task_of: dict[str, str] | None = None
        self._policy: Any = None
        self._calls = 0
        self.last_forests: list = []  # the forests of the latest call (for inspection and tests)
        self.last_budget: Any = None

    # -- what the trainer is configured with --------------------------------------------------

    @property
    def group_size(self) -> int | None:
        """Completions per prompt the sampler produces (`GRPOConfig.num_generations`); None for
        "chain", which produces whatever TRL asks for."""
        if self.sampler == "chain":
            return None
        return self.M * (self.K if self.K is not None else 1 + self.N * self.L)

    def dataset(self, n: int | None = None, *, offset: int = 0) -> Any:
        """A `datasets.Dataset` of this env split's prompts (column "prompt", plus "task_id").

        The prompt text is the env's reset prompt, which is how `__call__` knows the task: TRL
        passes a rollout_func the prompts only.
        """
        from datasets import Dataset

        tasks = unwrapped_forkable(self.env).tasks
        chosen = tasks[offset:] if n is None else tasks[offset:offset + n]
        if not chosen:
            raise ValueError(f"no tasks in [{offset}, {offset + (n or 0)}) of {len(tasks)}")
        return Dataset.from_dict({"prompt": [self._prompt(t) for t in chosen],
                                  "task_id": [t.id for t in chosen]})

    def _prompt(self, task: Any) -> str:
        probe = unwrapped_forkable(self.env).fork()
        prompt, _ = probe.reset(options={"task_id": task.id})
        return prompt

    def task_id(self, prompt: Any) -> str:
        """The task whose reset prompt is `prompt` (a str, or chat messages ending in it).

        Two tasks with the same question have the same prompt; the first one in the split is
        taken (the model sees the same text either way; only the gold answers could differ).
        """
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            prompt = prompt[-1].get("content")
        if not isinstance(prompt, str):
            raise TypeError(f"TreegymRollout takes text prompts, got {type(prompt).__name__}")
        if self._task_of is None:
            core = unwrapped_forkable(self.env)
            probe = core.fork()
            table: dict[str, str] = {}
            for task in core.tasks:
                text, _ = probe.reset(options={"task_id": task.id})
                table.setdefault(text, task.id)
            self._task_of = table
        try:
            return self._task_of[prompt]
        except KeyError:
            raise ValueError("prompt is not the reset prompt of any task of this env's split; build "
                             "the train dataset with TreegymRollout.dataset() (prompt starts: "
                             f"{prompt[:80]!r})") from None

    # -- the rollout_func ---------------------------------------------------------------------

    def __call__(self, prompts: list, trainer: Any) -> dict[str, list]:
        if getattr(trainer.args, "mask_truncated_completions", False):
            raise ValueError("GRPOConfig.mask_truncated_completions=True would mask every treegym "
                             "episode: they end at a stop string (</answer>), not at EOS")
        if not prompts:
            raise ValueError("rollout_func got no prompts")
        policy = self._policy_for(trainer)
        args = trainer.args
        gen = dict(max_new_tokens=self.max_new_tokens, temperature=float(args.temperature),
                   top_p=float(args.top_p))
        seed = _rollout.derive_seed(self.seed, int(trainer.state.global_step),
                                    int(trainer.accelerator.process_index), self._calls)
        self._calls += 1
        tasks = [self.task_id(p) for p in prompts]
        model = policy.model
        was_training = model.training
        try:
            if self.sampler == "chain":
                forests, budget = _rollout.chain(policy, self.env, tasks, G=1, seed=seed, **gen)
                adv = None
            else:
                groups = _groups(tasks, self.group_size)
                forests, budget = _rollout.tree_grpo(policy, self.env, groups, M=self.M, N=self.N,
                                                     L=self.L, K=self.K, seed=seed, **gen)
                adv = getattr(_advantages, self.estimator)(forests)
        finally:
            model.train(was_training)  # HFPolicy put the trainer's model in eval mode
        self.last_forests, self.last_budget = forests, budget
        return _to_trl(forests, adv, len(prompts))

    def _policy_for(self, trainer: Any) -> Any:
        from treegym.agents.hf import HFPolicy

        model = trainer.accelerator.unwrap_model(trainer.model)
        if self._policy is None or self._policy.model is not model:
            was_training = model.training
            self._policy = HFPolicy(model=model, tokenizer=trainer.processing_class)
            model.train(was_training)
        return self._policy


def _groups(tasks: list[str], size: int) -> list[str]:
    """The task of each group of `size` consecutive entries (TRL repeats a prompt per completion)."""
    if len(tasks) % size:
        raise ValueError(f"Tree-GRPO makes {size} leaves per prompt (M·K), but this process got "
                         f"{len(tasks)} prompt entries, not a multiple of {size}: set "
                         f"GRPOConfig.num_generations = TreegymRollout.group_size = {size} and a "
                         f"per-process batch that holds whole groups")
    out = []
    for i in range(0, len(tasks), size):
        run = tasks[i:i + size]
        if any(t != run[0] for t in run):
            raise ValueError(f"prompt entries {i}..{i + size - 1} are not one prompt repeated "
                             f"{size} times: GRPOConfig.num_generations must equal "
                             f"TreegymRollout.group_size = {size}")
        out.append(run[0])
    return out


def _to_trl(forests: list, adv: dict | None, expected: int) -> dict[str, list]:
    """One completion per kept leaf, in forest order: TRL's rows from treegym's batch rows."""
    batch = to_batch(forests, adv)
    if len(batch.leaves) != expected:
        raise RuntimeError(f"the rollout made {len(batch.leaves)} completions for {expected} prompt "
                           "entries")
    out: dict[str, list] = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask",
                                            "env_reward", "task_id")}
    if adv is not None:
        out["treegym_advantage"] = []
    prompt_len = {f.uid: len(f.prompt_ids) for f in forests}
    task_of = {f.uid: getattr(f.task, "id", None) for f in forests}
    for r, leaf in enumerate(batch.leaves):
        n = int(batch.attention_mask[r].sum())
        p = prompt_len[leaf.uid]
        ids = batch.input_ids[r, :n].tolist()
        if n <= p:
            raise RuntimeError(f"leaf {leaf.key} has no completion tokens")
        out["prompt_ids"].append(ids[:p])
        out["completion_ids"].append(ids[p:])
        out["logprobs"].append(batch.old_logprobs[r, p:n].astype(float).tolist())
        out["env_mask"].append(batch.loss_mask[r, p:n].astype(int).tolist())
        out["env_reward"].append(float(batch.rewards[r]))
        out["task_id"].append(task_of[leaf.uid])
        if adv is not None:
            out["treegym_advantage"].append(batch.advantages[r, p:n].astype(float).tolist())
    return out


class TreeGRPOTrainer(trl.GRPOTrainer):
    """`GRPOTrainer` that trains with treegym's advantages (`treegym_advantage` from the rollout).

    The one override runs TRL's scoring unchanged, then replaces its group advantages by the
    per-token advantages `TreegymRollout(sampler="tree_grpo")` computed over each prompt's trees
    (0 on observation and padding tokens; TRL's loss mask removes those anyway).
    """

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        output = super()._generate_and_score_completions(inputs)
        rows = [x.get("treegym_advantage") for x in inputs]
        if any(r is None for r in rows):
            raise ValueError("TreeGRPOTrainer needs rollout_func=TreegymRollout(sampler='tree_grpo') "
                             "(its rows carry treegym_advantage)")
        completion = output["completion_ids"]
        adv = np.zeros(tuple(completion.shape), dtype=np.float32)
        for i, row in enumerate(rows):
            adv[i, :len(row)] = row
        import torch

        output["advantages"] = torch.as_tensor(adv, device=completion.device)
        return output


__all__ = ["TreegymRollout", "TreeGRPOTrainer", "env_reward", "TRL_SPEC", "SAMPLERS", "ESTIMATORS"]
