"""The retrieval contract every backend (bm25, lucene, dense, hybrid, remote) implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Hit:
    """One retrieved passage. `title` and `text` are already split by Search-R1's rule (the first
    line of wiki-18's `contents` as is, quotes included; see `corpus.parse_contents`), so envs can
    format `Doc i(Title: T) text` without re-parsing."""

    doc_id: str
    score: float
    title: str
    text: str


@runtime_checkable
class Retriever(Protocol):
    """Batched search: one list of at most `k` hits per query, best first.

    Batched because every backend is faster per query in batches (sparse matmul, FAISS, HTTP) and
    tree rollouts issue many searches per turn.
    """

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]: ...


def check_search_args(queries: Sequence[str], k: int) -> list[str]:
    """The argument checks every backend's `search` shares, returning the queries as a list.

    A bare str is refused: as a sequence it would silently search each of its characters.
    """
    if isinstance(queries, str):
        raise TypeError("search() takes a sequence of queries, not a single str")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = list(queries)
    if not all(isinstance(q, str) for q in queries):
        raise TypeError("queries must be str")
    return queries
