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
    "CorpusMismatchError", "check_index_corpus", "cached_corpus_sha256", "KINDS",
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


# Options of a build that also configure the loaded retriever (build option -> load option).
_RELOAD_OPTS = {
    "bm25": {"threads": "threads"},
    "lucene": {"search_threads": "threads"},
    "dense": {"backend": "backend", "device": "device", "encoder": "encoder"},
    "hybrid": {"backend": "backend", "device": "device", "encoder": "encoder"},
}
# Kinds whose staging directory is worth keeping after a failure: re-running resumes the encoding.
_RESUMABLE = ("dense", "hybrid")


def build_index(corpus_path: str | os.PathLike[str], kind: str = "bm25", out_dir: str | os.PathLike[str] | None = None,
                **opts: Any) -> Retriever:
    """Build an index of ``kind`` from a jsonl corpus into ``out_dir`` and return it loaded.

    Atomic: the index is built in the hidden sibling ``.<name>.building`` and renamed onto
    ``out_dir`` only when complete, so a failed or interrupted build (Ctrl-C included) never leaves
    a half-written index at ``out_dir``, and an index already there stays usable until the new one
    replaces it. A failed bm25/lucene build removes its staging directory; a dense/hybrid one keeps
    it, because building again resumes the encoding from it (hours on wiki-18). ``out_dir`` may be
    missing, empty or an index; any other existing directory is refused, never overwritten.
    """
    if out_dir is None:
        raise TypeError("build_index() needs out_dir (the index directory to write)")
    if not Path(corpus_path).is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_path}")
    build = _backend(kind, "build")
    out = Path(out_dir)
    _check_replaceable(out)
    staging = out.parent / f".{out.name}.building"
    with _staging_lock(staging, out):
        if kind not in _RESUMABLE:
            _empty_dir(staging)
        try:
            retriever = build(corpus_path, staging, **opts)
        except BaseException:
            if kind not in _RESUMABLE:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        _check_replaceable(out)
        _swap_in(staging, out)
    del retriever  # it points into the staging path: reopen at the final one
    reload = {dst: opts[src] for src, dst in _RELOAD_OPTS.get(kind, {}).items() if src in opts}
    return load_index(out, expect_kind=kind, **reload)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another index directory")
    if out.is_dir() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and is not a treegym index (no {MANIFEST_FILE}); "
                              "refusing to replace it: delete it or choose another index directory")


@contextlib.contextmanager
def _staging_lock(staging: Path, out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the staging directory itself (no lock file left behind); a second
    build of the same ``out`` fails at once instead of writing into the first one's files."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir(exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no lock
        yield
        return
    fd = os.open(staging, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another build of {out} is running (it writes {staging})") from None
        yield
    finally:
        os.close(fd)  # releases the lock (it follows the directory, renamed or not)


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _swap_in(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``; an old ``out`` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_index(out_dir: str | os.PathLike[str], *, expect_corpus_sha256: str | None = None,
               expect_kind: str | None = None, **opts: Any) -> Retriever:
    """Open an index directory; refuse one without a valid manifest or built for another kind/corpus."""
    manifest = read_manifest(out_dir, expect_kind=expect_kind, expect_corpus_sha256=expect_corpus_sha256)
    return _backend(manifest.kind, "load")(out_dir, manifest, **opts)


class CorpusMismatchError(InvalidIndexError):
    """An index used with a corpus other than the one it was built over."""


def check_index_corpus(index_dir: str | os.PathLike[str], corpus_path: str | os.PathLike[str], *,
                       hint: str = "") -> Manifest:
    """Refuse an index built over another corpus than ``corpus_path``; return its manifest.

    Why: an index's doc ids and passages come from its own corpus, so used with another dataset it
    answers with wrong or no passages and nothing fails. The error names both corpora and hashes;
    ``hint`` says how the caller opts out.
    """
    manifest = read_manifest(index_dir)
    sha = cached_corpus_sha256(corpus_path)
    if manifest.corpus_sha256 != sha:
        built = manifest.corpus_path or "an unrecorded corpus"
        raise CorpusMismatchError(
            f"the index {index_dir} was built over {built} (sha256 {manifest.corpus_sha256[:16]}…), not over this "
            f"dataset's corpus {corpus_path} (sha256 {sha[:16]}…): its passages belong to another corpus. Rebuild it "
            f"with `treegym index build --corpus {corpus_path} --kind {manifest.kind} --out DIR`"
            + (f", or {hint}" if hint else ""))
    return manifest


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


def cached_corpus_sha256(corpus_path: str | os.PathLike[str], cache_dir: Path | None = None) -> str:
    """Corpus hash, remembered by (path, size, mtime): re-hashing wiki-18 (14 GB) per env is wasteful."""
    corpus_path = Path(corpus_path)
    cache_dir = treegym_home() / "indexes" if cache_dir is None else cache_dir
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
    file lock (staged and renamed into place by `build_index`); the others wait and load the result.
    """
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_path}")
    root = treegym_home() / "indexes"
    sha = cached_corpus_sha256(corpus_path, root)
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
        if final.exists():  # a leftover from an older treegym's crash or an invalid build: our cache
            shutil.rmtree(final)
        build_index(corpus_path, kind, final, **opts)  # staged and renamed into place
    return load_index(final, expect_corpus_sha256=sha, expect_kind=kind)
