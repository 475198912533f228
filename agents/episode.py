"""The one episode engine: every multi-turn rollout in treegym runs through `Engine.run`.

Evaluation (`train.evaluate.run_episodes`), SFT data (`train.sft.oracle_transcripts`),
`run_episode` and the tree samplers (`tree.rollout`) all advance their live episodes here, in
lock-step: ONE batched `policy.generate` call per turn for every live episode (a tiny model on
CPU is dominated by per-call overhead; a server batches them). What differs between callers is
only how an episode starts (a seeded reset, a fork restored to a tree node) and what a step is
recorded into (an `Episode`, a tree `Node`), so those are a `Slot` subclass and a callback.

The loop (Search-R1's, made token-exact): reset -> ``encode_prompt`` -> generate (the backend stops
at the env's stop strings) -> ``env.step(text of the sampled ids)`` -> ``encode`` the observation
ONCE and append its ids -> generate from the grown id sequence -> ... The sampled ids are never
re-tokenized: what the trainer sees is exactly what was sampled, with an action mask of 1 on
sampled tokens and 0 on prompt/observation tokens, and behaviour log-probs aligned to the ids
(0.0 where the mask is 0). An `Episode`'s transcript is derived from the ids (segment by segment),
so ``policy.decode(episode.token_ids) == episode.transcript`` for any tokenizer whose decode is
concatenative (byte-level BPE, the byte tokenizer).

Seeds: `derive_seed` is the one derivation in the package (samplers, evaluation, the trainer's
data order): a stable hash of a tuple of parts, independent of PYTHONHASHSEED and of the batch
composition, so an episode samples the same tokens whichever other episodes share its batch.
A slot's request seed at turn t is ``derive_seed(*slot.seed, t)``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from treegym.agents.base import GenRequest, GenResult, Policy
from treegym.envs.protocol import parse_action
from treegym.envs.rewards import exact_match, f1_score

DEFAULT_STOP = ("</search>", "</answer>")


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any tuple of ints/strings (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


class PolicyOutputError(ValueError):
    """The policy returned something a rollout cannot use (wrong count, mismatched lengths)."""


@dataclass
class Turn:
    """One Think-Action-Observation step, in ids and in text.

    ``observation_ids`` is empty on the final turn: nothing is generated after it."""

    action_ids: list[int]
    action_logprobs: list[float]
    action_text: str
    finish_reason: str
    observation: str
    observation_ids: list[int]
    reward: float
    terminated: bool
    truncated: bool
    info: dict
    entropies: list[float] | None = None


@dataclass
class Episode:
    """A finished (or cut) episode. Lists are aligned: one entry per token of ``token_ids``.

    The evaluation view (``answer``, ``em``, ``f1``, ``tool_calls``, ``invalid_actions``, ...) is
    read from the same record, so "eval EM" and "training reward" cannot silently disagree."""

    prompt_ids: list[int]
    token_ids: list[int]          # prompt + every action + every observation
    action_mask: list[int]        # 1 = sampled by the policy, 0 = prompt / observation
    logprobs: list[float]         # behaviour log-probs of sampled tokens, 0.0 elsewhere
    transcript: str               # decode of token_ids, built segment by segment
    reward: float
    terminated: bool
    truncated: bool
    turns: list[Turn] = field(default_factory=list)
    task_id: str | None = None
    entropies: list[float] | None = None  # per token when asked (0.0 where the mask is 0)
    task: Any = field(default=None, repr=False)  # the env's Task (gold answers stay here)
    answer: str | None = None     # the answer the env executed (its own parser), None if none
    sample: int = 0               # which of a task's samples (`run_episodes(samples=k)`)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def response_mask(self) -> list[int]:
        return self.action_mask[self.prompt_len:]

    @property
    def infos(self) -> list[dict]:
        return [t.info for t in self.turns]

    @property
    def finish_reasons(self) -> list[str]:
        return [t.finish_reason for t in self.turns]

    @property
    def num_sampled_tokens(self) -> int:
        return sum(self.action_mask)

    generated_tokens = num_sampled_tokens

    @property
    def actions(self) -> tuple[str, ...]:
        """The action texts the env executed, in order."""
        return tuple(t.action_text for t in self.turns)

    @property
    def tool_calls(self) -> int:
        return int(self.turns[-1].info.get("tool_calls", 0)) if self.turns else 0

    @property
    def invalid_actions(self) -> int:
        return sum(not t.info.get("valid_action", True) for t in self.turns)

    @property
    def kind(self) -> str | None:
        return getattr(self.task, "kind", None)

    @property
    def em(self) -> float:
        """Exact match of the executed answer against the task's gold answers (0 if none)."""
        golds = getattr(self.task, "answers", None)
        return exact_match(self.answer, golds) if self.answer is not None and golds else 0.0

    @property
    def f1(self) -> float:
        golds = getattr(self.task, "answers", None)
        return f1_score(self.answer, golds) if self.answer is not None and golds else 0.0


def env_stop_strings(env: Any) -> tuple[str, ...]:
    core = getattr(env, "unwrapped", env)
    stops = getattr(core, "stop_strings", None)
    return tuple(stops) if stops else DEFAULT_STOP


# -- the engine -------------------------------------------------------------------------------


@dataclass
class Slot:
    """One live episode: its env, its token context so far, and its seed parts.

    ``action_prefix``: ids the next action continues (a token-level fork regenerates an action
    from its first tokens; the env then executes prefix + sampled ids). Subclasses carry what
    their caller records into (an episode's lists, a tree node)."""

    env: Any
    context: list[int]
    seed: tuple[Any, ...] | None  # request seed at turn t = derive_seed(*seed, t); None = unseeded
    turn: int = 0
    action_prefix: tuple[int, ...] = ()

    def where(self) -> str:
        return f"episode {self.seed}, turn {self.turn}"


# An `Engine.run` hook: how a step is recorded (Turn has the action, observation, reward, flags).
OnStep = Callable[[Slot, GenRequest, GenResult, Turn], None]
# How a slot ends without an env ending: reason is "turn_limit" or "context_exhausted".
OnEnd = Callable[[Slot, str], None]
# A stand-in for `policy.generate` that also sees the slots (scripted plans, e.g. SFT's oracle).
Act = Callable[[Sequence[Slot], Sequence[GenRequest]], list[GenResult]]


class Engine:
    """Advances slots in lock-step until each one's env ends it (or a limit does).

    ``max_turns`` bounds turns per slot (a safety net for envs that never end); ``max_obs_tokens``
    cuts each observation's ids (Search-R1 cuts to 500); ``fit_context``: if the policy has a
    ``context_length``, a turn's ``max_new_tokens`` shrinks to fit and a slot that no longer fits
    ends with reason "context_exhausted" (off: the request goes as is and the policy decides).
    """

    def __init__(self, policy: Policy, *, stop: Sequence[str] = DEFAULT_STOP,
                 max_new_tokens: int = 500, temperature: float = 1.0, top_p: float = 1.0,
                 want_entropies: bool = False, max_turns: int = 64,
                 max_obs_tokens: int | None = None, fit_context: bool = True):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if max_obs_tokens is not None and max_obs_tokens <= 0:
            raise ValueError(f"max_obs_tokens must be > 0, got {max_obs_tokens}")
        if max_turns <= 0:
            raise ValueError(f"max_turns must be > 0, got {max_turns}")
        self.policy, self.stop = policy, tuple(stop)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.want_entropies, self.max_turns, self.max_obs_tokens = want_entropies, max_turns, max_obs_tokens
        self.context_length = getattr(policy, "context_length", None) if fit_context else None
        self.generate_calls = 0

    def request(self, slot: Slot) -> GenRequest | None:
        """The slot's next request, or None when its context has no room left."""
        budget = self.max_new_tokens
        if self.context_length is not None:
            budget = min(budget, self.context_length - len(slot.context))
            if budget <= 0:
                return None
        seed = None if slot.seed is None else derive_seed(*slot.seed, slot.turn)
        return GenRequest(tuple(slot.context), max_new_tokens=budget, temperature=self.temperature,
                          top_p=self.top_p, stop=self.stop, seed=seed,
                          want_entropies=self.want_entropies)

    def run(self, slots: Sequence[Slot], on_step: OnStep, on_end: OnEnd | None = None,
            act: Act | None = None) -> None:
        """Run every slot to its end. ``on_step`` records each step; ``on_end`` hears about a
        slot cut by a limit (default: nothing); ``act`` replaces ``policy.generate``."""
        active = list(slots)
        while active:
            ready, requests = [], []
            for s in active:
                req = self.request(s)
                if req is None:
                    if on_end is not None:
                        on_end(s, "context_exhausted")
                    continue
                ready.append(s)
                requests.append(req)
            if not ready:
                break
            results = act(ready, requests) if act is not None else self.policy.generate(requests)
            self.generate_calls += 1
            check_results(results, requests, ready)
            still: list[Slot] = []
            for s, req, res in zip(ready, requests, results):
                turn = self._step(s, res)
                on_step(s, req, res, turn)
                if turn.terminated or turn.truncated:
                    continue
                s.turn += 1
                s.context = s.context + list(turn.action_ids) + list(turn.observation_ids)
                s.action_prefix = ()
                if s.turn >= self.max_turns:
                    if on_end is not None:
                        on_end(s, "turn_limit")
                    continue
                still.append(s)
            active = still

    def _step(self, s: Slot, res: GenResult) -> Turn:
        ids = [int(t) for t in res.token_ids]
        text = res.text if not s.action_prefix else self.policy.decode(list(s.action_prefix) + ids)
        obs, reward, terminated, truncated, info = s.env.step(text)
        reward = float(reward)
        if math.isnan(reward) or math.isinf(reward):
            raise ValueError(f"env returned a non-finite reward {reward!r} ({s.where()})")
        obs = obs or ""
        done = bool(terminated or truncated)
        obs_ids: list[int] = []
        if obs:
            obs_ids = [int(t) for t in self.policy.encode(obs)]
            if self.max_obs_tokens is not None and not done:
                obs_ids = obs_ids[:self.max_obs_tokens]
        return Turn(ids, [float(x) for x in res.logprobs], text, res.finish_reason, obs, obs_ids,
                    reward, bool(terminated), bool(truncated), dict(info),
                    [float(x) for x in res.entropies] if res.entropies is not None else None)


def check_results(results: Any, requests: Sequence[GenRequest], slots: Sequence[Slot]) -> None:
    """A clear error naming the request when a policy breaks the `generate` contract."""
    if not isinstance(results, (list, tuple)) or len(results) != len(slots):
        n = len(results) if hasattr(results, "__len__") else type(results).__name__
        raise PolicyOutputError(f"policy.generate returned {n} results for {len(slots)} requests")
    for i, (res, req, s) in enumerate(zip(results, requests, slots)):
        where = f"request {i} ({s.where()})"
        if not isinstance(res, GenResult):
            raise PolicyOutputError(f"{where}: expected a GenResult, got {type(res).__name__}")
        if len(res.logprobs) != len(res.token_ids):
            raise PolicyOutputError(f"{where}: {len(res.token_ids)} token ids but "
                                    f"{len(res.logprobs)} log-probs")
        if res.entropies is not None and len(res.entropies) != len(res.token_ids):
            raise PolicyOutputError(f"{where}: {len(res.token_ids)} token ids but "
                                    f"{len(res.entropies)} entropies")
        if len(res.token_ids) > req.max_new_tokens:
            raise PolicyOutputError(f"{where}: {len(res.token_ids)} tokens exceed max_new_tokens="
                                    f"{req.max_new_tokens}")
        if any(math.isnan(float(x)) for x in res.logprobs):
            raise PolicyOutputError(f"{where}: NaN log-prob")


# -- episodes on the engine -------------------------------------------------------------------


@dataclass
class EpisodeSlot(Slot):
    """A slot that records into an `Episode`'s aligned lists."""

    task: Any = None
    sample: int = 0
    index: int = 0
    prompt_len: int = 0
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] | None = None
    pieces: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    cut: str | None = None  # "turn_limit" / "context_exhausted" when a limit ended it

    def where(self) -> str:
        tid = getattr(self.task, "id", None)
        return f"episode {self.index}" + (f" (task {tid})" if tid is not None else "") + f", turn {self.turn}"


def start_episode(policy: Policy, env: Any, *, seed: int | None = None, options: dict | None = None,
                  sample_seed: tuple[Any, ...] | None = None, want_entropies: bool = False,
                  task: Any = None, sample: int = 0, index: int = 0) -> EpisodeSlot:
    """Reset ``env`` (in place) and encode its prompt: a slot ready for `Engine.run`."""
    obs, _ = env.reset(seed=seed, options=options or None)
    prompt_ids = [int(t) for t in policy.encode_prompt(obs)]
    core = getattr(env, "unwrapped", env)
    task = getattr(core, "task", None) or task
    return EpisodeSlot(env=env, context=list(prompt_ids), seed=sample_seed, task=task,
                        sample=sample, index=index, prompt_len=len(prompt_ids),
                        mask=[0] * len(prompt_ids),
                        logprobs=[0.0] * len(prompt_ids),
                        entropies=[0.0] * len(prompt_ids) if want_entropies else None,
                        pieces=[policy.decode(prompt_ids)])


def play(engine: Engine, slots: Sequence[EpisodeSlot], act: Act | None = None) -> list[Episode]:
    """Run episode slots on ``engine``; returns their `Episode`s in slot order."""
    policy = engine.policy

    def on_step(s: Slot, req: GenRequest, res: GenResult, turn: Turn) -> None:
        assert isinstance(s, EpisodeSlot)
        n = len(turn.action_ids)
        s.mask += [1] * n
        s.logprobs += turn.action_logprobs
        if s.entropies is not None:
            s.entropies += turn.entropies if turn.entropies is not None else [0.0] * n
        s.pieces.append(policy.decode(turn.action_ids))
        if not (turn.terminated or turn.truncated):
            m = len(turn.observation_ids)
            s.mask += [0] * m
            s.logprobs += [0.0] * m
            if s.entropies is not None:
                s.entropies += [0.0] * m
            s.pieces.append(policy.decode(turn.observation_ids) if m else "")
        else:
            turn.observation_ids = []
        s.turns.append(turn)

    def on_end(s: Slot, reason: str) -> None:
        assert isinstance(s, EpisodeSlot)
        s.cut = reason
        if s.turns:
            s.turns[-1].info = dict(s.turns[-1].info, **{reason: True})

    engine.run(slots, on_step, on_end, act)
    out = []
    for s in slots:
        last = s.turns[-1] if s.turns else None
        done_by_env = last is not None and (last.terminated or last.truncated)
        ids = s.context + (list(last.action_ids) if done_by_env else [])
        out.append(Episode(
            prompt_ids=s.context[:s.prompt_len], token_ids=ids, action_mask=s.mask, logprobs=s.logprobs,
            transcript="".join(s.pieces), reward=last.reward if last is not None else 0.0,
            terminated=bool(last is not None and last.terminated),
            truncated=bool(s.cut is not None or (last is not None and last.truncated)),
            turns=s.turns, task_id=getattr(s.task, "id", None), entropies=s.entropies,
            task=s.task, answer=executed_answer(s.env), sample=s.sample))
    return out


def executed_answer(env: Any) -> str | None:
    """The answer the env executed (parsed with the env's own action parser), None if none."""
    core = getattr(env, "unwrapped", env)
    steps = getattr(getattr(core, "state", None), "steps", None) or ()
    parse = getattr(core, "_parse", parse_action)
    for step in reversed(list(steps)):
        if getattr(step, "tool", None) == "answer":
            return parse(step.action).argument
    return None


def run_episode(policy: Policy, env: Any, *, seed: int | None = None, task_id: str | None = None,
                options: dict | None = None, max_new_tokens: int = 500,
                temperature: float = 1.0, top_p: float = 1.0,
                stop: Sequence[str] | None = None, sample_seed: int | None = None,
                want_entropies: bool = False, max_obs_tokens: int | None = None,
                max_turns: int = 64) -> Episode:
    """Play one episode of ``env`` (in place) with ``policy`` and return its token-level record.

    ``seed`` seeds ``env.reset`` (task choice); ``task_id`` picks a task explicitly.
    ``sample_seed`` (default: ``seed``) seeds sampling: turn t uses
    ``derive_seed(sample_seed, t)``, so a seeded episode repeats exactly for a given backend.
    ``stop`` defaults to the env's stop strings. ``max_obs_tokens`` cuts each observation's ids
    (Search-R1 cuts to 500); the transcript then shows the cut text. If the policy has a
    ``context_length``, the last turns' ``max_new_tokens`` shrink to fit and an episode that no
    longer fits ends truncated with ``info["context_exhausted"]``. ``max_turns`` is a safety net
    for envs that never end (the episode ends truncated with ``info["turn_limit"]``).
    """
    engine = Engine(policy, stop=tuple(stop) if stop is not None else env_stop_strings(env),
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    want_entropies=want_entropies, max_turns=max_turns,
                    max_obs_tokens=max_obs_tokens)
    opts = dict(options or {})
    if task_id is not None:
        opts["task_id"] = task_id
    if sample_seed is None:
        sample_seed = seed
    slot = start_episode(policy, env, seed=seed, options=opts,
                         sample_seed=None if sample_seed is None else (sample_seed,),
                         want_entropies=want_entropies)
    return play(engine, [slot])[0]


__all__ = ["Episode", "Turn", "Engine", "Slot", "EpisodeSlot", "PolicyOutputError", "derive_seed", "run_episode",
           "start_episode", "play", "check_results", "executed_answer", "env_stop_strings"]
