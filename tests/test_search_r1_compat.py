"""A Search-R1 user switches by changing one URL: observations byte-identical to Search-R1's,
an index over another corpus refused, an unreachable retriever URL refused at gym.make.

The reference below is Search-R1's rule (search_r1/llm_agent/generation.py, `_passages2string`
and `execute_predictions`) written out from its documented behaviour, applied to the corpus
rows themselves; treegym's env, index and server are exercised through the public API only.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import httpx
import pytest

from netutil import free_port
import treegym  # noqa: F401 - registers the envs
from treegym.envs.data.dataset import Dataset
from treegym.envs.data.task import Task
from treegym.retrieval_index import CorpusMismatchError, build_index, load_index
from treegym.retrieval_index.remote import RemoteRetrieverError
from treegym.retrieval_index.server import create_app, serve_in_thread


def search_r1_passages2string(contents: list[str]) -> str:
    """Search-R1's `_passages2string` on each hit's `document.contents`."""
    reference = ""
    for i, content in enumerate(contents):
        title = content.split("\n")[0]
        text = "\n".join(content.split("\n")[1:])
        reference += f"Doc {i + 1}(Title: {title}) {text}\n"
    return reference


def search_r1_observation(contents: list[str]) -> str:
    """What Search-R1 appends after a `<search>` (execute_predictions)."""
    return f"\n\n<information>{search_r1_passages2string(contents).strip()}</information>\n\n"


# wiki-18 rows: a quoted title line, then the text (here also: multi-line text, quotes inside the
# title, a row that is all title, spaces Search-R1 keeps)
WIKI18 = [
    {"id": "1", "contents": '"Eiffel Tower"\nThe Eiffel Tower is a wrought-iron lattice tower in Paris.'},
    {"id": "2", "contents": '"Gustave Eiffel"\nGustave Eiffel was a civil engineer.\nHis company built the tower.'},
    {"id": "3", "contents": '"Paris "the City of Light""\nParis is the capital of France and has a tower.'},
    {"id": "4", "contents": "Tower of London"},
    {"id": "5", "contents": '"Pont Neuf "\n  The Pont Neuf is the oldest bridge in Paris.  '},
    {"id": "6", "contents": '"Toruń"\nToruń is a city on the Vistula with a Gothic tower.'},
]
# {"id","title","text"} rows: no first line to take, the title field is shown as is
TITLE_TEXT = [
    {"id": "a", "title": "Eiffel Tower", "text": "The Eiffel Tower is a lattice tower in Paris."},
    {"id": "b", "title": "Gustave Eiffel", "text": "Gustave Eiffel designed the tower.\nHe was an engineer."},
    {"id": "c", "title": "Louvre", "text": "The Louvre is a museum in Paris."},
]
QUERIES = ["tower in Paris", "Gustave Eiffel engineer", "capital of France", "Tower of London",
           "oldest bridge", "Toruń Vistula", "museum", "no such words zzz"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _contents(row: dict) -> str:
    return row["contents"] if "contents" in row else f"{row['title']}\n{row['text']}"


def _dataset(name: str, corpus: Path) -> Dataset:
    tasks = tuple(Task(f"q{i}", q, ("x",)) for i, q in enumerate(QUERIES))
    return Dataset(name=name, splits={"test": tasks}, corpus_path=corpus)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {"wiki18": _write(root / "wiki18.jsonl", WIKI18), "title_text": _write(root / "tt.jsonl", TITLE_TEXT)}


@pytest.fixture(scope="module")
def indexes(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    return {name: build_index(path, "bm25", root / name).index_dir for name, path in corpora.items()}


def _observations(env) -> list[str]:
    env.reset(seed=0)
    out = []
    for q in QUERIES:
        obs, *_ = env.step(f"<search>{q}</search>")
        out.append(obs)
        env.reset(seed=0)  # a fresh episode per query: no answer-now notice after the third search
    return out


@pytest.mark.parametrize("layout", ["wiki18", "title_text"])
def test_observations_are_byte_identical_to_search_r1(corpora, layout):
    rows = {r["id"]: r for r in (WIKI18 if layout == "wiki18" else TITLE_TEXT)}
    env = gym.make("TreeSearchQA-v0", data=_dataset(layout, corpora[layout]), split="test", retriever="bm25")
    observations = _observations(env)
    retriever = env.unwrapped.retriever
    for q, obs in zip(QUERIES, observations):
        ids = [h.doc_id for h in retriever.search([q], 3)[0]]
        assert obs == search_r1_observation([_contents(rows[i]) for i in ids]), q
    joined = "".join(observations)
    if layout == "wiki18":  # the quotes of wiki-18 title lines are kept, exactly
        assert '(Title: "Eiffel Tower") The Eiffel Tower' in joined
        assert 'Doc 1(Title: "Paris "the City of Light"") Paris' in joined
        assert '(Title: "Pont Neuf ")   The Pont Neuf' in joined
        assert "Doc 1(Title: Tower of London)" in joined
    else:
        assert "(Title: Eiffel Tower) The Eiffel Tower" in joined and '"' not in joined
    assert observations[-1] == "\n\n<information></information>\n\n"
    env.close()


@pytest.mark.parametrize("layout", ["wiki18", "title_text"])
def test_search_r1_client_on_our_server_sees_the_env_observation(indexes, corpora, layout):
    """Search-R1's client logic on treegym's server response == the env's observation, and an env
    over that URL plays the same episode text as one over the index directory."""
    data = _dataset(layout, corpora[layout])
    local = gym.make("TreeSearchQA-v0", data=data, split="test", retriever=str(indexes[layout]))
    expected = _observations(local)
    with serve_in_thread(create_app(load_index(indexes[layout]))) as server:
        body = httpx.post(server.retrieve_url, json={"queries": QUERIES, "topk": 3, "return_scores": True}).json()
        client_side = [search_r1_observation([item["document"]["contents"] for item in items])
                       for items in body["result"]]
        remote = gym.make("TreeSearchQA-v0", data=data, split="test", retriever=server.retrieve_url)
        assert _observations(remote) == expected
    assert client_side == expected


def test_synthetic_world_keeps_todays_unquoted_titles():
    """The synthetic world writes unquoted title lines, so its observations (and the committed warm
    starts trained on them) are what they were: `Doc 1(Title: Name) ...`, by the same rule."""
    env = gym.make("TreeSearchQA-v0", split="test")
    u = env.unwrapped
    corpus = {json.loads(line)["id"]: json.loads(line)["contents"]
              for line in Path(u.dataset.corpus_path).read_text(encoding="utf-8").splitlines()}
    env.reset(seed=0)
    doc = next(d for d in u.dataset.world.docs if d.doc_id == u.task.supporting_ids[0])
    obs, *_ = env.step(f"<search>{doc.title}</search>")
    ids = [h.doc_id for h in u.retriever.search([doc.title], 3)[0]]
    assert obs == search_r1_observation([corpus[i] for i in ids])
    assert f"(Title: {doc.title}) {doc.text}" in obs and '(Title: "' not in obs
    assert corpus[doc.doc_id] == f"{doc.title}\n{doc.text}"


# --- an index over another corpus ---------------------------------------------------------------

def test_index_over_another_corpus_is_refused_with_both_named(indexes, corpora):
    data = _dataset("tt", corpora["title_text"])
    with pytest.raises(CorpusMismatchError) as err:
        gym.make("TreeSearchQA-v0", data=data, split="test", retriever=str(indexes["wiki18"]))
    msg = str(err.value)
    from treegym.retrieval_index import corpus_sha256
    assert str(corpora["wiki18"]) in msg and str(corpora["title_text"]) in msg
    assert corpus_sha256(corpora["wiki18"])[:16] in msg and corpus_sha256(corpora["title_text"])[:16] in msg
    assert "check_corpus=False" in msg
    # the opt-out: the user says they know better
    env = gym.make("TreeSearchQA-v0", data=data, split="test", retriever=str(indexes["wiki18"]), check_corpus=False)
    env.reset(seed=0)
    assert '(Title: "Eiffel Tower")' in env.step("<search>Eiffel tower</search>")[0]
    # the matching index is accepted, also right after the refusal (the check is per env)
    gym.make("TreeSearchQA-v0", data=data, split="test", retriever=str(indexes["title_text"]))


def test_treegym_server_over_another_corpus_is_refused(indexes, corpora):
    data = _dataset("tt", corpora["title_text"])
    with serve_in_thread(create_app(load_index(indexes["wiki18"]))) as server:
        with pytest.raises(CorpusMismatchError, match=r"127\.0\.0\.1.*wiki18\.jsonl.*tt\.jsonl"):
            gym.make("TreeSearchQA-v0", data=data, split="test", retriever=server.retrieve_url)
        gym.make("TreeSearchQA-v0", data=data, split="test", retriever=server.retrieve_url, check_corpus=False)


# --- retriever URLs are checked at gym.make -----------------------------------------------------

def test_unreachable_retriever_url_fails_at_make_naming_it():
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/retrieve"
    with pytest.raises(RemoteRetrieverError, match=rf"cannot reach the retriever at {url}"):
        gym.make("TreeSearchQA-v0", retriever=url)


def test_search_r1s_own_server_without_health_route_is_accepted(corpora):
    """Search-R1's retrieval_server.py has only POST /retrieve: a 404 on /health still proves it is up."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/retrieve")
    def retrieve(payload: dict):
        return {"result": [[{"document": WIKI18[0], "score": 1.0}] for _ in payload["queries"]]}

    with serve_in_thread(app) as server:
        env = gym.make("TreeSearchQA-v0", data=_dataset("w", corpora["wiki18"]), split="test",
                       retriever=server.retrieve_url)
        env.reset(seed=0)
        assert env.step("<search>anything</search>")[0] == search_r1_observation([WIKI18[0]["contents"]])
