"""The skeleton every treegym tool-use env shares: Search-R1's turn rules on a forkable state.

`TreeSearchQA-v0` and `TreeWebAgent-v0` differ only in their tools (search vs search/visit/click/
next_page), their prompt and their state's extra fields; the episode rules — one step per
generation, invalid actions cost a turn, the answer-now notice after `max_tool_calls` turns, a
non-answer at the forced turn truncates with reward 0, reward on the terminating step — live here
once, so the two envs cannot drift apart.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

from gymnasium.error import ResetNeeded

from treegym.envs.core import EnvState, ForkableEnv, FreeText
from treegym.envs.protocol import (ANSWER_NOW_NOTICE, INFO_CLOSE, INFO_OPEN, INVALID_ACTION_FEEDBACK,
                                   MAX_ACTION_CHARS, ParsedAction)
from treegym.envs.rewards import REWARDS, exact_match, f1_score, format_em

MAX_TOPK = 100


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int within [low, high], or a ValueError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


class ToolEnv(ForkableEnv):
    """Base of the tool-use envs. Subclasses set `STOP_STRINGS` and `STATE`, and implement
    `_make_prompt(question)`, `_parse(action)`, `_use_tool(state, parsed)` and `_response`."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    STOP_STRINGS: tuple[str, ...] = ()
    STATE: type[EnvState] = EnvState
    MAX_TOPK: int = MAX_TOPK
    # Texts an env may word for its own tools (the web env speaks of "tool calls", not "searches").
    INVALID_ACTION_FEEDBACK: str = INVALID_ACTION_FEEDBACK
    ANSWER_NOW_NOTICE: str = ANSWER_NOW_NOTICE

    # -- construction helpers -------------------------------------------------------------------
    def _init_options(self, *, topk: int, max_tool_calls: int, max_obs_chars: int, reward: str,
                      render_mode: str | None, min_obs_chars: int = 1) -> None:
        self.topk = check_int("topk", topk, 1, self.MAX_TOPK)
        self.max_tool_calls = check_int("max_tool_calls", max_tool_calls, 0)
        self.max_obs_chars = check_int("max_obs_chars", max_obs_chars, min_obs_chars)
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; expected one of {', '.join(REWARDS)}")
        self.reward_name = reward
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, "
                             f"got {render_mode!r}")
        self.render_mode = render_mode
        # With no tool budget at all, the very first turn must answer: say so in the prompt.
        self._prompt_suffix = self.ANSWER_NOW_NOTICE if self.max_tool_calls == 0 else ""

    def _init_origin(self, extra: str = "") -> None:
        """Stamp for this env's states (`EnvState.origin`): the env class and the dataset's name
        and content hash (plus `extra`, e.g. the web env's site), so `restore` refuses a
        snapshot from another env or dataset with one string comparison."""
        name = getattr(self.dataset, "name", type(self.dataset).__name__)
        fingerprint = getattr(self.dataset, "fingerprint", None)
        digest = f" sha256:{fingerprint()[:12]}" if callable(fingerprint) else ""
        self._origin = f"{type(self).__name__}(dataset {name!r}{digest}{extra})"

    def _init_spaces(self, longest_question: int, origin_extra: str = "") -> None:
        """Free-text spaces bounded by the longest prompt and the longest observation delta, and
        the first (empty) state. `longest_question`: the most characters a task adds to
        `_make_prompt("")`. Call last in `__init__`, once `self.dataset` is set."""
        self._init_origin(origin_extra)
        longest_prompt = len(self._make_prompt("")) + longest_question + len(self.ANSWER_NOW_NOTICE)
        longest_step = max(len(INFO_OPEN) + self.max_obs_chars + len(INFO_CLOSE),
                           len(self.INVALID_ACTION_FEEDBACK)) + len(self.ANSWER_NOW_NOTICE)
        self.max_observation_chars = max(longest_prompt, longest_step)
        self.observation_space = FreeText(self.max_observation_chars)
        self.action_space = FreeText(MAX_ACTION_CHARS)
        self.state = self.STATE(origin=self._origin)

    def _release(self) -> None:
        self.dataset = self.retriever = None
        self.tasks, self._index = (), {}

    # -- public read-only views -----------------------------------------------------------------
    @property
    def task(self):
        """The current task (gold answers included: never shown to the policy)."""
        return self.state.task

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.STOP_STRINGS

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode. The task comes from `options["task_id"]`, else from the seeded RNG
        (so `reset(seed=s)` always gives the same task). Returns the full prompt."""
        self._check_open("reset")
        super().reset(seed=seed)
        options = dict(options or {})
        task_id = options.pop("task_id", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; accepted: 'task_id'")
        if task_id is not None:
            if task_id not in self._index:
                raise ValueError(f"unknown task_id {task_id!r} in split {self.split!r} "
                                 f"({len(self.tasks)} tasks, e.g. {self.tasks[0].id!r})")
            index = self._index[task_id]
        else:
            index = int(self.np_random.integers(len(self.tasks)))
        task = self.tasks[index]
        prompt = self._task_prompt(task) + self._prompt_suffix
        self.state = self.STATE(task=task, prompt=prompt, episode_seed=seed, origin=self._origin)
        return prompt, self._info(True, None, None)

    def step(self, action: str):
        self._check_open("step")
        st = self.state
        if st.task is None:
            raise ResetNeeded("call reset() before step()")
        if st.done:
            raise ResetNeeded("this episode has ended (terminated or truncated); call reset() first")
        parsed = self._parse(action)  # TypeError for a non-str action, state unchanged
        turn = st.turn + 1
        changes: dict[str, Any] = {}
        terminated = truncated = False
        reward = 0.0
        error = None
        if parsed.valid and parsed.tool == "answer":
            valid, tool, observation, terminated = True, "answer", "", True
            reward = self._reward(st, action, parsed.argument)
        elif turn > self.max_tool_calls:  # the forced-answer turn, and no answer
            valid, tool, observation, truncated = False, None, "", True
        elif parsed.valid:
            valid, tool = True, parsed.tool
            changes["tool_calls"] = st.tool_calls + 1
            observation, error, tool_changes = self._use_tool(st, parsed)
            changes.update(tool_changes)
        else:
            valid, tool, observation = False, None, self.INVALID_ACTION_FEEDBACK
        if turn == self.max_tool_calls and not (terminated or truncated):
            observation += self.ANSWER_NOW_NOTICE
        self.state = st.with_step(action, observation, valid, tool, turn=turn,
                                  terminated=terminated, truncated=truncated, reward=reward,
                                  **changes)
        return observation, reward, terminated, truncated, self._info(valid, tool, error)

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self.state.transcript
        return None

    # -- rewards and info -----------------------------------------------------------------------
    def _info(self, valid: bool, tool: str | None, error: str | None) -> dict[str, Any]:
        st = self.state
        info = {"turn": st.turn, "tool_calls": st.tool_calls, "valid_action": valid,
                "task_id": st.task.id if st.task is not None else None,
                "remaining_tool_calls": max(0, self.max_tool_calls - st.turn), "tool": tool}
        info.update(self._extra_info(error))
        return info

    def _extra_info(self, error: str | None) -> dict[str, Any]:
        return {}

    def _reward(self, st: EnvState, action: str, answer: str) -> float:
        golds = st.task.answers
        scorers: dict[str, Callable[[], float]] = {
            "em": lambda: exact_match(answer, golds),
            "f1": lambda: f1_score(answer, golds),
            "format_em": lambda: format_em(self._response(st, action), answer, golds),
        }
        return scorers[self.reward_name]()

    # -- what subclasses provide ----------------------------------------------------------------
    def _make_prompt(self, question: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _task_prompt(self, task) -> str:
        """The prompt of one task; the web env adds the task's start URL."""
        return self._make_prompt(task.question)

    def _parse(self, action: str) -> ParsedAction:  # pragma: no cover - abstract
        raise NotImplementedError

    def _use_tool(self, st: EnvState, parsed: ParsedAction) -> tuple[str, str | None, dict[str, Any]]:
        """(observation, error message or None, state changes) for one valid tool call."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _response(self, st: EnvState, final_action: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


__all__ = ["ToolEnv", "check_int", "MAX_TOPK"]
