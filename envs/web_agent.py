"""`TreeWebAgent-v0`: an offline web agent (search, visit, click, scroll, answer) over a local site.

Why: Tree-GRPO's web-agent setting (GAIA, WebWalkerQA) calls paid search and page-reading APIs.
Here the "web" is a `Site` (the synthetic world rendered as a wiki, or any folder of HTML files)
and search is a local index over its pages, so web-agent RL is free, offline, reproducible and,
like TreeSearchQA-v0, forkable at every step. The tool tags follow Search-R1's conventions and
share its parser (`protocol.parse_action`); the episode rules are `ToolEnv`'s, shared with the
QA env. The env's docs (Gymnasium's sections) are `TreeWebAgentEnv`'s docstring.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from treegym.envs import resources
from treegym.envs.core import EnvState
from treegym.envs.data.loaders import GOLD_PATH_KEY, START_KEY
from treegym.envs.protocol import ParsedAction, format_docs, information, parse_action
from treegym.envs.tool_env import ToolEnv
from treegym.envs.site import Page, PageError, Site
from treegym.paths import treegym_home
from treegym.retrieval_index.base import Hit

DEFAULT_MAX_OBS_CHARS = 2048  # ~ Search-R1's 500-token observation cut
DEFAULT_MAX_TOOL_CALLS = 5    # Tree-GRPO's web-agent setting
MAX_TOPK = 20
REWARDS = ("f1", "em", "format_em")

TOOLS: tuple[str, ...] = ("search", "visit", "click", "next_page", "answer")
STOP_STRINGS: tuple[str, ...] = ("</search>", "</visit>", "</click>", "</answer>", "<next_page>")

WEB_INSTRUCTION = (
    "Answer the given question by browsing a website. You must conduct reasoning inside <think> "
    "and </think> first every time you get new information. After reasoning, you can use one tool "
    "per turn: <search> query </search> searches the site and returns page titles, URLs and short "
    "snippets; <visit> URL </visit> opens a page; <click> n </click> opens link [n] of the current "
    "page (links are written [text][n]) or, right after a search, result Doc n; <next_page> shows "
    "the next part of a long page. Results "
    "come back between <information> and </information>. If you find no further external "
    "knowledge needed, you can directly provide the answer inside <answer> and </answer>, without "
    "detailed illustrations. For example, <answer> Beijing </answer>. Question: "
)

# Search-R1's invalid-action feedback (protocol.INVALID_ACTION_FEEDBACK), extended to the web tools.
INVALID_ACTION_FEEDBACK = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to open a page, I should put its URL between <visit> and "
    "</visit>, or a link number of the current page between <click> and </click>; <next_page> "
    "shows more of the current page. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)

ANSWER_NOW_NOTICE = (
    "\nI have used all my tool calls. I must now give the final answer between <answer> and "
    "</answer>.\n"
)

_FOOTER = "\n(more of this page: <next_page>)"
_NEXT_RE = re.compile(r"<next_page\s*/?>")
_OPEN_RE = re.compile(r"<(?:search|visit|click|answer)>")


START_LINE = "Start page: "


def make_prompt(question: str, start: str | None = None) -> str:
    """The instruction, `Question: {question}` and, for a task with a start URL, a line naming
    it (`Start page: /docs/index.html`), as a web agent's task names its website. Tasks without
    one (the synthetic world's) get exactly the prompt the committed web warm start learned."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if start is None:
        return f"{WEB_INSTRUCTION}{question}\n"
    return f"{WEB_INSTRUCTION}{question}\n{START_LINE}{start}\n"


def task_start(task: Any) -> str | None:
    """The task's start URL (`start` in its question file), or None."""
    return (getattr(task, "meta", None) or {}).get(START_KEY)


def task_gold_path(task: Any) -> tuple[str, ...]:
    """The task's gold browsing path (`gold_path` in its question file), or ()."""
    return tuple((getattr(task, "meta", None) or {}).get(GOLD_PATH_KEY) or ())


def parse_web_action(text: str) -> ParsedAction:
    """`protocol.parse_action` over the web tools, plus the bare `<next_page>` tag.

    The first tool tag decides, as in Search-R1: a `<next_page>` that comes before any other
    opening tag is a scroll; otherwise the tag-pair parser decides (and reports a
    `<next_page>` inside another tool's argument as nested).
    """
    parsed = parse_action(text, tools=TOOLS)  # TypeError for non-str; O(1) refusal when huge
    if parsed.reason == "action_too_long":
        return parsed
    scroll = _NEXT_RE.search(text)
    if scroll is not None:
        other = _OPEN_RE.search(text, 0, scroll.start())
        if other is None:
            return ParsedAction("next_page", "", True, "ok", scroll.end())
    if parsed.tool == "next_page" and parsed.reason in ("ok", "empty_argument"):
        return ParsedAction("next_page", "", True, "ok", parsed.end or len(text))
    return parsed


@dataclass(frozen=True)
class WebState(EnvState):
    """EnvState plus the browser: current page URL, which part of it is shown, pages opened.

    `visited` is a tuple in first-visit order. It grows by at most one URL per turn, so it holds
    at most `max_tool_calls` entries; copying it on a step is O(max_tool_calls), i.e. O(1) for the
    episode lengths of this protocol, and snapshots stay a single reference.
    """

    url: str | None = None
    part: int = 0
    visited: tuple[str, ...] = ()
    results: tuple[str, ...] | None = None  # URLs of the search results on screen (None: none are)


# ----------------------------------------------------------------------------------------------
# Shared read-only resources: sites and their search indexes, one per process per spec.

_lock = threading.RLock()
_sites: dict[Any, tuple[Any, Site]] = {}


def load_site(spec: Any, dataset: Any = None) -> Site:
    """The `Site` for `spec` ("synthetic": the dataset's world; a folder; a `Site`), memoised."""
    if isinstance(spec, Site):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"site must be 'synthetic', a folder of HTML files or a Site, got "
                         f"{type(spec).__name__}")
    text = os.fspath(spec)
    if text.startswith("synthetic"):
        world = getattr(dataset, "world", None)
        if world is None:
            raise ValueError(f"site={text!r} renders the synthetic world of `data`, but dataset "
                             f"{getattr(dataset, 'name', dataset)!r} has no world; pass "
                             "data='synthetic' (or a `treegym world` directory) or site=DIR")
        with _lock:
            key = ("world", id(world))
            if key not in _sites:
                _sites[key] = (world, Site.from_world(world))  # holding world keeps its id unique
            return _sites[key][1]
    folder = Path(text)
    if not folder.is_dir():
        raise ValueError(f"unknown site {text!r}; expected 'synthetic', a folder of HTML files, a "
                         "`treegym world` directory (with site/) or a Site object")
    if (folder / "world.json").is_file():  # a `treegym world` directory
        if (folder / "site").is_dir():
            folder = folder / "site"
        elif getattr(dataset, "world", None) is not None:
            return load_site("synthetic", dataset)
    key = ("dir", str(folder.resolve()))
    with _lock:
        if key not in _sites:
            _sites[key] = (None, Site.from_dir(folder))
        return _sites[key][1]


def site_retriever(site: Site, spec: Any = "bm25"):
    """A query-cached retriever whose doc ids are the site's URLs.

    For an index kind ("bm25", ...), the pages are written as a wiki-18 corpus under
    `$TREEGYM_HOME/sites/<fingerprint>/corpus.jsonl` and indexed through
    `treegym.retrieval_index.default_index` (cached by corpus hash). Other forms (index folder,
    URL, Retriever object) are passed to `resources.get_retriever` as they are.
    """
    if isinstance(spec, str) and spec in resources.INDEX_KINDS:
        with _lock:
            corpus = treegym_home() / "sites" / site.fingerprint()[:16] / "corpus.jsonl"
            if not corpus.is_file():
                site.write_corpus(corpus)
        return resources.get_retriever(spec, SimpleNamespace(corpus_path=corpus, name=site.name))
    return resources.get_retriever(spec)


def _dataset_for(site: Any, data: Any) -> Any:
    if data is not None:
        return resources.get_dataset(data)
    if isinstance(site, (str, os.PathLike)):
        text = os.fspath(site)
        if text.startswith("synthetic"):
            return resources.get_dataset(text)
        if (Path(text) / "world.json").is_file():
            return resources.get_dataset(text)
    raise ValueError(f"site={site!r} has no tasks of its own; pass data= (a Search-R1 parquet, a "
                     "FlashRAG jsonl, a `treegym world` directory or a Dataset) with questions "
                     "about it")


# ----------------------------------------------------------------------------------------------


class TreeWebAgentEnv(ToolEnv):
    """Offline web agent: answer a question by searching and browsing a local website.

    ## Description
    The "web" is a `Site`: the synthetic world rendered as a wiki (home page, category lists,
    one page per entity, links between related entities), any folder of HTML files (converted
    with html2text and held in memory), or a `treegym world` directory's `site/`. Search is a
    local index over the pages. Answers sit on pages, not in search snippets, so an agent has
    to open pages and follow links, as in Tree-GRPO's web setting (GAIA, WebWalkerQA).

    Your own site and questions: `gym.make("TreeWebAgent-v0", site="my_site/",
    data="questions.jsonl")`, one JSON object a line::

        {"id": "q1", "question": "Who maintains the parser?", "golden_answers": ["Ada"],
         "start": "/index.html", "gold_path": ["/index.html", "/team.html"]}

    `start` (optional) is named in the prompt (`Start page: /index.html`); `gold_path`
    (optional) is the pages a solver opens, in order, for `oracle_actions` and SFT data. Both
    must be pages of the site (checked at `gym.make`). A Search-R1 parquet takes the same two
    columns. A dataset read from one file has one split and loads without `split=`.

    ## Action Space
    `FreeText(65536)`: any `str`, one generation of the policy. The first tool tag decides:
    - `<search> q </search>`: the top-k pages as `Doc i(Title: T, URL: u) snippet`. Snippets
      are short fact-free summaries, so answers come from reading pages.
    - `<visit> url </visit>`: open a page (`/wiki/x.html`, relative to the current page, or
      `http://site.local/...`).
    - `<click> n </click>`: open link `[text][n]` of the current page or, right after a search,
      result `Doc n` (a results page is a page of links, as in a browser; it also spares the
      agent copying a URL it was just shown).
    - `<next_page>`: the next part of the current page (pages longer than `max_obs_chars` come
      in parts). A bare tag, so it doubles as its own stop string.
    - `<answer> a </answer>`: end the episode.
    Control and invisible characters in an argument are removed (the action stays valid); an
    action with no complete tag, an empty or nested argument, or over 65,536 characters gets a
    fixed invalid-action feedback instead. A URL or link that leads nowhere (unknown, off-site,
    `file://`, `../` out of the site, bad number) gets an `Error: ...` observation; no step
    reads a file.

    ## Observation Space
    `FreeText(max_observation_chars)`: `reset` returns the full prompt (instruction, `Question:
    ...` and, for a task with one, the start page); `step` returns only the new text, a page
    part or the results inside `\\n\\n<information>...</information>\\n\\n`, at most
    `max_obs_chars` characters of it, or the invalid-action feedback. Wrap with
    `TranscriptObservation` for the whole transcript.

    ## Rewards
    On the terminating `<answer>` step only: token F1 against the best gold answer (`"f1"`,
    default, the paper's web metric), SQuAD exact match (`"em"`) or Search-R1's format-shaped EM
    (`"format_em"`). Every other step: 0.

    ## Starting State
    `reset(seed=s)` draws a task of `split` from the seeded RNG (`options={"task_id": id}`
    picks one); no page is open.

    ## Episode End
    Terminated by an `<answer>`. Every step (tool call or invalid action) costs a turn; the
    observation of turn `max_tool_calls` tells the agent to answer, and any non-answer after it
    truncates the episode with reward 0. Stepping a finished episode raises `ResetNeeded`.

    ## Arguments
    - `site`: `"synthetic"` (the synthetic world of `data` as a wiki; default), a folder of HTML
      files, a `treegym world` directory (its `site/`), or a `Site`.
    - `data`: the questions. Default: the synthetic world (`site` is used as the data spec, e.g.
      `"synthetic?seed=1"`), or a world directory's own. Also a FlashRAG-style `.jsonl` or
      Search-R1 `.parquet` (with optional `start`/`gold_path`), a directory of
      `{train,dev,test}` files, or a `Dataset`.
    - `split`: the split `reset` draws from (`"train"`; ignored for a one-file dataset).
    - `retriever`: `"bm25"` (an index over the site's pages; default) or another index kind, an
      index directory, a retrieval-server URL, or any Retriever whose doc ids are URLs.
    - `topk`: results per search (3). `max_tool_calls`: turns before the answer is forced (5,
      Tree-GRPO's web setting). `reward`: `"f1"`, `"em"` or `"format_em"`.
    - `max_obs_chars`: characters of one observation (2048); longer pages come in parts.

    Forking: the browsing state (page, part, visited pages, results on screen) lives in the
    immutable `WebState`, so `treegym.fork/snapshot/restore` are O(1); `restore` refuses a
    snapshot of another env, dataset or site (`SnapshotMismatchError`); after `close()` the env
    refuses `reset/step/snapshot/restore/fork` (`ClosedEnvironmentError`).

    ## Version History
    - v0: initial version. Later additions that leave v0 episodes unchanged: a task's `start`
      URL in the prompt (tasks without one keep the v0 prompt), `gold_path`, one-file datasets
      without `split=`, `close()` and the restore check.
    """

    STOP_STRINGS = STOP_STRINGS
    STATE = WebState
    MAX_TOPK = MAX_TOPK
    INVALID_ACTION_FEEDBACK = INVALID_ACTION_FEEDBACK
    ANSWER_NOW_NOTICE = ANSWER_NOW_NOTICE

    def __init__(self, site: Any = "synthetic", data: Any = None, split: str = "train",
                 retriever: Any = "bm25", topk: int = 3,
                 max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS, reward: str = "f1",
                 max_obs_chars: int = DEFAULT_MAX_OBS_CHARS, render_mode: str | None = None):
        self._init_options(topk=topk, max_tool_calls=max_tool_calls, max_obs_chars=max_obs_chars,
                           reward=reward, render_mode=render_mode, min_obs_chars=64)
        self.dataset = _dataset_for(site, data)
        self.site = load_site(site, self.dataset)
        view = resources.get_split(self.dataset, split)  # the QA env's rule: ValueError if unknown
        if not view.tasks:
            raise ValueError(f"split {split!r} of dataset {getattr(self.dataset, 'name', data)!r} "
                             "has no tasks")
        self.split = split
        self.tasks = view.tasks
        self._index = view.index
        longest = _check_web_fields(self.site, self.tasks)
        self.retriever = site_retriever(self.site, retriever)

        self._init_spaces(longest, origin_extra=f", site {self.site.name!r} "
                                                 f"sha256:{self.site.fingerprint()[:12]}")

    def _release(self) -> None:
        super()._release()
        self.site = None

    # -- public read-only views -----------------------------------------------------------------
    @property
    def page(self) -> Page | None:
        """The page the agent has open (None before its first visit)."""
        return self.site.pages.get(self.state.url) if self.state.url else None

    # -- the tools ----------------------------------------------------------------------------
    def _make_prompt(self, question: str) -> str:
        return make_prompt(question)

    def _task_prompt(self, task: Any) -> str:
        start = task_start(task)
        return make_prompt(task.question, None if start is None else self.site.resolve(start))

    def _parse(self, action: str) -> ParsedAction:
        return parse_web_action(action)

    def _use_tool(self, st: WebState, parsed: ParsedAction) -> tuple[str, str | None, dict[str, Any]]:
        """(observation, error message or None, state changes) for one valid tool call."""
        if parsed.tool == "search":
            obs, urls = self._search(parsed.argument)
            return obs, None, {"results": urls}
        try:
            if parsed.tool == "next_page":
                if st.results is not None:
                    raise PageError("the search results are shown in full; <click> a result or "
                                    "<visit> a page")
                if st.url is None:
                    raise PageError("no page is open; <visit> a URL or <search> first")
                _, parts = self.site.part(st.url, 0, self._page_chars(st.url))
                if st.part + 1 >= parts:
                    raise PageError(f"this is the end of the page ({st.url})")
                url, part = st.url, st.part + 1
            elif parsed.tool == "click":
                if st.results is not None:
                    url, part = _result(st.results, parsed.argument.strip("[] ")), 0
                elif st.url is None:
                    raise PageError("no page is open, so there is no link to click")
                else:
                    url, part = self.site.link(st.url, parsed.argument.strip("[] ")), 0
            else:  # visit
                url, part = self.site.resolve(parsed.argument, base=st.url), 0
        except PageError as err:
            return information(f"Error: {err}"[: self.max_obs_chars]), str(err), {}
        visited = st.visited if url in st.visited else st.visited + (url,)
        return self._show(url, part), None, {"url": url, "part": part, "visited": visited, "results": None}

    def result_urls(self, query: str) -> tuple[str, ...]:
        """The URLs a `<search> query </search>` would list as Doc 1..k (no state changes)."""
        return self._search(query)[1]

    def _search(self, query: str) -> tuple[str, tuple[str, ...]]:
        """The results observation and the URLs behind `Doc 1..k` (what `<click>` opens next)."""
        hits = self.retriever.search([query], self.topk)[0][: self.topk]
        if not hits:
            return information("No results."), ()
        shown = []
        for hit in hits:
            page = self.site.pages.get(hit.doc_id)
            title = page.title if page else hit.title
            snippet = page.snippet if page else " ".join(hit.text.split())[:160]
            shown.append(Hit(hit.doc_id, hit.score, f"{title}, URL: {hit.doc_id}", snippet))
        return information(format_docs(shown), self.max_obs_chars), tuple(h.doc_id for h in hits)

    def _page_chars(self, url: str) -> int:
        """Characters of page text per part: the observation bound minus the header and footer."""
        page = self.site.pages[url]
        return max(64, self.max_obs_chars - len(page.title) - len(url) - len(_FOOTER) - 48)

    def _show(self, url: str, part: int) -> str:
        page = self.site.pages[url]
        text, parts = self.site.part(url, part, self._page_chars(url))
        header = f"Page: {page.title} ({url})"
        if parts > 1:
            header += f", part {part + 1} of {parts}"
        footer = _FOOTER if part + 1 < parts else ""
        return information(f"{header}\n{text}{footer}", self.max_obs_chars)

    # -- rewards and info -----------------------------------------------------------------------
    def _extra_info(self, error: str | None) -> dict[str, Any]:
        return {"url": self.state.url, "error": error}

    @staticmethod
    def _response(st: WebState, final_action: str) -> str:
        """The trajectory in the shape Search-R1's format check knows: each action cut after its
        executed tag, every web tool call written as a `<search>` call (the check only knows
        search/answer), the answer-now notice left out."""
        out = []
        steps = list(st.steps)
        actions = [s.action for s in steps] + [final_action]
        observations = [s.observation.replace(ANSWER_NOW_NOTICE, "") for s in steps] + [""]
        for action, observation in zip(actions, observations):
            parsed = parse_web_action(action)
            text = action[: parsed.end] if parsed.end else action
            if parsed.valid and parsed.tool == "next_page":
                text = _NEXT_RE.sub("<search>next_page</search>", text)
            text = re.sub(r"<(/?)(?:visit|click)>", r"<\1search>", text)
            out.append(text + observation)
        return "".join(out)


def _result(results: tuple[str, ...], number: str) -> str:
    """The URL of search result `number` (1-based) on screen; raises PageError."""
    try:
        n = int(number.strip())
    except ValueError:
        raise PageError(f"not a result number: {number[:40]!r}") from None
    if not 1 <= n <= len(results):
        raise PageError(f"the search results have no result {n} (results 1-{len(results)})"
                        if results else "the search found nothing to click")
    return results[n - 1]


def _check_web_fields(site: Site, tasks: Any) -> int:
    """Check that every task's `start` and `gold_path` URLs are pages of `site` (a ValueError
    naming the task and the URL otherwise, at `gym.make` rather than mid-rollout); return the
    most characters a task adds to the prompt (question plus start line)."""
    def page(task: Any, url: str) -> str:
        try:
            return site.resolve(url)
        except PageError as err:
            raise ValueError(f"task {task.id!r}: {url!r} is not a page of site {site.name!r} "
                             f"({err})") from None

    longest = 0
    for task in tasks:
        for url in task_gold_path(task):
            page(task, url)
        start = task_start(task)
        start_line = 0 if start is None else len(START_LINE) + len(page(task, start)) + 1
        longest = max(longest, len(task.question) + start_line)
    return longest


def oracle_actions(site: Site, task: Any, search: Any = None) -> list[str]:
    """The gold browsing path of `task` as actions, for scripted SFT data and tests.

    The path is the task's `gold_path` if it has one, else the pages rendering its
    `supporting_ids` (the synthetic world's tasks). A task with a `start` URL visits it first
    (the prompt names it); otherwise the oracle searches the first page's title and opens it
    (clicks its result when `search(query) -> result URLs` shows it, else visits its URL). Each
    next page is reached by clicking its link on the current page, or visited when the page
    does not link it (as for a comparison's second entity). Then it answers."""
    if task_gold_path(task):
        urls = [site.resolve(u) for u in task_gold_path(task)]
    else:
        urls = [site.url_for_doc(d) for d in task.supporting_ids]
    start = task_start(task)
    if start is not None:
        start = site.resolve(start)
        urls = urls if urls and urls[0] == start else [start] + urls
        actions = [f"<think>I start at the given page.</think>\n<visit> {start} </visit>"]
    elif urls:
        title = site.pages[urls[0]].title
        shown = list(search(title)) if search is not None else []
        actions = [f"<think>I search for {title}.</think>\n<search> {title} </search>",
                   f"<think>I open its result.</think>\n<click> {shown.index(urls[0]) + 1} </click>"
                   if urls[0] in shown else
                   f"<think>I open its page.</think>\n<visit> {urls[0]} </visit>"]
    else:
        raise ValueError(f"task {task.id!r} has no start, gold_path or supporting ids to follow")
    for prev, url in zip(urls, urls[1:]):
        links = site.pages[prev].links
        if url in links:
            actions.append(f"<think>I follow the link to {site.pages[url].title}.</think>\n"
                           f"<click> {links.index(url) + 1} </click>")
        else:
            actions.append(f"<think>I open the page of {site.pages[url].title}.</think>\n"
                           f"<visit> {url} </visit>")
    actions.append(f"<think>I have the answer.</think>\n<answer> {task.answers[0]} </answer>")
    return actions


__all__ = ["oracle_actions", "TreeWebAgentEnv", "WebState", "parse_web_action", "make_prompt",
           "task_start", "task_gold_path", "START_LINE", "load_site",
           "site_retriever", "STOP_STRINGS", "TOOLS", "INVALID_ACTION_FEEDBACK",
           "ANSWER_NOW_NOTICE", "WEB_INSTRUCTION", "DEFAULT_MAX_OBS_CHARS"]
