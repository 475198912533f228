"""`manifest.json`: what an index directory holds, and the proof that it was finished.

The manifest is written last, atomically (temp file + ``os.replace``), so a crash mid-build
leaves a directory without a manifest, which `read_manifest` refuses: a half-built index can
never be loaded by accident. It also pins the corpus hash, so an index is never silently used
with a different corpus than it was built from.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Manifest", "InvalidIndexError", "MANIFEST_FILE", "FORMAT_VERSION", "read_manifest", "write_manifest", "begin_build",
           "library_versions"]

MANIFEST_FILE = "manifest.json"
# 2: titles stored as Search-R1 takes them (wiki-18's first line as is, quotes kept); format-1
# indexes stripped the quotes, so their observations differ from Search-R1's (warned on load).
FORMAT_VERSION = 2


class InvalidIndexError(ValueError):
    """An index directory that cannot be used (missing, half-built, or built for something else)."""


@dataclass(frozen=True)
class Manifest:
    kind: str
    corpus_sha256: str
    doc_count: int
    params: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    treegym_version: str = ""
    created: str = ""
    corpus_path: str = ""
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the libraries an index depends on (recorded, not enforced)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _treegym_version() -> str:
    try:
        from treegym.version import __version__
        return __version__
    except ImportError:  # pragma: no cover - the package always ships version.py
        return "unknown"


def begin_build(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` and drop any old manifest first, so a rebuild that dies half-way leaves
    an index that refuses to load instead of an old manifest describing new, partial files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    return out_dir


def write_manifest(out_dir: str | os.PathLike[str], *, kind: str, corpus_sha256: str, doc_count: int,
                   params: dict[str, Any] | None = None, libraries: Iterable[str] = (),
                   corpus_path: str | os.PathLike[str] | None = None) -> Manifest:
    """Write ``out_dir/manifest.json`` atomically. Call it only after every other file is complete."""
    out_dir = Path(out_dir)
    manifest = Manifest(
        kind=kind, corpus_sha256=corpus_sha256, doc_count=int(doc_count), params=dict(params or {}),
        versions=library_versions(libraries), treegym_version=_treegym_version(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        corpus_path=str(corpus_path) if corpus_path is not None else "",
    )
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=out_dir)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the manifest is as public as the index files
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_dir / MANIFEST_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def read_manifest(index_dir: str | os.PathLike[str], *, expect_kind: str | None = None,
                  expect_corpus_sha256: str | None = None) -> Manifest:
    """Read and check a manifest; raise `InvalidIndexError` (a ValueError) saying exactly what is wrong."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise InvalidIndexError(f"index directory not found: {index_dir}")
    path = index_dir / MANIFEST_FILE
    if not path.is_file():
        raise InvalidIndexError(f"{index_dir} has no {MANIFEST_FILE}: not an index, or its build did not finish "
                          "(rebuild it with build_index / `treegym index build`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidIndexError(f"{path} is corrupt ({exc}); rebuild the index") from None
    if not isinstance(raw, dict):
        raise InvalidIndexError(f"{path} is corrupt (not a JSON object); rebuild the index")
    missing = [k for k in ("kind", "corpus_sha256", "doc_count") if k not in raw]
    if missing:
        raise InvalidIndexError(f"{path} is corrupt (missing {', '.join(missing)}); rebuild the index")
    known = set(Manifest.__dataclass_fields__)
    try:
        manifest = Manifest(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:  # pragma: no cover - defensive
        raise InvalidIndexError(f"{path} is corrupt ({exc})") from None
    if not isinstance(manifest.kind, str) or not isinstance(manifest.doc_count, int):
        raise InvalidIndexError(f"{path} is corrupt (bad kind/doc_count types); rebuild the index")
    if manifest.format > FORMAT_VERSION:
        raise InvalidIndexError(f"{path} has format {manifest.format}, newer than this treegym understands "
                          f"({FORMAT_VERSION}); upgrade treegym")
    if manifest.format < 2:
        warnings.warn(f"{index_dir} was built by an older treegym (index format {manifest.format}) that dropped the "
                      "quotes of wiki-18 title lines; its observations differ from Search-R1's "
                      "(`Title: X` instead of `Title: \"X\"`). Rebuild it for byte-identical observations.",
                      UserWarning, stacklevel=3)
    if expect_kind is not None and manifest.kind != expect_kind:
        raise InvalidIndexError(f"{index_dir} is a {manifest.kind!r} index, expected {expect_kind!r}")
    if expect_corpus_sha256 is not None and manifest.corpus_sha256 != expect_corpus_sha256:
        raise InvalidIndexError(f"{index_dir} was built from a different corpus (sha256 {manifest.corpus_sha256[:16]}…, "
                          f"expected {expect_corpus_sha256[:16]}…); rebuild it for this corpus")
    return manifest
