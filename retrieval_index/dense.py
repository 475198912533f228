"""Dense retrieval (`kind="dense"`): encoder vectors + FAISS Flat / HNSW / IVF-PQ, or torch top-k.

Why three FAISS types: Search-R1's flat e5 index of wiki-18 needs ~62 GB and OOMs GPUs; HNSW
trades memory for speed, IVF-PQ cuts memory 8-11x (136 bytes per passage at wiki-18 scale instead
of 1,536-byte vectors for a 384-d encoder) at a small recall cost (`treegym index eval` measures it). Why a torch
backend: when faiss-gpu is not installable, an exact top-k by sharded fp16/bf16 matmul is what
users fall back to on a GPU; it is selectable on CPU too (fp32) so it is tested everywhere.

Index directory layout (besides `manifest.json`, written by `build_index`):
  docs.arrow          passages (shared DocStore), row i = vector i
  dense.json          encoder settings + FAISS parameters (queries must be encoded like passages)
  index.faiss         the FAISS index, memory-mapped on load where FAISS supports it
  embeddings/         float32 shards of the passage vectors: resumable encoding, and a re-index
                      with other FAISS settings needs no re-encoding (`keep_embeddings=False` drops them)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from treegym.retrieval_index.base import Hit, check_search_args
from treegym.retrieval_index.encoder import Encoder, encode_to_shards, encoder_from_config, iter_shards

__all__ = ["DenseRetriever", "ShardedVectors", "build_dense_index", "load_dense_index", "make_faiss_index", "ivfpq_params",
           "ivfpq_bytes",
           "FAISS_TYPES", "BACKENDS"]

FAISS_TYPES = ("flat", "hnsw", "ivfpq")
BACKENDS = ("auto", "faiss", "faiss-gpu", "torch")
KIND = "dense"
CONFIG_FILE = "dense.json"
INDEX_FILE = "index.faiss"
EMB_DIR = "embeddings"


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency of the dense extra
        raise ImportError("dense indexes need FAISS: pip install 'treegym[dense]' (faiss-cpu)") from exc
    return faiss


class ShardedVectors:
    """The memory-mapped embedding shards seen as one (n, dim) array, without concatenating them.

    Why: wiki-18's vectors are 32 GB (384-d) to 64 GB (768-d) of float32; an IVF-PQ build needs
    only a training sample and chunks to add, so it must not load them all at once.
    """

    def __init__(self, shards: list[np.ndarray], dim: int):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.shape = (int(self.offsets[-1]), int(dim))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise ValueError("ShardedVectors slices must be contiguous")
            rows = np.arange(start, stop)
        else:
            rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][rows[mask] - self.offsets[s]]
        return out


# --------------------------------------------------------------------------------------------
# FAISS index construction


def ivfpq_params(n: int, dim: int, *, nlist: int | None = None, m: int | None = None, nbits: int | None = None,
                 nprobe: int | None = None) -> dict[str, int]:
    """IVF-PQ settings that train on `n` vectors without starving k-means.

    - nlist ≈ 4·√n but ≥ 39 training points per list (FAISS's own minimum), so tiny corpora get
      a handful of lists instead of empty ones.
    - m = dim/3 sub-quantizers (3 dims each, 1 byte with 8 bits): 128 B codes + 8 B id per 384-d
      vector vs 1,536 B flat (1/11). Measured on the synthetic world's vectors (3,055 passages):
      ANN recall@10 vs Flat 0.92 with m=128 against 0.87 with m=96 (both with every list probed);
      m must divide dim. `rerank` (DenseRetriever) recovers exact order from the on-disk vectors.
    - nbits: the largest (≤ 8) at which the whole index — codes, 8-byte ids, the PQ codebook
      (2^nbits·dim floats) and the coarse centroids — takes ≤ 1/8 of Flat's bytes
      (`ivfpq_bytes`). The codebook is fixed-size, so small corpora need fewer bits: on the
      default synthetic world (3,055 passages, MiniLM) 8 bits took 304 B/passage (1/5 of Flat)
      at 1.001x Flat's supporting-doc recall@10, 6 bits 176 B (1/8.7) at 0.997x, 5 bits 144 B
      at 0.988x; the cost is search speed (FAISS has a fast path for 8-bit codes only: 1,458 vs
      3,072 vector-searches/s there, still far above MiniLM's query encoding), so pass
      `nbits=8` (`--pq-nbits 8`) where memory does not matter. From ~25k passages (384-d) 8 bits
      fit. Below ~1,000 passages no setting of ≥ 5 bits fits (the index is a few hundred KB
      anyway); there nbits = min(6, log2(n)-1): a codebook cannot have more centroids than
      training points.
    - nprobe: at least 1/8 of the lists and enough to scan ~50k codes (so every list below ~50k
      passages). Questions sit far from passage clusters: on the synthetic world (3,055 passages,
      78 lists) supporting-doc recall@10 was 0.63 at nprobe 16, 0.66 at 32 and 0.74 (= Flat) at 78.
    """
    if n < 2:
        raise ValueError(f"IVF-PQ needs at least 2 passages to train, got {n}")
    if nlist is None:
        nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))
    if m is None:
        m = max(1, dim // 3)
        while dim % m:
            m -= 1
    if dim % m:
        raise ValueError(f"IVF-PQ m={m} must divide the vector dimension {dim}")
    if nbits is None:
        fits = [b for b in range(8, 4, -1) if ivfpq_bytes(n, dim, nlist, m, b) * 8 <= n * dim * 4]
        nbits = fits[0] if fits else max(1, min(6, int(math.log2(n)) - 1))
    if nprobe is None:
        # scan >= 1/8 of the lists and >= ~50k codes per query (all lists below ~50k passages)
        nprobe = max(16, nlist // 8, math.ceil(nlist * 50_000 / n))
    return {"nlist": int(nlist), "m": int(m), "nbits": int(nbits), "nprobe": int(min(nprobe, nlist))}


def ivfpq_bytes(n: int, dim: int, nlist: int, m: int, nbits: int) -> int:
    """Bytes of a FAISS IndexIVFPQ holding `n` vectors (its serialised size, within a few hundred
    bytes of headers): per vector ceil(m·nbits/8) code bytes + an 8-byte id, plus the PQ codebook
    (2^nbits centroids of dim floats) and the coarse quantizer (nlist centroids)."""
    return n * (math.ceil(m * nbits / 8) + 8) + (2 ** nbits) * dim * 4 + nlist * dim * 4


def make_faiss_index(vectors: np.ndarray, faiss_type: str = "flat", *, hnsw_m: int = 32, ef_construction: int = 200,
                     ef_search: int = 128, ivf: dict[str, int] | None = None, train_size: int = 262_144,
                     seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Build (train + add) a FAISS inner-product index over unit vectors; returns (index, params).

    `vectors` may be a memmap: IVF-PQ trains on a random sample of `train_size` rows and adds in
    chunks, so building never needs a second full copy in RAM.
    """
    faiss = _faiss()
    n, dim = vectors.shape
    if faiss_type == "flat":
        index = faiss.IndexFlatIP(dim)
        params: dict[str, Any] = {}
    elif faiss_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.hnsw.efSearch = int(ef_search)
        params = {"hnsw_m": int(hnsw_m), "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
    elif faiss_type == "ivfpq":
        p = ivfpq_params(n, dim, **(ivf or {}))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        # Small corpora train on few points per centroid on purpose; keep FAISS from warning.
        index.cp.min_points_per_centroid = 1
        index.pq.cp.min_points_per_centroid = 1
        index.cp.seed = seed
        index.pq.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))  # sorted rows: sequential reads
        index.nprobe = p["nprobe"]
        params = dict(p)
    else:
        raise ValueError(f"unknown faiss type {faiss_type!r}; expected one of {', '.join(FAISS_TYPES)}")
    for start in range(0, n, 65_536):
        index.add(np.ascontiguousarray(vectors[start:start + 65_536], dtype=np.float32))
    return index, params


def _read_faiss(path: Path, mmap: bool):
    faiss = _faiss()
    if mmap:
        # MMAP_IFC maps flat codes too (FAISS >= 1.8); older builds map only IVF lists.
        for flag_name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
            flag = getattr(faiss, flag_name, None)
            if flag is None:
                continue
            try:
                return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                continue
    return faiss.read_index(str(path))


# --------------------------------------------------------------------------------------------
# Search backends


class _TorchTopK:
    """Exact inner-product top-k by matmul over corpus shards (bounded memory per step).

    fp16/bf16 on a GPU (half the memory of fp32, tensor cores); fp32 on CPU where half matmuls are
    slow. Shards keep the (queries × shard) score matrix small for 21M-row corpora.
    """

    def __init__(self, vectors: "np.ndarray | ShardedVectors", *, device: str | None = None, dtype: str | None = None,
                 shard_rows: int = 1 << 20):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "float16" if self.device.type == "cuda" else "float32"
        if dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"torch backend dtype must be float16, bfloat16 or float32, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self.shard_rows = int(shard_rows)
        self.shards = []
        for start in range(0, len(vectors), self.shard_rows):
            chunk = torch.from_numpy(np.array(vectors[start:start + self.shard_rows], dtype=np.float32))  # copy: mmaps are read-only
            self.shards.append(chunk.to(self.device, self.dtype))
        self.ntotal = len(vectors)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        k = min(k, self.ntotal)
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device, self.dtype)
        best_s = best_i = None
        offset = 0
        with torch.inference_mode():
            for shard in self.shards:
                scores = (qt @ shard.T).float()
                s, i = scores.topk(min(k, shard.shape[0]), dim=1)
                i = i + offset
                offset += shard.shape[0]
                if best_s is None:
                    best_s, best_i = s, i
                else:
                    cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                    best_s, pos = cat_s.topk(k, dim=1)
                    best_i = cat_i.gather(1, pos)
        return best_s.cpu().numpy(), best_i.cpu().numpy()


class DenseRetriever:
    """`Retriever` over a dense index directory: encode queries, search, fetch passages.

    Thread-safe for concurrent `search` calls (FAISS search and torch inference are re-entrant);
    shared by env forks through the query cache. Pickles by path (a worker process re-opens the
    memory-mapped index instead of copying it).
    """

    kind = KIND

    def __init__(self, index_dir: str | os.PathLike[str], *, manifest: Any = None, backend: str = "auto",
                 mmap: bool = True,
                 nprobe: int | None = None, ef_search: int | None = None, device: str | None = None,
                 torch_dtype: str | None = None, encoder: Encoder | None = None, batch_size: int = 64,
                 rerank: int = 0):
        from treegym.retrieval_index.docstore import DocStore

        self.index_dir = Path(index_dir)
        self.manifest = manifest
        self._opts = {"backend": backend, "mmap": mmap, "nprobe": nprobe, "ef_search": ef_search, "device": device,
                      "torch_dtype": torch_dtype, "batch_size": batch_size, "rerank": rerank}
        cfg_path = self.index_dir / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{self.index_dir} is not a dense index (no {CONFIG_FILE})")
        self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if backend not in BACKENDS:
            raise ValueError(f"unknown dense backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.docs = DocStore(self.index_dir)
        self.encoder = encoder or encoder_from_config(self.config["encoder"], batch_size=batch_size, device=device)
        if self.encoder.dim != int(self.config["encoder"]["dim"]):
            raise ValueError(f"encoder dimension {self.encoder.dim} does not match the index's "
                             f"{self.config['encoder']['dim']}")
        self.faiss_type = self.config["faiss"]
        self.backend = self._pick_backend(backend)
        self._index = None
        self._torch: _TorchTopK | None = None
        if self.backend == "torch":
            self._torch = _TorchTopK(self._vectors_for_torch(mmap), device=device, dtype=torch_dtype)
        else:
            self._index = _read_faiss(self.index_dir / INDEX_FILE, mmap)
            if nprobe is not None and hasattr(self._index, "nprobe"):
                self._index.nprobe = int(nprobe)
            if ef_search is not None and hasattr(self._index, "hnsw"):
                self._index.hnsw.efSearch = int(ef_search)
            if self.backend == "faiss-gpu":
                faiss = _faiss()
                co = faiss.GpuMultipleClonerOptions()
                co.useFloat16 = True
                co.shard = True
                self._index = faiss.index_cpu_to_all_gpus(self._index, co=co)
        # rerank=R: fetch R·k approximate candidates, re-score them exactly with the float32 vectors
        # memory-mapped from disk (RAM holds only the PQ codes; the OS caches the rows it touches).
        self.rerank = int(rerank)
        self._exact: ShardedVectors | None = None
        if self.rerank > 1 and self.backend != "torch":
            shards = list(iter_shards(self.index_dir / EMB_DIR)) if (self.index_dir / EMB_DIR).is_dir() else []
            if not shards:
                raise ValueError(f"{self.index_dir}: rerank needs the passage vectors (build with keep_embeddings=True)")
            self._exact = ShardedVectors(shards, self.encoder.dim)
        if len(self.docs) != self.ntotal:
            raise ValueError(f"{self.index_dir}: {self.ntotal} vectors but {len(self.docs)} passages; rebuild the index")

    def _pick_backend(self, backend: str) -> str:
        if backend != "auto":
            if backend == "faiss-gpu" and _faiss_gpus() == 0:
                raise RuntimeError("backend='faiss-gpu' needs faiss with GPU support and a visible GPU")
            return backend
        if _faiss_gpus() > 0:
            return "faiss-gpu"
        try:
            import torch
            if torch.cuda.is_available() and self.faiss_type == "flat" and (self.index_dir / EMB_DIR).is_dir():
                return "torch"  # exact search on the GPU when faiss-gpu is missing
        except ImportError:  # pragma: no cover
            pass
        return "faiss"

    def _vectors_for_torch(self, mmap: bool) -> np.ndarray:
        shards = list(iter_shards(self.index_dir / EMB_DIR)) if (self.index_dir / EMB_DIR).is_dir() else []
        if shards:
            return ShardedVectors(shards, self.encoder.dim)  # copied to the device shard by shard
        if self.faiss_type == "flat":
            index = _read_faiss(self.index_dir / INDEX_FILE, mmap)
            return index.reconstruct_n(0, index.ntotal)
        raise ValueError(f"{self.index_dir}: the torch backend needs the passage vectors (an index built with "
                         "keep_embeddings=True, or a flat index)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (str(self.index_dir), self.manifest, self._opts))

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def ntotal(self) -> int:
        return self._torch.ntotal if self._torch is not None else int(self._index.ntotal)

    @property
    def doc_count(self) -> int:
        return len(self.docs)

    def search_vectors(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-k (scores, row numbers; -1 = none) for unit query vectors."""
        if self._torch is not None:
            return self._torch.search(q, k)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self._exact is None:
            return self._index.search(q, min(k, self.ntotal))
        _, cand = self._index.search(q, min(k * self.rerank, self.ntotal))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        rows = np.full((len(q), k), -1, dtype=np.int64)
        for i, c in enumerate(cand):
            c = c[c >= 0]
            exact = self._exact[np.sort(c)] @ q[i]
            order = np.argsort(-exact, kind="stable")[:k]
            rows[i, :len(order)] = np.sort(c)[order]
            scores[i, :len(order)] = exact[order]
        return scores, rows

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        queries = check_search_args(queries, k)
        out: list[list[Hit]] = [[] for _ in queries]
        live = [i for i, q in enumerate(queries) if q.strip()]
        if not live or self.ntotal == 0:
            return out  # blank queries get no hits, like the sparse backends
        q = self.encoder.encode_queries([queries[i] for i in live])
        scores, rows = self.search_vectors(q, k)
        flat_rows = [int(r) for row in rows for r in row if r >= 0]
        docs = iter(self.docs.get(flat_rows))
        for qi, srow, rrow in zip(live, scores, rows):
            hits = []
            for s, r in zip(srow, rrow):
                if r < 0:
                    continue
                doc_id, title, text = next(docs)
                hits.append(Hit(doc_id=doc_id, score=float(s), title=title, text=text))
            out[qi] = hits
        return out

    def __repr__(self) -> str:
        return (f"DenseRetriever({str(self.index_dir)!r}, faiss={self.faiss_type!r}, backend={self.backend!r}, "
                f"docs={self.doc_count})")


def _reopen(index_dir: str, manifest: Any, opts: dict[str, Any]) -> "DenseRetriever":
    return DenseRetriever(index_dir, manifest=manifest, **opts)


def _faiss_gpus() -> int:
    try:
        faiss = _faiss()
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:  # pragma: no cover
        return 0


# --------------------------------------------------------------------------------------------
# Build / load entry points (called by `build_index(kind="dense")` / `load_index`)


def build_dense_index(corpus_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      model: str | None = None, faiss: str = "flat", max_length: int = 256, batch_size: int = 32,
                      prefixes: str = "auto", quantize: bool = False, shard_size: int = 4096,
                      keep_embeddings: bool = True, progress: bool = True, hnsw_m: int = 32,
                      ef_construction: int = 200, ef_search: int = 128, nlist: int | None = None,
                      pq_m: int | None = None, pq_nbits: int | None = None, nprobe: int | None = None,
                      device: str | None = None, encoder: Encoder | None = None,
                      embeddings_from: str | os.PathLike[str] | None = None,
                      backend: str = "auto", **unknown: Any) -> DenseRetriever:
    """Encode the corpus (resumably) and build the FAISS index in `out_dir`; returns the retriever.

    Rerunning after a crash resumes the encoding at the last finished shard. `embeddings_from`
    (another dense index of the same corpus, built with `keep_embeddings=True`) reuses its vectors,
    so trying another FAISS type costs seconds, not an encoding pass. `manifest.json` is written last.
    """
    if unknown:
        raise TypeError(f"unknown dense index option(s): {', '.join(sorted(unknown))}")
    if faiss not in FAISS_TYPES:
        raise ValueError(f"unknown faiss type {faiss!r}; expected one of {', '.join(FAISS_TYPES)}")
    from treegym.retrieval_index.corpus import iter_corpus
    from treegym.retrieval_index.docstore import write_docstore

    from treegym.retrieval_index.corpus import corpus_sha256, to_contents
    from treegym.retrieval_index.manifest import begin_build, write_manifest

    out = begin_build(out_dir)
    sha = corpus_sha256(corpus_path)
    enc = encoder or Encoder(model, max_length=max_length, batch_size=batch_size, prefixes=prefixes,
                             quantize=quantize, device=device)
    t0 = time.perf_counter()
    n_docs = write_docstore(iter_corpus(corpus_path), out)
    t1 = time.perf_counter()
    # Encode `contents` as Search-R1's index_builder does (wiki-18: '"Title"\ntext', the row as is;
    # with e5's passage: prefix).
    texts = (to_contents(title, text) for _, title, text in iter_corpus(corpus_path, dedupe=True))
    if embeddings_from is not None:
        # adopt the source's shard size, so its shards line up with ours and are all reused
        shard_size = _seed_embeddings(Path(embeddings_from), out / EMB_DIR) or shard_size
    report = encode_to_shards(enc, texts, out / EMB_DIR, total=n_docs, shard_size=shard_size, progress=progress)
    n = report.passages
    t2 = time.perf_counter()
    if n != n_docs:  # pragma: no cover - both walks read the same file
        raise RuntimeError(f"{corpus_path} changed while building the index ({n_docs} vs {n} passages)")
    vectors = ShardedVectors(list(iter_shards(out / EMB_DIR)), enc.dim)
    ivf = {k: v for k, v in {"nlist": nlist, "m": pq_m, "nbits": pq_nbits, "nprobe": nprobe}.items() if v is not None}
    index, fparams = make_faiss_index(vectors, faiss, hnsw_m=hnsw_m, ef_construction=ef_construction,
                                      ef_search=ef_search, ivf=ivf)
    tmp = out / (INDEX_FILE + ".tmp")
    _faiss().write_index(index, str(tmp))
    os.replace(tmp, out / INDEX_FILE)
    t3 = time.perf_counter()
    del index, vectors
    if not keep_embeddings:
        shutil.rmtree(out / EMB_DIR, ignore_errors=True)
    cfg = {"encoder": enc.config.__dict__, "faiss": faiss, "faiss_params": fparams, "doc_count": n_docs,
           "keep_embeddings": keep_embeddings,
           "encoding": {"shards_encoded": report.shards_encoded, "shards_reused": report.shards_reused,
                        "passages_per_s": round(n / report.seconds, 1) if report.shards_encoded and report.seconds else None},
           "build_seconds": {"docstore": round(t1 - t0, 3), "encode": round(t2 - t1, 3), "faiss": round(t3 - t2, 3)}}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    manifest = write_manifest(out, kind=KIND, corpus_sha256=sha, doc_count=n_docs, params=dense_params(out),
                              libraries=("faiss-cpu", "torch", "transformers", "numpy", "pyarrow"),
                              corpus_path=corpus_path)
    return DenseRetriever(out, manifest=manifest, encoder=enc, backend=backend, device=device)


def _seed_embeddings(src_index: Path, dst: Path) -> int | None:
    """Hard-link (or copy) another index's embedding shards into `dst`; `encode_to_shards` then
    keeps those whose encoder settings and shapes match and re-encodes the rest."""
    src = src_index / EMB_DIR if (src_index / EMB_DIR).is_dir() else src_index
    if not (src / "shards.json").is_file():
        raise FileNotFoundError(f"embeddings_from={src_index}: no embedding shards there "
                                "(build that index with keep_embeddings=True)")
    dst.mkdir(parents=True, exist_ok=True)
    for f in [src / "shards.json", *sorted(src.glob("emb-*.npy"))]:
        target = dst / f.name
        if target.exists() or f.name.endswith(".tmp.npy"):
            continue
        if f.suffix == ".json":
            shutil.copy2(f, target)  # rewritten by encode_to_shards: never share it
            continue
        try:
            os.link(f, target)  # shards are only ever replaced, never written in place
        except OSError:
            shutil.copy2(f, target)
    try:
        return int(json.loads((src / "shards.json").read_text(encoding="utf-8"))["shard_size"])
    except (OSError, ValueError, KeyError):
        return None


def dense_params(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a dense index was built with (for the manifest's `params`)."""
    cfg = json.loads((Path(out_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    enc = cfg["encoder"]
    return {"encoder": enc["model_name"], "dim": enc["dim"], "max_length": enc["max_length"],
            "query_prefix": enc["query_prefix"], "faiss": cfg["faiss"], **cfg["faiss_params"]}


def load_dense_index(out_dir: str | os.PathLike[str], manifest: Any = None, **opts: Any) -> DenseRetriever:
    """Open a dense index directory (memory-mapped FAISS); `opts` go to `DenseRetriever`
    (backend, nprobe, ef_search, device, torch_dtype, batch_size)."""
    return DenseRetriever(out_dir, manifest=manifest, **opts)
