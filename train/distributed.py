"""Scale-out for the policy update: torchrun process groups, FSDP2 / DDP wrapping, and one
optimizer step whose loss and gradients equal a single-process step on the same global batch.

Why a separate module: the trainer's math (`treegym.train.loss`) must not change when it runs on 8
GPUs instead of one CPU. Everything distributed lives here, and every function also works with
one process and no process group (then it is the plain single-process update), so the trainer has
exactly one code path.

The equivalence rule. `token-mean` (Tree-GRPO's aggregation) is sum(masked token losses) / (number
of masked tokens in the *global* batch). Each rank holds some rows; a rank computing the mean over
its own tokens and letting DDP/FSDP average the gradients would weight a token on a rank with few
tokens more than one on a busy rank. So each rank scales its local aggregate by
`local_denominator / global_denominator` (the global one all-reduced once per step) and by the
world size, which cancels the averaging DDP and FSDP2 do in their gradient reduction. The summed
gradient is then exactly d(global loss)/dθ, grad clipping sees the same norm, and the optimizer
takes the same step. The same holds for the other aggregations of `agg_loss` (rows, rows with a
token, or the padded width as the denominator).

Backends: `nccl` on CUDA, `gloo` on CPU. FSDP2 (`torch.distributed.fsdp.fully_shard`) works on CPU
with gloo in torch 2.13 (forward, backward, reduce-scatter, AdamW on DTensor shards, grad clipping,
the bf16 MixedPrecisionPolicy, full state-dict gathering and loading were all exercised by
tests/test_train_distributed.py), so the
default strategy is FSDP2 everywhere; DDP remains available (`strategy="ddp"`), e.g. when every
rank should keep a full copy of the weights to generate rollouts locally.

Torchrun env vars read: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from treegym.train.loss import AGG_MODES, total_loss
from treegym.train.logprobs import ForwardBatch, masked_logprobs

Strategy = Literal["fsdp", "ddp", "none"]
STRATEGIES: tuple[str, ...] = ("fsdp", "ddp", "none")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. `world_size == 1` means no process group (plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RuntimeError(f"torchrun variable {name}={env[name]!r} is not an integer") from None


def init_distributed(backend: str | None = None, *, timeout_s: float = 1800.0,
                     env: Mapping[str, str] | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment, or return a single-process
    `DistInfo` when WORLD_SIZE is unset or 1 (so the same script runs with and without torchrun).

    `backend` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise; on CUDA the
    process is pinned to GPU LOCAL_RANK. Calling it again in an initialised process returns the
    current group's info instead of failing.
    """
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in env or _env_int(env, "WORLD_SIZE") <= 1:
        local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(device=device)
    missing = [v for v in _TORCHRUN_VARS if v not in env]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but torchrun variable(s) {missing} are missing; "
                           "launch with `torchrun --nproc_per_node N ...` or set them all")
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False; "
                           "use backend='gloo' on CPU")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device  # lets NCCL bind eagerly, avoids a hang on first use
        dist.init_process_group(**kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    backend=dist.get_backend(), device=device)


def cleanup_distributed() -> None:
    """Destroy the process group if there is one (call at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 or without a process group: the one process that logs and writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank0_print(*args: Any, **kwargs: Any) -> None:
    """`print` on the main process only, so N ranks do not print N copies of every metric."""
    if is_main():
        print(*args, **kwargs)


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` without a group.
    For small per-step records (rollout statistics, tree dumps), not for tensors."""
    if not _group_ready():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (e.g. a decision only rank 0 can make, because only it
    reads or writes the run directory); `obj` itself without a group."""
    if not _group_ready():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max, `op="max"`) of a few floats over ranks, in float64; unchanged without a group."""
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    return _all_reduce(list(values), op=op)


# ----------------------------------------------------------------------------------------------
# model wrapping


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM: the modules whose class is listed in
    `model._no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...). These are the FSDP units:
    one all-gather per block keeps peak memory at one block's full weights."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        inner = getattr(getattr(model, "model", None), "layers", None)
        layers = list(inner) if inner is not None else []
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: it lists no "
                         "_no_split_modules and has no .model.layers")
    return layers


def mixed_precision_policy(device: torch.device, enabled: bool | None = None):
    """FSDP2 bf16 policy: compute in bf16, reduce gradients in fp32, keep fp32 master weights.
    Default: on for CUDA, off on CPU (gloo and CPU kernels gain nothing from bf16 here)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if enabled is None:
        enabled = device.type == "cuda"
    if not enabled:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _broadcast_from_rank0(model: nn.Module) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def shard_model(model: nn.Module, info: DistInfo, *, strategy: Strategy = "fsdp",
                mixed_precision: bool | None = None, sync_init: bool = True,
                reshard_after_forward: bool = True) -> nn.Module:
    """Move `model` to `info.device` and wrap it for data-parallel training.

    - ``fsdp``: FSDP2 — `fully_shard` on every decoder layer, then on the root (embeddings, final
      norm and the possibly tied LM head form the root group); bf16 compute via
      `MixedPrecisionPolicy` on CUDA. Parameters become DTensor shards; build the optimizer AFTER
      this call.
    - ``ddp``: `DistributedDataParallel` (full copy per rank; use `unwrap(model)` for generation).
    - ``none``: no wrapper (only valid with one process).
    With one process every strategy returns the bare model on the device (nothing to shard).
    `sync_init` broadcasts rank 0's weights first, so ranks that initialised differently still
    start equal (FSDP2, unlike DDP, does not do this itself).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    model = model.to(info.device)
    if not info.distributed:
        return model
    if strategy == "none":
        raise ValueError(f"strategy 'none' cannot train with {info.world_size} processes; use "
                         "'fsdp' or 'ddp'")
    if sync_init:
        _broadcast_from_rank0(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = mixed_precision_policy(info.device, mixed_precision)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def copy_full_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy the (possibly FSDP2-sharded) weights of `src` into `dst`, an unsharded model of the
    same architecture — the rollout copy an FSDP2 trainer generates with. Under FSDP2 each
    parameter is all-gathered (`DTensor.full_tensor`), so this is a collective: every rank calls
    it, with the same models, at the same point. Names are matched, so tied weights (listed once
    by `named_parameters`) are copied once."""
    from torch.distributed.tensor import DTensor

    targets = dict(unwrap(dst).named_parameters())
    for name, p in unwrap(src).named_parameters():
        if name not in targets:
            raise KeyError(f"copy_full_weights: {name!r} of the trained model is not a parameter "
                           "of the rollout model (different architecture?)")
        full = p.full_tensor() if isinstance(p, DTensor) else p
        targets[name].copy_(full.to(device=targets[name].device, dtype=targets[name].dtype))


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 modifies the model in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def autocast(model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for unsharded / DDP models; FSDP2 already computes in bf16 through
    its MixedPrecisionPolicy, and CPU stays fp32 (the bit-exact resume tests run there)."""
    if device.type == "cuda" and not _is_fsdp(model):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# batches


@dataclass
class StepBatch:
    """One update's data on this rank: what the model runs on (`fwd`, padded or packed, see
    `treegym.train.logprobs.ForwardBatch`) and the per-leaf-token tensors of the loss [B, T],
    aligned like `treegym.tree.to_batch` (the value at t describes token t of a leaf row)."""

    fwd: ForwardBatch
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None = None

    _FIELDS = ("input_ids", "attention_mask", "loss_mask", "advantages", "old_logprobs")

    @property
    def rows(self) -> int:
        """Leaf rows (one per kept leaf)."""
        return int(self.loss_mask.shape[0])

    @property
    def input_ids(self) -> torch.Tensor:
        """The token ids the model runs on (the leaf rows themselves when padded)."""
        return self.fwd.input_ids

    @classmethod
    def from_any(cls, batch: Any, *, packed: bool = False) -> StepBatch:
        """Accept a `StepBatch`, a `treegym.tree.batch.Batch` (numpy) or a mapping with the keys
        input_ids, attention_mask, loss_mask, advantages, old_logprobs (and optional
        ref_logprobs); also the aliases ``mask`` and ``old_logp``. With `packed` (a tree `Batch`
        only: it knows the prompt of each row) each prompt group becomes one packed row. Shapes
        are checked here so a wrong batch fails with its field's name, not deep inside the model."""
        if isinstance(batch, StepBatch):
            return batch
        if isinstance(batch, Mapping):
            get = batch.get
        else:
            def get(k: str, default: Any = None) -> Any:
                return getattr(batch, k, default)
        aliases = {"loss_mask": "mask", "old_logprobs": "old_logp"}
        vals: dict[str, Any] = {}
        for f in cls._FIELDS:
            v = get(f, None)
            if v is None and f in aliases:
                v = get(aliases[f], None)
            if v is None:
                raise ValueError(f"batch has no {f!r} (need {list(cls._FIELDS)})")
            vals[f] = v
        vals["ref_logprobs"] = get("ref_logprobs", None)
        out: dict[str, torch.Tensor | None] = {}
        for k, v in vals.items():
            if v is None:
                out[k] = None
                continue
            t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
            out[k] = t.long() if k in ("input_ids", "attention_mask", "loss_mask") else t.float()
        ids = out["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        for k, t in out.items():
            if t is not None and t.shape != ids.shape:
                raise ValueError(f"batch field {k!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(ids.shape)} (same as input_ids)")
        if packed:
            if not hasattr(batch, "pack"):
                raise ValueError("packed=True needs a treegym.tree Batch (its uids say which rows "
                                 "share a prompt)")
            fwd = ForwardBatch.from_packed(batch.pack())
        else:
            fwd = ForwardBatch.padded(ids, out["attention_mask"])
        return cls(fwd=fwd, loss_mask=out["loss_mask"], advantages=out["advantages"],
                   old_logprobs=out["old_logprobs"], ref_logprobs=out["ref_logprobs"])

    def take(self, rows: Any) -> StepBatch:
        """These leaf rows, in this order (whole prompts when packed), trimmed to the widths
        they use."""
        rows = list(rows)
        fwd = self.fwd.take(rows)
        idx, width = torch.tensor(rows, dtype=torch.long), fwd.gather.shape[1]
        cut = lambda x: None if x is None else x[idx, :width]  # noqa: E731
        return StepBatch(fwd=fwd, loss_mask=cut(self.loss_mask), advantages=cut(self.advantages),
                         old_logprobs=cut(self.old_logprobs), ref_logprobs=cut(self.ref_logprobs))

    def with_logprobs(self, old: torch.Tensor | None = None, ref: torch.Tensor | None = None
                      ) -> StepBatch:
        return dataclasses.replace(self, old_logprobs=self.old_logprobs if old is None else old,
                                   ref_logprobs=ref)

    def to(self, device: torch.device) -> StepBatch:
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return StepBatch(fwd=self.fwd.to(device), loss_mask=mv(self.loss_mask),
                         advantages=mv(self.advantages), old_logprobs=mv(self.old_logprobs),
                         ref_logprobs=mv(self.ref_logprobs))


def shard_rows(batch: Any, rank: int, world_size: int) -> StepBatch:
    """Rank `rank`'s contiguous slice of the global batch's rows (sizes differ by at most one;
    a rank may get zero rows when there are fewer rows than ranks — it still joins the step)."""
    b = StepBatch.from_any(batch)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    bounds = np.linspace(0, b.rows, world_size + 1).round().astype(int)
    return b.take(range(int(bounds[rank]), int(bounds[rank + 1])))


# ----------------------------------------------------------------------------------------------
# the update


def agg_denominator(mask: torch.Tensor, agg: str) -> float:
    """What `treegym.train.loss.agg_loss` divides by, before its clamp: masked tokens for
    token-mean, rows for seq-mean-token-sum, rows with a masked token for seq-mean-token-mean, the
    padded width for seq-mean-token-sum-norm. Local aggregate x this = the local numerator."""
    if agg == "token-mean":
        return float(mask.sum())
    if agg == "seq-mean-token-sum":
        return float(mask.shape[0])
    if agg == "seq-mean-token-mean":
        return float((mask.sum(-1) > 0).sum())
    if agg == "seq-mean-token-sum-norm":
        return float(mask.shape[-1])
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _chunks(b: StepBatch, micro_rows: int | None) -> list[tuple[list[int], StepBatch]]:
    """Micro-batches of `micro_rows` forward rows (leaf rows when padded, prompts when packed),
    each with the leaf rows it holds."""
    if b.rows == 0:
        return []
    order = b.fwd.row_of.tolist()
    fwd_rows = list(dict.fromkeys(order))
    step = len(fwd_rows) if not micro_rows else micro_rows
    out = []
    for i in range(0, len(fwd_rows), step):
        part = set(fwd_rows[i:i + step])
        rows = [j for j, r in enumerate(order) if r in part]
        out.append((rows, b.take(rows)))
    return out


def _dummy(b: StepBatch) -> StepBatch:
    """One two-token row with no loss token: lets a rank with no (or fewer) micro-batches join
    the collectives of every forward/backward, contributing exactly zero gradient."""
    z = torch.zeros((1, 2), dtype=torch.long)
    f = torch.zeros((1, 2), dtype=torch.float32)
    fwd = ForwardBatch.padded(z, torch.ones_like(z))
    if b.fwd.packed:
        fwd = dataclasses.replace(fwd, position_ids=torch.arange(2)[None],
                                  tree_mask=torch.tril(torch.ones(1, 2, 2, dtype=torch.bool)))
    return StepBatch(fwd=fwd, loss_mask=z.clone(), advantages=f, old_logprobs=f.clone(),
                     ref_logprobs=None if b.ref_logprobs is None else f.clone())


@contextlib.contextmanager
def _grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction on all but the last micro-batch (same result, fewer comms)."""
    if enabled:
        yield
        return
    if _is_ddp(model):
        with model.no_sync():
            yield
        return
    if _is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def _total_norm(norm: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def rank_logprobs(model: nn.Module, batch: Any, *, micro_batch_rows: int | None = None,
                  want_entropy: bool = False, loss_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of this rank's leaf rows at their loss tokens (`loss_mask`, default
    the batch's), 0 elsewhere, shaped like the loss layout, on the CPU — the "old" and reference
    log-probs of a PPO step. Under FSDP2 every forward all-gathers, so every rank runs the same
    number of forwards (padding micro-batches where it has fewer rows); call it on all ranks
    together."""
    local = StepBatch.from_any(batch)
    if loss_mask is not None:
        local = dataclasses.replace(local, loss_mask=loss_mask.long())
    device = next(unwrap(model).parameters()).device
    chunks = _chunks(local, micro_batch_rows)
    n = int(_all_reduce([float(len(chunks))], op="max")[0])
    logp = torch.zeros(local.loss_mask.shape, dtype=torch.float32)
    ent = torch.zeros_like(logp) if want_entropy else None
    for i in range(max(n, 1)):
        real = i < len(chunks)
        rows, chunk = chunks[i] if real else ([], _dummy(local))
        c = chunk.to(device)
        with autocast(model, device):
            lp, e = masked_logprobs(model, c.fwd, c.loss_mask, want_entropy=want_entropy)
        if real:
            idx, width = torch.tensor(rows), lp.shape[1]
            logp[idx, :width] = lp.float().cpu()
            if ent is not None and e is not None:
                ent[idx, :width] = e.float().cpu()
    return logp, ent


_TOKEN_STATS = ("clipfrac", "clipfrac_lower", "approx_kl")
_AGG_STATS = ("loss", "pg_loss", "kl", "entropy")


def policy_update_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, *,
                       info: DistInfo | None = None, clip: float = 0.2,
                       dual_clip: float | None = 3.0, kl_coef: float = 0.0,
                       entropy_coef: float = 0.0, agg: str = "token-mean",
                       grad_clip: float | None = 1.0, micro_batch_rows: int | None = None,
                       scheduler: Any = None, compute_entropy: bool | None = None,
                       old_from_forward: bool = False, ref_from_forward: bool = False
                       ) -> dict[str, float]:
    """One optimizer step on this rank's rows of the global (mini)batch — THE training step,
    with one process (world size 1: no collective runs) and under torchrun alike.

    `batch` holds THIS rank's rows (use `shard_rows` on a global batch, or give each rank its own
    rollouts); with one process it is the whole batch. The loss is `treegym.train.loss.total_loss`
    (dual-clip PPO via `policy_loss`, + kl_coef * k3 KL when the batch has ref_logprobs, −
    entropy_coef * entropy), aggregated over the GLOBAL batch (module docstring), so loss, gradients,
    the clipped grad norm and the update equal a single-process step on all rows. `micro_batch_rows`
    splits the local forward rows (leaf rows, or prompts when packed) for gradient accumulation
    (memory), without changing the result. `compute_entropy` (default: only when entropy_coef != 0)
    also reports the entropy. `old_from_forward`: the weights are still those of the rollout, so
    the old log-probs are this forward's own (detached) — the skipped "old" pass would have
    computed the same numbers (and the batch's old_logprobs, then, are only logged against);
    `ref_from_forward` likewise for the reference log-probs while the policy equals the reference.

    Returns global metrics (identical on every rank): loss, pg_loss, kl, entropy, clipfrac,
    clipfrac_lower, approx_kl, grad_norm (before clipping), tokens, rows, lr; with
    `old_from_forward` also `old_logprobs` (this rank's, CPU, loss layout).
    """
    if info is None:
        info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size()) \
            if dist.is_available() and dist.is_initialized() else DistInfo()
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if micro_batch_rows is not None and micro_batch_rows <= 0:
        raise ValueError(f"micro_batch_rows must be > 0, got {micro_batch_rows}")
    local = StepBatch.from_any(batch)
    # position 0 has no prediction (masked_logprobs puts 0 there): never a loss token
    first_free = local.loss_mask.clone()
    first_free[:, :1] = 0
    local = dataclasses.replace(local, loss_mask=first_free)
    device = next(unwrap(model).parameters()).device
    want_kl = bool(kl_coef) and (local.ref_logprobs is not None or ref_from_forward)
    want_ent = bool(entropy_coef) if compute_entropy is None else bool(compute_entropy or entropy_coef)

    chunks = [(rows, c, False) for rows, c in _chunks(local, micro_batch_rows)]
    sums = _all_reduce([float(local.loss_mask.sum()), float(local.rows),
                        agg_denominator(local.loss_mask, agg)
                        if agg != "seq-mean-token-sum-norm" else 0.0])
    maxes = _all_reduce([float(local.loss_mask.shape[-1]) if local.rows else 0.0,
                         float(len(chunks))], op="max")
    tokens, rows = sums[0], sums[1]
    global_denom = maxes[0] if agg == "seq-mean-token-sum-norm" else sums[2]
    global_denom = max(global_denom, 1.0)
    tokens_denom = max(tokens, 1.0)
    n_chunks = int(maxes[1])
    while len(chunks) < max(n_chunks, 1):
        chunks.append(([], _dummy(local), True))
    # DDP and FSDP2 average gradients over ranks; the world size turns that average into the sum.
    grad_scale = float(info.world_size) if (_is_ddp(model) or _is_fsdp(model)) else 1.0

    optimizer.zero_grad(set_to_none=True)
    acc = {k: 0.0 for k in (*_TOKEN_STATS, *_AGG_STATS)}
    old_seen = torch.zeros(local.loss_mask.shape, dtype=torch.float32) if old_from_forward else None
    model.train()
    for i, (rows_i, chunk, is_dummy) in enumerate(chunks):
        chunk = chunk.to(device)
        with _grad_sync(model, i == len(chunks) - 1), autocast(model, device):
            logp, ent = masked_logprobs(model, chunk.fwd, chunk.loss_mask, want_entropy=want_ent)
            old = logp.detach() if old_from_forward else chunk.old_logprobs
            ref = logp.detach() if ref_from_forward else chunk.ref_logprobs
            loss, stats = total_loss(
                logp, old, chunk.advantages, chunk.loss_mask,
                ref_logp=ref if want_kl else None, entropy=ent, clip=clip,
                dual_clip=dual_clip, kl_coef=kl_coef if want_kl else 0.0,
                entropy_coef=entropy_coef, agg=agg)
            n_tok = 0.0 if is_dummy else float(chunk.loss_mask.sum())
            d = 0.0 if is_dummy else agg_denominator(chunk.loss_mask, agg)
            (loss * (d / global_denom) * grad_scale).backward()
        if old_seen is not None and not is_dummy:
            old_seen[torch.tensor(rows_i), :old.shape[1]] = old.float().cpu()
        for k in _TOKEN_STATS:
            acc[k] += stats.get(k, 0.0) * n_tok
        for k in _AGG_STATS:
            acc[k] += stats.get(k, 0.0) * d
    reduced = _all_reduce([acc[k] for k in (*_TOKEN_STATS, *_AGG_STATS)])
    out: dict[str, Any] = {k: v / tokens_denom for k, v in zip(_TOKEN_STATS, reduced[:len(_TOKEN_STATS)])}
    out.update({k: v / global_denom for k, v in zip(_AGG_STATS, reduced[len(_TOKEN_STATS):])})
    if not want_kl:
        out.pop("kl")
    if not want_ent:
        out.pop("entropy")

    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    out["grad_norm"] = _total_norm(norm)
    out["lr"] = float(optimizer.param_groups[0]["lr"])  # the rate this step used
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    out["tokens"] = tokens
    out["rows"] = rows
    if old_seen is not None:
        out["old_logprobs"] = old_seen
    return out


# ----------------------------------------------------------------------------------------------
# gathering weights, rank-0 checkpoints


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0, `{}` on the other ranks. A collective: every
    rank must call it. Works for FSDP2, DDP and bare models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(unwrap(model) if _is_ddp(model) else model,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if is_main() else {}


def gather_full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full gradients by parameter name (DTensor shards gathered), on every rank; for tests and
    debugging. A collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in unwrap(model).named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name] = g.detach().cpu().clone()
    return out


def _drop_tied_copies(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered state dict lists a tied LM head as its own tensor; drop it when the model ties
    it to the embeddings, so a sharded run writes the same files as `save_pretrained` in one
    process (`load_checkpoint_distributed` and `from_pretrained` re-tie it on load)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return sd
    tied = getattr(model, "_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return sd
    return {k: v for k, v in sd.items() if not (k in tied and tied[k] in sd)}


class _FullModelView:
    """What `treegym.train.checkpoint.save_checkpoint` needs of a model (`save_pretrained`),
    backed by an already-gathered full state dict."""

    def __init__(self, model: nn.Module, state_dict: dict[str, torch.Tensor]):
        self._model, self._sd = unwrap(model), _drop_tied_copies(unwrap(model), state_dict)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        self._model.save_pretrained(path, state_dict=self._sd, **kwargs)


class _FullOptimizerView:
    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def save_pretrained_rank0(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Gather the weights and write a normal Hugging Face directory from rank 0 (what SGLang's
    `/update_weights_from_disk` and `HFPolicy` load). Collective; ends with a barrier so no rank
    tells a server to load a half-written directory."""
    sd = gather_full_state_dict(model)
    out = Path(out_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        _FullModelView(model, sd).save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    barrier()
    return out


def save_checkpoint_rank0(run_dir: str | Path, step: int, model: nn.Module,
                          optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                          tokenizer: Any = None, extra: dict | None = None,
                          keep: int | None = None) -> Path | None:
    """`treegym.train.checkpoint.save_checkpoint` for a sharded run: every rank gathers (model and
    optimizer state as full, name-keyed state dicts), rank 0 writes the atomic checkpoint.
    Returns the path on rank 0 and None elsewhere. Restore with `load_checkpoint_distributed`
    (the optimizer state is keyed by parameter names, not by position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from treegym.train.checkpoint import save_checkpoint

    sd = gather_full_state_dict(model)
    osd = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(unwrap(model) if _is_ddp(model) else model, optimizer,
                                       options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    path = None
    if is_main():
        path = save_checkpoint(run_dir, step, _FullModelView(model, sd),
                               _FullOptimizerView(osd) if osd is not None else None,
                               scheduler, tokenizer, extra={**(extra or {}), "distributed": True},
                               keep=keep)
    barrier()
    return path


def _param_names(model: nn.Module) -> list[str]:
    """Parameter names in `model.parameters()` order (tied weights once): position i of a plain
    `optimizer.state_dict()` is the i-th of these when the optimizer got `model.parameters()`."""
    return [n for n, _ in unwrap(model).named_parameters()]


def optimizer_state_by_name(state: dict, model: nn.Module) -> dict:
    """A single-process `optimizer.state_dict()` (keyed by position) re-keyed by parameter name,
    the form `set_optimizer_state_dict` loads into sharded ranks; a name-keyed one is returned
    as is. Lets a torchrun run resume a checkpoint written by one process."""
    names = _param_names(model)
    groups = state.get("param_groups", [])
    if not any(isinstance(i, int) for g in groups for i in g.get("params", [])):
        return state
    def name(i: int) -> str:
        if not 0 <= i < len(names):
            raise ValueError(f"optimizer state refers to parameter {i}, but the model has "
                             f"{len(names)}: a checkpoint of a different model?")
        return names[i]
    return {"state": {name(i): v for i, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [name(i) for i in g["params"]]} for g in groups]}


def optimizer_state_by_position(state: dict, model: nn.Module) -> dict:
    """The inverse: a name-keyed optimizer state (written by `save_checkpoint_rank0`) in the
    positional form `optimizer.load_state_dict` of a one-process run expects, so a run trained
    under torchrun can be resumed without it."""
    index = {n: i for i, n in enumerate(_param_names(model))}
    groups = state.get("param_groups", [])
    if not any(isinstance(k, str) for g in groups for k in g.get("params", [])):
        return state
    def pos(n: str) -> int:
        if n not in index:
            raise ValueError(f"optimizer state names parameter {n!r}, which the model lacks: a "
                             "checkpoint of a different model?")
        return index[n]
    return {"state": {pos(n): v for n, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [pos(n) for n in g["params"]]} for g in groups]}


def load_checkpoint_distributed(path: str | Path, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None,
                                scheduler: Any = None) -> dict:
    """Load a checkpoint written by `save_checkpoint_rank0` (or by one process's
    `treegym.train.checkpoint.save_checkpoint`) into a (possibly sharded) model and optimizer on
    every rank. Each rank reads the files (a shared or local disk on one node);
    hashes are verified first (`CheckpointError` on a bad checkpoint). Returns the trainer state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from treegym.train.checkpoint import CheckpointError, load_trainer_state

    state = load_trainer_state(path)
    shards = sorted(Path(path).glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"checkpoint {path} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for s in shards:
        weights.update(load_file(str(s)))
    target = unwrap(model) if _is_ddp(model) else model
    base = unwrap(model)
    tied = bool(getattr(getattr(base, "config", None), "tie_word_embeddings", False))
    if tied:
        for name in [n for n in base.state_dict() if n.endswith("lm_head.weight")]:
            src = name.replace("lm_head.weight", "model.embed_tokens.weight")
            if name not in weights and src in weights:
                weights[name] = weights[src]
    set_model_state_dict(target, weights, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and state.get("optimizer") is not None:
        set_optimizer_state_dict(target, optimizer, optimizer_state_by_name(state["optimizer"], model),
                                 options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


# ----------------------------------------------------------------------------------------------
# throughput probe (the GPU measurement issue 8 asks for; runs on CPU with --size tiny)

BENCH_SIZES: dict[str, dict[str, int]] = {
    # Qwen2.5-0.5B's shapes (random init: throughput does not depend on the weights)
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def bench_main(argv: list[str] | None = None) -> int:
    """A few policy-update steps of a randomly initialised model under torchrun; prints one JSON
    line with tokens/s (all ranks' tokens) from rank 0. No downloads: the config is built here.

    `torchrun --nproc_per_node 8 -m treegym.train.distributed --size 0.5b --steps 5`
    """
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(prog="python -m treegym.train.distributed",
                                 description=bench_main.__doc__)
    ap.add_argument("--size", choices=sorted(BENCH_SIZES), default="tiny")
    ap.add_argument("--strategy", choices=STRATEGIES[:2], default="fsdp")
    ap.add_argument("--rows", type=int, default=8, help="rows per rank per step")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch rows")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, Qwen2Config

    info = init_distributed()
    torch.manual_seed(0)
    cfg = Qwen2Config(**BENCH_SIZES[args.size], max_position_embeddings=max(args.seq, 64),
                      tie_word_embeddings=True, use_sliding_window=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model = shard_model(model, info, strategy=args.strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    g = torch.Generator().manual_seed(1 + info.rank)
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "loss_mask": (torch.rand(ids.shape, generator=g) < 0.5).long(),
             "advantages": torch.randn(ids.shape, generator=g),
             "old_logprobs": torch.zeros(ids.shape)}
    times = []
    for step in range(args.steps + 1):
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = policy_update_step(model, opt, batch, info=info, micro_batch_rows=args.micro)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    tokens = args.rows * args.seq * info.world_size
    mean = sum(times) / max(len(times), 1)
    report = {"size": args.size, "params": n_params, "strategy": args.strategy,
              "world_size": info.world_size, "device": str(info.device),
              "rows_per_rank": args.rows, "seq": args.seq, "steps": len(times),
              "step_s": round(mean, 4), "tokens_per_s": round(tokens / mean, 1) if mean else None,
              "loss": stats["loss"]}
    if info.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(info.device)
        report["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(info.device) / 2**30, 2)
    rank0_print(json.dumps(report))
    cleanup_distributed()
    return 0


__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "is_main", "barrier",
           "rank0_print", "all_gather_objects", "broadcast_object", "all_reduce_floats",
           "copy_full_weights", "decoder_layers", "mixed_precision_policy", "shard_model", "unwrap",
           "autocast", "StepBatch", "shard_rows", "agg_denominator", "rank_logprobs",
           "policy_update_step",
           "gather_full_state_dict", "gather_full_grads", "save_pretrained_rank0",
           "save_checkpoint_rank0", "load_checkpoint_distributed", "optimizer_state_by_name",
           "optimizer_state_by_position", "bench_main"]


if __name__ == "__main__":
    raise SystemExit(bench_main())
