"""The Search-R1-compatible retrieval server and its client, over real HTTP on 127.0.0.1.

A tiny bm25 index keeps these fast; the server code is the same for every index kind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from netutil import free_port
from treegym.envs.data.synthetic import make_world
from treegym.retrieval_index import build_index
from treegym.retrieval_index.remote import RemoteRetriever, RemoteRetrieverError
from treegym.retrieval_index.server import Limits, create_app, serve_in_thread


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(0, n_people=60, n_cities=10, n_countries=3, n_orgs=10, n_works=20, n_questions=100)
    out = tmp_path_factory.mktemp("world")
    w.write(out)
    return w, out / "corpus.jsonl"


@pytest.fixture(scope="module")
def index(world, tmp_path_factory):
    _, corpus = world
    out = tmp_path_factory.mktemp("idx") / "bm25"
    build_index(corpus, "bm25", out)
    return out


@pytest.fixture(scope="module")
def known(world):
    """A query with hits in this world: an entity's name."""
    return world[0].docs[0].title


@pytest.fixture(scope="module")
def retriever(index):
    from treegym.retrieval_index import load_index
    return load_index(index)


@pytest.fixture(scope="module")
def server(retriever):
    app = create_app(retriever, limits=Limits(max_queries=16, max_query_chars=200, max_topk=20), info={"kind": "bm25"})
    handle = serve_in_thread(app)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _corpus_rows(corpus: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


def test_round_trip_exact_search_r1_shapes(client, world, retriever):
    w, corpus = world
    rows = _corpus_rows(corpus)
    queries = [t.question for t in w.tasks["test"][:3]]
    r = client.post("/retrieve", json={"queries": queries, "topk": 3, "return_scores": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["result"] and len(body["result"]) == 3
    local = retriever.search(queries, 3)
    for items, hits in zip(body["result"], local):
        assert len(items) == 3
        for item, hit in zip(items, hits):
            assert set(item) == {"document", "score"}
            assert set(item["document"]) == {"id", "contents"}
            # contents is byte-identical to the corpus row
            assert item["document"] == {"id": hit.doc_id, "contents": rows[hit.doc_id]["contents"]}
            assert item["score"] == pytest.approx(hit.score)

    # Search-R1's own client code (search_r1/llm_agent/generation.py, _passages2string), verbatim logic
    def passages2string(retrieval_result):
        out = ""
        for idx, doc_item in enumerate(retrieval_result):
            content = doc_item["document"]["contents"]
            title = content.split("\n")[0]
            text = "\n".join(content.split("\n")[1:])
            out += f"Doc {idx + 1}(Title: {title}) {text}\n"
        return out

    first = passages2string(body["result"][0])
    assert first == "".join(f"Doc {i}(Title: {h.title}) {h.text}\n" for i, h in enumerate(local[0], 1))


def test_without_scores_documents_are_bare_like_search_r1(client, known):
    r = client.post("/retrieve", json={"queries": [known], "topk": 2, "return_scores": False})
    assert r.status_code == 200
    items = r.json()["result"][0]
    assert len(items) == 2 and all(set(it) == {"id", "contents"} for it in items)
    # defaults: topk → the server's default (3), return_scores → false
    r = client.post("/retrieve", json={"queries": [known, "born"]})
    assert [len(x) for x in r.json()["result"]] == [3, 3]
    r = client.post("/retrieve", json={"queries": [known], "topk": None, "return_scores": None, "extra": 1})
    assert r.status_code == 200


def test_empty_and_stopword_queries_give_empty_lists(client, known):
    r = client.post("/retrieve", json={"queries": ["", "the of and", known], "topk": 3, "return_scores": True})
    assert r.status_code == 200
    res = r.json()["result"]
    assert res[0] == [] and res[1] == [] and len(res[2]) == 3


def test_health_and_openapi(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["kind"] == "bm25" and h["limits"]["max_queries"] == 16
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/retrieve"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["queries"] and schema["properties"]["topk"]["maximum"] == 20
    assert "/health" in spec["paths"]


BAD_REQUESTS = [
    ("invalid json", b'{"queries": ["a"', 400),
    ("not utf-8", b"\xff\xfe\x00garbage", 400),
    ("empty body", b"", 400),
    ("deeply nested", b"[" * 20_000 + b"]" * 20_000, 400),
    ("array body", json.dumps(["a"]).encode(), 422),
    ("missing queries", json.dumps({"topk": 3}).encode(), 422),
    ("queries is a string", json.dumps({"queries": "a"}).encode(), 422),
    ("queries empty", json.dumps({"queries": []}).encode(), 422),
    ("query not a string", json.dumps({"queries": ["a", 3]}).encode(), 422),
    ("query null", json.dumps({"queries": [None]}).encode(), 422),
    ("too many queries", json.dumps({"queries": ["a"] * 17}).encode(), 413),
    ("query too long", json.dumps({"queries": ["a" * 201]}).encode(), 413),
    ("topk zero", json.dumps({"queries": ["a"], "topk": 0}).encode(), 422),
    ("topk negative", json.dumps({"queries": ["a"], "topk": -5}).encode(), 422),
    ("topk too big", json.dumps({"queries": ["a"], "topk": 21}).encode(), 422),
    ("topk string", json.dumps({"queries": ["a"], "topk": "3"}).encode(), 422),
    ("topk bool", json.dumps({"queries": ["a"], "topk": True}).encode(), 422),
    ("topk float", json.dumps({"queries": ["a"], "topk": 2.5}).encode(), 422),
    ("topk huge int", b'{"queries": ["a"], "topk": 1' + b"0" * 400 + b"}", 422),
    ("number over python's digit limit", b'{"queries": ["a"], "topk": 1' + b"0" * 5000 + b"}", 400),
    ("NaN topk", b'{"queries": ["a"], "topk": NaN}', 422),
    ("return_scores string", json.dumps({"queries": ["a"], "return_scores": "yes"}).encode(), 422),
    ("body over the size limit", b'{"queries": ["' + b"a" * 3_000_000 + b'"]}', 413),
]


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_with_a_message_and_the_server_keeps_serving(client, known, name, body, status):
    r = client.post("/retrieve", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    msg = r.json()["error"]
    assert isinstance(msg, str) and len(msg) > 10
    ok = client.post("/retrieve", json={"queries": [known], "topk": 1})
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 1


def test_default_limits(retriever, known):
    """Without a Limits argument: at most 4,096 queries and 51,200 results (queries x topk) per
    request, 4,096 chars per query, topk 1..100."""
    handle = serve_in_thread(create_app(retriever))
    try:
        with httpx.Client(base_url=handle.url, timeout=60) as c:
            def post(body):
                return c.post("/retrieve", json=body)

            assert post({"queries": [known] * 512, "topk": 100}).status_code == 200
            assert post({"queries": ["x"] * 4096, "topk": 3}).status_code == 200
            r = post({"queries": ["x"] * 4097})
            assert r.status_code == 413 and "4096" in r.json()["error"]
            r = post({"queries": ["x"] * 600, "topk": 100})  # 60,000 results
            assert r.status_code == 413 and "topk" in r.json()["error"]
            assert post({"queries": ["a" * 4096]}).status_code == 200
            assert post({"queries": ["a" * 4097]}).status_code == 413
            assert post({"queries": [known], "topk": 101}).status_code == 422
            assert len(post({"queries": [known], "topk": 2}).json()["result"][0]) == 2
    finally:
        handle.stop()


def test_search_r1_training_batch_in_one_request(retriever, world):
    """Search-R1's GRPO default (train_batch_size 512 x n_agent 5) posts 2,560 queries in one
    request and reads response["result"] unchecked: the default server answers all of them, and
    searches them in bounded chunks (512 queries per backend call), not in one 2,560-query call."""
    w, _ = world
    questions = [t.question for split in ("train", "dev", "test") for t in w.tasks[split]]
    queries = [questions[i % len(questions)] for i in range(2560)]
    sizes = []

    class Recording:  # the real index underneath; records the size of each backend call
        def search(self, qs, k):
            sizes.append(len(qs))
            return retriever.search(qs, k)

    with serve_in_thread(create_app(Recording())) as handle:
        r = httpx.post(handle.retrieve_url, json={"queries": queries, "topk": 3, "return_scores": True}, timeout=120)
    assert r.status_code == 200
    result = r.json()["result"]
    assert len(result) == 2560 and all(len(items) == 3 for items in result)
    expected = retriever.search(queries, 3)
    assert [[it["document"]["id"] for it in items] for items in result] == [[h.doc_id for h in hits] for hits in expected]
    assert sizes == [512] * 5


def test_wrong_method_and_path_are_4xx(client):
    assert client.get("/retrieve").status_code == 405
    assert client.post("/nope", json={}).status_code == 404


def test_load_8_concurrent_clients_1000_requests(server, retriever, world):
    w, _ = world
    questions = [t.question for split in ("train", "dev", "test") for t in w.tasks[split]]
    expected = {q: [h.doc_id for h in hits] for q, hits in zip(questions, retriever.search(questions, 3))}
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    calls_before = server.server.config.app.state.batcher.calls

    def worker(wid: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for i in range(125):
                qs = [questions[(wid * 131 + i * 7 + j) % len(questions)] for j in range(1 + i % 3)]
                try:
                    r = c.post("/retrieve", json={"queries": qs, "topk": 3, "return_scores": True})
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    got = [[it["document"]["id"] for it in items] for items in r.json()["result"]]
                    if got != [expected[q] for q in qs]:
                        raise RuntimeError(f"wrong result for {qs}")
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    with lock:
                        errors.append(repr(exc))
                with lock:
                    done[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    dt = time.perf_counter() - t0
    calls = server.server.config.app.state.batcher.calls - calls_before
    print(f"\nload test: {done[0]} requests from 8 clients in {dt:.1f}s ({done[0] / dt:.0f} req/s), "
          f"{calls} backend search calls (micro-batching merged {done[0] - calls} requests)")
    assert errors == [] and done[0] == 1000
    assert calls <= 1000


def test_remote_retriever_equals_in_process(server, retriever, world):
    w, _ = world
    queries = [t.question for t in w.tasks["dev"][:7]] + ["", "the"]
    local = retriever.search(queries, 5)
    with RemoteRetriever(server.retrieve_url, max_batch=3) as remote:  # 9 queries → 3 requests
        assert remote.search(queries, 5) == [
            [type(h)(h.doc_id, pytest.approx(h.score), h.title, h.text) for h in hits] for hits in local]
        assert remote.health()["status"] == "ok"
        assert remote.search([], 3) == []
    # base URL without /retrieve is accepted too
    assert RemoteRetriever(server.url).url == server.retrieve_url


def test_remote_errors_name_the_url(server):
    with RemoteRetriever(server.retrieve_url) as remote:
        with pytest.raises(RemoteRetrieverError, match=r"127\.0\.0\.1.*refused the request.*topk"):
            remote.search(["x"], 21)  # over the server's max_topk: a 4xx, not retried
    port = free_port()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/retrieve"
    with pytest.raises(RemoteRetrieverError, match=rf"{port}/retrieve failed after 2 attempt"):
        RemoteRetriever(url, retries=1, backoff=0.01, timeout=2).search(["x"], 3)
    with pytest.raises(ValueError, match="http"):
        RemoteRetriever("localhost:8000")


def test_backend_failure_is_reported_and_server_survives():
    class Flaky:
        def __init__(self):
            self.fail = True

        def search(self, queries, k):
            if self.fail:
                raise RuntimeError("disk on fire")
            from treegym.retrieval_index.base import Hit
            return [[Hit("1", 1.0, "T", "x")] for _ in queries]

    backend = Flaky()
    with serve_in_thread(create_app(backend)) as h, httpx.Client(base_url=h.url) as c:
        r = c.post("/retrieve", json={"queries": ["a"]})
        assert r.status_code == 500 and "disk on fire" in r.json()["error"]
        backend.fail = False
        assert c.post("/retrieve", json={"queries": ["a"]}).json() == {
            "result": [[{"id": "1", "contents": "T\nx"}]]}


def test_serve_retriever_command(index, known, tmp_path):
    """`treegym serve-retriever` as a user runs it: a real process on 127.0.0.1. A BM25 server
    with `--threads` runs without torch, which the `server` extra does not install."""
    port = free_port()
    no_torch = tmp_path / "no_torch"
    no_torch.mkdir()
    (no_torch / "torch.py").write_text("raise ImportError('torch is not installed (server extra)')\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(no_torch), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "treegym.cli", "serve-retriever", "--index", str(index),
                             "--port", str(port), "--log-level", "warning", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(url + "/retrieve", json={"queries": [known], "topk": 2, "return_scores": True})
        assert r.status_code == 200 and len(r.json()["result"][0]) == 2
        assert httpx.get(url + "/health").json()["kind"] == "bm25"
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_retriever_rejects_bad_flags(index, tmp_path, capsys):
    from treegym.retrieval_index.server import cli_main

    assert cli_main(["--index", str(index), "--max-topk", "0"]) == 2
    assert cli_main(["--index", str(index), "--threads", "0"]) == 2
    assert cli_main(["--index", str(tmp_path)]) == 2
    assert "manifest" in capsys.readouterr().err


def test_env_observations_identical_in_process_and_remote(server, index, world, tmp_path):
    """TreeSearchQA-v0 over the index directory vs over this server's URL: same episode text."""
    gym = pytest.importorskip("gymnasium")
    import treegym  # noqa: F401 - registers the envs

    w, _ = world
    data = tmp_path / "world"
    w.write(data)
    episodes = []
    for retriever in (str(index), server.retrieve_url):
        env = gym.make("TreeSearchQA-v0", data=str(data), split="test", retriever=retriever)
        seq = []
        for seed in (0, 3):
            obs, _ = env.reset(seed=seed)
            seq.append(obs)
            task = env.unwrapped.task
            for action in (f"<search>{task.question}</search>", "<search>born in</search>",
                           f"<answer>{task.answers[0]}</answer>"):
                obs, reward, terminated, truncated, _ = env.step(action)
                seq.append((obs, reward, terminated, truncated))
        episodes.append(seq)
        env.close()
    assert episodes[0] == episodes[1]
    assert "<information>Doc 1(Title: " in episodes[1][1][0]
