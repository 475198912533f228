"""A transformers backend: batched sampling over token ids with shared-prefix KV reuse.

Why a hand-written decoding loop instead of ``model.generate``: RL needs, per request, its own
seeded generator, the log-prob (and optionally entropy) of every sampled token, stop strings that
end the request exactly at ``</search>`` / ``</answer>``, and — the point of tree rollouts — the KV
cache of a prefix shared by sibling branches computed once. ``generate`` gives only some of these.

Prefix-KV reuse: requests are sorted by prompt ids; a small dynamic programme splits them into
groups that maximise the prefill tokens saved (members-1) x shared-prefix-length (so the common
Search-R1 instruction does not swallow the longer per-question or per-branch prefixes). Each
group's prefix is prefilled once, its keys/values are copied into every member's row of one
batch cache, and only the members' suffixes are prefilled. The row layout is
``[pad | prefix | pad | suffix]`` with an explicit attention mask and explicit position ids, so
each row computes exactly what it would alone. Log-prob semantics: see `treegym.agents.sampling`.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from treegym.agents.base import GenRequest, GenResult, ends_generation, eos_token_ids, stop_window
from treegym.agents.sampling import make_generator, sample_next
from treegym.agents.tokenizer import HFTokenizer, TokenizerBacked

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """Fail early, naming the missing file, instead of deep inside ``from_pretrained``."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} is missing config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"model directory {str(path)!r} has no weights: expected one of "
                                f"{', '.join(_WEIGHT_FILES)}")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {str(path)!r} has no tokenizer: expected one of "
                                f"{', '.join(_TOKENIZER_FILES)}")
    return path


def _resolve_dtype(dtype: Any, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


@dataclass
class _Group:
    prefix_len: int
    rows: list[int]  # indices into the batch; rows[0] is the one that "computes" the prefix


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix_groups(prompts: Sequence[Sequence[int]], min_len: int = 16) -> list[_Group]:
    """Partition requests into groups sharing a prefix so that the prefill tokens saved are maximal.

    Sorted order puts prompts with long common prefixes next to each other; any group is then a
    contiguous run, and a DP over runs picks the best split. A member keeps at least one token of
    its own so that its last-position logits come from the suffix pass.
    """
    n = len(prompts)
    if n < 2:
        return []
    order = sorted(range(n), key=lambda i: tuple(prompts[i]))
    adj = [_lcp(prompts[order[k]], prompts[order[k + 1]]) for k in range(n - 1)]

    def run_prefix(i: int, j: int) -> int:  # shared prefix of sorted run i..j (inclusive)
        shared = min(adj[i:j]) if j > i else 0
        return min(shared, min(len(prompts[order[k]]) for k in range(i, j + 1)) - 1)

    best = [0] * (n + 1)  # best[j] = max saving over the first j sorted prompts
    choice = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], choice[j] = best[j - 1], j - 1  # prompt j-1 alone
        for i in range(j - 1):  # run i..j-1 (at least two members)
            p = run_prefix(i, j - 1)
            if p < min_len:
                continue
            gain = best[i] + (j - 1 - i) * p
            if gain > best[j]:
                best[j], choice[j] = gain, i
    groups: list[_Group] = []
    j = n
    while j > 0:
        i = choice[j]
        if j - i >= 2:
            groups.append(_Group(run_prefix(i, j - 1), [order[k] for k in range(i, j)]))
        j = i
    return groups[::-1]


def cache_argument(model: Any) -> str:
    """The forward() keyword that takes a KV cache: ``cache`` since transformers 5.x deprecated
    ``past_key_values`` (a FutureWarning on every call; removed in 5.40), ``past_key_values`` in the
    releases before it."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters  # DDP wraps
    return "cache" if "cache" in params else "past_key_values"


class HFPolicy(TokenizerBacked):
    """`Policy` over a Hugging Face causal LM directory (or an already loaded model + tokenizer).

    ``truncate_prompt``: a prompt that does not fit ``context_length - max_new_tokens`` raises a
    ValueError naming the lengths (default) or, if True, keeps its last tokens (reported in
    ``result.meta["truncated_prompt_tokens"]``). ``prefix_reuse`` turns the shared-prefix KV reuse
    on or off (the results agree to float rounding either way); ``min_shared_prefix`` is the
    shortest prefix worth sharing. ``stats`` counts prefill/generated tokens across calls.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "cpu",
                 dtype: Any = None, *, model: Any = None, tokenizer: Any = None,
                 truncate_prompt: bool = False, prefix_reuse: bool = True,
                 min_shared_prefix: int = 16, max_batch_size: int = 64,
                 use_chat_template: bool | None = None, attn_implementation: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        if model is None:
            if model_dir is None:
                raise ValueError("HFPolicy needs model_dir or model=")
            path = check_model_dir(model_dir)
            kwargs: dict[str, Any] = {"dtype": _resolve_dtype(dtype, device)}
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
            model.to(self.device)
        elif tokenizer is None:
            raise ValueError("HFPolicy(model=...) also needs tokenizer=")
        else:  # a live model (e.g. the trainer's): sample on whatever device it is on
            self.device = next(model.parameters()).device
        self.model = model.eval()
        self.tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(
            tokenizer, use_chat_template=use_chat_template)
        self.model_dir = None if model_dir is None else str(model_dir)
        self.truncate_prompt = truncate_prompt
        self.prefix_reuse = prefix_reuse
        self.min_shared_prefix = max(1, int(min_shared_prefix))
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        self.max_batch_size = int(max_batch_size)
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = set(eos_token_ids(self.tokenizer, cfg,
                                         getattr(self.model, "generation_config", None)))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.stats = {"calls": 0, "prefill_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "forward_passes": 0}
        self._cache_arg = cache_argument(self.model)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, GenRequest):
                raise TypeError(f"requests[{i}] is a {type(r).__name__}, not a GenRequest")
        if not requests:
            return []
        prompts, truncated = [], []
        for r in requests:
            ids, cut = self._fit_context(list(r.prompt_ids), r.max_new_tokens)
            prompts.append(ids)
            truncated.append(cut)
        # Sorting keeps requests with shared prefixes in the same chunk.
        order = sorted(range(len(requests)), key=lambda i: tuple(prompts[i]))
        results: list[GenResult | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            outs = self._generate_batch([requests[i] for i in chunk], [prompts[i] for i in chunk])
            for i, res in zip(chunk, outs):
                if truncated[i]:
                    res.meta["truncated_prompt_tokens"] = truncated[i]
                results[i] = res
        self.stats["calls"] += 1
        return results  # type: ignore[return-value]

    def _fit_context(self, ids: list[int], max_new: int) -> tuple[list[int], int]:
        limit = self.context_length - max_new
        if len(ids) <= limit:
            return ids, 0
        if not self.truncate_prompt or limit <= 0:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens {max_new} = {len(ids) + max_new} "
                f"exceeds the model context of {self.context_length} tokens"
                + ("" if limit <= 0 else f" (HFPolicy(truncate_prompt=True) keeps the last "
                                         f"{limit} prompt tokens)"))
        return ids[-limit:], len(ids) - limit

    @torch.inference_mode()
    def _generate_batch(self, reqs: list[GenRequest], prompts: list[list[int]]) -> list[GenResult]:
        t0 = time.perf_counter()
        bsz, dev = len(reqs), self.device
        groups = shared_prefix_groups(prompts, self.min_shared_prefix) if (
            self.prefix_reuse and bsz > 1) else []
        prefix_len = [0] * bsz
        cached = [0] * bsz
        row_group = [-1] * bsz
        for g_idx, g in enumerate(groups):
            for k, row in enumerate(g.rows):
                prefix_len[row] = g.prefix_len
                row_group[row] = g_idx
                cached[row] = g.prefix_len if k > 0 else 0

        cache = self._new_cache()
        big_p = max((g.prefix_len for g in groups), default=0)
        prefill = 0
        if groups:
            # One batched prefill of every group's prefix (left-padded to the longest).
            g_ids = torch.full((len(groups), big_p), self.pad_id, dtype=torch.long)
            g_mask = torch.zeros((len(groups), big_p), dtype=torch.long)
            for g_idx, g in enumerate(groups):
                toks = prompts[g.rows[0]][:g.prefix_len]
                g_ids[g_idx, big_p - g.prefix_len:] = torch.tensor(toks)
                g_mask[g_idx, big_p - g.prefix_len:] = 1
                prefill += g.prefix_len
            g_pos = (g_mask.cumsum(-1) - 1).clamp_(min=0)
            g_cache = self._new_cache()
            self.model(input_ids=g_ids.to(dev), attention_mask=g_mask.to(dev),
                       position_ids=g_pos.to(dev), use_cache=True, logits_to_keep=1,
                       **{self._cache_arg: g_cache})
            self.stats["forward_passes"] += 1
            # Broadcast each group's K/V to its members; rows outside every group get masked zeros.
            sel = torch.tensor([max(g, 0) for g in row_group], device=dev)
            in_group = torch.tensor([g >= 0 for g in row_group], dtype=torch.long)
            for layer_idx, layer in enumerate(g_cache.layers):
                keys = layer.keys.index_select(0, sel)
                values = layer.values.index_select(0, sel)
                cache.update(keys, values, layer_idx)
            prefix_mask = g_mask.index_select(0, sel.cpu()) * in_group[:, None]
        else:
            prefix_mask = torch.zeros((bsz, 0), dtype=torch.long)

        suffixes = [p[prefix_len[i]:] for i, p in enumerate(prompts)]
        big_s = max(len(s) for s in suffixes)
        s_ids = torch.full((bsz, big_s), self.pad_id, dtype=torch.long)
        s_mask = torch.zeros((bsz, big_s), dtype=torch.long)
        s_pos = torch.zeros((bsz, big_s), dtype=torch.long)
        for i, s in enumerate(suffixes):
            s_ids[i, big_s - len(s):] = torch.tensor(s)
            s_mask[i, big_s - len(s):] = 1
            s_pos[i, big_s - len(s):] = torch.arange(prefix_len[i], prefix_len[i] + len(s))
            prefill += len(s)
        attn = torch.cat([prefix_mask, s_mask], dim=1).to(dev)
        out = self.model(input_ids=s_ids.to(dev), attention_mask=attn, position_ids=s_pos.to(dev),
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        self.stats["forward_passes"] += 1
        self.stats["prefill_tokens"] += prefill
        self.stats["cached_tokens"] += sum(cached)
        logits = out.logits[:, -1, :]

        gens = [make_generator(r.seed) for r in reqs]
        temps = [r.temperature for r in reqs]
        tops = [r.top_p for r in reqs]
        want_ent = [r.want_entropies for r in reqs]
        windows = [stop_window(r.stop) for r in reqs]
        tokens: list[list[int]] = [[] for _ in reqs]
        logps: list[list[float]] = [[] for _ in reqs]
        ents: list[list[float]] = [[] for _ in reqs]
        finish: list[str | None] = [None] * bsz
        next_pos = [len(p) for p in prompts]
        active = list(range(bsz))  # batch row -> request index
        while True:
            tok, lp, ent = sample_next(logits, [temps[i] for i in active], [tops[i] for i in active],
                                       [gens[i] for i in active],
                                       want_entropy=any(want_ent[i] for i in active))
            tok_l, lp_l = tok.tolist(), lp.tolist()
            ent_l = ent.tolist() if ent is not None else None
            keep_rows = []
            for row, i in enumerate(active):
                t = tok_l[row]
                tokens[i].append(t)
                logps[i].append(lp_l[row])
                if want_ent[i] and ent_l is not None:
                    ents[i].append(ent_l[row])
                why = ends_generation(tokens[i], reqs[i].stop, self.decode, self.eos_ids, windows[i])
                if why is not None:
                    finish[i] = why
                elif len(tokens[i]) >= reqs[i].max_new_tokens:
                    finish[i] = "length"
                else:
                    keep_rows.append(row)
            if not keep_rows:
                break
            if len(keep_rows) < len(active):  # drop finished rows from the batch and its cache
                idx = torch.tensor(keep_rows, device=dev)
                cache.batch_select_indices(idx)
                attn = attn.index_select(0, idx)
                tok = tok.index_select(0, idx)
                active = [active[r] for r in keep_rows]
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=attn.dtype, device=dev)], 1)
            pos = torch.tensor([[next_pos[i]] for i in active], device=dev)
            for i in active:
                next_pos[i] += 1
            out = self.model(input_ids=tok[:, None].to(dev), attention_mask=attn, position_ids=pos,
                             use_cache=True, **{self._cache_arg: cache})
            self.stats["forward_passes"] += 1
            logits = out.logits[:, -1, :]

        elapsed = time.perf_counter() - t0
        results = []
        for i, r in enumerate(reqs):
            self.stats["generated_tokens"] += len(tokens[i])
            results.append(GenResult(
                token_ids=tokens[i], logprobs=logps[i], text=self.decode(tokens[i]),
                finish_reason=finish[i] or "length",
                entropies=ents[i] if r.want_entropies else None,
                meta={"prompt_tokens": len(prompts[i]), "cached_tokens": cached[i],
                      "batch_seconds": elapsed}))
        return results

    def _new_cache(self) -> Any:
        """An empty KV cache laid out for this model's layers (full or sliding-window)."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56: no per-layer layout
            return DynamicCache()

    def __repr__(self) -> str:
        return (f"HFPolicy({self.model_dir or type(self.model).__name__!r}, device={str(self.device)!r}, "
                f"dtype={self.model.dtype})")


__all__ = ["HFPolicy", "check_model_dir", "shared_prefix_groups", "cache_argument"]
