"""The embedded BM25 (kind ``"bm25"``): Lucene's BM25 over precomputed weights, no Java.

Why not bm25s's default backend: on a 100k-passage corpus it served 310 queries/s batched where
pyserini's ``batch_search`` served 1,815 (issue 6). Here every (term, doc) BM25 weight is computed
once at build time into a float32 CSR matrix ``W`` (vocab × docs, doc-sorted postings, memory-
mapped on load), with each term's maximum weight. A query is then scored exactly with MaxScore
pruning (see `BM25Retriever._top_one`): only the postings of its rare, "essential" terms are
read in full; common terms are looked up by binary search for the few surviving candidates. A
plain sparse product ``Q @ W`` scored every posting of every common word and was ~3× slower.
Query analysis is batched (one stemmer call per batch).

Scoring follows Lucene's ``BM25Similarity`` as configured by pyserini (k1=0.9, b=0.4):
``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``, ``tf / (tf + k1 (1 - b + b·dl/avgdl))`` with
``dl`` decoded from Lucene's lossy one-byte length norm (``SmallFloat.intToByte4``), ties broken
by doc id (string order, as Anserini sorts) — so rankings agree with pyserini's reference BM25.

Index files: ``bm25_{indptr,indices,data,idrank,maxw}.npy``, ``bm25_terms.json`` and the passage
store ``docs.arrow``.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from treegym.retrieval_index.analysis import Analyzer
from treegym.retrieval_index.base import Hit, check_search_args
from treegym.retrieval_index.corpus import corpus_sha256, iter_corpus
from treegym.retrieval_index.docstore import DocStore, write_docstore
from treegym.retrieval_index.manifest import Manifest, begin_build, write_manifest

__all__ = ["BM25Retriever", "build_bm25_index", "load_bm25_index", "lucene_norm_length"]

KIND = "bm25"
_TERMS_FILE = "bm25_terms.json"


def _long_to_int4(i: int) -> int:
    # org.apache.lucene.util.SmallFloat.longToInt4
    num_bits = i.bit_length()
    if num_bits < 4:
        return i
    shift = num_bits - 4
    return ((i >> shift) & 0x07) | ((shift + 1) << 3)


def _int4_to_long(i: int) -> int:
    bits, shift = i & 0x07, (i >> 3) - 1
    return bits if shift == -1 else (bits | 0x08) << shift


_NUM_FREE_VALUES = 255 - _long_to_int4(2**31 - 1)  # = 24


def lucene_norm_length(length: int) -> int:
    """The document length Lucene's BM25 actually sees: ``byte4ToInt(intToByte4(length))``.

    Lucene stores field lengths in one byte (exact below 24, ~3 significant bits above), and
    BM25 scores with the decoded value; using it makes our scores match pyserini's.
    """
    if length < _NUM_FREE_VALUES:
        return length
    code = _NUM_FREE_VALUES + _long_to_int4(length - _NUM_FREE_VALUES)
    return _NUM_FREE_VALUES + _int4_to_long(code - _NUM_FREE_VALUES)


def _max_weights(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per-term upper bound of its BM25 contribution (the MaxScore bound)."""
    out = np.zeros(len(indptr) - 1, dtype=np.float32)
    nonempty = np.flatnonzero(np.diff(indptr) > 0)
    if len(nonempty):
        out[nonempty] = np.maximum.reduceat(np.asarray(data), np.asarray(indptr[:-1])[nonempty])
    return out


def _decoded_lengths(lengths: np.ndarray) -> np.ndarray:
    uniq, inverse = np.unique(lengths, return_inverse=True)
    return np.array([lucene_norm_length(int(x)) for x in uniq], dtype=np.float64)[inverse]


def _index_text(title: str, text: str) -> str:
    # pyserini indexes wiki-18 `contents` = '"Title"\ntext' (the title line as is; the analyzer drops
    # the quotes): the title's words count as passage words.
    return f"{title}\n{text}" if title else text


def _batched(rows: Iterable[tuple[str, str, str]], size: int) -> Iterable[list[tuple[str, str, str]]]:
    batch: list[tuple[str, str, str]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_bm25_index(corpus_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                     k1: float = 0.9, b: float = 0.4, stemmer: str | None = "porter", ascii_fold: bool = False,
                     batch_size: int = 8192, progress: bool = False, threads: int = 1) -> "BM25Retriever":
    """Build a bm25 index of ``corpus_path`` in ``out_dir`` (manifest written last) and load it.

    ``ascii_fold=True`` folds accents in passages and queries (`Torun` finds `Toruń`); off by
    default, as in Lucene's English analyzer. Recorded in the manifest and applied on load.
    """
    if k1 < 0 or not 0 <= b <= 1:
        raise ValueError(f"BM25 parameters out of range: k1={k1} (>= 0), b={b} (0..1)")
    out_dir = Path(out_dir)
    begin_build(out_dir)
    sha = corpus_sha256(corpus_path)
    analyzer = Analyzer(stemmer=stemmer, ascii_fold=ascii_fold)
    vocab: dict[str, int] = {}
    # Postings are spilled to disk per batch of passages and scattered into memory-mapped CSR
    # arrays at the end, so peak RAM stays ~one batch plus per-doc/per-term vectors (wiki-18:
    # 1.4B postings would need ~40 GB as in-RAM COO→CSR).
    spill = out_dir / ".bm25-build"
    if spill.exists():
        shutil.rmtree(spill)
    spill.mkdir()
    chunks: list[int] = []
    df_parts: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    n_docs = 0

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="bm25 index", unit=" passages")

    def rows_and_terms() -> Iterable[tuple[str, str, str]]:
        nonlocal n_docs
        for batch in _batched(iter_corpus(corpus_path), batch_size):
            words = [analyzer.words(_index_text(title, text)) for _, title, text in batch]
            doc_len = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
            flat = analyzer.stem([w for ws in words for w in ws])
            setdefault = vocab.setdefault
            ids = np.fromiter((setdefault(t, len(vocab)) for t in flat), dtype=np.int64, count=len(flat))
            docs = np.repeat(np.arange(n_docs, n_docs + len(batch), dtype=np.int64), doc_len)
            # one (doc, term) key per posting, counted: term frequencies without a Python loop
            keys, tf = np.unique(docs << 32 | ids, return_counts=True)
            terms = (keys & 0xFFFFFFFF).astype(np.int32)
            i = len(chunks)
            np.save(spill / f"{i}.docs.npy", (keys >> 32).astype(np.int32))
            np.save(spill / f"{i}.terms.npy", terms)
            np.save(spill / f"{i}.tf.npy", tf.astype(np.float32))
            chunks.append(i)
            df_parts.append(np.bincount(terms))
            lengths.append(doc_len.astype(np.int32))
            n_docs += len(batch)
            if bar is not None:
                bar.update(len(batch))
            yield from batch

    try:
        doc_count = write_docstore(rows_and_terms(), out_dir)
        if bar is not None:
            bar.close()
        assert doc_count == n_docs
        if n_docs == 0:
            raise ValueError(f"{corpus_path}: corpus has no passages")

        n_terms = len(vocab)
        df = np.zeros(n_terms, dtype=np.int64)
        for part in df_parts:
            df[:len(part)] += part
        del df_parts
        dl = np.concatenate(lengths)
        del lengths
        nnz = int(df.sum())
        avgdl = float(dl.sum(dtype=np.float64)) / n_docs
        idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        norm = k1 * (1.0 - b + b * _decoded_lengths(dl) / max(avgdl, 1e-9))
        index_dtype = np.int32 if max(nnz, n_docs) < 2**31 - 1 else np.int64
        indptr = np.zeros(n_terms + 1, dtype=index_dtype)
        indptr[1:] = np.cumsum(df)
        np.save(out_dir / "bm25_indptr.npy", indptr)
        indices = np.lib.format.open_memmap(out_dir / "bm25_indices.npy", mode="w+", dtype=index_dtype, shape=(nnz,))
        data = np.lib.format.open_memmap(out_dir / "bm25_data.npy", mode="w+", dtype=np.float32, shape=(nnz,))
        cursor = indptr[:-1].astype(np.int64)
        for i in chunks:  # counting-sort scatter: chunks come in doc order, so postings stay doc-sorted
            d = np.load(spill / f"{i}.docs.npy")
            t = np.load(spill / f"{i}.terms.npy")
            tf = np.load(spill / f"{i}.tf.npy")
            w = (idf[t] * tf / (tf + norm[d])).astype(np.float32)
            order = np.argsort(t, kind="stable")
            ts = t[order]
            uniq, starts, counts = np.unique(ts, return_index=True, return_counts=True)
            pos = cursor[ts] + (np.arange(len(ts)) - np.repeat(starts, counts))
            indices[pos] = d[order]
            data[pos] = w[order]
            cursor[uniq] += counts
        indices.flush()
        data.flush()
        np.save(out_dir / "bm25_maxw.npy", _max_weights(indptr, data))
        del indices, data
    finally:
        shutil.rmtree(spill, ignore_errors=True)

    # Ties are broken by doc id string, ascending, as Anserini sorts (score desc, then id).
    import pyarrow.compute as pc
    ids = DocStore(out_dir).ids()
    idrank = np.empty(n_docs, dtype=np.int32 if n_docs < 2**31 - 1 else np.int64)
    idrank[pc.sort_indices(ids).to_numpy()] = np.arange(n_docs, dtype=idrank.dtype)
    np.save(out_dir / "bm25_idrank.npy", idrank)
    terms_list = [""] * n_terms
    for term, i in vocab.items():
        terms_list[i] = term
    (out_dir / _TERMS_FILE).write_text(json.dumps(terms_list, ensure_ascii=False), encoding="utf-8")

    params = {"k1": k1, "b": b, "avgdl": avgdl, "vocab_size": n_terms, "nnz": nnz,
              **analyzer.params()}
    manifest = write_manifest(out_dir, kind=KIND, corpus_sha256=sha, doc_count=n_docs, params=params,
                              libraries=("numpy", "scipy", "pyarrow", "PyStemmer"), corpus_path=corpus_path)
    return load_bm25_index(out_dir, manifest, threads=threads)


def load_bm25_index(out_dir: str | os.PathLike[str], manifest: Manifest, *, threads: int = 1) -> "BM25Retriever":
    return BM25Retriever(out_dir, manifest, threads=threads)


class BM25Retriever:
    """Batched BM25 search over a memory-mapped weight matrix. Thread-safe; share it between forks.

    ``threads`` > 1 maps large batches over a thread pool. Most per-query work is small numpy
    calls that hold the GIL, so this gains little (measured ~1.05× on 2 cores); batching itself
    (one analysis pass, one passage lookup) is the main win.
    """

    kind = KIND

    def __init__(self, index_dir: str | os.PathLike[str], manifest: Manifest, *, threads: int = 1):
        self.index_dir = Path(index_dir)
        self.manifest = manifest
        self.threads = max(1, int(threads))
        params = manifest.params
        self.analyzer = Analyzer(stemmer=params.get("stemmer", "porter"), ascii_fold=params.get("ascii_fold", False))
        try:
            terms = json.loads((self.index_dir / _TERMS_FILE).read_text(encoding="utf-8"))
            arrays = [np.load(self.index_dir / f"bm25_{name}.npy", mmap_mode="r")
                      for name in ("indptr", "indices", "data", "idrank")]
        except (OSError, ValueError) as exc:
            from treegym.retrieval_index.manifest import InvalidIndexError
            raise InvalidIndexError(f"{self.index_dir}: bm25 index files are missing or corrupt ({exc})") from None
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(terms)}
        indptr, indices, data, idrank = arrays
        self.idrank = np.asarray(idrank)
        self.matrix = sp.csr_matrix((data, indices, indptr), shape=(len(terms), manifest.doc_count), copy=False)
        # plain ndarray views of the memmaps: slicing a np.memmap subclass is ~10x slower per call
        self._indptr, self._indices, self._data = np.asarray(indptr), np.asarray(indices), np.asarray(data)
        maxw_path = self.index_dir / "bm25_maxw.npy"
        self.max_weight = np.load(maxw_path) if maxw_path.is_file() else _max_weights(indptr, data)
        self.docs = DocStore(self.index_dir)
        self._pool: ThreadPoolExecutor | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle by path: the mmapped arrays stay on disk, another process re-opens them.
        return (load_bm25_index, (str(self.index_dir), self.manifest), {"threads": self.threads})

    def __setstate__(self, state: dict) -> None:
        self.threads = state.get("threads", 1)

    def __len__(self) -> int:
        return self.manifest.doc_count

    def query_terms(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(term ids, counts) of the query's known terms (a repeated term counts twice, as in Anserini)."""
        return self._analyze_batch([query])[0]

    def _analyze_batch(self, queries: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        # one stemmer call for the whole batch: per-call overhead dominated small queries
        words = [self.analyzer.words(q) for q in queries]
        stems = iter(self.analyzer.stem([w for ws in words for w in ws]))
        vocab = self.vocab
        out = []
        for ws in words:
            found: dict[int, int] = {}
            for _ in range(len(ws)):
                i = vocab.get(next(stems))
                if i is not None:
                    found[i] = found.get(i, 0) + 1
            out.append((np.fromiter(found.keys(), dtype=np.int64, count=len(found)),
                        np.fromiter(found.values(), dtype=np.float32, count=len(found))))
        return out

    def _lookup(self, cands: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask of cands present in the term's doc-sorted postings [lo, hi), their weights)."""
        post = self._indices[lo:hi]
        pos = np.searchsorted(post, cands)
        np.minimum(pos, hi - lo - 1, out=pos)
        hit = post[pos] == cands
        return hit, self._data[lo:hi][pos[hit]]

    def _top_one(self, query: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k for one query with MaxScore pruning (Turtle & Flood, 1995).

        Why: a query of common words has postings covering much of the corpus; scoring all of
        them is what made a plain sparse product slow on 100k passages (Lucene prunes likewise).
        θ starts as the k-th best weight in the highest-bound term's postings (a lower bound on
        the final k-th score). Query terms whose upper bounds sum below θ are non-essential: a doc
        containing only them cannot reach the top k. Candidates are the postings of the essential
        terms, summed by doc; a candidate whose partial score plus the non-essential bounds stays
        below θ is dropped; the rest get the non-essential terms' weights by binary search in
        those (doc-sorted) postings. The result is exact, identical to scoring everything.
        """
        terms, counts = query
        if len(terms) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        los = self._indptr[terms].tolist()
        his = self._indptr[terms + 1].tolist()
        cnt = counts.tolist()
        bounds = self.max_weight[terms] * counts
        top = int(np.argmax(bounds))
        theta = 0.0
        if his[top] - los[top] >= k:
            w = self._data[los[top]:his[top]]
            theta = float(np.partition(w, len(w) - k)[len(w) - k]) * cnt[top]
        asc = np.argsort(bounds, kind="stable").tolist()
        cum = np.cumsum(bounds[asc].astype(np.float64)) * (1 + 1e-5)
        n_non = int(np.searchsorted(cum, theta, side="left")) if theta > 0 else 0
        non_essential, essential = asc[:n_non], asc[n_non:]
        # partial scores over the essential terms, summed per doc
        if len(essential) == 1:
            j = essential[0]
            cands = self._indices[los[j]:his[j]]
            partial = self._data[los[j]:his[j]] * np.float32(cnt[j]) if cnt[j] != 1 else self._data[los[j]:his[j]]
        else:
            docs = np.concatenate([self._indices[los[j]:his[j]] for j in essential])
            weights = np.concatenate([self._data[los[j]:his[j]] * np.float32(cnt[j]) if cnt[j] != 1
                                      else self._data[los[j]:his[j]] for j in essential])
            order = np.argsort(docs, kind="stable")
            docs, weights = docs[order], weights[order]
            starts = np.flatnonzero(np.concatenate(([True], docs[1:] != docs[:-1])))
            cands, partial = docs[starts], np.add.reduceat(weights, starts)
        if non_essential:
            if len(partial) >= k:
                theta = max(theta, float(np.partition(partial, len(partial) - k)[len(partial) - k]))
            rest = float(cum[n_non - 1])
            keep = partial + rest >= theta
            cands, scores = cands[keep], partial[keep].astype(np.float32, copy=True)
            for j in non_essential:
                hit, w = self._lookup(cands, los[j], his[j])
                scores[hit] += w * np.float32(cnt[j]) if cnt[j] != 1 else w
        else:
            scores = partial
        return self._select(cands, scores, k)

    def _select(self, cands: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # top-k by score, ties by doc id string (Anserini's order)
        if len(scores) > k:
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            keep = scores >= kth
            cands, scores = cands[keep], scores[keep]
        order = np.lexsort((self.idrank[cands], -scores))[:k]
        return cands[order], scores[order]

    def search_ids(self, queries: Sequence[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k (row numbers, scores) per query, best first — the raw result, no passage lookup."""
        queries = check_search_args(queries, k)
        if not queries:
            return []
        if self.threads > 1 and len(queries) >= 64:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bm25")
            return list(self._pool.map(lambda q: self._top_one(q, k), self._analyze_batch(queries), chunksize=32))
        return [self._top_one(q, k) for q in self._analyze_batch(queries)]

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Batched search: at most ``k`` hits per query; empty/stop-word-only queries give ``[]``."""
        ranked = self.search_ids(queries, k)
        rows = np.concatenate([r for r, _ in ranked]) if ranked else np.zeros(0, np.int64)
        passages = iter(self.docs.get(rows))
        results = []
        for row_ids, scores in ranked:
            hits = []
            for score in scores.tolist():
                doc_id, title, text = next(passages)
                hits.append(Hit(doc_id, score, title, text))
            results.append(hits)
        return results
