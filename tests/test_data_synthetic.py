"""The synthetic world: deterministic, consistent, solvable by searching entity names."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from treegym.envs.data.synthetic import KINDS, SPLITS, World, cli_main, make_world

SMALL = dict(n_people=120, n_cities=20, n_countries=4, n_orgs=15, n_works=40, n_questions=400)


@pytest.fixture(scope="module")
def small() -> World:
    return make_world(7, **SMALL)


@pytest.fixture(scope="module")
def default_world() -> World:
    return make_world(0)


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    make_world(3, **SMALL).write(tmp_path / "a")
    make_world(3, **SMALL).write(tmp_path / "b")
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert set(a) == {"corpus.jsonl", "train.parquet", "dev.parquet", "test.parquet", "world.json"}
    assert a == b


def test_other_seed_gives_other_world(tmp_path: Path) -> None:
    make_world(3, **SMALL).write(tmp_path / "a")
    make_world(4, **SMALL).write(tmp_path / "b")
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    for name in ("corpus.jsonl", "train.parquet", "test.parquet", "world.json"):
        assert a[name] != b[name], name


def test_identical_across_processes_with_different_hash_seeds(tmp_path: Path) -> None:
    # str hashing is salted per process: a generator that leaked hash() order would differ here.
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"w{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-m", "treegym.cli", "world", "--seed", "5", "--out",
                        str(out), "--n-people", "80", "--n-cities", "12", "--n-countries", "3",
                        "--n-orgs", "10", "--n-works", "20", "--n-questions", "200"],
                       check=True, env=env, capture_output=True)
        outs.append(_hashes(out))
    assert "site/index.html" in outs[0]  # `treegym world` also renders the website
    assert outs[0] == outs[1]


# ---------------------------------------------------------------------------------------------
# structure


def test_default_world_is_large_enough_for_rl(default_world: World) -> None:
    c = default_world.counts()
    assert c["docs"] >= 2000
    assert c["tasks"]["train"] >= 2000
    assert c["distractor_docs"] > 0
    assert set(c["tasks_by_kind"]) == set(KINDS)
    assert set(c["entities_by_type"]) == {"person", "city", "country", "organisation", "work"}


def test_splits_are_disjoint_and_ids_unique(default_world: World) -> None:
    questions = {s: {t.question for t in default_world.tasks[s]} for s in SPLITS}
    assert all(questions[s] for s in SPLITS)
    assert not questions["train"] & questions["dev"]
    assert not questions["train"] & questions["test"]
    assert not questions["dev"] & questions["test"]
    ids = [t.id for s in SPLITS for t in default_world.tasks[s]]
    assert len(ids) == len(set(ids))
    n_questions = sum(len(q) for q in questions.values())
    assert n_questions == len(ids)  # no duplicate question inside a split either


def test_doc_ids_unique_and_every_entity_has_one_passage(small: World) -> None:
    ids = [d.doc_id for d in small.docs]
    assert len(ids) == len(set(ids))
    own = [d.entity_id for d in small.docs if d.entity_id is not None]
    assert sorted(own) == sorted(e.id for e in small.entities)
    for e in small.entities:
        doc = small.doc_of(e.id)
        assert doc.title == e.name
        assert doc.text.count(e.name) >= 2  # title + text repeats: exact-name search finds it


def test_corpus_file_is_wiki18_layout_with_unquoted_titles(tmp_path: Path, small: World) -> None:
    """wiki-18's {"id", "contents"} layout; the title line has no quotes, so observations (title
    line as is, Search-R1's rule) show `Title: Name`, the text the warm starts were trained on."""
    small.write(tmp_path)
    lines = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(small.docs)
    for line, doc in zip(lines, small.docs):
        row = json.loads(line)
        assert set(row) == {"id", "contents"}
        assert row["id"] == doc.doc_id
        title, text = row["contents"].split("\n", 1)
        assert title == doc.title and text == doc.text
    info = json.loads((tmp_path / "world.json").read_text())
    assert info["seed"] == 7 and info["counts"]["docs"] == len(small.docs)


def test_names_are_short_unique_and_listed(default_world: World) -> None:
    names = [e.name for e in default_world.entities]
    assert len(names) == len(set(names))
    for e in default_world.entities:
        words = e.name.split()
        assert len(words) == (2 if e.type == "person" else 1)
        assert all(w.isalpha() and len(w) <= 11 for w in words)
    listed = set(default_world.entity_names())
    assert set(names) <= listed
    assert default_world.entity_names() == sorted(listed)


def test_distractors_share_surnames_and_near_names(default_world: World) -> None:
    distractor_titles = [d.title for d in default_world.docs if d.entity_id is None]
    surnames = {e.attributes["surname"] for e in default_world.entities if e.type == "person"}
    people = {e.name for e in default_world.entities if e.type == "person"}
    namesakes = [t for t in distractor_titles
                 if len(t.split()) == 2 and t.split()[1] in surnames and t not in people]
    assert len(namesakes) > 50
    cities = [e.name for e in default_world.entities if e.type == "city"]
    villages = [t for t in distractor_titles if any(t != c and t.startswith(c[:-2]) for c in cities)]
    assert villages
    in_passing = [d for d in default_world.docs if d.entity_id is None and "Festival" in d.title]
    assert in_passing


# ---------------------------------------------------------------------------------------------
# tasks: supporting docs and answers follow from the world's facts


def _expected(world: World, template: str, hops: list[str]) -> str:
    """Re-derive the gold answer from the entity graph, independently of the generator."""
    E = world.entity

    def name(eid: str | None) -> str:
        assert eid is not None
        return E(eid).name

    h = [E(i) for i in hops]
    single = {
        "born_city": lambda: name(h[0].rel("born_in")),
        "born_year": lambda: str(h[0].attributes["birth_year"]),
        "employer": lambda: name(h[0].rel("works_for")),
        "city_country": lambda: name(h[0].rel("located_in")),
        "org_founded": lambda: str(h[0].attributes["founding_year"]),
        "creator": lambda: name(h[0].rel("created_by")),
        "person_country": lambda: name(E(h[0].rel("born_in")).rel("located_in")),
        "employer_city": lambda: name(E(h[0].rel("works_for")).rel("headquartered_in")),
        "employer_country": lambda: name(
            E(E(h[0].rel("works_for")).rel("headquartered_in")).rel("located_in")),
        "creator_city": lambda: name(E(h[0].rel("created_by")).rel("born_in")),
        "creator_year": lambda: str(E(h[0].rel("created_by")).attributes["birth_year"]),
        "creator_country": lambda: name(E(E(h[0].rel("created_by")).rel("born_in")).rel("located_in")),
        "born_earlier": lambda: min(h, key=lambda e: e.attributes["birth_year"]).name,
        "founded_first": lambda: min(h, key=lambda e: e.attributes["founding_year"]).name,
        "more_inhabitants": lambda: max(h, key=lambda e: e.attributes["population"]).name,
    }
    return single[template]()


def _check_world_tasks(world: World) -> None:
    person_titles = [d.title for d in world.docs if len(d.title.split()) == 2
                     and not d.title.startswith("Births") and not d.title.endswith("Festival")]
    for split in SPLITS:
        for t in world.tasks[split]:
            assert t.kind in KINDS
            hops = t.meta["hop_entity_ids"]
            n_hops = {"single": 1, "bridge": 2, "comparison": 2, "bridge3": 3}[t.kind]
            assert len(t.supporting_ids) == len(hops) == n_hops, t
            assert t.answers[0] == _expected(world, t.meta["template"], hops), t
            for doc_id, eid, title in zip(t.supporting_ids, hops, t.meta["hops"]):
                doc = world.doc(doc_id)  # exists
                assert doc.entity_id == eid and doc.title == title == world.entity(eid).name
            docs = [world.doc(d) for d in t.supporting_ids]
            if t.kind != "comparison":
                # hop order: each passage names the next hop, and the last one states the answer
                for doc, nxt in zip(docs, t.meta["hops"][1:]):
                    assert nxt in doc.text, (t, doc)
                assert t.answers[0] in docs[-1].text, (t, docs[-1])
                assert t.meta["hops"][0] in t.question
            else:
                assert all(hop in t.question for hop in t.meta["hops"])
            for alias in t.answers[1:]:
                if alias.startswith("Republic of "):
                    assert alias == f"Republic of {t.answers[0]}"
                else:  # a surname alias names exactly one person in the whole corpus
                    assert t.answers[0].endswith(" " + alias)
                    assert sum(title.split()[1] == alias for title in person_titles) == 1, t


def test_supporting_docs_and_answers_match_facts(default_world: World) -> None:
    _check_world_tasks(default_world)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31))
def test_any_seed_gives_consistent_tasks(seed: int) -> None:
    world = make_world(seed, **SMALL)
    _check_world_tasks(world)
    assert sum(len(v) for v in world.tasks.values()) > 100


def test_exact_name_search_ranks_own_passage_in_top3(default_world: World) -> None:
    # The scripted oracle searches supporting titles; plain BM25 must put the passage in its top 3.
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    docs = default_world.docs
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([d.contents for d in docs], stopwords="en", stemmer=stemmer,
                                   show_progress=False), show_progress=False)
    entities = default_world.entities
    queries = bm25s.tokenize([e.name for e in entities], stopwords="en", stemmer=stemmer,
                             show_progress=False)
    results, _ = retriever.retrieve(queries, k=3, show_progress=False)
    misses = [e.name for e, row in zip(entities, results)
              if default_world.doc_of(e.id).doc_id not in {docs[i].doc_id for i in row}]
    assert misses == []


# ---------------------------------------------------------------------------------------------
# arguments and CLI


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(TypeError, match="n_peeple"):
        make_world(0, n_peeple=3)
    with pytest.raises(ValueError, match="n_people"):
        make_world(0, n_people=1)
    with pytest.raises(TypeError, match="seed"):
        make_world("0")  # type: ignore[arg-type]


def test_cli_writes_world_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from treegym.cli import main

    out = tmp_path / "w"
    rc = main(["world", "--seed", "2", "--out", str(out), "--n-people", "60", "--n-cities", "10",
               "--n-countries", "3", "--n-orgs", "8", "--n-works", "15", "--n-questions", "100"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("corpus.jsonl", "train.parquet", "dev.parquet", "test.parquet", "world.json"):
        assert (out / name).is_file()
        assert str(out / name) in printed
    assert "seed=2" in printed
    assert (out / "site" / "index.html").is_file() and "site" in printed
    assert main(["world", "--out", str(tmp_path / "nosite"), "--no-site", "--n-people", "60",
                 "--n-questions", "50"]) == 0
    assert not (tmp_path / "nosite" / "site").exists()
    # the data layer alone writes no site and knows no --site flag
    assert cli_main(["--out", str(tmp_path / "data"), "--n-people", "60", "--n-questions", "50"]) == 0
    assert not (tmp_path / "data" / "site").exists()
    with pytest.raises(SystemExit):
        cli_main(["--out", str(tmp_path / "data2"), "--no-site"])


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    assert cli_main(["--out", str(tmp_path), "--n-people", "1"]) == 2
    with pytest.raises(SystemExit):
        cli_main(["--seed", "x", "--out", str(tmp_path)])
