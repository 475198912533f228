"""treegym's envs as a SkyRL-gym text env (`skyrl-gym`): `skyrl_gym.make("treegym", ...)`.

    import skyrl_gym
    import treegym.integrations.skyrl  # registers "treegym"
    env = skyrl_gym.make("treegym", env_config={"max_tool_calls": 2}, extras={"task_id": "s0-train-00000"})
    chat, meta = env.init([{"role": "user", "content": "..."}])
    out = env.step("<search> ... </search>")   # {"observations", "reward", "done", "metadata"}

SkyRL's generator builds one env per trajectory as `skyrl_gym.make(env_class,
env_config=cfg.skyrl_gym[env_class], extras=row)` (row = the dataset row's extra columns plus
`max_turns`), calls `init(prompt_messages)` once and `step(model_text)` until `done`. This class
keeps that contract:

- `env_config` takes SkyRL's Search-R1 env keys — `search_url` (our retriever reads the same
  `/retrieve` API), `topk`; `timeout`, `log_requests` are accepted and ignored — and treegym's
  `gym.make` keys (`env_id`, `data`, `split`, `retriever`, `max_tool_calls`, `reward`,
  `max_obs_chars`). Unknown keys are an error, not a silent default.
- the task comes from `extras`: `task_id` (top level or in `extra_info`), else the question in
  `extra_info.question` (Search-R1 rows carry it), disambiguated by `reward_spec.ground_truth`.
- `max_turns` (SkyRL counts every generation) sets `max_tool_calls = max_turns - 1` unless the
  config sets it: both sides then end the episode at the same turn.
- `init` returns the prompt's system messages plus our reset prompt as the user message (the env
  owns the protocol text); `step` returns the observation delta as a user message, the env
  reward on the last step, and treegym's info as metadata.

To swap SkyRL's Search-R1 recipe onto treegym without touching its data, register this class
under the recipe's env class: `register("search", replace=True)`; or set `env_class: treegym`.
`fork()` (not part of SkyRL's API) branches an episode with `treegym.fork`.
"""

from __future__ import annotations

from typing import Any

from treegym.integrations._requires import require

SKYRL_SPEC = ">=0.4.0,<0.5"
skyrl_gym = require("skyrl_gym", "skyrl-gym", SKYRL_SPEC, "skyrl")

import gymnasium  # noqa: E402  (after the version guard)
from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput  # noqa: E402

import treegym  # noqa: E402  (registers the Gymnasium ids)

MAKE_KEYS = ("data", "split", "retriever", "topk", "max_tool_calls", "reward", "max_obs_chars")
IGNORED_KEYS = ("timeout", "log_requests", "env_class")


def _plain(value: Any) -> dict:
    """A DictConfig (what SkyRL passes) or a mapping, as a plain dict."""
    if value is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            return dict(OmegaConf.to_container(value, resolve=True))
    except ImportError:  # pragma: no cover - skyrl-gym depends on omegaconf
        pass
    return dict(value)


class TreegymTextEnv(BaseTextEnv):
    """A treegym env under SkyRL-gym's `BaseTextEnv` contract. See the module docstring."""

    def __init__(self, env_config: Any = None, extras: Any = None):
        super().__init__()
        cfg, self.extras = _plain(env_config), _plain(extras)
        env_id = cfg.pop("env_id", "TreeSearchQA-v0")
        kwargs = {k: cfg.pop(k) for k in MAKE_KEYS if k in cfg}
        if "search_url" in cfg:
            kwargs.setdefault("retriever", cfg.pop("search_url"))
        for key in IGNORED_KEYS:
            cfg.pop(key, None)
        if cfg:
            raise ValueError(f"unknown treegym env_config keys {sorted(cfg)}; accepted: env_id, "
                             f"search_url, {', '.join(MAKE_KEYS)}")
        if "max_tool_calls" not in kwargs and self.extras.get("max_turns") is not None:
            kwargs["max_tool_calls"] = max(0, int(self.extras["max_turns"]) - 1)
        self.env = gymnasium.make(env_id, **kwargs)
        self.max_turns = self.env.unwrapped.max_tool_calls + 1
        self.task_id = _find_task(self.env.unwrapped, self.extras)
        self.reward = 0.0

    def init(self, prompt: list[dict]) -> tuple[list[dict], dict[str, Any]]:
        obs, info = self.env.reset(options={"task_id": self.task_id})
        system = [m for m in (prompt or []) if isinstance(m, dict) and m.get("role") == "system"]
        return system + [{"role": "user", "content": obs}], {"task_id": info["task_id"]}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = bool(terminated or truncated)
        self.reward = float(reward)
        observations = [{"role": "user", "content": obs}] if obs and not done else []
        return BaseTextEnvStepOutput(observations=observations, reward=float(reward), done=done,
                                     metadata=info)

    def get_metrics(self) -> dict[str, Any]:
        st = self.env.unwrapped.state
        return {"turns": st.turn, "tool_calls": st.tool_calls, "reward": self.reward}

    def fork(self) -> TreegymTextEnv:
        """A branch of this episode (treegym.fork): same state, steps independently."""
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__)
        child.env = treegym.fork(self.env)
        return child

    def close(self) -> None:
        self.env.close()


def _find_task(core: Any, extras: dict) -> str:
    info = extras.get("extra_info") or {}
    task_id = extras.get("task_id") or info.get("task_id")
    if task_id is not None:
        if task_id not in core._index:
            raise ValueError(f"extras name task_id {task_id!r}, which is not in split {core.split!r}")
        return str(task_id)
    question = info.get("question") or extras.get("question")
    if not question:
        raise ValueError("extras name no task: give task_id, or extra_info.question (Search-R1 "
                         "rows carry it) of a task in the env's split")
    matches = [t for t in core.tasks if t.question.strip() == str(question).strip()]
    gold = ((extras.get("reward_spec") or {}).get("ground_truth") or {})
    target = gold.get("target") if isinstance(gold, dict) else gold
    if len(matches) > 1 and target is not None:
        golds = {str(a) for a in ([target] if isinstance(target, str) else list(target))}
        matches = [t for t in matches if golds & set(t.answers)] or matches
    if not matches:
        raise ValueError(f"no task of split {core.split!r} has the question {str(question)[:80]!r}")
    return matches[0].id


def register(name: str = "treegym", *, replace: bool = False) -> None:
    """Register `TreegymTextEnv` in SkyRL-gym as `name` (idempotent). replace=True takes over an
    existing id, e.g. "search" so a Search-R1 recipe's rows run on treegym unchanged."""
    registry = skyrl_gym.registry
    if name in registry:
        if registry[name].entry_point is TreegymTextEnv:
            return
        if not replace:
            raise ValueError(f"SkyRL-gym already has an env {name!r}; pass replace=True to take it over")
        skyrl_gym.envs.registration.deregister(name)
    skyrl_gym.register(id=name, entry_point=TreegymTextEnv)


register()

__all__ = ["TreegymTextEnv", "register", "SKYRL_SPEC"]
