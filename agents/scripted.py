"""Scripted policies — oracle, random, replay — that speak token ids like a model does.

Why: episodes, masks, trees and trainers must be testable without a model, and SFT needs gold
transcripts. These policies implement the same `Policy.generate` contract as the model backends:
they decode the prompt ids, decide an action *text*, cut it after the first stop string (or at
``max_new_tokens``), and return its token ids under their tokenizer (by default the exact
`ByteTokenizer`; pass an `HFTokenizer`/`HFPolicy` to produce a model's own ids, e.g. for SFT data).

Log-probs: a scripted token is chosen with probability 1, so every reported log-prob is 0.0 (and
entropies, when asked, are 0.0). Finish reason: "stop" when the action ended on a stop string,
"length" when cut by ``max_new_tokens``, otherwise "eos" (the script ended its action; no EOS
token is appended, so ids always decode to exactly the action text).
"""

from __future__ import annotations

import numbers
import random
import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from treegym.agents.base import GenRequest, GenResult
from treegym.agents.tokenizer import ByteTokenizer, TextTokenizer, TokenizerBacked

_QUESTION_RE = re.compile(r"Question:\s*(.*)")
_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)
try:  # the env's "answer now" notice; a fixed phrase of it if the env package is absent
    from treegym.envs.protocol import ANSWER_NOW_NOTICE as _NOTICE
    _ANSWER_NOW_HINT = _NOTICE.strip()
except ImportError:  # pragma: no cover
    _ANSWER_NOW_HINT = "I must now give the final answer"


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to and including the earliest-ending stop string."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    if not ends:
        return text, False
    return text[:min(ends)], True


class _ScriptedBase(TokenizerBacked):
    """Shared tokenizer plumbing: subclasses implement ``_action(request, context_text)``."""

    def __init__(self, tokenizer: TextTokenizer | None = None):
        self.tokenizer: TextTokenizer = tokenizer if tokenizer is not None else ByteTokenizer()

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out = []
        for i, req in enumerate(requests):
            if not isinstance(req, GenRequest):
                raise TypeError(f"requests[{i}] is a {type(req).__name__}, not a GenRequest")
            out.append(self._finish(req, self._action(req, self.decode(req.prompt_ids))))
        return out

    def _finish(self, req: GenRequest, text: str) -> GenResult:
        text, stopped = _cut_at_stop(text, req.stop)
        ids = self.encode(text)
        reason = "stop" if stopped else "eos"
        if len(ids) > req.max_new_tokens:
            ids, reason = ids[:req.max_new_tokens], "length"
        n = len(ids)
        return GenResult(token_ids=ids, logprobs=[0.0] * n, text=self.decode(ids),
                         finish_reason=reason,
                         entropies=[0.0] * n if req.want_entropies else None,
                         meta={"scripted": type(self).__name__})

    def _action(self, req: GenRequest, context: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _collect_tasks(source: Any) -> list[Any]:
    if hasattr(source, "splits"):  # a Dataset
        return [t for ts in source.splits.values() for t in ts]
    if hasattr(source, "tasks") and isinstance(getattr(source, "tasks"), Mapping):  # a World
        return [t for ts in source.tasks.values() for t in ts]
    tasks = list(source)
    if not tasks:
        raise ValueError("OraclePolicy needs at least one task")
    return tasks


def read_titles(corpus_path: str | Path) -> dict[str, str]:
    """doc id -> title of a wiki-18 style jsonl corpus (used when tasks carry no hop names)."""
    from treegym.retrieval_index.corpus import iter_corpus

    return {doc_id: title for doc_id, title, _ in iter_corpus(corpus_path)}


def _source_titles(source: Any) -> dict[str, str] | None:
    """doc id -> title of the documents behind `source` (its world's docs, else its corpus), or
    None when it has neither (a plain list of tasks)."""
    world = getattr(source, "world", None) or (source if hasattr(source, "docs") else None)
    if world is not None:
        return {d.doc_id: d.title for d in world.docs}
    corpus = getattr(source, "corpus_path", None)
    return read_titles(corpus) if corpus is not None else None


def _searches_spent(after_question: str) -> int:
    """Searches already made in an episode: one `<information>` block each."""
    return after_question.count("<information>")


def _think(text: str, on: bool) -> str:
    return f"<think> {text} </think>\n" if on else ""


# Both scripted policies take the same arguments in the same order: the tasks first, then
# keyword-only `tokenizer`, `max_searches`, `think`, then their own options.


class OraclePolicy(_ScriptedBase):
    """Follows the gold path: searches the title of each supporting doc in hop order, then answers.

    Args:
        source: tasks, a `Dataset` or a `World`. The hop titles come from
            ``task.meta["hops"]`` (the synthetic world stores them), else from ``titles``,
            else from the dataset's world or corpus.
        tokenizer: whose ids to return (default `ByteTokenizer`; pass a model's for SFT data).
        max_searches: cap on searches (pass the env's ``max_tool_calls``); an answer-now notice
            from the env also makes it answer.
        think: write a short ``<think>`` before each action.
        titles: doc id -> title, when the source has no world or corpus.

    The oracle recognises the question in the decoded prompt and counts its own searches in the
    transcript, so it is stateless and works on any fork of an episode. This is the ceiling of
    the env and the SFT data source.
    """

    def __init__(self, source: Any, *, tokenizer: TextTokenizer | None = None,
                 max_searches: int | None = None, think: bool = False,
                 titles: Mapping[str, str] | None = None):
        super().__init__(tokenizer)
        tasks = _collect_tasks(source)
        self.by_question: dict[str, Any] = {}
        for t in tasks:
            self.by_question.setdefault(t.question.strip(), t)
        self.think = think
        self.max_searches = max_searches
        self._titles = dict(titles) if titles is not None else None
        self._source = source

    def _title_map(self) -> dict[str, str]:
        if self._titles is None:
            self._titles = _source_titles(self._source)
            if self._titles is None:
                raise ValueError("OraclePolicy: tasks carry no meta['hops'] and no titles were "
                                 "given; pass titles={doc_id: title} or a Dataset with a corpus")
        return self._titles

    def hops(self, task: Any) -> list[str]:
        hops = (task.meta or {}).get("hops") if hasattr(task, "meta") else None
        if hops and len(hops) == len(task.supporting_ids):
            return [str(h) for h in hops]
        titles = self._title_map()
        missing = [d for d in task.supporting_ids if d not in titles]
        if missing:
            raise ValueError(f"OraclePolicy: no title for supporting doc(s) {missing} of task "
                             f"{task.id!r}")
        return [titles[d] for d in task.supporting_ids]

    def find_task(self, context: str) -> tuple[Any, int]:
        """The task whose question is in ``context``, and where the question ends."""
        for m in _QUESTION_RE.finditer(context):
            task = self.by_question.get(m.group(1).strip())
            if task is not None:
                return task, m.end()
        for question, task in self.by_question.items():  # slow path: odd prompt formats
            pos = context.find(question)
            if pos >= 0:
                return task, pos + len(question)
        raise ValueError("OraclePolicy: none of its tasks' questions is in the prompt "
                         f"(prompt starts {context[:120]!r})")

    def _action(self, req: GenRequest, context: str) -> str:
        task, q_end = self.find_task(context)
        after = context[q_end:]
        # Which hops were already searched (by anyone: the oracle may continue a fork of another
        # policy's episode), and how many searches were spent (one <information> block each).
        searched = {q.strip() for q in _SEARCH_RE.findall(after)}
        todo = [h for h in self.hops(task) if h.strip() not in searched]
        budget_left = self.max_searches is None or _searches_spent(after) < self.max_searches
        if todo and budget_left and _ANSWER_NOW_HINT not in after:
            hop = todo[0]
            return f"{_think(f'I need to find {hop}.', self.think)}<search> {hop} </search>"
        return f"{_think('I have the answer.', self.think)}<answer> {task.answers[0]} </answer>"


class RandomPolicy(_ScriptedBase):
    """Random but well-formed actions: a search for 1-3 words or an answer of 1-2 words.

    Args (the oracle's, in the same order, then its own):
        source: optional tasks, `Dataset` or `World`; the titles of all its documents (world
            or corpus, the same for every task: no gold path leaks) join the words a search or
            answer draws from, so a random search can hit a real page. Without it, words come
            from the question in the prompt only.
        tokenizer: whose ids to return (default `ByteTokenizer`).
        max_searches: answer once this many searches were made (None: no cap).
        think: write a short ``<think>`` before each action.
        seed: the policy seed. An int as the first positional argument is still read as the
            seed (the old signature), with a DeprecationWarning.
        answer_prob: chance of answering instead of searching.
        vocabulary: extra words to draw from.

    Deterministic given the policy seed, the request seed and the prompt, so forks and replays
    reproduce.
    """

    def __init__(self, source: Any = None, *, tokenizer: TextTokenizer | None = None,
                 max_searches: int | None = None, think: bool = False, seed: int = 0,
                 answer_prob: float = 0.3, vocabulary: Iterable[str] = ()):
        if isinstance(source, numbers.Integral) and not isinstance(source, bool):
            warnings.warn("RandomPolicy(seed) is deprecated: the first argument is `source`, as "
                          "for OraclePolicy; pass RandomPolicy(seed=...)", DeprecationWarning,
                          stacklevel=2)
            source, seed = None, int(source)
        super().__init__(tokenizer)
        if not 0 <= answer_prob <= 1:
            raise ValueError(f"answer_prob must be in [0, 1], got {answer_prob}")
        self.seed = int(seed)
        self.max_searches = max_searches
        self.think = think
        titles = _source_titles(source) if source is not None else None
        self.vocabulary = [w for w in vocabulary if w] + sorted(set((titles or {}).values()))
        self.answer_prob = answer_prob

    def _action(self, req: GenRequest, context: str) -> str:
        key = f"{self.seed}/{req.seed}/{zlib.crc32(repr(req.prompt_ids).encode())}"
        rng = random.Random(key)
        m = list(_QUESTION_RE.finditer(context))
        question = m[-1].group(1) if m else context[-200:]
        words = re.findall(r"[A-Za-z0-9]+", question) + self.vocabulary or ["nothing"]
        spent = _searches_spent(context[m[-1].end():] if m else context)
        if rng.random() < self.answer_prob or (self.max_searches is not None
                                               and spent >= self.max_searches):
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 2)))
            return f"{_think('I guess.', self.think)}<answer> {answer} </answer>"
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        return f"{_think('I try a search.', self.think)}<search> {query} </search>"


class ReplayPolicy(_ScriptedBase):
    """Replays recorded actions (token ids), one per request, in order.

    For tests and debugging: replaying an episode's actions through a fresh env must reproduce
    it. ``logprobs`` (optional, one list per action) are returned as recorded, else 0.0. The
    recorded ids are returned as they are (stop strings are not re-applied: the recording is the
    truth); ``max_new_tokens`` still cuts them.
    """

    def __init__(self, actions: Sequence[Sequence[int]], *,
                 logprobs: Sequence[Sequence[float]] | None = None,
                 tokenizer: TextTokenizer | None = None):
        super().__init__(tokenizer)
        self.actions = [list(map(int, a)) for a in actions]
        if logprobs is not None:
            if len(logprobs) != len(self.actions) or any(
                    len(lp) != len(a) for lp, a in zip(logprobs, self.actions)):
                raise ValueError("ReplayPolicy: logprobs must have one value per recorded token")
        self.logprobs = None if logprobs is None else [list(map(float, lp)) for lp in logprobs]
        self.cursor = 0

    @classmethod
    def from_episode(cls, episode: Any, tokenizer: TextTokenizer | None = None) -> ReplayPolicy:
        return cls([t.action_ids for t in episode.turns],
                   logprobs=[t.action_logprobs for t in episode.turns], tokenizer=tokenizer)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out = []
        for i, req in enumerate(requests):
            if not isinstance(req, GenRequest):
                raise TypeError(f"requests[{i}] is a {type(req).__name__}, not a GenRequest")
            if self.cursor >= len(self.actions):
                raise RuntimeError(f"ReplayPolicy: all {len(self.actions)} recorded actions were "
                                   "already replayed")
            ids = self.actions[self.cursor]
            lps = self.logprobs[self.cursor] if self.logprobs else [0.0] * len(ids)
            self.cursor += 1
            reason = "eos"
            if len(ids) > req.max_new_tokens:
                ids, lps, reason = ids[:req.max_new_tokens], lps[:req.max_new_tokens], "length"
            else:
                text = self.decode(ids)
                if any(s in text for s in req.stop if s):
                    reason = "stop"
            out.append(GenResult(token_ids=list(ids), logprobs=list(lps), text=self.decode(ids),
                                 finish_reason=reason,
                                 entropies=[0.0] * len(ids) if req.want_entropies else None,
                                 meta={"scripted": "ReplayPolicy"}))
        return out


__all__ = ["OraclePolicy", "RandomPolicy", "ReplayPolicy", "read_titles"]
