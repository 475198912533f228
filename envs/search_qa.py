"""`TreeSearchQA-v0`: Search-R1's search-and-answer protocol as a forkable Gymnasium env.

One step is one generation of the policy. The first `<search>q</search>` or `<answer>a</answer>`
in it is executed (see `protocol.parse_action`); a search returns the top-k passages as
`\\n\\n<information>Doc 1(Title: T) text\\n...</information>\\n\\n`, anything without a valid
action returns Search-R1's fixed invalid-action feedback. Episode rule (Search-R1's rollout
loop): turns 1..max_tool_calls may search; every turn, valid or not, counts; the observation of
turn `max_tool_calls` ends with a notice that the next action must be an answer; at turn
max_tool_calls+1 anything but an answer ends the episode truncated with reward 0. The reward
(em / f1 / format_em) arrives on the terminating step only.

All episode state is one immutable `EnvState` (treegym.envs.core), so `treegym.fork(env)` and
`treegym.snapshot(env)` are O(1) and a snapshot pickles to the size of the episode's text. The
dataset and the retriever are shared, read-only, per process (`resources.py`).
"""

from __future__ import annotations

from typing import Any

from treegym.envs import resources
from treegym.envs.core import EnvState
from treegym.envs.protocol import (ANSWER_NOW_NOTICE, STOP_STRINGS, ParsedAction, format_docs,
                                   information, make_prompt, parse_action)
from treegym.envs.tool_env import ToolEnv

DEFAULT_MAX_OBS_CHARS = 4096  # ~ Search-R1's 500-token observation cut; 3 wiki-18 passages fit


class TreeSearchQAEnv(ToolEnv):
    """Search-augmented QA (Search-R1 / Tree-GRPO protocol). See the module docstring.

    Args:
        data: "synthetic" (default), "synthetic:multihop", "synthetic:singlehop" (optionally
            "?seed=N"), a Search-R1 parquet file, a FlashRAG jsonl file, a `treegym world`
            directory, or a `Dataset`.
        split: which split's tasks `reset` draws from.
        retriever: "bm25" (index built over the dataset's corpus), "lucene"/"dense"/"hybrid",
            an index directory, an `http://host:port/retrieve` URL, or any `Retriever`.
        topk: passages per search (Search-R1: 3).
        max_tool_calls: turns that may search before the answer is forced (Search-R1 max_turns).
        reward: "em" (SQuAD exact match, any gold), "f1" (token F1) or "format_em" (Search-R1's
            format-shaped EM, see `rewards.format_em`).
        max_obs_chars: bound on the passages' text in one observation (cut inside the tags).
        check_corpus: refuse (`CorpusMismatchError`) an index directory or treegym server built over
            another corpus than the dataset's; False uses it anyway.
    """

    STOP_STRINGS = STOP_STRINGS
    STATE = EnvState

    def __init__(self, data: Any = "synthetic", split: str = "train", retriever: Any = "bm25",
                 topk: int = 3, max_tool_calls: int = 3, reward: str = "em",
                 max_obs_chars: int = DEFAULT_MAX_OBS_CHARS, render_mode: str | None = None,
                 check_corpus: bool = True):
        self._init_options(topk=topk, max_tool_calls=max_tool_calls, max_obs_chars=max_obs_chars,
                           reward=reward, render_mode=render_mode)
        self.dataset = resources.get_dataset(data)
        view = resources.get_split(self.dataset, split)  # ValueError naming the splits if unknown
        if not view.tasks:
            raise ValueError(f"split {split!r} of dataset {getattr(self.dataset, 'name', data)!r} has no tasks")
        self.split = split
        self.tasks = view.tasks
        self._index = view.index
        self.retriever = resources.get_retriever(retriever, self.dataset, check_corpus=check_corpus)

        self._init_spaces(view.longest_question)

    # -- the tool -------------------------------------------------------------------------------
    def _make_prompt(self, question: str) -> str:
        return make_prompt(question)

    def _parse(self, action: str) -> ParsedAction:
        return parse_action(action)

    def _use_tool(self, st: EnvState, parsed: ParsedAction) -> tuple[str, str | None, dict[str, Any]]:
        return self._search(parsed.argument), None, {}

    def _search(self, query: str) -> str:
        hits = self.retriever.search([query], self.topk)[0]
        return information(format_docs(hits[: self.topk]), self.max_obs_chars)

    @staticmethod
    def _response(st: EnvState, final_action: str) -> str:
        """The trajectory as Search-R1's format check sees it: each action cut after its executed
        closing tag (Search-R1 cuts generations at the stop string), our answer-now notice left
        out (Search-R1 has none, it would count as stray text)."""
        actions = [s.action for s in st.steps] + [final_action]
        observations = [s.observation.replace(ANSWER_NOW_NOTICE, "") for s in st.steps] + [""]
        out = []
        for action, observation in zip(actions, observations):
            end = parse_action(action).end
            out.append((action[:end] if end else action) + observation)
        return "".join(out)


__all__ = ["TreeSearchQAEnv", "DEFAULT_MAX_OBS_CHARS"]
