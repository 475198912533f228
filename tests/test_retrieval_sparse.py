"""Embedded BM25, corpus reading, manifests, default_index and the shared query cache."""

from __future__ import annotations

import json
import os
import pickle
import threading
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treegym.retrieval_index import (
    CachedRetriever, CorpusFormatError, Hit, InvalidIndexError, Retriever, build_index, corpus_sha256,
    default_index, iter_corpus, load_index, parse_contents,
)
from treegym.retrieval_index.manifest import FORMAT_VERSION
from treegym.retrieval_index.analysis import Analyzer
from treegym.retrieval_index.bm25 import lucene_norm_length

DOCS = [
    ("d0", "Aldric Venn", "Aldric Venn is a painter born in Castor Bay. He studied glass and light."),
    ("d1", "Castor Bay", "Castor Bay is a harbour city in the country of Melora, known for its lighthouse."),
    ("d2", "Melora", "Melora is a country whose capital is Virel. Its currency is the mora."),
    ("d3", "Virel", "Virel is the capital city of Melora, founded by fishermen on a river delta."),
    ("d4", "Brenna Holt", "Brenna Holt is a composer born in Virel. Her symphonies describe storms."),
    ("d5", "The Glass Tower", "The Glass Tower is a novel by Orin Slate about a lighthouse keeper."),
    ("d6", "Orin Slate", "Orin Slate is a writer from Castor Bay who wrote The Glass Tower."),
    ("d7", "Tamsin Rook", "Tamsin Rook's paintings of running horses hang in the Virel museum."),
]


def write_corpus(path: Path, docs=DOCS, style: str = "contents") -> Path:
    """`contents` rows with an unquoted title line (taken as is, so titles round-trip), or
    `title`/`text` rows. wiki-18's quoted title lines are tested in test_search_r1_compat.py."""
    with path.open("w", encoding="utf-8") as fh:
        for doc_id, title, text in docs:
            row = ({"id": doc_id, "contents": f"{title}\n{text}"} if style == "contents"
                   else {"id": doc_id, "title": title, "text": text})
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    return build_index(corpus, "bm25", tmp_path_factory.mktemp("idx") / "bm25")


# --- corpus -----------------------------------------------------------------------------------

def test_parse_contents_matches_search_r1_split():
    # the title line as is, quotes included (Search-R1: contents.split("\n")[0])
    assert parse_contents('"Paris"\nParis is the capital.\nSecond line.') == ('"Paris"', "Paris is the capital.\nSecond line.")
    assert parse_contents("No title line") == ("No title line", "")
    assert parse_contents('"A "quoted" title"\ntext') == ('"A "quoted" title"', "text")
    assert parse_contents("\ntext") == ("", "text")


def test_iter_corpus_reads_both_layouts(tmp_path):
    a = list(iter_corpus(write_corpus(tmp_path / "a.jsonl")))
    b = list(iter_corpus(write_corpus(tmp_path / "b.jsonl", style="title_text")))
    assert a == b == DOCS


_titles = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters='\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029'),
                  max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_titles, st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)),
                min_size=1, max_size=8),
       st.sampled_from(["contents", "title_text"]))
def test_iter_corpus_round_trips_any_text(tmp_path_factory, rows, style):
    docs = [(f"id{i}", title, text) for i, (title, text) in enumerate(rows)]
    path = write_corpus(tmp_path_factory.mktemp("rt") / "c.jsonl", docs, style=style)
    assert list(iter_corpus(path)) == docs


def test_iter_corpus_accepts_integer_ids_and_blank_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": 7, "contents": "\\"T\\"\\nx"}\n\n   \n{"id": "8", "text": "y"}\n')
    assert list(iter_corpus(p)) == [("7", '"T"', "x"), ("8", "", "y")]  # the title line as is


@pytest.mark.parametrize("line, problem", [
    ('{"id": "x", "contents": "ok"', "malformed JSON"),
    ('["id", "contents"]', "expected a JSON object"),
    ('{"contents": "no id"}', "missing field 'id'"),
    ('{"id": "", "contents": "empty id"}', "field 'id'"),
    ('{"id": true, "contents": "bool id"}', "field 'id'"),
    ('{"id": "x"}', "missing field 'contents'"),
    ('{"id": "x", "contents": 5}', "'contents' must be a string"),
    ('{"id": "x", "title": "t", "text": null}', "'text' must be a string"),
    ('{"id": "x", "title": 3, "text": "t"}', "'title' must be a string"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, problem):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "ok", "contents": "\\"T\\"\\nfine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=problem) as err:
        list(iter_corpus(p))
    assert f"{p}:2" in str(err.value)
    assert isinstance(err.value, CorpusFormatError)


def test_invalid_utf8_names_line(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: not valid UTF-8"):
        list(iter_corpus(p))


def test_build_index_reports_bad_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=f"{p}:2"):
        build_index(p, "bm25", tmp_path / "idx")
    with pytest.raises(InvalidIndexError, match="not found"):
        load_index(tmp_path / "idx")
    assert list(tmp_path.iterdir()) == [p]  # no half-written index, no staging dir, no spilled postings


def test_duplicate_ids_keep_first_with_one_counted_warning(tmp_path):
    p = tmp_path / "dup.jsonl"
    rows = [("a", "A", "first"), ("b", "B", "x"), ("a", "A", "second"), ("a", "A", "third")]
    write_corpus(p, rows)
    with pytest.warns(UserWarning, match=r"2 duplicate id\(s\)") as rec:
        out = list(iter_corpus(p))
    assert len(rec) == 1
    assert out == [("a", "A", "first"), ("b", "B", "x")]


def test_corpus_sha256_streams_the_bytes(tmp_path):
    import hashlib
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"abc" * 1000)
    assert corpus_sha256(p, chunk_size=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        build_index(tmp_path / "nope.jsonl", "bm25", tmp_path / "idx")


# --- analysis ---------------------------------------------------------------------------------

def test_analyzer_follows_lucene_english():
    a = Analyzer()
    assert a("The running horses of Tamsin's city") == ["run", "hors", "tamsin", "citi"]
    assert a("the of and a it") == []
    assert a("") == []
    # StandardTokenizer (UAX #29) keeps these together
    assert a.words("U.S. population 1,346,000 or 3.14; don't") == ["u.s", "population", "1,346,000", "3.14", "don't"]


@pytest.mark.parametrize("length, decoded", [(0, 0), (23, 23), (24, 24), (25, 25), (40, 40), (41, 40),
                                             (100, 96), (1000, 984)])
def test_lucene_norm_length_is_the_smallfloat_round_trip(length, decoded):
    assert lucene_norm_length(length) == decoded


# --- bm25 search ------------------------------------------------------------------------------

def test_bm25_is_a_retriever(index):
    assert isinstance(index, Retriever)


@pytest.mark.parametrize("doc_id, title, text", DOCS)
def test_known_item_queries_rank_first(index, doc_id, title, text):
    [hits] = index.search([title + " " + text.split(".")[0]], 3)
    assert hits[0].doc_id == doc_id
    assert (hits[0].title, hits[0].text) == (title, text)


def test_search_is_batched_ordered_and_bounded(index):
    res = index.search(["lighthouse", "capital of Melora", "composer storms"], 2)
    assert len(res) == 3
    assert all(len(r) <= 2 for r in res)
    assert {h.doc_id for h in res[0]} == {"d1", "d5"}
    assert res[2][0].doc_id == "d4"
    for hits in res:
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(isinstance(h, Hit) and h.score > 0 for h in hits)


def test_fewer_matches_than_k_returns_only_matches(index):
    [hits] = index.search(["symphonies"], 5)
    assert [h.doc_id for h in hits] == ["d4"]


@pytest.mark.parametrize("query", ["", "   ", "the of a", "?!.,", "zzzunknownzzz"])
def test_empty_stopword_or_unknown_queries_give_no_hits(index, query):
    assert index.search([query, "Virel"], 3)[0] == []


def test_empty_batch_and_bad_arguments(index):
    assert index.search([], 3) == []
    with pytest.raises(ValueError, match="k must be"):
        index.search(["x"], 0)
    with pytest.raises(TypeError, match="sequence of queries"):
        index.search("Virel", 3)
    with pytest.raises(TypeError, match="must be str"):
        index.search(["Virel", None], 3)
    assert len(index.search([" ".join(["Virel glass"] * 100_000)], 3)[0]) == 3


def test_batch_equals_single_queries(index):
    queries = ["glass", "Virel museum", "writer Castor Bay", "the", "Melora capital currency"]
    assert index.search(queries, 3) == [index.search([q], 3)[0] for q in queries]


def test_large_batches_over_threads_match(corpus, tmp_path):
    r = load_index(build_index(corpus, "bm25", tmp_path / "i").index_dir, threads=2)
    queries = [f"{w} {v}" for w in ("glass", "virel", "storms", "horses") for v in ("lighthouse", "melora")] * 100
    assert r.search(queries, 3) == [r.search([q], 3)[0] for q in queries[:8]] * 100


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_any_text_query_is_safe(index, query):
    [hits] = index.search([query], 3)
    assert len(hits) <= 3


def test_index_pickles_by_path(index):
    clone = pickle.loads(pickle.dumps(index))
    assert len(pickle.dumps(index)) < 4096
    assert clone.search(["Orin Slate"], 3) == index.search(["Orin Slate"], 3)


# --- manifest / load_index --------------------------------------------------------------------

def test_manifest_records_the_build(index, corpus):
    m = json.loads((index.index_dir / "manifest.json").read_text())
    assert m["kind"] == "bm25" and m["doc_count"] == len(DOCS)
    assert m["corpus_sha256"] == corpus_sha256(corpus)
    assert m["params"]["k1"] == 0.9 and m["params"]["b"] == 0.4
    assert {"numpy", "scipy", "python"} <= set(m["versions"]) and m["treegym_version"] and m["created"]
    assert sorted(p.name for p in index.index_dir.iterdir()) == [
        "bm25_data.npy", "bm25_idrank.npy", "bm25_indices.npy", "bm25_indptr.npy", "bm25_maxw.npy",
        "bm25_terms.json", "docs.arrow", "manifest.json"]


def test_load_index_checks_kind_and_corpus(index, corpus):
    d = index.index_dir
    assert load_index(d, expect_kind="bm25", expect_corpus_sha256=corpus_sha256(corpus)).search(["Virel"], 1)
    with pytest.raises(InvalidIndexError, match="is a 'bm25' index, expected 'dense'"):
        load_index(d, expect_kind="dense")
    with pytest.raises(InvalidIndexError, match="different corpus"):
        load_index(d, expect_corpus_sha256="0" * 64)


def test_load_index_refuses_missing_corrupt_or_partial(index, tmp_path):
    with pytest.raises(InvalidIndexError, match="not found"):
        load_index(tmp_path / "nowhere")
    import shutil
    bad = tmp_path / "copy"
    shutil.copytree(index.index_dir, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidIndexError, match="corrupt"):
        load_index(bad)
    (bad / "manifest.json").write_text(json.dumps({"kind": "bm25"}))
    with pytest.raises(InvalidIndexError, match="missing corpus_sha256, doc_count"):
        load_index(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(InvalidIndexError, match="did not finish"):
        load_index(bad)
    shutil.copy(index.index_dir / "manifest.json", bad / "manifest.json")
    (bad / "bm25_data.npy").unlink()  # files lost after a finished build
    with pytest.raises(InvalidIndexError, match="missing or corrupt"):
        load_index(bad)
    (bad / "manifest.json").write_text(json.dumps({"kind": "sparkly", "corpus_sha256": "x", "doc_count": 1}))
    with pytest.raises(ValueError, match="unknown index kind 'sparkly'"):
        load_index(bad)


def test_failed_rebuild_leaves_the_old_index_untouched(corpus, tmp_path):
    d = tmp_path / "idx"
    build_index(corpus, "bm25", d)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError):
        build_index(bad, "bm25", d)  # dies half-way, in the staging directory
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.jsonl", "idx"]
    assert load_index(d).search(["Virel"], 1)[0][0].doc_id == "d3"


def test_build_refuses_to_replace_a_directory_that_is_not_an_index(corpus, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a treegym index"):
        build_index(corpus, "bm25", d)
    assert (d / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_index(corpus, "bm25", empty).search(["Virel"], 1)[0][0].doc_id == "d3"


def test_interrupted_build_leaves_nothing_behind(corpus, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a build (here: while the passage store is written)."""
    import treegym.retrieval_index.bm25 as bm25

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bm25, "write_docstore", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, "bm25", tmp_path / "idx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind_lists_the_accepted_ones(corpus, tmp_path):
    with pytest.raises(ValueError, match="bm25, lucene, dense, hybrid"):
        build_index(corpus, "tfidf", tmp_path / "x")


# --- default_index ----------------------------------------------------------------------------

def test_default_index_builds_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEGYM_HOME", str(tmp_path / "home"))
    corpus = write_corpus(tmp_path / "c.jsonl")
    r1 = default_index(corpus)
    sha = corpus_sha256(corpus)
    assert r1.index_dir == tmp_path / "home" / "indexes" / f"{sha[:16]}-bm25-v{FORMAT_VERSION}"
    mtime = (r1.index_dir / "manifest.json").stat().st_mtime_ns
    r2 = default_index(corpus)
    assert (r2.index_dir / "manifest.json").stat().st_mtime_ns == mtime
    assert r2.search(["Brenna Holt"], 1)[0][0].doc_id == "d4"
    leftovers = [p.name for p in (tmp_path / "home" / "indexes").iterdir() if "building" in p.name]
    assert leftovers == []


def test_default_index_replaces_a_half_built_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEGYM_HOME", str(tmp_path / "home"))
    corpus = write_corpus(tmp_path / "c.jsonl")
    sha = corpus_sha256(corpus)
    half = tmp_path / "home" / "indexes" / f"{sha[:16]}-bm25-v{FORMAT_VERSION}"
    half.mkdir(parents=True)
    (half / "bm25_data.npy").write_bytes(b"partial")
    assert default_index(corpus).search(["Orin Slate"], 1)[0][0].doc_id == "d6"


def test_default_index_is_race_safe_across_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEGYM_HOME", str(tmp_path / "home"))
    corpus = write_corpus(tmp_path / "c.jsonl")
    results, errors = [], []

    def worker():
        try:
            results.append(default_index(corpus).search(["Melora"], 2))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 4 and all(r == results[0] for r in results)


def test_default_index_is_race_safe_across_processes(tmp_path):
    """Parallel envs in separate processes (async vector envs) share one default index."""
    import subprocess
    import sys
    corpus = write_corpus(tmp_path / "c.jsonl")
    code = ("import sys; from treegym.retrieval_index import default_index; "
            "r = default_index(sys.argv[1]); print(r.index_dir, r.search(['Melora'], 1)[0][0].doc_id)")
    env = {**os.environ, "TREEGYM_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(corpus)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    assert [p.name for p in (tmp_path / "home" / "indexes").iterdir() if not p.name.startswith(".")] == [
        outs[0][0].split()[0].rsplit("/", 1)[1]]


def test_default_index_new_corpus_gets_new_index(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEGYM_HOME", str(tmp_path / "home"))
    a = default_index(write_corpus(tmp_path / "a.jsonl"))
    b = default_index(write_corpus(tmp_path / "b.jsonl", DOCS[:3]))
    assert a.index_dir != b.index_dir and len(b) == 3


# --- cache ------------------------------------------------------------------------------------

class CountingRetriever:
    """A real backend plus a record of the batches it received."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def search(self, queries, k):
        self.batches.append(list(queries))
        return self.inner.search(queries, k)


def test_cache_sends_only_missing_queries_in_one_batch(index):
    backend = CountingRetriever(index)
    cache = CachedRetriever(backend, maxsize=100)
    first = cache.search(["Virel", "glass", "Virel"], 3)
    assert backend.batches == [["Virel", "glass"]]
    assert first == index.search(["Virel", "glass", "Virel"], 3)
    second = cache.search(["glass", "storms", "Virel"], 3)
    assert backend.batches[-1] == ["storms"]
    assert second == index.search(["glass", "storms", "Virel"], 3)
    cache.search(["glass"], 1)  # k is part of the key
    assert backend.batches[-1] == ["glass"]
    assert cache.stats() == {"hits": 3, "misses": 4, "size": 4, "maxsize": 100}


def test_cache_is_lru_bounded(index):
    backend = CountingRetriever(index)
    cache = CachedRetriever(backend, maxsize=2)
    cache.search(["a1 glass"], 3), cache.search(["b1 virel"], 3), cache.search(["a1 glass"], 3)
    cache.search(["c1 storms"], 3)  # evicts the least recently used: "b1 virel"
    assert len(cache) == 2
    n = len(backend.batches)
    cache.search(["a1 glass"], 3)
    assert len(backend.batches) == n
    cache.search(["b1 virel"], 3)
    assert len(backend.batches) == n + 1


def test_cache_results_cannot_be_mutated_by_callers(index):
    cache = CachedRetriever(index)
    cache.search(["Virel"], 3)[0].clear()
    assert cache.search(["Virel"], 3)[0]


def test_cache_is_shared_between_holders_and_threads(index):
    backend = CountingRetriever(index)
    shared = CachedRetriever(backend)
    holders = [shared for _ in range(8)]  # forks of an env hold the same object
    threads = [threading.Thread(target=h.search, args=(["lighthouse keeper"], 3)) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared.hits + shared.misses == 8
    assert sum(b.count("lighthouse keeper") for b in backend.batches) == shared.misses


def test_cache_maxsize_zero_caches_nothing_and_bad_args(index):
    cache = CachedRetriever(index, maxsize=0)
    cache.search(["Virel"], 1), cache.search(["Virel"], 1)
    assert len(cache) == 0 and cache.misses == 2
    with pytest.raises(ValueError):
        CachedRetriever(index, maxsize=-1)
    with pytest.raises(TypeError):
        CachedRetriever(object())


def test_cache_pickles_empty(index):
    cache = CachedRetriever(index, maxsize=10)
    cache.search(["Virel"], 1)
    clone = pickle.loads(pickle.dumps(cache))
    assert len(clone) == 0 and clone.maxsize == 10
    assert clone.search(["Virel"], 1) == cache.search(["Virel"], 1)


# --- on the synthetic world -------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_index(tmp_path_factory):
    from treegym.envs.data.synthetic import make_world
    world = make_world(seed=0)
    out = tmp_path_factory.mktemp("world")
    world.write(out)
    return world, build_index(out / "corpus.jsonl", "bm25", out / "idx")


def test_world_titles_find_their_supporting_docs_at_rank_1(world_index):
    """The oracle searches the supporting titles in hop order; each must come back first."""
    world, index = world_index
    tasks = world.tasks["test"][:300]
    ids = [s for t in tasks for s in t.supporting_ids]
    results = index.search([world.doc(i).title for i in ids], 3)
    at1 = sum(bool(h) and h[0].doc_id == i for h, i in zip(results, ids)) / len(ids)
    assert at1 >= 0.95, at1
    assert len(index) == len(world.docs)


# --- MaxScore pruning is exact ----------------------------------------------------------------

@pytest.fixture(scope="module")
def zipf_index(tmp_path_factory):
    """A corpus with a skewed vocabulary (common words in most passages), where pruning matters."""
    import numpy as np
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(300)]
    p = 1.0 / np.arange(1, 301)
    p /= p.sum()
    out = tmp_path_factory.mktemp("zipf")
    docs = [(str(i), f"t{i}", " ".join(rng.choice(vocab, size=int(rng.integers(5, 60)), p=p))) for i in range(600)]
    corpus = write_corpus(out / "corpus.jsonl", docs)
    return build_index(corpus, "bm25", out / "idx"), vocab


def brute_force(index, query: str, k: int):
    """Dense scores of every doc and the exact top-k (row, score) list, Anserini tie order."""
    import numpy as np
    terms, counts = index.query_terms(query)
    if len(terms) == 0:
        return None, []
    scores = np.asarray((index.matrix[terms].T @ counts)).ravel().astype(np.float32)
    rows = np.flatnonzero(scores > 0)
    order = np.lexsort((index.idrank[rows], -scores[rows]))[:k]
    return scores, [(int(r), float(scores[r])) for r in rows[order]]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 299), min_size=1, max_size=8), st.integers(1, 12))
def test_pruned_search_equals_brute_force(zipf_index, words, k):
    index, vocab = zipf_index
    query = " ".join(vocab[w] for w in words)
    [(rows, scores)] = index.search_ids([query], k)
    dense, expected = brute_force(index, query, k)
    assert len(rows) == len(expected)
    # same ranking; where two docs tie up to float32 summation order either may come first
    for i, (row, score) in enumerate(zip(rows.tolist(), scores.tolist())):
        assert score == pytest.approx(expected[i][1], rel=1e-5)
        assert dense[row] == pytest.approx(score, rel=1e-5)
    exact = sum(int(r) == e for r, (e, _) in zip(rows, expected))
    assert exact >= len(expected) - 2


def test_default_index_rebuilds_a_broken_cached_index(tmp_path, monkeypatch):
    """The default index dir is treegym's cache: a cached index that no longer loads is rebuilt
    (with a warning), never a dead end for the user."""
    import json
    import warnings as _warnings

    from treegym.retrieval_index import default_index

    monkeypatch.setenv("TREEGYM_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "contents": f'"Title {i}"\nword{i} text'}) + "\n"
                              for i in range(5)))
    first = default_index(corpus)
    assert first.search(["word3"], 1)[0][0].doc_id == "d3"
    index_dir = first.index_dir
    victims = [p for p in index_dir.iterdir() if p.name != "manifest.json"]
    assert victims
    victims[0].unlink()  # what an older format or a crash leaves behind
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        again = default_index(corpus)
    assert any("rebuilding the cached index" in str(w.message) for w in caught)
    assert again.search(["word3"], 1)[0][0].doc_id == "d3"


def test_search_argument_checks_are_shared_by_the_backends():
    from treegym.retrieval_index.base import check_search_args

    assert check_search_args(("a", "b"), 3) == ["a", "b"]
    with pytest.raises(TypeError, match="not a single str"):
        check_search_args("ab", 3)  # would otherwise search "a" and "b"
    with pytest.raises(ValueError, match="k must be >= 1"):
        check_search_args(["a"], 0)
    with pytest.raises(TypeError, match="queries must be str"):
        check_search_args(["a", 3], 1)
