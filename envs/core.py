"""Forkable text environments: immutable state, O(1) snapshot / restore / fork.

Why immutable state: a tree rollout forks an episode at every Think-Action-Observation step. If
the env state is one frozen value whose history is a linked tuple (each step points at its
parent), a snapshot is just a reference, restoring is an assignment, and sibling branches share
their common prefix instead of copying it. This is ALE's `clone_state()/restore_state()` idea,
made structural.

`snapshot/restore/fork` at module level work on a `gym.make`-wrapped env too: they walk the
wrapper stack, carry each wrapper's small bookkeeping (OrderEnforcing's "has reset", TimeLimit's
step count, ...) and, for `fork`, copy the stack around the forked core.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ClosedEnvironmentError
from gymnasium.vector.utils import shared_memory as _shm

from treegym.envs.data.task import Task

# ----------------------------------------------------------------------------------------------
# Spaces


class FreeText(spaces.Text):
    """A `Text` space that contains *any* Unicode string up to `max_length` characters.

    Gymnasium's `Text` only contains strings over its charset (alphanumeric by default), which an
    LLM's output never respects. `sample()` still draws from a printable charset (with a bounded
    length) so `check_env` and random agents work.
    """

    def __init__(self, max_length: int, *, min_length: int = 0, sample_max_length: int = 64,
                 seed: int | np.random.Generator | None = None):
        charset = "".join(chr(c) for c in range(32, 127))
        super().__init__(max_length=max_length, min_length=min_length, charset=charset, seed=seed)
        self.sample_max_length = max(min_length, min(sample_max_length, max_length))

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def sample(self, mask=None, probability=None) -> str:  # noqa: D102 - see class docstring
        if mask is None and probability is None:
            length = int(self.np_random.integers(self.min_length, self.sample_max_length + 1))
            mask = (length, None)
        return super().sample(mask=mask, probability=probability)

    def __repr__(self) -> str:
        return f"FreeText(max_length={self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, FreeText) and self.max_length == other.max_length
                and self.min_length == other.min_length)


# Async vector envs put observations in shared memory; Gymnasium's Text codec maps characters
# through the charset and would drop anything outside it. Store raw code points instead.
@_shm.create_shared_memory.register(FreeText)
def _create_free_text_shm(space: FreeText, n: int = 1, ctx=_shm.mp):
    return ctx.Array(np.dtype(np.int32).char, n * space.max_length)


class _SharedTexts(Sequence):
    """A live, read-only view of n strings in shared memory.

    AsyncVectorEnv calls `read_from_shared_memory` once, at construction, and afterwards returns
    (a deepcopy of) that object after every step, like the numpy view it gets for a Box. A plain
    tuple would be stale forever (Gymnasium's own Text codec has this bug), so decode on access;
    `deepcopy` (what the vector env hands out by default) freezes it into a tuple of str.
    """

    def __init__(self, data: np.ndarray):
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        row = self._data[i]
        end = np.flatnonzero(row < 0)
        row = row[: end[0]] if len(end) else row
        return row.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def __deepcopy__(self, memo) -> tuple[str, ...]:
        return tuple(self)

    def __eq__(self, other: Any) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __repr__(self) -> str:
        return repr(tuple(self))


@_shm.read_from_shared_memory.register(FreeText)
def _read_free_text_shm(space: FreeText, shared_memory, n: int = 1) -> _SharedTexts:
    data = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape((n, space.max_length))
    return _SharedTexts(data)


@_shm.write_to_shared_memory.register(FreeText)
def _write_free_text_shm(space: FreeText, index: int, values: str, shared_memory) -> None:
    size = space.max_length
    codes = np.full(size, -1, dtype=np.int32)
    points = np.frombuffer(values.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)[:size]
    codes[: len(points)] = points
    dest = np.frombuffer(shared_memory.get_obj(), dtype=np.int32)
    np.copyto(dest[index * size:(index + 1) * size], codes)


# ----------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class Step:
    """One Think-Action-Observation step, linked to the step before it (None for the first).

    A linked list rather than a tuple of steps: appending is O(1) and every snapshot along one
    branch shares the same cells.
    """

    parent: Step | None
    action: str
    observation: str
    valid: bool
    tool: str | None = None  # "search", "answer", "visit", ... or None for an invalid action

    def __iter__(self) -> Iterator[Step]:  # oldest first
        chain, node = [], self
        while node is not None:
            chain.append(node)
            node = node.parent
        return reversed(chain)


@dataclass(frozen=True)
class EnvState:
    """Everything that changes during an episode. Envs subclass it to add their own fields.

    Never holds the corpus, the retriever or the tokenizer: those are shared read-only resources
    of the env, so a pickled snapshot is as small as the episode's text.
    """

    task: Task | None = None
    prompt: str = ""
    turn: int = 0
    tool_calls: int = 0
    last: Step | None = None
    terminated: bool = False
    truncated: bool = False
    reward: float = 0.0
    episode_seed: int | None = None
    # Which env made this state (env class, dataset and, for the web env, site, each with a
    # content hash): `restore` refuses a state from elsewhere by comparing this one string, so the
    # check is O(1) and survives pickling into another process. None: made outside an env.
    origin: str | None = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def steps(self) -> list[Step]:
        return list(self.last) if self.last is not None else []

    @property
    def transcript(self) -> str:
        """Prompt followed by every action and observation, exactly as a policy saw them."""
        return self.prompt + "".join(s.action + s.observation for s in self.steps)

    def with_step(self, action: str, observation: str, valid: bool, tool: str | None,
                  **changes: Any) -> EnvState:
        step = Step(self.last, action, observation, valid, tool)
        return replace(self, last=step, **changes)


class SnapshotMismatchError(ValueError):
    """`restore` was given a state made by a different env (another env class, dataset or site).

    Restoring it would pair a task, history and browsing state with resources they were never
    made for (a question answered from another corpus, a URL of another site); that fails much
    later and much less clearly, so it is refused here, naming both origins.
    """


class ForkableEnv(gym.Env[str, str]):
    """Base class of treegym's envs: all episode state lives in `self.state` (an `EnvState`).

    Subclasses implement `reset`/`step` by building new states with `dataclasses.replace`; they
    must never mutate a state in place, or snapshots would change under their holders' feet.
    They set `_origin` (a short string naming the env and its data) and stamp it on every state
    they make, so `restore` can tell a foreign state in O(1).

    Lifecycle: `close()` drops the env's references to its state and resources (see
    `_release`); afterwards `reset`, `step`, `snapshot`, `restore` and `fork` raise
    `gymnasium.error.ClosedEnvironmentError`. Forks made before the close are separate envs and
    keep working.
    """

    metadata = {"render_modes": ["ansi"]}
    state: EnvState
    _origin: str | None = None
    _closed: bool = False

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise ClosedEnvironmentError(
                f"{method}() on a closed {type(self).__name__}: close() released its data and "
                "retriever; make a new env (forks made before close() still work)")

    def snapshot(self) -> EnvState:
        """The current state. O(1): states are immutable, so the reference *is* a snapshot."""
        self._check_open("snapshot")
        return self.state

    def restore(self, state: EnvState) -> None:
        """Make `state` (from `snapshot()` of this env, a fork of it, or an unpickled copy) the
        current state. O(1): one type check and one comparison of the states' origin strings."""
        self._check_restorable(state)
        self.state = state

    def _check_restorable(self, state: Any) -> None:
        self._check_open("restore")
        if not isinstance(state, EnvState):
            raise TypeError(f"restore() takes an EnvState from snapshot(), got {type(state).__name__}")
        if state.origin != self._origin or not isinstance(state, type(self.state)):
            raise SnapshotMismatchError(
                f"cannot restore a {type(state).__name__} taken on "
                f"{state.origin or 'no recorded env (made by hand, or pickled by an older treegym)'} "
                f"into {self._origin or type(self).__name__}: a snapshot only restores into the "
                "env it was taken on (or a fork, or an env made the same way in another process)")

    def fork(self) -> ForkableEnv:
        """A new env with the same state that shares every read-only resource with this one."""
        self._check_open("fork")
        new = copy.copy(self)  # shallow: corpus, retriever, caches, tokenizers are shared
        if getattr(self, "_np_random", None) is not None:
            new._np_random = _copy_rng(self._np_random)  # the only mutable piece
        new.state = self.state
        return new

    def close(self) -> None:
        """Release the episode state and this env's references to shared resources. Idempotent.

        The resources themselves (dataset, index, query cache, site) are shared with forks and
        other envs and stay in the per-process memo (`treegym.envs.resources`) for the next
        `gym.make`, so they are dropped here, not shut down; `resources.clear()` forgets the
        datasets and retrievers, which are freed once no env holds them.
        """
        if not self._closed:
            self._closed = True
            self.state = type(self.state)() if isinstance(getattr(self, "state", None),
                                                          EnvState) else EnvState()
            self._release()
        super().close()

    def _release(self) -> None:
        """Drop the env's own references to its resources (subclasses: datasets, retrievers)."""

    def render(self) -> str:
        return self.state.transcript


# ----------------------------------------------------------------------------------------------
# Wrapper-aware snapshot / restore / fork


_SHARED_WRAPPER_ATTRS = frozenset({"env", "_action_space", "_observation_space", "_metadata",
                                   "_reward_range", "_cached_spec"})


def _stack(env: gym.Env) -> tuple[list[gym.Env], ForkableEnv]:
    wrappers: list[gym.Env] = []
    node = env
    while isinstance(node, gym.Wrapper):
        wrappers.append(node)
        node = node.env
    if not isinstance(node, ForkableEnv) and callable(getattr(node, "__treegym_env__", None)):
        node = node.__treegym_env__()  # a client of a served env (treegym.integrations.openenv)
    if not isinstance(node, ForkableEnv):
        raise TypeError(f"{type(node).__name__} is not a treegym ForkableEnv; only treegym envs can "
                        "be snapshotted and forked")
    return wrappers, node


def _copy_rng(rng: np.random.Generator) -> np.random.Generator:
    """An independent copy of a numpy Generator. Moving the bit generator's state into a new one
    is ~5x faster than `copy.deepcopy` (which goes through pickling), and fork is a hot path."""
    try:
        bit_gen = type(rng.bit_generator)(0)
        bit_gen.state = rng.bit_generator.state
        return np.random.Generator(bit_gen)
    except Exception:  # an exotic bit generator: take the slow, general path
        return copy.deepcopy(rng)


_IMMUTABLE = (bool, int, float, str, bytes, type(None), tuple, frozenset)


def _wrapper_state(wrapper: gym.Env) -> tuple[tuple[str, Any], ...]:
    """A wrapper's own bookkeeping (OrderEnforcing._has_reset, TimeLimit._elapsed_steps, ...)."""
    return tuple((k, v if isinstance(v, _IMMUTABLE) else copy.copy(v)) for k, v in vars(wrapper).items()
                 if k not in _SHARED_WRAPPER_ATTRS and not isinstance(v, gym.Env))


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a wrapped env: the core state plus each wrapper's bookkeeping, outer first."""

    state: EnvState
    wrappers: tuple[tuple[tuple[str, Any], ...], ...] = field(default=())


def snapshot(env: gym.Env) -> Snapshot:
    wrappers, core = _stack(env)
    return Snapshot(core.snapshot(), tuple(_wrapper_state(w) for w in wrappers))


def restore(env: gym.Env, snap: Snapshot | EnvState) -> None:
    wrappers, core = _stack(env)
    if isinstance(snap, EnvState):  # a bare core state: leave the wrappers as they are
        core.restore(snap)
        return
    if not isinstance(snap, Snapshot):
        raise TypeError(f"restore() takes a Snapshot from treegym.snapshot(), got {type(snap).__name__}")
    core._check_restorable(snap.state)  # a foreign state is named before any wrapper mismatch
    if len(snap.wrappers) != len(wrappers):
        raise ValueError(f"snapshot was taken through {len(snap.wrappers)} wrappers, this env has "
                         f"{len(wrappers)}")
    core.restore(snap.state)
    for wrapper, attrs in zip(wrappers, snap.wrappers):
        for key, value in attrs:
            setattr(wrapper, key, value if isinstance(value, _IMMUTABLE) else copy.copy(value))


def fork(env: gym.Env) -> gym.Env:
    """A copy of `env` (with its whole wrapper stack) that can be stepped independently."""
    wrappers, core = _stack(env)
    node: gym.Env = core.fork()
    for wrapper in reversed(wrappers):
        clone = object.__new__(type(wrapper))  # = copy.copy(wrapper), without pickle's detour
        clone.__dict__.update(vars(wrapper))
        for key, value in _wrapper_state(wrapper):
            setattr(clone, key, value)  # _wrapper_state copied mutable values already
        clone.env = node
        node = clone
    return node


def unwrapped_forkable(env: gym.Env) -> ForkableEnv:
    return _stack(env)[1]


__all__: Sequence[str] = ("FreeText", "Step", "EnvState", "ForkableEnv", "Snapshot",
                          "SnapshotMismatchError", "snapshot", "restore", "fork")
