"""Hybrid retrieval (`kind="hybrid"`): reciprocal-rank fusion of a sparse and a dense index.

Why RRF (Cormack et al., SIGIR 2009): BM25 scores and cosine similarities live on different
scales, so score interpolation needs per-corpus tuning; RRF uses only ranks,
``score(d) = Σ_r w_r / (rrf_k + rank_r(d))``, and is the standard robust default. BM25 wins on
rare names, the dense encoder on paraphrase; fusing both fixes most misses of either.

Weighted RRF (``weights=(w_sparse, w_dense)``) lets a corpus favour the side that is stronger on
it. The defaults (equal weights, ``rrf_k=60``, depth 100) are the literature's and right for an
unknown corpus (with e5 on wiki-18 the dense side is the stronger one). On the synthetic worlds
BM25 is the stronger side (invented names), and ``rrf_k=100, weights=(1.25, 1)``, chosen on worlds
1-19, is the setting whose worst world stays at or above the better single backend; the selection and its
numbers are in ``benchmarks/retrieval_fusion.py``. Score fusion (min-max or z-score CombSUM,
pyserini's ``HybridSearcher`` interpolation) was measured there too and lost to RRF by ~1-2 points.

Layout: ``sparse/`` and ``dense/`` are complete indexes of their own (each with a manifest), so
either can also be loaded or served alone; ``manifest.json`` at the top says ``kind: hybrid``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from treegym.retrieval_index.base import Hit, Retriever, check_search_args

__all__ = ["HybridRetriever", "build_hybrid_index", "load_hybrid_index", "rrf_fuse"]

KIND = "hybrid"


def rrf_fuse(rankings: Sequence[Sequence[Hit]], k: int, *, rrf_k: float = 60.0,
             weights: Sequence[float] | None = None) -> list[Hit]:
    """Fuse ranked hit lists into one top-`k` list; a hit's score becomes its fused RRF score.

    Ties (equal fused score) go to the document with the better best rank, then the lower doc id,
    so the result is deterministic.
    """
    weights = _check_weights(weights, len(rankings)) if weights is not None else [1.0] * len(rankings)
    score: dict[str, float] = {}
    best: dict[str, int] = {}
    first_hit: dict[str, Hit] = {}
    for w, hits in zip(weights, rankings):
        for rank, hit in enumerate(hits, start=1):
            score[hit.doc_id] = score.get(hit.doc_id, 0.0) + w / (rrf_k + rank)
            best[hit.doc_id] = min(best.get(hit.doc_id, rank), rank)
            first_hit.setdefault(hit.doc_id, hit)
    order = sorted(score, key=lambda d: (-score[d], best[d], d))[:k]
    return [Hit(doc_id=d, score=score[d], title=first_hit[d].title, text=first_hit[d].text) for d in order]


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    """One finite, non-negative weight per ranking, not all zero (else every fused score is 0)."""
    try:
        out = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"RRF weights must be numbers, got {weights!r}") from None
    if len(out) != n:
        raise ValueError(f"{len(out)} RRF weights for {n} rankings")
    if not all(math.isfinite(w) and w >= 0 for w in out) or not any(out):
        raise ValueError(f"RRF weights must be finite, >= 0 and not all 0, got {out}")
    return out


class HybridRetriever:
    """RRF over any two (or more) retrievers; each is asked for `depth` hits per query (≥ k).

    `weights` (one per retriever, default all 1) make it weighted RRF.
    """

    kind = KIND

    def __init__(self, retrievers: Sequence[Retriever], *, rrf_k: float = 60.0, depth: int = 100,
                 weights: Sequence[float] | None = None, manifest: Any = None):
        if len(retrievers) < 2:
            raise ValueError("a hybrid retriever fuses at least two retrievers")
        if depth < 1 or rrf_k < 0:
            raise ValueError(f"hybrid needs depth >= 1 and rrf_k >= 0, got depth={depth}, rrf_k={rrf_k}")
        self.retrievers = list(retrievers)
        self.rrf_k = float(rrf_k)
        self.depth = int(depth)
        self.weights = _check_weights(weights, len(self.retrievers)) if weights is not None else None
        self.manifest = manifest

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        queries = check_search_args(queries, k)
        depth = max(k, self.depth)
        per_backend = [r.search(queries, depth) for r in self.retrievers]
        return [rrf_fuse([res[i] for res in per_backend], k, rrf_k=self.rrf_k, weights=self.weights)
                for i in range(len(queries))]

    def __len__(self) -> int:
        return len(self.retrievers[0])  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (f"HybridRetriever({self.retrievers!r}, rrf_k={self.rrf_k}, depth={self.depth}, "
                f"weights={self.weights})")


def build_hybrid_index(corpus_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       sparse: str = "bm25", rrf_k: float = 60.0, depth: int = 100,
                       weights: Sequence[float] | None = None,
                       sparse_opts: dict[str, Any] | None = None, progress: bool = True,
                       **dense_opts: Any) -> HybridRetriever:
    """Build `out_dir/sparse` (bm25 or lucene) and `out_dir/dense`, then the hybrid manifest.

    `rrf_k`, `depth` and `weights` (sparse, dense) are stored in the manifest and used on load.
    Extra keyword options go to the dense build (`faiss`, `model`, `max_length`, ...).
    """
    from treegym.retrieval_index import build_index
    from treegym.retrieval_index.corpus import corpus_sha256
    from treegym.retrieval_index.manifest import begin_build, write_manifest

    if sparse not in ("bm25", "lucene"):
        raise ValueError(f"hybrid sparse side must be 'bm25' or 'lucene', got {sparse!r}")
    if depth < 1 or rrf_k < 0:
        raise ValueError(f"hybrid needs depth >= 1 and rrf_k >= 0, got depth={depth}, rrf_k={rrf_k}")
    weights = _check_weights(weights, 2) if weights is not None else None
    out = begin_build(out_dir)
    sha = corpus_sha256(corpus_path)
    s = build_index(corpus_path, sparse, out / "sparse", **(sparse_opts or {}))
    d = build_index(corpus_path, "dense", out / "dense", progress=progress, **dense_opts)
    dm = d.manifest
    params = {"sparse": sparse, "rrf_k": rrf_k, "depth": depth, "weights": weights,
              "dense": dict(dm.params) if dm is not None else {}}
    manifest = write_manifest(out, kind=KIND, corpus_sha256=sha, doc_count=len(d), params=params,
                              corpus_path=corpus_path)
    return HybridRetriever([s, d], rrf_k=rrf_k, depth=depth, weights=weights, manifest=manifest)


def load_hybrid_index(out_dir: str | os.PathLike[str], manifest: Any = None, *, rrf_k: float | None = None,
                      depth: int | None = None, weights: Sequence[float] | None = None,
                      **dense_opts: Any) -> HybridRetriever:
    """Open both halves (checked against the hybrid's corpus hash); `dense_opts` go to the dense side.

    `rrf_k`, `depth` and `weights` override the values stored at build time.
    """
    from treegym.retrieval_index import load_index
    from treegym.retrieval_index.manifest import read_manifest

    out = Path(out_dir)
    manifest = manifest or read_manifest(out, expect_kind=KIND)
    params = manifest.params
    s = load_index(out / "sparse", expect_corpus_sha256=manifest.corpus_sha256, expect_kind=params.get("sparse"))
    d = load_index(out / "dense", expect_corpus_sha256=manifest.corpus_sha256, expect_kind="dense", **dense_opts)
    return HybridRetriever([s, d], rrf_k=rrf_k if rrf_k is not None else params.get("rrf_k", 60.0),
                           depth=depth if depth is not None else params.get("depth", 100),
                           weights=weights if weights is not None else params.get("weights"), manifest=manifest)
