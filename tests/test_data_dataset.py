"""`resolve_dataset` forms, the cached synthetic world on disk, and `treegym_home`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from treegym.envs.data import Dataset, Task, resolve_dataset
from treegym.paths import treegym_home
from treegym.envs.data.synthetic import (WORLD_VERSION, ensure_world_files, make_world,
                                         synthetic_dataset)

SMALL = dict(n_people=80, n_cities=12, n_countries=3, n_orgs=10, n_works=20, n_questions=200)


def test_treegym_home_follows_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "home"
    monkeypatch.setenv("TREEGYM_HOME", str(target))
    assert treegym_home() == target and target.is_dir()
    monkeypatch.delenv("TREEGYM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert treegym_home() == tmp_path / ".cache" / "treegym"


def test_synthetic_dataset_writes_world_once_under_home() -> None:
    ds = synthetic_dataset(seed=0)
    expected_dir = treegym_home() / "worlds" / f"synthetic-v{WORLD_VERSION}-seed0"
    assert ds.corpus_path == expected_dir / "corpus.jsonl" and ds.corpus_path.is_file()
    assert ds.world is not None and ds.tasks("train") == tuple(ds.world.tasks["train"])
    mtime = ds.corpus_path.stat().st_mtime_ns
    again = synthetic_dataset(seed=0, kinds=["single"])
    assert again.corpus_path == ds.corpus_path and ds.corpus_path.stat().st_mtime_ns == mtime
    assert {t.kind for t in again.tasks("test")} == {"single"}


def test_racing_writers_leave_one_complete_world(tmp_path: Path) -> None:
    world = make_world(1, **SMALL)
    target = tmp_path / "worlds" / "w"
    errors: list[BaseException] = []

    def write() -> None:
        try:
            assert ensure_world_files(world, target) == target
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in target.iterdir()) == [
        "corpus.jsonl", "dev.parquet", "test.parquet", "train.parquet", "world.json"]
    assert [p.name for p in target.parent.iterdir()] == ["w"]  # no temp dirs left behind
    assert json.loads((target / "world.json").read_text())["seed"] == 1


@pytest.mark.parametrize("spec, kinds", [
    ("synthetic", {"single", "bridge", "comparison", "bridge3"}),
    ("synthetic:multihop", {"bridge", "comparison", "bridge3"}),
    ("synthetic:singlehop", {"single"}),
    ("synthetic:bridge,comparison", {"bridge", "comparison"}),
])
def test_synthetic_specs_select_kinds(spec: str, kinds: set[str]) -> None:
    ds = resolve_dataset(spec)
    assert ds.corpus_path is not None and ds.world is not None
    for split in ("train", "dev", "test"):
        assert {t.kind for t in ds.tasks(split)} == kinds


def test_seed_option_gives_another_world() -> None:
    a, b = resolve_dataset("synthetic:multihop"), resolve_dataset("synthetic:multihop?seed=1")
    assert a.corpus_path != b.corpus_path
    assert a.tasks("train")[0].question != b.tasks("train")[0].question
    assert resolve_dataset("synthetic?seed=1").world is b.world  # one world per seed per process


def test_dataset_passes_through_and_looks_up_tasks() -> None:
    ds = Dataset(name="mine", splits={"train": [Task("a", "q?", ("x",))]})
    assert resolve_dataset(ds) is ds
    assert ds.task("a").question == "q?" and len(ds) == 1
    with pytest.raises(ValueError, match="no split 'test'.*available: \\['train'\\]"):
        ds.tasks("test")
    with pytest.raises(KeyError, match="no task 'b'"):
        ds.task("b")


def test_world_directory_file_forms(tmp_path: Path) -> None:
    world = make_world(2, **SMALL)
    world.write(tmp_path / "w")
    ds = resolve_dataset(str(tmp_path / "w"))
    assert ds.corpus_path == tmp_path / "w" / "corpus.jsonl"
    assert ds.tasks("dev") == tuple(world.tasks["dev"])
    assert ds.world is not None and ds.world.tasks["dev"] == world.tasks["dev"]

    single = resolve_dataset(tmp_path / "w" / "test.parquet")
    assert single.tasks("test") == tuple(world.tasks["test"])
    assert single.tasks("train") == single.tasks("test")  # one file: the file is the data

    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"question": "q?", "golden_answers": ["a"]}) + "\n")
    assert resolve_dataset(str(jsonl)).tasks() == (Task("qa_0", "q?", ("a",)),)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown dataset 'nope'"),
    ("synthetic:threehop", "unknown selection 'threehop'"),
    ("synthetic?seed=x", "seed must be an integer"),
    ("synthetic?size=3", "unknown option"),
    ("missing.parquet", "no such file"),
    (42, "unknown dataset 42"),
    (None, "unknown dataset None"),
])
def test_bad_specs_list_accepted_forms(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        resolve_dataset(spec)
    if message.startswith(("unknown dataset", "unknown selection")):
        assert "synthetic:multihop" in str(err.value) and ".parquet" in str(err.value)


def test_empty_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no train/dev/test"):
        resolve_dataset(tmp_path)


def test_dataset_pickles_with_its_world() -> None:
    # Async vector envs send their kwargs (possibly a Dataset) to worker processes.
    import pickle

    ds = resolve_dataset("synthetic:singlehop")
    back = pickle.loads(pickle.dumps(ds))
    assert back.tasks("dev") == ds.tasks("dev") and back.corpus_path == ds.corpus_path
    task = ds.tasks("dev")[0]
    assert back.task(task.id) == task
    hop = task.meta["hop_entity_ids"][0]
    assert back.world is not None and back.world.entity(hop).name == task.meta["hops"][0]


def test_foreign_world_json_does_not_attach_a_world(tmp_path: Path) -> None:
    make_world(2, **SMALL).write(tmp_path)
    info = json.loads((tmp_path / "world.json").read_text())
    info["counts"]["docs"] += 1  # files no longer match what this code would generate
    (tmp_path / "world.json").write_text(json.dumps(info))
    ds = resolve_dataset(tmp_path)
    assert ds.world is None and len(ds.tasks("train")) > 0
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(ValueError, match="world.json"):
        resolve_dataset(tmp_path)
