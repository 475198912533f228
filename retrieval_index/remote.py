"""`RemoteRetriever`: the `Retriever` protocol over HTTP, speaking Search-R1's `POST /retrieve`.

Why: a 21M-passage index lives in one process (or on one GPU box) while many env workers and
rollout processes search it. Works with `treegym serve-retriever` and with Search-R1's own
retrieval server (both formats of a result item are read: `{"document", "score"}` and a bare
document). Transient failures (connection errors, timeouts, 5xx) are retried with backoff; a
4xx is the caller's mistake and is raised at once with the server's message. Every error names
the URL so a misconfigured worker says which server it could not reach.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from treegym.retrieval_index.base import Hit, check_search_args
from treegym.retrieval_index.corpus import parse_contents

__all__ = ["RemoteRetriever", "RemoteRetrieverError"]


class RemoteRetrieverError(RuntimeError):
    """A retrieval server that failed, refused a request, or answered something unreadable."""


class RemoteRetriever:
    """Batched search against `url` (e.g. ``http://127.0.0.1:8000/retrieve``).

    `max_batch` splits large query lists into several requests (512 fits every treegym server,
    including older ones whose cap was 512; today's takes 4,096).
    Thread-safe: one pooled `httpx.Client` is shared by all forks of an env.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 max_batch: int = 512, client: Any = None):
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"retriever URL must start with http:// or https://, got {url!r}")
        if retries < 0 or max_batch < 1 or timeout <= 0:
            raise ValueError("RemoteRetriever needs retries >= 0, max_batch >= 1 and timeout > 0")
        self.url = url if url.rstrip("/").endswith("/retrieve") else url.rstrip("/") + "/retrieve"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_batch = max_batch
        self._httpx = httpx
        self._client = client or httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=64))
        self.served: dict[str, Any] = {}  # the server's /health answer, once `check_reachable` ran

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteRetriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """The server's `/health` JSON (raises `RemoteRetrieverError` if it is not up)."""
        health_url = self.url.rsplit("/retrieve", 1)[0] + "/health"
        try:
            resp = self._client.get(health_url)
            resp.raise_for_status()
            return resp.json()
        except (self._httpx.HTTPError, ValueError) as exc:
            raise RemoteRetrieverError(f"retriever at {health_url} is not healthy: {exc}") from None

    def check_reachable(self, timeout: float = 10.0) -> dict[str, Any]:
        """One request, so a wrong URL fails when an env is made instead of at its first search.

        ``GET /health``: treegym's server answers what it serves (kind, corpus hash); Search-R1's
        own server has no such route and answers 404, which still proves it is up. Only a failed
        connection (refused, unknown host, timeout, not HTTP) raises `RemoteRetrieverError`, naming
        the URL. Returns the health JSON, or ``{}`` when the server has none. No retries: this is
        a configuration check, and a dead URL should fail in seconds, not after backoff.
        """
        health_url = self.url.rsplit("/retrieve", 1)[0] + "/health"
        try:
            resp = self._client.get(health_url, timeout=min(timeout, self.timeout))
        except self._httpx.HTTPError as exc:
            raise RemoteRetrieverError(
                f"cannot reach the retriever at {self.url} ({type(exc).__name__}: {exc}); start it (e.g. "
                "`treegym serve-retriever --index DIR`) or fix the URL") from None
        try:
            data = resp.json() if resp.status_code == 200 else {}
        except ValueError:
            data = {}
        self.served = data if isinstance(data, dict) else {}
        return self.served

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        queries = check_search_args(queries, k)
        out: list[list[Hit]] = []
        for start in range(0, len(queries), self.max_batch):
            out.extend(self._post(queries[start:start + self.max_batch], k))
        return out

    def _post(self, queries: list[str], k: int) -> list[list[Hit]]:
        payload = {"queries": queries, "topk": k, "return_scores": True}
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._client.post(self.url, json=payload)
            except self._httpx.HTTPError as exc:  # connection refused, timeout, reset ...
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {_message(resp)}"
                continue
            if resp.status_code >= 400:
                raise RemoteRetrieverError(f"retriever at {self.url} refused the request "
                                           f"(HTTP {resp.status_code}): {_message(resp)}")
            return self._parse(resp, len(queries))
        raise RemoteRetrieverError(f"retriever at {self.url} failed after {self.retries + 1} attempt(s): {last}")

    def _parse(self, resp: Any, n: int) -> list[list[Hit]]:
        try:
            data = resp.json()
            result = data["result"]
            if not isinstance(result, list) or len(result) != n:
                raise ValueError(f"expected {n} result lists, got {len(result) if isinstance(result, list) else result!r}")
            out = []
            for items in result:
                hits = []
                for item in items:
                    doc = item["document"] if "document" in item else item
                    title, text = parse_contents(doc["contents"])
                    hits.append(Hit(doc_id=str(doc["id"]), score=float(item.get("score", 0.0)), title=title, text=text))
                out.append(hits)
            return out
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteRetrieverError(f"retriever at {self.url} sent an unreadable answer: {exc}") from None

    def __repr__(self) -> str:
        return f"RemoteRetriever({self.url!r})"


def _message(resp: Any) -> str:
    try:
        data = resp.json()
        if isinstance(data, dict):
            return str(data.get("error") or data.get("detail") or data)[:500]
    except ValueError:
        pass
    return resp.text[:500]
