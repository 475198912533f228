"""Offline retrieval for treegym: one ``Retriever`` protocol, several index kinds, one directory format.

    from treegym.retrieval_index import build_index, load_index, default_index
    r = build_index("corpus.jsonl", kind="bm25", out_dir="idx")     # or "lucene", "dense", "hybrid"
    r.search(["who founded x"], k=3)                              # -> [[Hit(doc_id, score, title, text)]]
    r = load_index("idx", expect_kind="bm25")                       # refuses half-built/mismatched dirs

An index is a directory with ``manifest.json`` (written last); each kind lives in its own module
exposing ``build_<kind>_index(corpus_path, out_dir, **opts) -> Retriever`` (which writes the
manifest last) and ``load_<kind>_index(out_dir, manifest, **opts) -> Retriever``. Heavy kinds
(lucene: a JVM; dense/hybrid: torch, faiss) are imported only when asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from treegym.paths import treegym_home
from treegym.retrieval_index.base import Hit, Retriever
from treegym.retrieval_index.cache import CachedRetriever
from treegym.retrieval_index.corpus import CorpusFormatError, corpus_sha256, iter_corpus, parse_contents
from treegym.retrieval_index.manifest import (FORMAT_VERSION, MANIFEST_FILE, InvalidIndexError, Manifest,
                                              read_manifest)

__all__ = [
    "Retriever", "Hit", "build_index", "load_index", "default_index", "CachedRetriever", "iter_corpus",
    "parse_contents", "corpus_sha256", "read_manifest", "Manifest", "InvalidIndexError", "CorpusFormatError",
    "KINDS",
]

# kind -> module implementing build_<kind>_index / load_<kind>_index
_MODULES = {
    "bm25": "treegym.retrieval_index.bm25",
    "lucene": "treegym.retrieval_index.lucene",
    "dense": "treegym.retrieval_index.dense",
    "hybrid": "treegym.retrieval_index.hybrid",
}
KINDS = tuple(_MODULES)


def _backend(kind: str, verb: str) -> Callable[..., Any]:
    if kind not in _MODULES:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        module = importlib.import_module(_MODULES[kind])
    except ImportError as exc:
        extra = {"lucene": "lucene", "dense": "dense", "hybrid": "dense"}.get(kind, "")
        hint = f" (install it with `pip install treegym[{extra}]`)" if extra else ""
        raise ImportError(f"index kind {kind!r} is not available: {exc}{hint}") from exc
    return getattr(module, f"{verb}_{kind}_index")


def build_index(corpus_path: str | os.PathLike[str], kind: str = "bm25", out_dir: str | os.PathLike[str] | None = None,
                **opts: Any) -> Retriever:
    """Build an index of ``kind`` from a jsonl corpus into ``out_dir`` and return it loaded.

    The manifest is written last, so an interrupted build leaves a directory `load_index` refuses.
    """
    if out_dir is None:
        raise TypeError("build_index() needs out_dir (the index directory to write)")
    if not Path(corpus_path).is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_path}")
    return _backend(kind, "build")(corpus_path, out_dir, **opts)


def load_index(out_dir: str | os.PathLike[str], *, expect_corpus_sha256: str | None = None,
               expect_kind: str | None = None, **opts: Any) -> Retriever:
    """Open an index directory; refuse one without a valid manifest or built for another kind/corpus."""
    manifest = read_manifest(out_dir, expect_kind=expect_kind, expect_corpus_sha256=expect_corpus_sha256)
    return _backend(manifest.kind, "load")(out_dir, manifest, **opts)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Inter-process lock (fcntl), so parallel envs/processes build a default index once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: fall back to rename atomicity only
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached_sha256(corpus_path: Path, cache_dir: Path) -> str:
    """Corpus hash, remembered by (path, size, mtime): re-hashing wiki-18 (14 GB) per env is wasteful."""
    st = corpus_path.stat()
    key = hashlib.sha256(f"{corpus_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir / ".sha256" / key
    with contextlib.suppress(OSError):
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    value = corpus_sha256(corpus_path)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, memo)
    return value


def default_index(corpus_path: str | os.PathLike[str], kind: str = "bm25", **opts: Any) -> Retriever:
    """Load the cached index of ``corpus_path``, building it first if needed.

    Lives in ``$TREEGYM_HOME/indexes/<sha256[:16]>-<kind>/``. Race-safe: one process builds under a
    file lock into a temporary sibling directory, renamed into place only when complete; the others
    wait and load the result.
    """
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_path}")
    root = treegym_home() / "indexes"
    sha = _cached_sha256(corpus_path, root)
    # The format version is in the name so an index cached by an older treegym is never picked up;
    # a cached index that still fails to load (a crash, a hand edit) is rebuilt, not fatal: this
    # directory is our cache, never a user's data.
    final = root / f"{sha[:16]}-{kind}-v{FORMAT_VERSION}"

    def _load_cached() -> Retriever | None:
        if not (final / MANIFEST_FILE).is_file():
            return None
        try:
            return load_index(final, expect_corpus_sha256=sha, expect_kind=kind)
        except InvalidIndexError as err:
            warnings.warn(f"rebuilding the cached index {final}: {err}", stacklevel=3)
            return None

    retriever = _load_cached()
    if retriever is not None:
        return retriever
    with _file_lock(root / f".{final.name}.lock"):
        retriever = _load_cached()  # someone else may have finished while we waited
        if retriever is not None:
            return retriever
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=root))
        try:
            build_index(corpus_path, kind, tmp, **opts)
            if final.exists():  # a leftover from a crashed or invalid build: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_index(final, expect_corpus_sha256=sha, expect_kind=kind)
