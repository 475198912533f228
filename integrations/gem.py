"""treegym's envs in GEM (axon-rl/gem, `gem-llm`): `gem.make("treegym/TreeSearchQA-v0")`.

    import gem
    import treegym.integrations.gem  # registers treegym/TreeSearchQA-v0 and treegym/TreeWebAgent-v0
    env = gem.make("treegym/TreeSearchQA-v0", max_tool_calls=2)
    obs, info = env.reset(seed=0)
    branch = env.spawn(same_state=True)       # a treegym fork: O(1), steps independently

GEM's env API is Gymnasium's minus spaces (`reset(seed) -> (obs, info)`, `step(a)` -> 5-tuple)
plus three calls its own envs implement only for the *task*: `get_state()`/`set_state()` hold
the question and answer, and `spawn(same_state=True)` starts a new episode on the same task.
Here they mean the *episode*: `get_state()` returns `{"snapshot": treegym.snapshot(env)}` (an
immutable value, O(1), picklable), `set_state()` restores it mid-episode, and
`spawn(same_state=True)` is `treegym.fork` — the branch continues from this step, not from the
start. `spawn(same_state=False, **kwargs)` builds a fresh env with the same configuration
(kwargs override it, e.g. `seed`), as GEM's envs do.

Vector envs: GEM's `SyncVectorEnv` and its thread-pool `AsyncVectorEnv` (`make_vec(...,
async_mode=True)`) both step these envs; threads share the corpus and retriever read-only.
Seeds: `gem.make_vec` gives env i the constructor kwarg `seed = seed + i`; the first `reset()`
without a seed uses it, so a vector env's members start on different, reproducible tasks. Later
seedless resets (GEM's autoreset) draw the next task from the env's own RNG.

Observations are treegym's: the reset prompt, then observation deltas (what a token-level
policy appends). GEM's `ObservationWrapper`s keep their own history and are not forked by
`spawn`; fork the treegym env under them.
"""

from __future__ import annotations

import functools
from typing import Any

from treegym.integrations._requires import require

GEM_SPEC = ">=0.1.0,<0.2"
gem = require("gem", "gem-llm", GEM_SPEC, "gem")

import gymnasium  # noqa: E402  (after the version guard)

import treegym  # noqa: E402  (registers the Gymnasium ids)
from treegym.envs.core import Snapshot  # noqa: E402

ENV_IDS = {"treegym/TreeSearchQA-v0": "TreeSearchQA-v0",
           "treegym/TreeWebAgent-v0": "TreeWebAgent-v0"}


class TreegymGemEnv(gem.Env):
    """A treegym env behind GEM's `Env` interface. See the module docstring.

    Args:
        env_id: the Gymnasium id ("TreeSearchQA-v0" or "TreeWebAgent-v0").
        seed: the first seedless `reset()` uses it (GEM's `make_vec` passes seed + index).
        **kwargs: passed to `gym.make` (data, split, retriever, topk, max_tool_calls, reward, ...).
    """

    def __init__(self, env_id: str = "TreeSearchQA-v0", seed: int | None = 0, **kwargs: Any):
        super().__init__()
        self.treegym_id = env_id
        self.seed = seed
        self.make_kwargs = dict(kwargs)
        self.env = gymnasium.make(env_id, **kwargs)
        self._seeded = False

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        if seed is None and not self._seeded:
            seed = self.seed
        self._seeded = True
        return self.env.reset(seed=seed)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        return self.env.step(action)

    def sample_random_action(self) -> str:
        return self.env.action_space.sample()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Where a generation should stop (Search-R1: `</search>`, `</answer>`)."""
        return self.env.unwrapped.stop_strings

    def get_state(self) -> dict[str, Any]:
        """The whole episode so far, as an immutable treegym snapshot (O(1))."""
        return {"snapshot": treegym.snapshot(self.env)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state()` of this env or of any env with the same configuration."""
        snap = state.get("snapshot") if isinstance(state, dict) else None
        if not isinstance(snap, Snapshot):
            raise TypeError("set_state() takes the dict get_state() returned ({'snapshot': ...}), "
                            f"got {type(state).__name__}")
        treegym.restore(self.env, snap)
        self._seeded = True

    def spawn(self, same_state: bool = False, **kwargs: Any) -> TreegymGemEnv:
        """same_state=True: a fork of this episode (shares corpus and retriever, O(1)).
        same_state=False: a fresh env with this configuration, `kwargs` overriding it."""
        if same_state:
            if kwargs:
                raise ValueError(f"spawn(same_state=True) forks this episode and takes no "
                                 f"configuration overrides, got {sorted(kwargs)}")
            child = object.__new__(type(self))
            child.__dict__.update(self.__dict__)
            child.env = treegym.fork(self.env)
            return child
        config = {"seed": self.seed, **self.make_kwargs, **kwargs}
        return type(self)(self.treegym_id, **config)

    def close(self) -> None:
        self.env.close()


def register() -> None:
    """Register the treegym ids in GEM's registry (idempotent; done on import)."""
    from gem.envs.registration import ENV_REGISTRY

    for gem_id, env_id in ENV_IDS.items():
        if gem_id not in ENV_REGISTRY:
            # positional: GEM's register() has its own `env_id` parameter
            gem.register(gem_id, functools.partial(TreegymGemEnv, env_id))


register()

__all__ = ["TreegymGemEnv", "register", "ENV_IDS", "GEM_SPEC"]
