"""Rollout samplers: chain (GRPO), Tree-GRPO and entropy-guided (TreeRL/EPTree) trees.

All three run on the package's one episode engine (`agents.episode.Engine`, which evaluation, SFT
data and `run_episode` share): a set of *continuations* (an env fork restored to a node's state
plus the token context so far) advanced in lock-step, ONE batched `policy.generate` call per turn
for every continuation of every prompt and tree in the wave; this module records each step as a
tree `Node` and keeps the budget. Token ids are the truth: the prompt is
encoded once with `policy.encode_prompt`, each observation once with `policy.encode`, and a
continuation's next request is exactly the previous context + sampled ids + observation ids.

Branching restores `treegym.snapshot` states into `treegym.fork`ed envs, so a continuation never
touches its siblings, and its remaining tool budget (max − tool calls so far) is whatever the
restored env state says.

Seeds (`agents.episode.derive_seed`, the package's one derivation): every request's seed is
derived from (seed, prompt index, tree, wave, slot, turn), every
random expansion choice from (seed, prompt, tree, wave), so runs repeat exactly with a policy that
honours `GenRequest.seed`, whatever the batch composition. `chain(G)` and the initial chains of
`tree_grpo(M=G)` use the same seeds, so they sample the same trajectories. `prompt_index` names
each task's index in a larger batch (default 0..n-1): a data-parallel rank that rolls out prompts
2, 5 and 8 of a step passes them, and samples exactly what one process rolling out the whole
batch samples for those prompts (same seeds, same uids).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from treegym.agents.base import GenRequest, GenResult
from treegym.agents.episode import (Engine, PolicyOutputError, Slot, Turn, derive_seed,
                                    env_stop_strings)
from treegym.envs.core import fork as env_fork
from treegym.envs.core import restore as env_restore
from treegym.envs.core import snapshot as env_snapshot
from treegym.envs.core import unwrapped_forkable
from treegym.tree.node import Budget, Forest, Node, Tree


@dataclass
class _Cont(Slot):
    """One in-flight continuation: where it attaches (prompt, tree, parent node) and its budget
    bookkeeping; the env, context, seed parts, turn and token-fork prefix live in `Slot`."""

    p: int = 0  # prompt index
    tree: Tree | None = None
    parent: Node | None = None  # the next node is created as a child of this one
    wave: int = 0
    slot: int = 0
    split_idx: int | None = None  # only for the first step of a token-level fork
    tool_calls: int = 0  # the env's tool calls before the next step
    hashed: int = 0  # how many context tokens are already in the prefix set
    prefix_hash: int = 0  # rolling hash of context[:hashed]

    def where(self) -> str:
        return (f"prompt {self.p}, tree {self.tree.tree_id}, wave {self.wave}, slot {self.slot}, "
                f"turn {self.turn}")


class _Engine:
    """The samplers' side of the episode engine: forests, env forks at tree nodes, budget."""

    def __init__(self, policy, env, tasks, *, seed: int, max_new_tokens: int, temperature: float,
                 top_p: float, want_entropies: bool, max_turns: int, sampler: str,
                 prompt_index: Sequence[int] | None = None):
        if not tasks:
            raise ValueError("tasks is empty: give at least one task (a Task, a task id, or None)")
        self.index = _prompt_index(prompt_index, len(tasks))
        self.policy, self.env, self.tasks = policy, env, list(tasks)
        self.seed, self.sampler = seed, sampler
        # fit_context=False: a request that does not fit is the policy's to refuse (HFPolicy raises
        # naming the lengths) rather than a leaf cut short without a reward
        self.engine = Engine(policy, stop=env_stop_strings(unwrapped_forkable(env)),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             want_entropies=want_entropies, max_turns=max_turns, fit_context=False)
        self.budget = Budget()
        self._prefixes: set[int] = set()
        self.forests: list[Forest] = []
        self._base_envs: list[Any] = []
        self._t0 = time.perf_counter()

    # -- setup --------------------------------------------------------------------------------

    def start(self, n_trees: int, params: dict) -> None:
        for p, task in enumerate(self.tasks):
            base = env_fork(self.env)
            options = {}
            task_id = getattr(task, "id", task)
            if task_id is not None:
                options["task_id"] = task_id
            gp = self.index[p]  # the prompt's index in the whole batch: seeds and uid use it
            prompt, _ = base.reset(seed=derive_seed(self.seed, gp, "reset"), options=options or None)
            core = unwrapped_forkable(base)
            task_obj = getattr(core.state, "task", None) or (task if not isinstance(task, str) else None)
            tid = getattr(task_obj, "id", task_id)
            uid = f"{gp}:{tid}"
            prompt_ids = tuple(int(t) for t in self.policy.encode_prompt(prompt))
            if not prompt_ids:
                raise PolicyOutputError(f"policy.encode_prompt returned no tokens for prompt {p}")
            snap = env_snapshot(base)
            anchor = _state_hash(core)
            forest = Forest(uid=uid, task=task_obj, meta={"sampler": self.sampler, **params,
                                                          "seed": self.seed, "prompt_index": gp})
            for m in range(n_trees):
                root = Node(uid=uid, tree_id=m, node_id=0, obs_ids=prompt_ids, obs_text=prompt,
                            snapshot=snap, anchor_key=anchor)
                forest.trees.append(Tree(uid=uid, tree_id=m, root=root))
            self.forests.append(forest)
            self._base_envs.append(base)

    def continuation(self, p: int, tree: Tree, node: Node, wave: int, slot: int,
                     split_at: int | None = None) -> _Cont:
        """A fresh continuation from `node`'s state (or inside its action at token `split_at`)."""
        env = env_fork(self._base_envs[p])
        prefix: tuple[int, ...] = ()
        if split_at is None:
            env_restore(env, node.snapshot)
            context = node.context_ids()
        else:
            env_restore(env, node.state_before())
            prefix = tuple(node.full_action_ids[:split_at])
            context = node.context_before_ids() + list(prefix)
        return _Cont(env=env, context=context, action_prefix=prefix,
                     seed=(self.seed, self.index[p], tree.tree_id, wave, slot), p=p, tree=tree,
                     parent=node, wave=wave, slot=slot, split_idx=split_at,
                     tool_calls=unwrapped_forkable(env).state.tool_calls)

    # -- recording what the engine steps ---------------------------------------------------------

    def run(self, conts: list[_Cont]) -> list[Node]:
        """Advance every continuation to the end of its episode; returns the new leaves."""
        leaves: list[Node] = []
        calls = self.engine.generate_calls

        def on_step(c: Slot, req: GenRequest, res: GenResult, turn: Turn) -> None:
            assert isinstance(c, _Cont)
            self._account(c, req, res)
            node = self._add_node(c, turn)
            if node.terminal:
                leaves.append(node)
                self.budget.leaves += 1
            c.parent, c.split_idx = node, None

        def on_end(c: Slot, reason: str) -> None:
            assert isinstance(c, _Cont)
            raise RuntimeError(f"episode of prompt {c.p}, tree {c.tree.tree_id} did not end "
                               f"after {self.engine.max_turns} turns; is the env bounded?")

        self.engine.run(conts, on_step, on_end)
        self.budget.generate_calls += self.engine.generate_calls - calls
        return leaves

    def _account(self, c: _Cont, req: GenRequest, res: GenResult) -> None:
        b = self.budget
        b.llm_calls += 1
        b.generated_tokens += len(res.token_ids)
        b.prefill_tokens += len(req.prompt_ids)
        # distinct prompt prefixes over the run (a radix cache's prefill); each continuation
        # hashes only the tokens appended since its previous request
        h, new, seen = c.prefix_hash, 0, self._prefixes
        for tok in req.prompt_ids[c.hashed:]:
            h = hash((h, tok))
            if h not in seen:
                seen.add(h)
                new += 1
        c.prefix_hash, c.hashed = h, len(req.prompt_ids)
        b.prefill_tokens_shared += new

    def _add_node(self, c: _Cont, turn: Turn) -> Node:
        core = unwrapped_forkable(c.env)
        done = turn.terminated or turn.truncated
        after = core.state.tool_calls
        self.budget.tool_calls += after - c.tool_calls
        c.tool_calls = after
        return c.tree.add(
            c.parent, action_ids=tuple(turn.action_ids), logprobs=tuple(turn.action_logprobs),
            entropies=tuple(turn.entropies) if turn.entropies is not None else None,
            obs_ids=tuple(turn.observation_ids), action_text=turn.action_text,
            obs_text=turn.observation, snapshot=env_snapshot(c.env),
            finish_reason=turn.finish_reason, terminal=done,
            truncated=turn.truncated and not turn.terminated,
            reward=turn.reward if done else None, anchor_key=_state_hash(core),
            split_idx=c.split_idx, tool_calls=after, wave=c.wave)

    def finish(self, K: int | None) -> tuple[list[Forest], Budget]:
        if K is not None:
            for forest, p in zip(self.forests, range(len(self.forests))):
                for tree in forest.trees:
                    leaves = tree.leaves(include_dropped=True)
                    if K > len(leaves):
                        raise ValueError(f"K={K} exceeds the {len(leaves)} leaves of tree "
                                         f"{tree.tree_id} of prompt {p}")
                    rng = np.random.default_rng(derive_seed(self.seed, self.index[p], tree.tree_id,
                                                            "sample_leaf"))
                    keep = set(rng.choice(len(leaves), size=K, replace=False).tolist())
                    for i, leaf in enumerate(leaves):
                        leaf.kept = i in keep
        self.budget.kept_leaves = sum(len(f.leaves()) for f in self.forests)
        self.budget.wall_s = time.perf_counter() - self._t0
        return self.forests, self.budget


def _state_hash(core: Any) -> str:
    """GiGPO anchor: a hash of the env state (task id + full transcript)."""
    st = core.state
    task_id = getattr(getattr(st, "task", None), "id", "")
    text = getattr(st, "transcript", None)
    if text is None:
        text = repr(st)
    return hashlib.sha1(f"{task_id}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _prompt_index(index: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if index is None:
        return tuple(range(n))
    out = tuple(index)
    if len(out) != n:
        raise ValueError(f"prompt_index has {len(out)} entries for {n} tasks")
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in out):
        raise ValueError(f"prompt_index must hold ints >= 0, got {list(out)}")
    if len(set(out)) != n:
        raise ValueError(f"prompt_index has repeated entries: {list(out)}")
    return tuple(int(i) for i in out)


def _nonneg(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _token_candidates(tree: Tree) -> list[tuple[Node, int]]:
    """(node, split index into its full action) for every action token owned by a tree node."""
    out = []
    for node in tree.nodes[1:]:
        inherited = len(node.full_action_ids) - len(node.action_ids)
        out.extend((node, inherited + j) for j in range(len(node.action_ids)))
    return out


_GEN_DEFAULTS = dict(max_new_tokens=500, temperature=1.0, top_p=1.0, want_entropies=False,
                     max_turns=64)


def tree_grpo(policy, env, tasks: Sequence[Any], M: int = 2, N: int = 2, L: int = 1,
              K: int | None = None, seed: int = 0, *, granularity: str = "step",
              prompt_index: Sequence[int] | None = None, **gen: Any) -> tuple[list[Forest], Budget]:
    """Tree-GRPO's tree search (arXiv 2509.21240, AMAP-ML/Tree-GRPO), one forest per task.

    M trees per prompt, each initialised by one full chain from the prompt. Then L times, per tree:
    draw N nodes uniformly *with replacement* from the root and the non-leaf nodes, and from each
    run a fresh chain to the end of the episode from that node's env state (remaining tool budget
    = max − depth: the restored state carries it). Each chain adds one leaf: M·(1 + N·L) leaves per
    prompt; `K` keeps K random leaves per tree (the reference's `sample_leaf`); None keeps all.
    All continuations of a wave (all prompts, all trees) share one `generate` call per turn.

    granularity="token": the ablation with token-level nodes — the N fork points are drawn
    uniformly over all action tokens in the tree; a fork at token s of node X regenerates X's
    action from its first s tokens (a child with `split_idx = s`) and continues the episode.

    `tasks`: Task objects, task ids (`reset(options={"task_id": ...})`) or None (seeded reset).
    Generation kwargs: max_new_tokens (500), temperature (1.0), top_p (1.0; the paper uses 0.95),
    want_entropies, max_turns (a safety bound).
    """
    M, N = _positive("M", M), _positive("N", N)
    L = _nonneg("L", L)
    if K is not None:
        K = _positive("K", K)
        if K > 1 + N * L:
            raise ValueError(f"K={K} exceeds the 1 + N·L = {1 + N * L} leaves each tree will have")
    if granularity not in ("step", "token"):
        raise ValueError(f"granularity must be 'step' or 'token', got {granularity!r}")
    return _tree_search(policy, env, tasks, M, N, L, K, seed, granularity, "tree_grpo", gen,
                        prompt_index)


def chain(policy, env, tasks: Sequence[Any], G: int = 6, seed: int = 0, *,
          prompt_index: Sequence[int] | None = None, **gen: Any) -> tuple[list[Forest], Budget]:
    """GRPO's rollout: G independent chains per prompt (one single-path tree each)."""
    G = _positive("G", G)
    return _tree_search(policy, env, tasks, G, 0, 0, None, seed, "step", "chain", gen,
                        prompt_index)


def _tree_search(policy, env, tasks, M, N, L, K, seed, granularity, name, gen,
                 prompt_index=None):
    opts = {**_GEN_DEFAULTS, **gen}
    unknown = set(opts) - set(_GEN_DEFAULTS)
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(unknown)}")
    engine = _Engine(policy, env, tasks, seed=seed, sampler=name, prompt_index=prompt_index,
                     **opts)
    engine.start(M, {"M": M, "N": N, "L": L, "K": K, "granularity": granularity})
    engine.run([engine.continuation(p, tree, tree.root, wave=0, slot=0)
                for p, forest in enumerate(engine.forests) for tree in forest.trees])
    for wave in range(1, L + 1):
        conts = []
        for p, forest in enumerate(engine.forests):
            for tree in forest.trees:
                rng = np.random.default_rng(derive_seed(seed, engine.index[p], tree.tree_id,
                                                        "expand", wave))
                if granularity == "step":
                    cands = tree.internal_nodes()
                    for slot, i in enumerate(rng.integers(len(cands), size=N).tolist()):
                        conts.append(engine.continuation(p, tree, cands[i], wave, slot))
                else:
                    cands = _token_candidates(tree) or [(tree.root, None)]
                    for slot, i in enumerate(rng.integers(len(cands), size=N).tolist()):
                        node, s = cands[i]
                        conts.append(engine.continuation(p, tree, node, wave, slot, split_at=s))
        engine.run(conts)
    return engine.finish(K)


def _answer_started(policy, node: Node) -> int:
    """Index of the first own action token whose text contains "answer" (TreeRL masks after it)."""
    for j, tok in enumerate(node.action_ids):
        if "answer" in policy.decode([tok]).lower():
            return j
    return len(node.action_ids)


def entropy(policy, env, tasks: Sequence[Any], M: int = 6, N: int = 2, L: int = 1, T: int = 2,
            K: int | None = None, seed: int = 0, *, granularity: str = "token",
            prompt_index: Sequence[int] | None = None, **gen: Any) -> tuple[list[Forest], Budget]:
    """Entropy-guided tree search, TreeRL's EPTree (arXiv 2506.11902, THUDM/TreeRL
    `entropy_chain_local_manager.py`).

    M chains per prompt (one tree each). L times, per tree: take the N fork points with the highest
    uncertainty — −log p of the sampled token, as TreeRL's code does — and sample T continuations
    from each: M·(1 + N·T·L) leaves per prompt when enough fork points exist.
    granularity="token" (TreeRL): a fork point is an action token; the continuation regenerates from
    the tokens before it (`split_idx`). Not forkable: a branch's first token and tokens after the
    first one containing "answer" (TreeRL's mask). granularity="step": a fork point is a step,
    scored by the mean −log p of its action; the step is resampled from the state before it.
    """
    M, N, T = _positive("M", M), _positive("N", N), _positive("T", T)
    L = _nonneg("L", L)
    if K is not None:
        K = _positive("K", K)
    if granularity not in ("step", "token"):
        raise ValueError(f"granularity must be 'step' or 'token', got {granularity!r}")
    opts = {**_GEN_DEFAULTS, **gen}
    unknown = set(opts) - set(_GEN_DEFAULTS)
    if unknown:
        raise TypeError(f"entropy() got unexpected keyword arguments {sorted(unknown)}")
    engine = _Engine(policy, env, tasks, seed=seed, sampler="entropy", prompt_index=prompt_index,
                     **opts)
    engine.start(M, {"M": M, "N": N, "L": L, "T": T, "K": K, "granularity": granularity})
    engine.run([engine.continuation(p, tree, tree.root, wave=0, slot=0)
                for p, forest in enumerate(engine.forests) for tree in forest.trees])
    for wave in range(1, L + 1):
        conts = []
        for p, forest in enumerate(engine.forests):
            for tree in forest.trees:
                scored: list[tuple[float, int, int, Node, int | None]] = []
                for node in tree.nodes[1:]:
                    if not node.action_ids:
                        continue
                    if granularity == "step":
                        score = float(-np.mean(node.logprobs))
                        scored.append((score, node.node_id, 0, node, None))
                        continue
                    inherited = len(node.full_action_ids) - len(node.action_ids)
                    stop = _answer_started(policy, node) + 1  # the "answer" token itself may fork
                    first = 1 if node.split_idx is not None else 0
                    for j in range(first, min(stop, len(node.action_ids))):
                        scored.append((-node.logprobs[j], node.node_id, j, node, inherited + j))
                scored.sort(key=lambda x: (-x[0], x[1], x[2]))
                slot = 0
                for _, _, _, node, s in scored[:N]:
                    for _ in range(T):
                        if s is None:  # resample this step from the state before it
                            conts.append(engine.continuation(p, tree, node.parent, wave, slot))
                        else:
                            conts.append(engine.continuation(p, tree, node, wave, slot, split_at=s))
                        slot += 1
        if not conts:
            break
        engine.run(conts)
    return engine.finish(K)


__all__ = ["chain", "tree_grpo", "entropy", "derive_seed", "PolicyOutputError"]
