"""`treegym serve-retriever`: any treegym index behind Search-R1's HTTP retrieval API.

Wire format (checked against PeterGriffinJin/Search-R1 `search_r1/search/retrieval_server.py`,
whose training code posts `{"queries", "topk", "return_scores": true}` and reads
`result[i][j]["document"]["contents"]`):

    POST /retrieve {"queries": ["q1", ...], "topk": 3, "return_scores": true}
    → {"result": [[{"document": {"id": "...", "contents": "\\"Title\\"\\ntext"}, "score": 12.3}, ...], ...]}

`contents` is the corpus row's own `contents` (wiki-18: quoted title line, newline, text), so
Search-R1's `_passages2string` on it gives byte for byte the env's observation.

With `"return_scores": false` (the default) Search-R1 returns the bare documents,
`[[{"id", "contents"}, ...]]`, and so do we, so clients written against it work unchanged.
`topk` missing or null means the server's `--topk` (3), as in Search-R1.

Why a rewrite instead of Search-R1's server: theirs holds a global lock per request and answers
malformed input with 500s (GEM's users saw 84.7 % failures at 50 concurrent clients). Here every
request is validated and bounded (4xx JSON with a message, never a 500 for bad input), concurrent
requests are micro-batched into backend `search` calls on one worker thread (backends are fastest
in batches and need no locking), and the server binds 127.0.0.1 unless told otherwise. The
default bounds take Search-R1's real training batches (2,560 queries in one request, see
`DEFAULT_MAX_QUERIES`); such a request is searched in chunks of 512 so memory stays bounded.
Request bodies are parsed as JSON only; nothing from a request is ever unpickled.
"""

# (no `from __future__ import annotations`: FastAPI resolves the endpoint annotations at runtime)

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Sequence

from treegym.retrieval_index.base import Hit, Retriever
from treegym.retrieval_index.corpus import to_contents

__all__ = ["create_app", "serve_in_thread", "ServerHandle", "cli_main", "hit_to_document", "Limits",
           "DEFAULT_MAX_QUERIES"]


# Search-R1's client posts one search round of the whole training batch in one request and reads
# `response["result"]` without checking the status (a 413 dies as `KeyError: 'result'`). Its
# train_grpo.sh runs data.train_batch_size=512 with rollout.n_agent=5: 2,560 queries per round
# (train_ppo.sh: 512; val_batch_size: 256). The default cap takes that with room for n_agent=8.
DEFAULT_MAX_QUERIES = 4096
# Queries handed to the backend per call: big requests are searched in chunks of this size, so a
# backend's working memory (dense query embeddings, sparse candidate arrays) stays bounded.
DEFAULT_CHUNK_QUERIES = 512


@dataclass(frozen=True)
class Limits:
    """Bounds on one request.

    `max_queries` (4,096) takes Search-R1's default GRPO batch (512 prompts x 5 samples = 2,560
    queries in one request); `max_results` bounds queries x topk (51,200 = 2,560 x 20, the same
    worst case the old 512 x 100 cap allowed), so the response, not just the request, is bounded;
    `max_batch_queries` is the chunk one backend call gets (requests are split and merged to it).
    """

    max_queries: int = DEFAULT_MAX_QUERIES
    max_query_chars: int = 4096
    max_topk: int = 100
    default_topk: int = 3
    max_results: int = 51_200
    max_batch_queries: int = DEFAULT_CHUNK_QUERIES
    max_body_cap: int = 64 << 20  # 64 MiB: 2,560 ordinary queries are ~0.3 MB

    @property
    def max_body_bytes(self) -> int:
        # Worst legal body (every query at max length, 4-byte UTF-8 escaped as \uXXXX\uXXXX) + slack,
        # capped: at 4,096 queries that worst case is 200 MB, which no real batch comes near.
        return min(self.max_queries * (self.max_query_chars * 12 + 8) + 65_536, self.max_body_cap)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def hit_to_document(hit: Hit) -> dict[str, str]:
    """A hit as a corpus row: `contents` = title, newline, text — the corpus row itself for a
    wiki-18 corpus (its title line keeps its quotes), so Search-R1's client shows exactly what
    the local env shows (`corpus.to_contents`)."""
    return {"id": hit.doc_id, "contents": to_contents(hit.title, hit.text)}


def _validate(payload: Any, limits: Limits) -> tuple[list[str], int, bool]:
    if not isinstance(payload, dict):
        raise BadRequest(422, f"request body must be a JSON object, got {type(payload).__name__}")
    if "queries" not in payload:
        raise BadRequest(422, "missing field 'queries' (a list of strings)")
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise BadRequest(422, f"'queries' must be a list of strings, got {type(queries).__name__}")
    if not queries:
        raise BadRequest(422, "'queries' is empty; send at least one query")
    if len(queries) > limits.max_queries:
        raise BadRequest(413, f"too many queries: {len(queries)} > the server's maximum of {limits.max_queries}; "
                              "split the batch or start the server with a larger --max-queries")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise BadRequest(422, f"queries[{i}] must be a string, got {type(q).__name__}")
        if len(q) > limits.max_query_chars:
            raise BadRequest(413, f"queries[{i}] is {len(q)} characters long; the maximum is {limits.max_query_chars}")
    topk = payload.get("topk")
    if topk is None:
        topk = limits.default_topk
    elif isinstance(topk, bool) or not isinstance(topk, int):
        raise BadRequest(422, f"'topk' must be an integer, got {type(topk).__name__}")
    elif not 1 <= topk <= limits.max_topk:
        raise BadRequest(422, f"'topk' must be between 1 and {limits.max_topk}, got {topk}")
    if len(queries) * topk > limits.max_results:
        raise BadRequest(413, f"{len(queries)} queries x topk {topk} = {len(queries) * topk} results is over the "
                              f"server's maximum of {limits.max_results}; split the batch or lower topk")
    return_scores = payload.get("return_scores", False)
    if return_scores is None:
        return_scores = False
    if not isinstance(return_scores, bool):
        raise BadRequest(422, f"'return_scores' must be true or false, got {type(return_scores).__name__}")
    return queries, topk, return_scores


class MicroBatcher:
    """Merges requests that arrive while the backend is busy into `search` calls of at most
    `max_batch_queries` queries each; a request bigger than that (Search-R1's 2,560) is searched
    in chunks of that size, one after the other, so backend memory stays bounded.

    No timer: the worker takes everything queued when it becomes free, so an idle server adds no
    latency and a loaded one batches naturally. Requests are grouped by `topk` so every client gets
    exactly the result it would get alone (top-3 is not always a prefix of top-10 under ties).
    """

    def __init__(self, retriever: Retriever, max_batch_queries: int):
        self.retriever = retriever
        self.max_batch_queries = max_batch_queries
        self.queue: asyncio.Queue | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.task: asyncio.Task | None = None
        self.calls = 0
        self.queries = 0

    async def start(self) -> None:
        # One worker thread: backends need no locking, and batching (not threads) gives the speed.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="treegym-retrieve")
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.queue = self.task = self.executor = None

    async def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        if self.queue is None:  # app used without its lifespan (e.g. some test clients)
            await self.start()
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((queries, k, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            total = len(first[0])
            while total < self.max_batch_queries and not self.queue.empty():
                item = self.queue.get_nowait()
                batch.append(item)
                total += len(item[0])
            by_k: dict[int, list[tuple[list[str], int, asyncio.Future]]] = {}
            for item in batch:
                by_k.setdefault(item[1], []).append(item)
            for k, items in by_k.items():
                merged = [q for qs, _, _ in items for q in qs]
                try:
                    results = []
                    for start in range(0, len(merged), self.max_batch_queries):
                        chunk = merged[start:start + self.max_batch_queries]
                        found = await loop.run_in_executor(self.executor, self.retriever.search, chunk, k)
                        if len(found) != len(chunk):
                            raise RuntimeError(f"backend returned {len(found)} result lists for {len(chunk)} queries")
                        results.extend(found)
                        self.calls += 1
                except Exception as exc:  # noqa: BLE001 - reported to each waiting request, server keeps going
                    for _, _, fut in items:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.queries += len(merged)
                pos = 0
                for qs, _, fut in items:
                    if not fut.done():
                        fut.set_result(results[pos:pos + len(qs)])
                    pos += len(qs)


def _request_schema(limits: Limits) -> dict[str, Any]:
    return {
        "title": "RetrieveRequest",
        "type": "object",
        "required": ["queries"],
        "properties": {
            "queries": {"type": "array", "minItems": 1, "maxItems": limits.max_queries,
                        "items": {"type": "string", "maxLength": limits.max_query_chars}},
            "topk": {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_topk,
                     "default": limits.default_topk},
            "return_scores": {"type": "boolean", "default": False},
        },
        "example": {"queries": ["Who wrote Pride and Prejudice?"], "topk": 3, "return_scores": True},
    }


def create_app(retriever: Retriever, *, limits: Limits | None = None, info: dict[str, Any] | None = None):
    """A FastAPI app serving `retriever` with Search-R1's `/retrieve` plus `/health`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel

    limits = limits or Limits()
    manifest = getattr(retriever, "manifest", None)
    if manifest is not None and getattr(manifest, "corpus_sha256", None):
        # what is served, so clients (treegym envs) can refuse an index over another corpus
        info = {"kind": manifest.kind, "docs": manifest.doc_count, "corpus_sha256": manifest.corpus_sha256,
                "corpus_path": manifest.corpus_path, **(info or {})}
    batcher = MicroBatcher(retriever, limits.max_batch_queries)
    started = time.time()

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    class Document(BaseModel):
        id: str
        contents: str

    class ScoredDocument(BaseModel):
        document: Document
        score: float

    class RetrieveResponse(BaseModel):
        result: list[list[ScoredDocument] | list[Document]]

    class ErrorResponse(BaseModel):
        error: str

    app = FastAPI(title="treegym retriever", version="1",
                  description="Search-R1-compatible retrieval API (POST /retrieve) over a treegym index.",
                  lifespan=lifespan)
    app.state.batcher = batcher
    app.state.limits = limits

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad_request(_request: Request, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.post("/retrieve", response_model=RetrieveResponse,
              responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}, 500: {"model": ErrorResponse}},
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": _request_schema(limits)}}}})
    async def retrieve(request: Request):
        """Batched search: one list of up to `topk` passages per query, best first."""
        body = await _read_body(request, limits.max_body_bytes)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, 5,000-digit numbers, deep nesting
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {str(exc)[:200]}"
            raise BadRequest(400, f"request body is not valid JSON ({msg})") from None
        queries, topk, return_scores = _validate(payload, limits)
        try:
            results = await batcher.search(queries, topk)
        except Exception as exc:  # noqa: BLE001
            return error(500, f"retrieval backend failed: {type(exc).__name__}: {exc}")
        if return_scores:
            out = [[{"document": hit_to_document(h), "score": float(h.score)} for h in hits] for hits in results]
        else:
            out = [[hit_to_document(h) for h in hits] for hits in results]
        return JSONResponse({"result": out})

    @app.get("/health")
    async def health():
        """Liveness plus what is being served and the request limits."""
        return {"status": "ok", "retriever": type(retriever).__name__, **(info or {}),
                "limits": {"max_queries": limits.max_queries, "max_query_chars": limits.max_query_chars,
                           "max_topk": limits.max_topk, "default_topk": limits.default_topk,
                           "max_results": limits.max_results, "chunk_queries": limits.max_batch_queries},
                "backend_calls": batcher.calls, "queries_served": batcher.queries,
                "uptime_s": round(time.time() - started, 1)}

    return app


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BadRequest(413, f"request body of {declared} bytes is over the limit of {limit}")
        except ValueError:
            raise BadRequest(400, "invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Running the server


@dataclass
class ServerHandle:
    """A uvicorn server running in a background thread (tests, notebooks, benchmarks)."""

    url: str
    server: Any
    thread: threading.Thread

    @property
    def retrieve_url(self) -> str:
        return self.url + "/retrieve"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                    startup_timeout: float = 30.0) -> ServerHandle:
    """Start `app` with uvicorn on `host:port` (0 = a free port) in a daemon thread; wait until it serves."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="treegym-uvicorn")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"retriever server on {host}:{port} did not start")
        time.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    return ServerHandle(url=f"http://{shown}:{port}", server=server, thread=thread)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treegym serve-retriever",
                                description="Serve a treegym index with Search-R1's POST /retrieve API.")
    p.add_argument("--index", required=True, help="index directory (from `treegym index build`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--topk", type=int, default=3, help="topk when a request does not say (Search-R1: 3)")
    p.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES,
                   help=f"most queries in one request (default {DEFAULT_MAX_QUERIES}: Search-R1's GRPO default sends "
                        "512 prompts x 5 samples = 2,560)")
    p.add_argument("--max-results", type=int, default=Limits.max_results,
                   help=f"most queries x topk in one request (default {Limits.max_results})")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_QUERIES,
                   help=f"queries per backend search call; bigger requests are searched in chunks (default "
                        f"{DEFAULT_CHUNK_QUERIES})")
    p.add_argument("--max-query-chars", type=int, default=4096, help="longest query accepted")
    p.add_argument("--max-topk", type=int, default=100, help="largest topk accepted")
    p.add_argument("--backend", default=None, help="dense search backend: faiss, faiss-gpu or torch")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (dense ivfpq indexes)")
    p.add_argument("--rerank", type=int, default=None, help="dense hnsw/ivfpq: exact re-scoring of RERANK*k candidates")
    p.add_argument("--cache", type=int, default=0, help="LRU query-cache entries (0 = off)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the dense encoder and FAISS (default: torch's; use 1 on cores shared with "
                        "a trainer)")
    p.add_argument("--log-level", default="info")
    return p


def _encodes_queries(index_dir: Any) -> bool:
    """Whether the index runs a torch encoder (dense, hybrid): only those take --threads, so a
    BM25 server never imports torch (the `server` extra does not install it)."""
    from treegym.retrieval_index.manifest import read_manifest

    try:
        return read_manifest(index_dir).kind in ("dense", "hybrid")
    except (OSError, ValueError):
        return False  # load_index below reports the bad index


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("max_queries", "max_query_chars", "max_topk", "max_results", "chunk", "topk", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"serve-retriever: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.topk > args.max_topk:
        print("serve-retriever: --topk must be <= --max-topk", file=sys.stderr)
        return 2
    import uvicorn

    from treegym.retrieval_index import load_index

    if args.threads is not None and _encodes_queries(args.index):
        from treegym.retrieval_index.encoder import set_cpu_threads
        set_cpu_threads(args.threads)
    opts: dict[str, Any] = {}
    if args.backend:
        opts["backend"] = args.backend
    if args.nprobe:
        opts["nprobe"] = args.nprobe
    if args.rerank:
        opts["rerank"] = args.rerank
    try:
        retriever = load_index(args.index, **opts)
    except (OSError, ValueError, TypeError) as exc:
        print(f"serve-retriever: cannot load index {args.index}: {exc}", file=sys.stderr)
        return 2
    if args.cache > 0:
        from treegym.retrieval_index import CachedRetriever
        retriever = CachedRetriever(retriever, maxsize=args.cache)
    info = {"index": str(args.index)}
    try:
        from treegym.retrieval_index.manifest import read_manifest
        m = read_manifest(args.index)
        info.update(kind=m.kind, docs=m.doc_count, corpus_sha256=m.corpus_sha256, corpus_path=m.corpus_path)
    except (ImportError, OSError, ValueError):
        pass
    limits = Limits(max_queries=args.max_queries, max_query_chars=args.max_query_chars, max_topk=args.max_topk,
                    default_topk=args.topk, max_results=args.max_results, max_batch_queries=args.chunk)
    app = create_app(retriever, limits=limits, info=info)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serve-retriever: warning: binding {args.host}: the index is reachable from other machines "
              "(there is no authentication)", file=sys.stderr)
    print(f"serving {args.index} on http://{args.host}:{args.port}/retrieve", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
