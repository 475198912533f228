"""The Search-R1 text protocol: the instruction prompt, action parsing and observation formatting.

Why a module of its own: the env, the scripted policies, the tokenizer builder and the trainer all
have to agree byte for byte on these strings (a model trained on one prompt and evaluated on
another loses most of its skill). Everything here follows PeterGriffinJin/Search-R1
(`scripts/data_process/nq_search.py` for the prompt, `search_r1/llm_agent/generation.py` for
parsing, the invalid-action text and `_passages2string`), which Tree-GRPO (AMAP-ML/Tree-GRPO)
reuses unchanged. Where we deviate it is to refuse inputs Search-R1 would pass on blindly
(empty, nested, over-long arguments); those are listed in `parse_action`'s docstring.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import NamedTuple, Sequence

from treegym.retrieval_index.base import Hit

# Search-R1's instruction (nq_search.py, template "base"), kept verbatim including its typo
# ("as your want"): checkpoints trained with Search-R1 expect exactly this text.
INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: "
)

# Search-R1's feedback for an action without a <search>/<answer> pair (generation.py), verbatim.
INVALID_ACTION_FEEDBACK = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer between "
    "<answer> and </answer>. Let me try again.\n"
)

# Search-R1 has no such text: after max_turns it silently disables search for one last
# generation. We say so in the observation (DESIGN.md), in the same first-person voice as the
# feedback above, so a policy can learn that the next action must be an answer.
ANSWER_NOW_NOTICE = (
    "\nI have used all my searches. I must now give the final answer between <answer> and "
    "</answer>.\n"
)

# Generation stops at the first closing tag (Search-R1 cuts the response there after the fact).
STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")
DEFAULT_TOOLS: tuple[str, ...] = ("search", "answer")

# Bounds. An action longer than this is refused before any regex runs, so a 1 MB (or 1 GB)
# action costs O(1); a query longer than MAX_ARGUMENT_CHARS would only hurt the retriever.
MAX_ACTION_CHARS = 65_536
MAX_ARGUMENT_CHARS = 4_096

INFO_OPEN = "\n\n<information>"
INFO_CLOSE = "</information>\n\n"


def make_prompt(question: str) -> str:
    """Search-R1's prompt: the instruction, then `Question: {question}` and a newline.

    Search-R1 strips the question and adds a trailing "?" only in its inference script; the
    training data (and so this) keeps the question as given.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    return f"{INSTRUCTION}{question}\n"


class ParsedAction(NamedTuple):
    """What one generation asks the env to do. `tool` is None and `valid` False when nothing
    executable was found; `reason` then names why (for logs and info dicts, never shown to the
    policy: the policy always sees the one fixed `INVALID_ACTION_FEEDBACK`). A NamedTuple, not a
    frozen dataclass: it is built on every env step and is ~5x cheaper to construct."""

    tool: str | None
    argument: str
    valid: bool
    reason: str = "ok"
    end: int = 0  # index just past the executed closing tag (0 when invalid)


@lru_cache(maxsize=32)
def _patterns(tools: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Validated, compiled patterns per tool set (cached: parse_action runs on every env step)."""
    if not tools or not all(isinstance(t, str) and re.fullmatch(r"[A-Za-z_][\w-]*", t) for t in tools):
        raise ValueError(f"tools must be a non-empty sequence of tag names like ('search', 'answer'), "
                         f"got {tools!r}")
    names = "|".join(re.escape(t) for t in tools)
    opening = re.compile(rf"<({names})>")
    any_tag = re.compile(rf"</?(?:{names})>")
    return opening, any_tag


# With at most this many '<' the regex retries at most this many openings: linear in practice.
_REGEX_MAX_OPENINGS = 8


@lru_cache(maxsize=32)
def _search_r1_regex(opening: str) -> re.Pattern[str]:
    """Search-R1's pattern `<(search|answer)>(.*?)</\1>` (dot-all) for the given opening."""
    return re.compile(opening + r"(.*?)</\1>", re.DOTALL)


def _first_action(text: str, opening: re.Pattern[str]) -> tuple[str, int, int, int] | None:
    """(tool, argument start, argument end, match end) of the first `<(t)>(.*?)</t>` match.

    Same result as `re.search(r"<(search|answer)>(.*?)</\1>", text, re.DOTALL)`, but linear:
    that regex retries every opening tag against the rest of the text, which takes seconds on an
    adversarial 64k-char action such as "<search>" * 8000. An opening can only match if its
    closing tag occurs after it, i.e. before that tag's last occurrence.
    """
    last_close: dict[str, int] = {}
    for m in opening.finditer(text):
        tool = m.group(1)
        close = f"</{tool}>"
        if tool not in last_close:
            last_close[tool] = text.rfind(close)
        if last_close[tool] >= m.end():
            end = text.find(close, m.end())
            return tool, m.end(), end, end + len(close)
    return None


def parse_action(text: str, tools: Sequence[str] = DEFAULT_TOOLS) -> ParsedAction:
    """Find the action in one generation, Search-R1 style.

    The first match of `<(tool)>(.*?)</tool>` (dot-all) decides; text before it is free thinking
    and text after its closing tag is ignored. The argument is stripped and cleaned by
    `sanitize_text`. Invalid (reason in brackets): no complete tag pair [no_action], an opening
    tag without its closing tag [unclosed], an argument that is empty after cleaning
    [empty_argument], one that itself contains a tool tag, e.g. `<search><answer>x</answer>
    </search>` [nested], an action over MAX_ACTION_CHARS [action_too_long] or an argument over
    MAX_ARGUMENT_CHARS [argument_too_long]. Search-R1 would execute the first three with an
    empty or odd query; we refuse them so the policy gets a clear signal.

    Raises TypeError for a non-str `text` (a programming error, not a policy mistake).
    """
    if not isinstance(text, str):
        raise TypeError(f"an action must be a str (the generated text), got {type(text).__name__}")
    try:
        opening, tag_re = _patterns(tuple(tools))
    except TypeError:  # unhashable entries
        raise ValueError(f"tools must be a sequence of tag names, got {tools!r}") from None
    if len(text) > MAX_ACTION_CHARS:
        return ParsedAction(None, "", False, "action_too_long")
    if text.count("<") <= _REGEX_MAX_OPENINGS:  # the usual case: the C regex is fastest
        m = _search_r1_regex(opening.pattern).search(text)
        found = (m.group(1), m.start(2), m.end(2), m.end()) if m else None
    else:  # many '<': the backtracking regex could go quadratic, scan linearly
        found = _first_action(text, opening)
    if found is None:
        reason = "unclosed" if tag_re.search(text) else "no_action"
        return ParsedAction(None, "", False, reason)
    tool, start, stop, end = found
    raw = text[start:stop]
    if tag_re.search(raw):
        return ParsedAction(tool, "", False, "nested")
    if len(raw) > MAX_ARGUMENT_CHARS:
        return ParsedAction(tool, "", False, "argument_too_long")
    argument = sanitize_text(raw)
    if not argument:
        return ParsedAction(tool, "", False, "empty_argument")
    return ParsedAction(tool, argument, True, "ok", end)


_WS = re.compile(r"\s+")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _join_pair(m: re.Match[str]) -> str:
    return m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def sanitize_text(text: str) -> str:
    """Make model output safe for a retriever or a reward: no control characters, no lone
    surrogates (which cannot be UTF-8 encoded and crash tokenizers, HTTP clients and Java), no
    other unassigned/private code points, whitespace collapsed to single spaces."""
    if text.isascii() and text.isprintable():  # the common case, no per-character work
        return " ".join(text.split())
    text = _SURROGATE_PAIR.sub(_join_pair, text)  # a valid pair spelled as two halves: join it
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(" ")
        elif cat == "Cf":
            continue  # zero-width joiners, BOMs, ...: invisible, drop
        else:
            out.append(ch)
    return _WS.sub(" ", "".join(out)).strip()


def format_docs(hits: Sequence[Hit]) -> str:
    """Search-R1's `_passages2string` then `.strip()`: `Doc {i}(Title: {title}) {text}\\n` per hit,
    i from 1, concatenated and stripped (so no newline after the last doc), as Search-R1 puts it
    inside the <information> tags. `title` is the corpus row's title line as is (wiki-18 keeps its
    quotes; see `treegym.retrieval_index.corpus.parse_contents`), so the text is byte-identical.
    """
    return "".join(f"Doc {i}(Title: {h.title}) {h.text}\n" for i, h in enumerate(hits, 1)).strip()


def information(docs: str, max_chars: int | None = None) -> str:
    """The observation for a search: `\\n\\n<information>{docs}</information>\\n\\n`.

    `max_chars` bounds the docs (Search-R1 cuts observations to 500 tokens); the cut is made
    inside the tags so the closing tag always survives.
    """
    if max_chars is not None and len(docs) > max_chars:
        docs = docs[:max_chars]
    return f"{INFO_OPEN}{docs}{INFO_CLOSE}"


__all__ = ["INSTRUCTION", "INVALID_ACTION_FEEDBACK", "ANSWER_NOW_NOTICE", "STOP_STRINGS",
           "DEFAULT_TOOLS", "MAX_ACTION_CHARS", "MAX_ARGUMENT_CHARS", "ParsedAction", "make_prompt",
           "parse_action", "sanitize_text", "format_docs", "information"]
