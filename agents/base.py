"""The policy contract: token ids are the source of truth.

A request carries prompt *token ids*; a result carries the sampled token ids and their log-probs.
Text is derived (decoded) and never re-tokenized for training, which removes the classic
multi-turn RL bug where re-tokenizing a decoded rollout gives different tokens than were sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 500
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    want_entropies: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_ids, tuple):
            object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.prompt_ids) == 0:
            raise ValueError("GenRequest.prompt_ids is empty")
        if self.max_new_tokens <= 0:
            raise ValueError(f"GenRequest.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0) or math.isinf(self.temperature):
            raise ValueError(f"GenRequest.temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"GenRequest.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenResult:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (a stop string), "eos", or "length"
    entropies: list[float] | None = None
    meta: dict = field(default_factory=dict)  # backend extras, e.g. SGLang's cached_tokens


def eos_token_ids(*sources: object) -> frozenset[int]:
    """The EOS ids a generation stops on: the union over ``sources``, each an id, a list of ids,
    None, or anything with an ``eos_token_id`` (a tokenizer, a ``config.json`` or
    ``generation_config.json`` as object or dict).

    SGLang stops on the union of the tokenizer's, the model config's and the generation config's
    EOS ids (``ModelConfig._get_hf_eos_token_id`` + ``Req._check_token_based_finish``, 0.5.23), so
    every backend uses that union to end the same episodes.
    """
    out: set[int] = set()
    for src in sources:
        val = src.get("eos_token_id") if isinstance(src, dict) else getattr(src, "eos_token_id", src)
        if isinstance(val, (list, tuple, set, frozenset)):
            out.update(int(v) for v in val if v is not None)
        elif isinstance(val, int):
            out.add(int(val))
    return frozenset(out)


def stop_window(stops: Sequence[str]) -> int:
    """How many trailing tokens to decode to see any of ``stops`` completed by the last token.

    Every token is at least one byte, so ``max UTF-8 length + 1`` tokens cover a stop string
    however the model spelled it (SGLang's server uses its *canonical* token count + 1 instead,
    which misses spellings with more tokens; `treegym.agents.sglang` re-applies this rule).
    """
    return max((len(s.encode("utf-8")) for s in stops), default=0) + 1


def ends_generation(ids: Sequence[int], stops: Sequence[str], decode: Callable[[Sequence[int]], str],
                    eos_ids: Collection[int], window: int) -> str | None:
    """Why the *last* token of ``ids`` ends a generation: ``"eos"``, ``"stop"`` or None.

    The one finish rule of every backend: an EOS id wins, else a stop string that appears in the
    decoded last ``window`` tokens (`stop_window`). The sampled ids (and their log-probs) end at
    that token, stop string included.
    """
    if ids[-1] in eos_ids:
        return "eos"
    if stops and any(s in decode(ids[-window:]) for s in stops):
        return "stop"
    return None


def first_end(ids: Sequence[int], stops: Sequence[str], decode: Callable[[Sequence[int]], str],
              eos_ids: Collection[int]) -> tuple[int, str] | None:
    """The earliest ``(length, reason)`` at which `ends_generation` fires on a prefix of ``ids``.

    For a backend that samples past the point where the local rule would have stopped (a server
    with its own stop rule): cutting there gives the ids a local backend would have produced from
    the same sampled tokens. Fast path: a window's text is a substring of its prefix's text (true
    for byte-level BPE and SentencePiece decoders), and a prefix's text only grows, so the first
    prefix whose text shows a stop string is found by bisection and the token walk starts there
    (tests/test_sglang_stop_rule.py checks this against the plain walk).
    """
    ids = list(ids)
    eos_at = next((k for k, t in enumerate(ids, 1) if t in eos_ids), None)
    limit = eos_at or len(ids)
    stops = tuple(stops) if stops and any(s in decode(ids[:limit]) for s in stops) else ()
    if stops:
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in decode(ids[:mid]) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        window = stop_window(stops)
        for k in range(lo, limit + 1):
            why = ends_generation(ids[:k], stops, decode, eos_ids, window)
            if why is not None:
                return k, why
    return (eos_at, "eos") if eos_at is not None else None


@runtime_checkable
class Policy(Protocol):
    """A batched sampler over token ids plus the tokenizer that defines those ids."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of an env's reset prompt (through the chat template when the model has one)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of an observation appended mid-episode (no special tokens added)."""

    def decode(self, ids: Sequence[int]) -> str: ...

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]: ...
