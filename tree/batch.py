"""Forests → training tensors (plain numpy), one row per kept leaf, plus a packed tree form.

Alignment convention (both forms): the value at position t describes token `input_ids[t]` —
`old_logprobs[t]` = log π_old(input_ids[t] | input_ids[:t]), `loss_mask[t]` = 1 iff that token was
sampled by the policy (an action token), `advantages[t]` = the advantage of the step that token
belongs to. The trainer's log-probs (`treegym.train.logprobs.masked_logprobs`) follow the same
convention, so they compare with `old_logprobs` under `loss_mask` position by position. Prompt and
observation tokens have loss_mask 0.

Why a packed form: the M·(1+N·L) leaves of a prompt share long prefixes (the prompt, the steps
before each fork). The duplicated form recomputes them once per leaf; the packed form stores each
distinct prefix of a prompt group once (one packed row per uid), with a tree attention mask (a
token sees exactly its ancestors) and position ids = depth in the row, so one forward pass yields
every leaf's log-probs; `PackedBatch.unpack()` gathers them back into the duplicated [B, T] layout,
where the loss is computed exactly as before. This module stays numpy-only: the torch side is
`treegym.train.logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from treegym.tree.node import Forest, Node, leaf_reward


@dataclass
class Batch:
    """Right-padded rows, one per kept leaf; shared prefixes duplicated."""

    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64, 1 on real tokens
    loss_mask: np.ndarray  # [B, T] int64, 1 on sampled action tokens
    advantages: np.ndarray  # [B, T] float32, 0 where loss_mask is 0
    old_logprobs: np.ndarray  # [B, T] float32, 0 where loss_mask is 0
    position_ids: np.ndarray  # [B, T] int64
    rewards: np.ndarray  # [B] float32
    uids: list[str] = field(default_factory=list)
    tree_ids: list[int] = field(default_factory=list)
    leaves: list[Node] = field(default_factory=list)
    entropies: np.ndarray | None = None  # [B, T] when every action node has them

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def pack(self) -> PackedBatch:
        return pack(self)


@dataclass
class PackedBatch:
    """The rows of each prompt group (all leaves of one uid) merged into one packed sequence that
    stores every distinct prefix once; one packed row per group, right-padded to [P, S]."""

    input_ids: np.ndarray  # [P, S] int64
    position_ids: np.ndarray  # [P, S] int64: depth of the token in its batch row
    parent: np.ndarray  # [P, S] int64: position (in the packed row) of the previous token, -1 at the root
    lengths: np.ndarray  # [P] int64: packed tokens per row (the rest is padding)
    gather_index: np.ndarray  # [B, T] int64: flat packed index p*S + s of each row token (-1: padding)
    uids: list[str] = field(default_factory=list)  # the group of each packed row

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def attention_mask(self) -> np.ndarray:
        """[P, S, S] bool: token i attends to j iff j is i or an ancestor of i (padding attends to
        itself only, so no attention row is empty). O(S²) memory per packed row."""
        p, s = self.input_ids.shape
        mask = np.zeros((p, s, s), dtype=bool)
        for r in range(p):
            m, par = mask[r], self.parent[r]
            for i in range(int(self.lengths[r])):
                if par[i] >= 0:
                    m[i] = m[par[i]]
                m[i, i] = True
            m[np.arange(int(self.lengths[r]), s), np.arange(int(self.lengths[r]), s)] = True
        return mask

    def unpack(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Gather per-packed-token values [P, S] into the duplicated layout [B, T]."""
        flat = np.asarray(values).reshape(-1)
        return np.where(self.gather_index >= 0, flat[np.clip(self.gather_index, 0, None)], fill)


def _row(leaf: Node, adv: np.ndarray | None) -> dict[str, list]:
    path = leaf.path()
    node_value = {}
    if adv is not None:
        if len(adv) != len(path):
            raise ValueError(f"advantages for leaf {leaf.key} have {len(adv)} values, its path has "
                             f"{len(path)} nodes")
        node_value = {id(n): float(v) for n, v in zip(path, adv)}
    ids: list[int] = []
    mask: list[int] = []
    advs: list[float] = []
    lps: list[float] = []
    ents: list[float] | None = []
    for owner, kind, a, b in leaf.segments_after():
        if kind == "action":
            ids.extend(owner.action_ids[a:b])
            mask.extend([1] * (b - a))
            lps.extend(owner.logprobs[a:b])
            advs.extend([node_value.get(id(owner), 0.0)] * (b - a))
            if ents is not None:
                ents = ents + list(owner.entropies[a:b]) if owner.entropies is not None else None
        else:
            ids.extend(owner.obs_ids[a:b])
            mask.extend([0] * (b - a))
            lps.extend([0.0] * (b - a))
            advs.extend([0.0] * (b - a))
            if ents is not None:
                ents = ents + [0.0] * (b - a)
    return {"ids": ids, "mask": mask, "adv": advs, "lp": lps, "ent": ents}


def to_batch(forests: Sequence[Forest] | Forest, advantages: dict | None = None, *,
             pad_id: int = 0, max_length: int | None = None) -> Batch:
    """One row per kept leaf of every forest (forest order, then tree, then creation order).

    `advantages` is an estimator's output (`treegym.tree.advantages.*`); without it the
    advantages are 0. `max_length` cuts rows from the right (the cut tokens are simply absent).
    """
    if isinstance(forests, Forest):
        forests = [forests]
    leaves = [leaf for f in forests for leaf in f.leaves()]
    if not leaves:
        raise ValueError("to_batch: the forests have no kept leaves")
    if advantages is not None:
        missing = [l.key for l in leaves if l not in advantages]
        if missing:
            raise ValueError(f"to_batch: no advantages for {len(missing)} kept leaves, e.g. {missing[0]}")
    rows = [_row(leaf, advantages[leaf] if advantages is not None else None) for leaf in leaves]
    if max_length is not None:
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {max_length}")
        for row in rows:
            for k in ("ids", "mask", "adv", "lp"):
                row[k] = row[k][:max_length]
            if row["ent"] is not None:
                row["ent"] = row["ent"][:max_length]
    b, t = len(rows), max(len(r["ids"]) for r in rows)
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    attn = np.zeros((b, t), dtype=np.int64)
    loss = np.zeros((b, t), dtype=np.int64)
    adv = np.zeros((b, t), dtype=np.float32)
    lp = np.zeros((b, t), dtype=np.float32)
    pos = np.zeros((b, t), dtype=np.int64)
    have_ent = all(r["ent"] is not None for r in rows)
    ent = np.zeros((b, t), dtype=np.float32) if have_ent else None
    for i, row in enumerate(rows):
        n = len(row["ids"])
        input_ids[i, :n] = row["ids"]
        attn[i, :n] = 1
        loss[i, :n] = row["mask"]
        adv[i, :n] = row["adv"]
        lp[i, :n] = row["lp"]
        pos[i, :n] = np.arange(n)
        if ent is not None:
            ent[i, :n] = row["ent"]
    rewards = np.array([leaf_reward(l) for l in leaves], dtype=np.float32)
    return Batch(input_ids=input_ids, attention_mask=attn, loss_mask=loss, advantages=adv,
                 old_logprobs=lp, position_ids=pos, rewards=rewards,
                 uids=[l.uid for l in leaves], tree_ids=[l.tree_id for l in leaves],
                 leaves=leaves, entropies=ent)


def pack(batch: Batch) -> PackedBatch:
    """Merge the common prefixes of each prompt group's rows (a token trie per uid): each distinct
    prefix is stored once, in the order the rows first reach it.

    Identical prefixes give identical log-probs under a causal LM, so merging is exact. Rows of
    different prompts never share a packed row: a minibatch of whole prompts is a set of packed
    rows, and one prompt's sequence length does not depend on the others.
    """
    b, t = batch.input_ids.shape
    uids = list(batch.uids) if batch.uids else [str(r) for r in range(b)]
    groups = list(dict.fromkeys(uids))
    row_of = {u: i for i, u in enumerate(groups)}
    tries = [([{}], [], [], []) for _ in groups]  # per group: children, ids, parent, depth
    where = np.full((b, t), -1, dtype=np.int64)  # packed position within the group's row
    for r in range(b):
        children, ids, parent, depth = tries[row_of[uids[r]]]
        cur, prev = 0, -1
        for j in range(int(batch.attention_mask[r].sum())):
            tok = int(batch.input_ids[r, j])
            nxt = children[cur].get(tok)
            if nxt is None:
                nxt = len(children)
                children[cur][tok] = nxt
                children.append({})
                ids.append(tok)
                parent.append(prev)
                depth.append(j)
            where[r, j] = nxt - 1
            prev, cur = nxt - 1, nxt
    lengths = np.array([len(tr[1]) for tr in tries], dtype=np.int64)
    s = int(lengths.max()) if len(lengths) else 0
    input_ids = np.zeros((len(groups), s), dtype=np.int64)
    position_ids = np.zeros((len(groups), s), dtype=np.int64)
    parent_arr = np.full((len(groups), s), -1, dtype=np.int64)
    for g, (_, ids, parent, depth) in enumerate(tries):
        input_ids[g, :len(ids)] = ids
        position_ids[g, :len(ids)] = depth
        parent_arr[g, :len(ids)] = parent
    rows = np.array([row_of[u] for u in uids], dtype=np.int64)
    gather = np.where(where >= 0, rows[:, None] * s + where, -1)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, parent=parent_arr,
                       lengths=lengths, gather_index=gather, uids=groups)


__all__ = ["Batch", "PackedBatch", "to_batch", "pack"]
