"""`treegym index build | search | eval`: build an index from a corpus, query it, measure it.

    treegym index build --corpus corpus.jsonl --kind dense --faiss ivfpq --out idx/
    treegym index search idx/ "who founded Dosund" -k 3
    treegym index eval idx/ --data synthetic --split test

Thin on purpose: the work is in `build_index` / `load_index` / `evaluate.evaluate_retriever`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main"]

_DENSE_FLAGS = ("faiss", "model", "max_length", "batch_size", "quantize", "prefixes", "nlist", "pq_m", "pq_nbits",
                "nprobe_build", "hnsw_m", "ef_search_build", "shard_size", "no_keep_embeddings")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treegym index", description="Build, search and evaluate retrieval indexes.")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build an index directory from a jsonl corpus")
    b.add_argument("--corpus", required=True, type=Path, help='jsonl corpus: {"id","contents"} or {"id","title","text"}')
    b.add_argument("--kind", default="bm25", choices=["bm25", "lucene", "dense", "hybrid"])
    b.add_argument("--out", required=True, type=Path, help="index directory to write")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--ascii-fold", action="store_true",
                   help="bm25/lucene: fold accents in passages and queries (Torun finds Toruń); default off, as in "
                        "Lucene's English analyzer")
    _threads_flag(b)
    d = b.add_argument_group("dense / hybrid options")
    d.add_argument("--faiss", choices=["flat", "hnsw", "ivfpq"], default=None, help="FAISS index type (default flat)")
    d.add_argument("--model", default=None, help="local HF encoder directory (default: packaged all-MiniLM-L6-v2)")
    d.add_argument("--e5", dest="prefixes", action="store_const", const="e5", default=None,
                   help="use e5's 'query: '/'passage: ' prefixes (auto-detected from the model name)")
    d.add_argument("--max-length", type=int, default=None, help="encoder max tokens per passage (default 256)")
    d.add_argument("--batch-size", type=int, default=None, help="encoding batch size (default 32)")
    d.add_argument("--quantize", action="store_true", default=None, help="int8 dynamic quantization (CPU)")
    d.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4*sqrt(n))")
    d.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers, must divide the dimension (default dim/4)")
    d.add_argument("--pq-nbits", type=int, default=None, help="bits per PQ code (default 8)")
    d.add_argument("--nprobe", dest="nprobe_build", type=int, default=None, help="default IVF lists searched")
    d.add_argument("--hnsw-m", type=int, default=None, help="HNSW graph degree (default 32)")
    d.add_argument("--ef-search", dest="ef_search_build", type=int, default=None, help="HNSW efSearch (default 128)")
    d.add_argument("--shard-size", type=int, default=None, help="passages per resumable embedding shard (4096)")
    d.add_argument("--no-keep-embeddings", action="store_true", default=None,
                   help="delete the float32 passage vectors after building (saves disk; no re-index / torch backend)")
    h = b.add_argument_group("hybrid options (reciprocal-rank fusion, stored in the manifest)")
    h.add_argument("--sparse", choices=["bm25", "lucene"], default=None, help="the sparse side (bm25)")
    h.add_argument("--rrf-k", type=float, default=None, help="RRF constant k (default 60)")
    h.add_argument("--sparse-weight", type=float, default=None,
                   help="weight of the sparse side's RRF term, the dense side's is 1 (default 1; the synthetic "
                        "worlds' tuned fusion is --rrf-k 100 --sparse-weight 1.25)")

    s = sub.add_parser("search", help="search an index")
    s.add_argument("index", type=Path)
    s.add_argument("queries", nargs="+", help="one or more queries")
    s.add_argument("-k", type=int, default=3)
    s.add_argument("--json", action="store_true", help="print Search-R1-style JSON")
    _load_flags(s)

    e = sub.add_parser("eval", help="recall@k of supporting docs and answer recall on QA tasks")
    e.add_argument("index", type=Path)
    e.add_argument("--data", required=True,
                   help="tasks: 'synthetic[:kind]', a Search-R1 parquet, a FlashRAG jsonl or a world directory")
    e.add_argument("--split", default=None, help="split to use (default: test if present, else all)")
    e.add_argument("-k", "--ks", type=int, nargs="+", default=[1, 3, 10])
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N tasks only")
    e.add_argument("--json", action="store_true")
    _load_flags(e)
    return p


def _threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the dense encoder and FAISS (default: torch's; use 1 on cores shared with "
                        "another job)")


def _load_flags(p: argparse.ArgumentParser) -> None:
    _threads_flag(p)
    p.add_argument("--backend", default=None, help="dense backend: faiss, faiss-gpu or torch")
    p.add_argument("--nprobe", type=int, default=None, help="dense ivfpq: lists to search")
    p.add_argument("--rerank", type=int, default=None,
                   help="dense hnsw/ivfpq: re-score RERANK*k candidates exactly with the on-disk vectors")


def _load_opts(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("backend", args.backend), ("nprobe", args.nprobe), ("rerank", args.rerank))
            if v is not None}


def _build(args: argparse.Namespace) -> int:
    from treegym.retrieval_index import build_index

    opts: dict[str, Any] = {}
    dense_given = [f for f in _DENSE_FLAGS if getattr(args, f, None) is not None]
    if args.kind in ("dense", "hybrid"):
        rename = {"nprobe_build": "nprobe", "ef_search_build": "ef_search"}
        for f in dense_given:
            if f == "no_keep_embeddings":
                opts["keep_embeddings"] = False
            else:
                opts[rename.get(f, f)] = getattr(args, f)
        opts["progress"] = not args.quiet
        if args.kind == "hybrid":
            if args.sparse:
                opts["sparse"] = args.sparse
            if args.rrf_k is not None:
                opts["rrf_k"] = args.rrf_k
            if args.sparse_weight is not None:
                opts["weights"] = (args.sparse_weight, 1.0)
    elif dense_given:
        flags = ", ".join("--" + f.replace("_build", "").replace("_", "-") for f in dense_given)
        print(f"treegym index build: {flags} only apply to --kind dense or hybrid", file=sys.stderr)
        return 2
    elif args.kind == "bm25":
        opts["progress"] = not args.quiet
    if args.ascii_fold:
        if args.kind not in ("bm25", "lucene"):
            print("treegym index build: --ascii-fold applies to --kind bm25 or lucene", file=sys.stderr)
            return 2
        opts["ascii_fold"] = True
    hybrid_given = [f for f in ("sparse", "rrf_k", "sparse_weight") if getattr(args, f) is not None]
    if hybrid_given and args.kind != "hybrid":
        flags = ", ".join("--" + f.replace("_", "-") for f in hybrid_given)
        print(f"treegym index build: {flags} only apply to --kind hybrid", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        retriever = build_index(args.corpus, args.kind, args.out, **opts)
    except RuntimeError as exc:  # e.g. another build of the same --out is running
        print(f"treegym index build: {exc}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    n = len(retriever) if hasattr(retriever, "__len__") else None
    print(f"built {args.kind} index of {n if n is not None else '?'} passages in {args.out} "
          f"({dt:.1f}s, {size / 1e6:.1f} MB on disk)")
    return 0


def _search(args: argparse.Namespace) -> int:
    from treegym.retrieval_index import load_index
    from treegym.retrieval_index.server import hit_to_document

    if args.k < 1:
        print("treegym index search: -k must be >= 1", file=sys.stderr)
        return 2
    retriever = load_index(args.index, **_load_opts(args))
    results = retriever.search(args.queries, args.k)
    if args.json:
        print(json.dumps({"result": [[{"document": hit_to_document(h), "score": h.score} for h in hits]
                                     for hits in results]}, ensure_ascii=False, indent=1))
        return 0
    for q, hits in zip(args.queries, results):
        print(f"query: {q}")
        if not hits:
            print("  (no hits)")
        for i, h in enumerate(hits, 1):
            text = h.text if len(h.text) <= 160 else h.text[:157] + "..."
            print(f"  {i}. [{h.doc_id}] {h.score:.4f}  {h.title}: {text}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from treegym.retrieval_index import load_index
    from treegym.retrieval_index.evaluate import evaluate_retriever, format_report

    if args.load_tasks is None:
        raise ValueError("index eval needs a dataset loader; run it as `treegym index eval`")
    tasks = args.load_tasks(args.data, args.split)
    if args.limit is not None:
        tasks = tasks[: max(0, args.limit)]
    if not tasks:
        print("treegym index eval: no tasks to evaluate", file=sys.stderr)
        return 2
    retriever = load_index(args.index, **_load_opts(args))
    metrics = evaluate_retriever(retriever, tasks, args.ks)
    print(json.dumps(metrics, indent=1) if args.json else format_report(metrics))
    return 0


TaskLoader = Callable[[str, str | None], list[Any]]


def main(argv: Sequence[str] | None = None, load_tasks: TaskLoader | None = None) -> int:
    """`treegym index ...`. ``load_tasks(data, split)`` gives `eval` its questions: datasets live
    above this package (in envs), so the top-level `treegym` command passes the loader in."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    args.load_tasks = load_tasks
    try:
        if args.threads is not None:
            from treegym.retrieval_index.encoder import set_cpu_threads
            set_cpu_threads(args.threads)
        return {"build": _build, "search": _search, "eval": _eval}[args.cmd](args)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        # Bad paths, corrupt or mismatched indexes, malformed corpora: one clear line, exit 2.
        print(f"treegym index {args.cmd}: {exc}", file=sys.stderr)
        return 2
