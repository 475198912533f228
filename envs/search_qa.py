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
    """Search-augmented QA with Search-R1's protocol, forkable at every step.

    ## Description
    The agent answers a question by thinking, searching a local index (`<search> q </search>`)
    and answering (`<answer> a </answer>`), with Search-R1's prompt, parsing, result format and
    invalid-action feedback (Tree-GRPO reuses them unchanged), so a Search-R1 checkpoint and its
    data work as they are. Default data: a seeded synthetic world of 1-3-hop questions with an
    embedded BM25 index, generated on first use under `$TREEGYM_HOME`.

    ## Action Space
    `FreeText(65536)`: any `str`, one generation of the policy. The first `<search>q</search>` or
    `<answer>a</answer>` is executed; text after its closing tag is ignored. Control and
    invisible characters in the argument are removed and whitespace collapsed (the action stays
    valid). No complete tag pair, an argument that is empty after cleaning, a nested tag or an
    action over 65,536 characters gets Search-R1's invalid-action feedback and costs a turn.
    A non-`str` action raises `TypeError` (the state is unchanged).

    ## Observation Space
    `FreeText(max_observation_chars)`: `reset` returns the full prompt (instruction +
    `Question: ...`); `step` returns only the new text, for a search
    `\\n\\n<information>Doc 1(Title: T) text\\nDoc 2(...)...</information>\\n\\n` (the docs cut to
    `max_obs_chars`), for an invalid action the feedback, for the answer `""`. Gold answers are
    never in an observation (they are in `env.unwrapped.task`). Wrap with
    `TranscriptObservation` for the whole transcript.

    ## Rewards
    On the terminating `<answer>` step only: SQuAD-normalised exact match against any gold
    answer (`"em"`, default), token F1 (`"f1"`) or Search-R1's format-shaped EM
    (`"format_em"`, `rewards.format_em`). Every other step: 0.

    ## Starting State
    `reset(seed=s)` draws a task of `split` from the seeded RNG (the same `s`, the same task);
    `options={"task_id": id}` picks one.

    ## Episode End
    Terminated by an `<answer>`. Turns 1..`max_tool_calls` may search; every turn, valid or not,
    counts; the observation of turn `max_tool_calls` ends with a notice that the next action must
    be an answer, and anything else then truncates the episode with reward 0 (Search-R1's
    rollout loop). Stepping a finished episode raises `ResetNeeded`. `info` always has `turn`,
    `tool_calls`, `valid_action`, `task_id`, `remaining_tool_calls`, `tool`.

    ## Arguments
    - `data`: `"synthetic"` (default), `"synthetic:multihop"`, `"synthetic:singlehop"`,
      `"synthetic:<kind>,..."` (optionally `"?seed=N"`), a Search-R1 `.parquet` file, a
      FlashRAG `.jsonl` file, a `treegym world` directory, or a `Dataset`.
    - `split`: the split `reset` draws from (`"train"`; ignored for a one-file dataset, which
      has one split).
    - `retriever`: `"bm25"` (index built over the dataset's corpus), `"lucene"`/`"dense"`/
      `"hybrid"`, an index directory, an `http://host:port/retrieve` URL, or any `Retriever`.
    - `topk`: passages per search (3, Search-R1's). `max_tool_calls`: turns that may search
      before the answer is forced (3, Search-R1's `max_turns`). `reward`: `"em"`, `"f1"` or
      `"format_em"`. `max_obs_chars`: bound on one observation's docs (4096).
    - `check_corpus`: refuse (`CorpusMismatchError`) an index directory or treegym server built
      over another corpus than the dataset's (default True); False uses it anyway.

    Forking: all episode state is one immutable `EnvState`, so `treegym.fork/snapshot/restore`
    are O(1); `restore` refuses a snapshot of another env or dataset (`SnapshotMismatchError`);
    after `close()` the env refuses `reset/step/snapshot/restore/fork`
    (`ClosedEnvironmentError`).

    ## Version History
    - v0: initial version. Later additions that leave v0 episodes unchanged: `close()`, the
      restore check, the corpus check, and titles shown as the corpus writes them (Search-R1's
      rule; wiki-18 keeps its quotes, the synthetic world's titles never had any in observations).
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
