"""The one place where a model's log-probs and entropies of given tokens are computed.

`masked_logprobs(model, fb, loss_mask)` returns log π(token | its prefix) and the entropy of that
predictive distribution at every position where `loss_mask` is 1 (0 elsewhere), in the
duplicated layout [B, T] of `treegym.tree.to_batch` (one row per leaf; the value at t describes
token t, position 0 has none). The model sees a `ForwardBatch`, in one of two layouts:

- **padded** (`ForwardBatch.padded`): the [B, T] rows themselves, right-padded, causal mask;
- **packed** (`ForwardBatch.packed`): one row per prompt group in which every distinct prefix is
  stored once (`treegym.tree.batch.pack`), with a tree attention mask (a token sees exactly its
  ancestors) and position ids = depth. A token's prediction comes from its *parent's* output, not
  from the position before it; `gather` maps every leaf token back to its packed position, so
  log-probs, loss and gradients equal the padded layout's (tests/test_logprobs.py) while each
  shared prefix goes through the transformer once. The prompt groups of one forward are
  concatenated into a single row without padding, and an SDPA model runs it with
  `tree_attention`, which skips the masked blocks (dense attention over a 2,000-token packed
  row would cost more than the duplicated layout saves).

Why the LM head runs only where a loss token is predicted: a rollout row has far more prompt and
observation tokens than sampled ones, and with a real vocabulary (Qwen2.5: 151,936) the fp32
logits of every position dominate time and memory. The selection goes through the model's own
forward (`logits_to_keep` as a boolean mask, transformers >= 5), so FSDP2's root hooks run.

Used by the trainer (old, reference and training passes), SFT and the tests; nothing else in the
package takes a log-softmax of a model's logits (tests/test_logprobs.py greps for it). The
sampler's per-token log-prob at generation time lives with the sampler (`agents/sampling.py`),
where it is the temperature-scaled distribution it draws from.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

# attention implementations that accept a dense 4-D mask per row (bool for SDPA, additive for eager)
TREE_MASK_ATTENTION = ("sdpa", "eager")
TREE_ATTENTION = "treegym_tree"  # what an "sdpa" model runs a packed forward with (below)
BLOCK = 128  # queries per block of the tree attention (64-512 measured; 128 best overall)


def entropy(logits: torch.Tensor, logp: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, -Σ p log p, in fp32 (0·log 0 taken as 0).
    The trainer's only entropy formula (verl's `entropy_from_logits` computes the same value)."""
    logp = torch.log_softmax(logits.float(), dim=-1) if logp is None else logp
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


@dataclass
class ForwardBatch:
    """What the model runs on: R rows of S tokens, and where each of B·T leaf tokens lives in it.

    `prev[r, s]` is the position in row r whose output predicts token (r, s) (s - 1 when padded,
    the trie parent when packed; -1: no prediction). `gather[b, t]` is the flat index r·S + s of
    leaf token (b, t) (-1 on padding); `row_of[b]` its row. `tree_mask` [R, S, S] (packed only)
    is True where a token may attend."""

    input_ids: torch.Tensor  # [R, S] long
    prev: torch.Tensor  # [R, S] long
    lengths: torch.Tensor  # [R] long
    gather: torch.Tensor  # [B, T] long
    row_of: torch.Tensor  # [B] long
    position_ids: torch.Tensor | None = None  # [R, S] long (packed: depth); None = 0..S-1
    tree_mask: torch.Tensor | None = None  # [R, S, S] bool (packed)
    labels: tuple[str, ...] = ()  # a name per row (the prompt uid), for error messages

    @property
    def packed(self) -> bool:
        return self.tree_mask is not None

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens through the transformer (padding excluded)."""
        return int(self.lengths.sum())

    @classmethod
    def padded(cls, input_ids: Any, attention_mask: Any) -> ForwardBatch:
        """The duplicated layout: the right-padded rows as they are."""
        ids = torch.as_tensor(np.asarray(input_ids) if not isinstance(input_ids, torch.Tensor)
                              else input_ids).long()
        att = torch.as_tensor(np.asarray(attention_mask) if not isinstance(attention_mask, torch.Tensor)
                              else attention_mask).long()
        if ids.dim() != 2 or att.shape != ids.shape:
            raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(att.shape)} "
                             "must both be [batch, seq]")
        b, t = ids.shape
        pos = torch.arange(t).expand(b, t)
        real = att.bool()
        prev = torch.where(real & (pos > 0), pos - 1, -1)
        gather = torch.where(real, torch.arange(b)[:, None] * t + pos, -1)
        return cls(input_ids=ids, prev=prev, lengths=att.sum(-1), gather=gather,
                   row_of=torch.arange(b))

    @classmethod
    def from_packed(cls, packed: Any) -> ForwardBatch:
        """The packed layout of a `treegym.tree.batch.PackedBatch` (one row per prompt group)."""
        return cls(input_ids=torch.as_tensor(packed.input_ids).long(),
                   prev=torch.as_tensor(packed.parent).long(),
                   lengths=torch.as_tensor(packed.lengths).long(),
                   gather=torch.as_tensor(packed.gather_index).long(),
                   row_of=torch.as_tensor(_row_of(packed.gather_index, packed.input_ids.shape[1])),
                   position_ids=torch.as_tensor(packed.position_ids).long(),
                   tree_mask=torch.as_tensor(packed.attention_mask()),
                   labels=tuple(packed.uids))

    def take(self, leaf_rows: Any) -> ForwardBatch:
        """The forward rows holding these leaf rows (whole groups: every leaf of a kept row must be
        among them), with both layouts trimmed to the widths they use."""
        leaf_rows = torch.as_tensor(list(leaf_rows), dtype=torch.long)
        fwd = torch.tensor(list(dict.fromkeys(self.row_of[leaf_rows].tolist())), dtype=torch.long)
        if int(torch.isin(self.row_of, fwd).sum()) != len(leaf_rows):
            raise ValueError("ForwardBatch.take: the leaf rows must cover whole forward rows "
                             "(all leaves of a prompt together)")
        s_old = self.input_ids.shape[1]
        width = min(max(int(self.lengths[fwd].max()) if len(fwd) else 0, 1), s_old)
        new_row = torch.full((self.rows,), -1, dtype=torch.long)
        new_row[fwd] = torch.arange(len(fwd))
        g = self.gather[leaf_rows]
        t = int((g >= 0).sum(-1).max()) if len(leaf_rows) else 0
        g = g[:, :max(t, 1)]
        col = g % s_old
        gather = torch.where(g >= 0, new_row[g // s_old] * width + col, -1)
        return ForwardBatch(
            input_ids=self.input_ids[fwd, :width], prev=self.prev[fwd, :width],
            lengths=self.lengths[fwd], gather=gather, row_of=new_row[self.row_of[leaf_rows]],
            position_ids=None if self.position_ids is None else self.position_ids[fwd, :width],
            tree_mask=None if self.tree_mask is None else self.tree_mask[fwd, :width, :width],
            labels=tuple(self.labels[i] for i in fwd.tolist()) if self.labels else ())

    def flat(self) -> ForwardBatch:
        """A packed batch as ONE row: its rows concatenated without their padding (the tree mask
        keeps prompts apart, so nothing changes but the work: padding a short prompt group to
        the longest one would cost as much as the group itself)."""
        if not self.packed or self.rows <= 1:
            return self
        lengths = self.lengths.tolist()
        s = self.input_ids.shape[1]
        offsets = torch.tensor([0, *np.cumsum(lengths)[:-1].tolist()], device=self.input_ids.device)
        n = int(sum(lengths))
        cut = lambda x: torch.cat([x[r, :l] for r, l in enumerate(lengths)])[None]  # noqa: E731
        prev = torch.cat([torch.where(self.prev[r, :l] >= 0, self.prev[r, :l] + offsets[r], -1)
                          for r, l in enumerate(lengths)])[None]
        mask = torch.zeros((1, n, n), dtype=torch.bool, device=self.input_ids.device)
        for r, l in enumerate(lengths):
            o = int(offsets[r])
            mask[0, o:o + l, o:o + l] = self.tree_mask[r, :l, :l]
        g = self.gather
        gather = torch.where(g >= 0, offsets[(g // s).clamp_min(0)] + g % s, -1)
        return ForwardBatch(input_ids=cut(self.input_ids), prev=prev,
                            lengths=torch.tensor([n], device=self.lengths.device), gather=gather,
                            row_of=torch.zeros_like(self.row_of),
                            position_ids=cut(self.position_ids), tree_mask=mask,
                            labels=("+".join(self.labels),) if self.labels else ())

    def to(self, device: torch.device) -> ForwardBatch:
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return ForwardBatch(input_ids=mv(self.input_ids), prev=mv(self.prev), lengths=mv(self.lengths),
                            gather=mv(self.gather), row_of=mv(self.row_of),
                            position_ids=mv(self.position_ids), tree_mask=mv(self.tree_mask),
                            labels=self.labels)


def _row_of(gather_index: np.ndarray, s: int) -> np.ndarray:
    first = np.asarray(gather_index)[:, 0]
    if (first < 0).any():
        raise ValueError("a leaf row of the packed batch is empty")
    return first // max(s, 1)


def check_model_takes_tree_mask(model: Any) -> None:
    """A packed forward needs an attention implementation that accepts a dense 4-D mask; fail
    early, naming the setting, instead of deep inside the attention kernel."""
    config = getattr(_unwrap(model), "config", None)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in TREE_MASK_ATTENTION:
        raise ValueError(
            f"packed updates need a tree attention mask (a 4-D mask), which attn_implementation="
            f"{impl!r} cannot take: load the model with attn_implementation='sdpa' (or 'eager'), or "
            "turn packing off (TrainConfig.update.packed=False, --update.no-packed)")


def check_context(model: Any, fb: ForwardBatch) -> None:
    """Refuse rows the model cannot position: a packed row whose deepest token sits past the
    model's context would otherwise be silently wrong (RoPE extrapolation) or crash."""
    config = getattr(_unwrap(model), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return
    depth = (fb.position_ids.max(-1).values + 1 if fb.position_ids is not None else fb.lengths)
    for r in range(fb.rows):
        if fb.lengths[r] > 0 and int(depth[r]) > limit:
            name = fb.labels[r] if fb.labels else f"row {r}"
            kind = "packed sequence" if fb.packed else "sequence"
            raise ValueError(f"prompt {name}: its {kind} ({int(fb.lengths[r])} tokens) reaches "
                             f"length {int(depth[r])}, longer than the model's context "
                             f"(max_position_embeddings={limit}); shorten rollouts "
                             "(rollout.max_new_tokens, max_tool_calls)")


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _attention(model: Any, fb: ForwardBatch) -> torch.Tensor:
    if not fb.packed:
        return (torch.arange(fb.input_ids.shape[1], device=fb.input_ids.device)[None]
                < fb.lengths[:, None]).long()
    check_model_takes_tree_mask(model)
    mask = fb.tree_mask[:, None]
    impl = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", "sdpa")
    if impl == "eager":  # eager attention adds the mask to the scores
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min)
    return mask  # SDPA: True = may attend


# ----------------------------------------------------------------------------------------------
# block-sparse attention under a tree mask


@dataclass
class _Plan:
    """For every block of BLOCK consecutive packed queries: the keys any of them may see."""

    inverse: torch.Tensor  # [R*S]: where each query's output sits in the concatenated blocks
    # per group of blocks: query index [n, BLOCK] (the tail of a row clamped), key index
    # [n, K], mask [n, 1, BLOCK, K], real query [n, BLOCK]
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


_plan_cache: tuple[Any, _Plan] | None = None


def _plan(mask: torch.Tensor) -> _Plan:
    """Blocks of the dense tree mask [R, 1, S, S], grouped by how many keys they need (so the
    padding of a group stays small). Cached for the mask object: every layer of one forward gets
    the same mask (a weak reference, so a new mask never reuses an old plan)."""
    global _plan_cache
    if _plan_cache is not None and _plan_cache[0]() is mask:
        return _plan_cache[1]
    r, s = mask.shape[0], mask.shape[-1]
    dev = mask.device
    nb = -(-s // BLOCK)
    m = F.pad(mask[:, 0], (0, 0, 0, nb * BLOCK - s))  # padding queries see nothing
    need = m.view(r, nb, BLOCK, s).any(2).reshape(r * nb, s)  # [blocks, keys]
    counts = need.sum(-1)
    order = torch.argsort(counts, stable=True)
    queries, groups = [], []
    for g in torch.tensor_split(order, min(4, len(order))):
        row, blk = g // nb, g % nb
        kmax = int(counts[g].max())
        keys = torch.sort(need[g].to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :kmax]
        kvalid = torch.arange(kmax, device=dev)[None] < counts[g][:, None]
        qpos = blk[:, None] * BLOCK + torch.arange(BLOCK, device=dev)[None]
        qvalid = qpos < s
        qc = qpos.clamp(max=s - 1)
        allowed = mask[row[:, None, None], 0, qc[:, :, None], keys[:, None, :]] & kvalid[:, None, :]
        groups.append((row[:, None] * s + qc, row[:, None] * s + keys, allowed[:, None], qvalid))
        queries.append((row[:, None] * s + qpos)[qvalid])
    flat = torch.cat(queries)
    inverse = torch.empty_like(flat)
    inverse[flat] = torch.arange(len(flat), device=dev)
    plan = _Plan(inverse=inverse, groups=groups)
    _plan_cache = (weakref.ref(mask), plan)
    return plan


def tree_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA under a dense boolean tree mask, computed block-sparse (a Hugging Face attention
    function, registered as "treegym_tree").

    Why: a packed prompt group is one long row (G16: ~2,000 tokens) whose tokens each see only
    their ancestors — the prompt and their own chain — so dense attention over the row would
    spend most of its work on masked pairs (more than the duplicated layout spends in total).
    Here each block of BLOCK consecutive queries attends only to the union of the keys its
    queries may see, with the exact mask inside; the result equals dense masked SDPA."""
    plan = _plan(attention_mask)
    r, h, s, d = query.shape
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(r * s, h, d)
    k = key.transpose(1, 2).reshape(r * s, hkv, d)
    v = value.transpose(1, 2).reshape(r * s, hkv, d)
    outs = []
    take = lambda x, idx: x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])  # noqa: E731
    for qi, ki, allowed, real in plan.groups:  # index_select: its backward is a fast index_add
        o = F.scaled_dot_product_attention(take(q, qi).transpose(1, 2), take(k, ki).transpose(1, 2),
                                           take(v, ki).transpose(1, 2), attn_mask=allowed,
                                           dropout_p=dropout, scale=scaling,
                                           enable_gqa=hkv != h)
        outs.append(o.transpose(1, 2)[real])
    out = torch.cat(outs).index_select(0, plan.inverse)
    return out.view(r, s, h, d), None


AttentionInterface.register(TREE_ATTENTION, tree_attention)


@contextlib.contextmanager
def _tree_kernel(model: Any, packed: bool):
    """An SDPA model runs a packed forward with `tree_attention` (same numbers, block-sparse)."""
    config = getattr(_unwrap(model), "config", None)
    if not packed or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    config._attn_implementation = TREE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def masked_logprobs(model: Any, fb: ForwardBatch, loss_mask: torch.Tensor, *,
                    want_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(token | prefix) and (with `want_entropy`) the predictive entropy at every leaf
    position where `loss_mask` [B, T] is 1, zero elsewhere; fp32 tensors shaped like `loss_mask`.

    One forward over `fb` (padded or packed); the LM head runs only on the positions that predict
    a loss token (a packed parent predicting several children is projected once). Positions with
    no prediction (a row's first token) are 0 even when masked. Differentiable: a packed token
    shared by k leaves receives the sum of their gradients, as in the padded layout."""
    fb = fb.flat()
    device = fb.input_ids.device
    r, s = fb.input_ids.shape
    if loss_mask.shape != fb.gather.shape:
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, the batch's leaf layout "
                         f"is {tuple(fb.gather.shape)}")
    sel = loss_mask.to(device).bool() & (fb.gather >= 0)
    src = fb.gather[sel]  # flat forward position of every selected leaf token, row-major
    before = fb.prev.reshape(-1)[src]
    ok = before >= 0
    if not bool(ok.all()):  # a first token: nothing predicts it
        sel = sel.clone()
        sel[sel.clone()] = ok
        src, before = src[ok], before[ok]
    pred = (src // s) * s + before  # flat position whose output predicts the token
    keep = torch.zeros(r * s, dtype=torch.bool, device=device)
    keep[pred] = True
    kept_index = keep.cumsum(0) - 1
    keep = keep.view(r, s)
    kw: dict[str, Any] = dict(input_ids=fb.input_ids, attention_mask=_attention(model, fb),
                              use_cache=False)
    if fb.position_ids is not None:
        kw["position_ids"] = fb.position_ids
    with _tree_kernel(model, fb.packed):
        if _accepts_logits_to_keep(model):
            logits = model(**kw, logits_to_keep=keep).logits
            if logits.dim() != 2:  # an older model that read the mask as positions
                raise RuntimeError(f"{type(_unwrap(model)).__name__} does not support a boolean "
                                   "logits_to_keep (needs transformers >= 5); upgrade transformers")
        else:
            logits = model(**kw).logits[keep]
    logits = logits.float()
    logsm = torch.log_softmax(logits, dim=-1)
    row = kept_index[pred]
    lp = logsm[row, fb.input_ids.reshape(-1)[src]]
    zeros = torch.zeros(sel.shape, dtype=torch.float32, device=device)
    logp = zeros.masked_scatter(sel, lp)
    ent = zeros.masked_scatter(sel, entropy(logits, logsm)[row]) if want_entropy else None
    return logp, ent


__all__ = ["ForwardBatch", "masked_logprobs", "entropy", "check_model_takes_tree_mask",
           "check_context", "TREE_MASK_ATTENTION"]
