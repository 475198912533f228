"""Streaming reader for retrieval corpora in the two jsonl layouts the field uses.

* wiki-18 / Search-R1 / pyserini: ``{"id": ..., "contents": "\\"Title\\"\\ntext"}``
* FlashRAG-style: ``{"id": ..., "title": ..., "text": ...}``

Why streaming: wiki-18 has 21M passages (~14 GB of jsonl); a reader that builds a list would
need tens of GB of Python objects. Every consumer (index builders, hashing, the docstore) walks
the file once, row by row.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterator

__all__ = ["iter_corpus", "parse_contents", "to_contents", "corpus_sha256", "CorpusFormatError"]


class CorpusFormatError(ValueError):
    """A corpus row that cannot be read; the message names ``file:line`` and the problem."""


def parse_contents(contents: str) -> tuple[str, str]:
    """Split a corpus row's ``contents`` into (title, text) exactly as Search-R1 does.

    Search-R1 (``search_r1/llm_agent/generation.py``, ``_passages2string``) takes
    ``title = contents.split("\\n")[0]`` *as is* and ``text = "\\n".join(contents.split("\\n")[1:])``.
    In wiki-18 the first line carries its quotes (``"Eiffel Tower"``), so a Search-R1 checkpoint
    has only ever seen ``Doc 1(Title: "Eiffel Tower") ...``; we keep them, so observations are
    byte-identical. A ``contents`` without a newline is all title, as in Search-R1.
    """
    first, sep, rest = contents.partition("\n")
    return first, rest if sep else ""


def to_contents(title: str, text: str) -> str:
    """The inverse of `parse_contents`: the ``contents`` string Search-R1's client splits back.

    For a wiki-18 row it rebuilds the original ``contents`` byte for byte (a row without a newline
    gains one, which Search-R1 splits back to the same title and empty text); for a
    ``{"id","title","text"}`` row it is ``title + "\\n" + text``, so a Search-R1 client shows the
    same ``Title: {title}`` the local env shows.
    """
    return f"{title}\n{text}"


def _doc_id(value: object) -> str | None:
    # ids are strings in wiki-18 but integers in some dumps; bool is an int subclass: refuse it.
    if isinstance(value, str) and value != "":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def iter_corpus(path: str | os.PathLike[str], *, dedupe: bool = True) -> Iterator[tuple[str, str, str]]:
    """Yield ``(doc_id, title, text)`` for every row of a jsonl corpus, streaming.

    The title rule (what observations show as ``Doc i(Title: {title}) {text}``): a ``contents``
    row gives its first line *as is* (Search-R1's rule: wiki-18's quotes stay); a
    ``{"id","title","text"}`` row gives its ``title`` field as is (no first line to take).

    Malformed JSON, a row that is not an object, a missing/invalid ``id`` or missing text fields
    raise :class:`CorpusFormatError` (a ``ValueError``) naming ``file:line``. Blank lines are
    skipped. Duplicate ids keep the first row; one warning with the count is issued at the end
    (a duplicate is a data quality problem, not a reason to refuse a 21M-passage corpus).
    ``dedupe=False`` skips the id set (saves memory on corpora known to be clean).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    seen: set[str] | None = set() if dedupe else None
    duplicates = 0
    first_duplicate = ""
    # Binary lines, decoded one by one: a text-mode reader decodes ahead and would blame the
    # wrong line for invalid UTF-8.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusFormatError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusFormatError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise CorpusFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "id" not in row:
                raise CorpusFormatError(f"{where}: missing field 'id'")
            doc_id = _doc_id(row["id"])
            if doc_id is None:
                raise CorpusFormatError(f"{where}: field 'id' must be a non-empty string or integer, got {row['id']!r}")
            if "contents" in row:
                contents = row["contents"]
                if not isinstance(contents, str):
                    raise CorpusFormatError(f"{where}: field 'contents' must be a string, got {type(contents).__name__}")
                title, text = parse_contents(contents)
            elif "text" in row:
                title, text = row.get("title", ""), row["text"]
                if not isinstance(text, str):
                    raise CorpusFormatError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
                if not isinstance(title, str):
                    raise CorpusFormatError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
            else:
                raise CorpusFormatError(f"{where}: missing field 'contents' (or 'title'/'text')")
            if seen is not None:
                if doc_id in seen:
                    duplicates += 1
                    first_duplicate = first_duplicate or f"{doc_id!r} at line {lineno}"
                    continue
                seen.add(doc_id)
            yield doc_id, title, text
    if duplicates:
        warnings.warn(
            f"{path}: {duplicates} duplicate id(s) skipped (kept the first of each; first duplicate {first_duplicate})",
            UserWarning,
            stacklevel=2,
        )


def corpus_sha256(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of the corpus file's bytes, streamed; manifests use it to tie an index to its corpus."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
