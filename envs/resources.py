"""Per-process memo of the env's heavy read-only resources: datasets and retrievers.

Why: `gym.make_vec(..., num_envs=16)` or a tree rollout with hundreds of forks must not load the
corpus and the index 16 (or hundreds of) times. Every env in a process that asks for the same
dataset spec and the same retriever spec gets the same objects, and in particular one
`CachedRetriever`, so a query issued by one branch is a cache hit for its siblings. (Forks share
them anyway, because `ForkableEnv.fork` copies the env shallowly.)

The memo is keyed by the spec as given (paths resolved to absolute paths); a file changed on disk
after its first load is not re-read in the same process (call `clear()`).
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from treegym.retrieval_index.base import Retriever

# Backends `default_index(corpus_path, kind=...)` can build next to the dataset's corpus.
INDEX_KINDS = ("bm25", "lucene", "dense", "hybrid")
DEFAULT_CACHE_SIZE = 65_536

RETRIEVER_FORMS = (
    f"one of {', '.join(repr(k) for k in INDEX_KINDS)} (an index built over the dataset's corpus "
    "under $TREEGYM_HOME/indexes), a directory holding an index (manifest.json, from "
    "`treegym index build`), an http(s)://host:port/retrieve URL of a Search-R1-style retrieval "
    "server, or any object with a `search(queries, k)` method (a treegym Retriever)"
)

_lock = threading.RLock()
_datasets: dict[str, Any] = {}
_retrievers: dict[tuple[str, str], Retriever] = {}
_wrapped: "weakref.WeakKeyDictionary[Any, Retriever]" = weakref.WeakKeyDictionary()


def _path_key(spec: str) -> str:
    """Resolve specs that are paths, so "./w" and "/abs/w" share one entry."""
    base, sep, query = spec.partition("?")
    if base and os.path.exists(base):
        return str(Path(base).resolve()) + sep + query
    return spec


def get_dataset(spec: Any) -> Any:
    """The `Dataset` for `spec` (see `treegym.envs.data.resolve_dataset`), loaded once per process.

    A `Dataset` object is returned unchanged.
    """
    from treegym.envs.data import resolve_dataset  # lazy: keeps `import treegym` cheap

    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "tasks"):
            return spec
        return resolve_dataset(spec)  # raises ValueError listing the accepted forms
    key = _path_key(os.fspath(spec))
    with _lock:
        if key not in _datasets:
            _datasets[key] = resolve_dataset(os.fspath(spec))
        return _datasets[key]


@dataclass(frozen=True)
class SplitView:
    """One split's tasks with a task-id index, computed once per (dataset, split) per process
    (a Search-R1 train split has ~170k tasks; 16 vector envs should not index it 16 times)."""

    tasks: tuple
    index: Mapping[str, int]
    longest_question: int


_splits: "weakref.WeakKeyDictionary[Any, dict[str, SplitView]]" = weakref.WeakKeyDictionary()


def get_split(dataset: Any, split: str) -> SplitView:
    """The tasks of `split` (ValueError from the dataset, listing its splits, if unknown)."""
    try:
        with _lock:
            cached = _splits.get(dataset, {}).get(split)
    except TypeError:  # not weak-referenceable: no memo
        cached = None
    if cached is not None:
        return cached
    tasks = tuple(dataset.tasks(split))
    view = SplitView(tasks, {t.id: i for i, t in enumerate(tasks)},
                     max((len(t.question) for t in tasks), default=0))
    try:
        with _lock:
            _splits.setdefault(dataset, {})[split] = view
    except TypeError:
        pass
    return view


def _cached(retriever: Retriever, cache_size: int) -> Retriever:
    from treegym.retrieval_index import CachedRetriever

    if isinstance(retriever, CachedRetriever):
        return retriever
    return CachedRetriever(retriever, maxsize=cache_size)


def get_retriever(spec: Any, dataset: Any = None, *, cache_size: int = DEFAULT_CACHE_SIZE,
                  check_corpus: bool = True) -> Retriever:
    """The shared, query-cached retriever for `spec` (forms: `RETRIEVER_FORMS`).

    Raises ValueError naming the accepted forms for anything else, and when an index kind is
    asked for but the dataset has no corpus to build it from. Fails here, not at the first search:
    a URL gets one reachability check (`RemoteRetrieverError` naming it); an index directory, or a
    treegym server that reports its corpus hash, built over another corpus than the dataset's
    raises `CorpusMismatchError` naming both (`check_corpus=False` skips that comparison).
    """
    if not isinstance(spec, (str, os.PathLike)):
        if callable(getattr(spec, "search", None)):
            with _lock:
                try:
                    if spec not in _wrapped:
                        _wrapped[spec] = _cached(spec, cache_size)
                    return _wrapped[spec]
                except TypeError:  # not weak-referenceable / hashable: wrap per env
                    return _cached(spec, cache_size)
        raise ValueError(f"unknown retriever {spec!r}; expected {RETRIEVER_FORMS}")

    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        key = ("url", text)
    elif text in INDEX_KINDS:
        corpus = getattr(dataset, "corpus_path", None)
        if corpus is None:
            name = getattr(dataset, "name", "the dataset")
            raise ValueError(f"retriever={text!r} builds an index over the dataset's corpus, but "
                             f"{name!r} has no corpus; pass retriever= {RETRIEVER_FORMS}")
        key = (text, str(Path(corpus).resolve()))
    elif os.path.isdir(text):
        key = ("dir", str(Path(text).resolve()))
    else:
        raise ValueError(f"unknown retriever {text!r}; expected {RETRIEVER_FORMS}")

    with _lock:
        if key not in _retrievers:
            _retrievers[key] = _cached(_open(key), cache_size)
        retriever = _retrievers[key]
    corpus = getattr(dataset, "corpus_path", None)
    if check_corpus and corpus is not None and key[0] in ("dir", "url"):
        _check_corpus(key, retriever, corpus)
    return retriever


_OPT_OUT = "pass check_corpus=False (e.g. gym.make(..., check_corpus=False)) to use it anyway"


def _check_corpus(key: tuple[str, str], retriever: Retriever, corpus: Any) -> None:
    """Compare the index's corpus hash with the dataset's (each env: the memo is per index, not
    per dataset). The dataset's hash is memoised on disk by (path, size, mtime)."""
    from treegym.retrieval_index import CorpusMismatchError, cached_corpus_sha256, check_index_corpus

    kind, where = key
    if kind == "dir":
        check_index_corpus(where, corpus, hint=_OPT_OUT)
        return
    served = getattr(getattr(retriever, "retriever", None), "served", {}) or {}
    theirs = served.get("corpus_sha256")
    if isinstance(theirs, str) and theirs != cached_corpus_sha256(corpus):
        raise CorpusMismatchError(
            f"the retriever at {where} serves {served.get('index', 'an index')} built over "
            f"{served.get('corpus_path') or 'another corpus'} (sha256 {theirs[:16]}…), not over this dataset's "
            f"corpus {corpus} (sha256 {cached_corpus_sha256(corpus)[:16]}…); {_OPT_OUT}")


def _open(key: tuple[str, str]) -> Retriever:
    kind, where = key
    if kind == "url":
        from treegym.retrieval_index.remote import RemoteRetriever

        remote = RemoteRetriever(where)
        remote.check_reachable()  # fail at gym.make, with the URL, if nothing answers
        return remote
    if kind == "dir":
        from treegym.retrieval_index import load_index

        return load_index(where)
    from treegym.retrieval_index import default_index

    return default_index(where, kind=kind)


def clear() -> None:
    """Forget every memoised dataset and retriever (they are freed once no env holds them)."""
    with _lock:
        _datasets.clear()
        _retrievers.clear()
        _wrapped.clear()
        _splits.clear()


__all__ = ["get_dataset", "get_retriever", "get_split", "SplitView", "clear", "INDEX_KINDS", "RETRIEVER_FORMS"]
