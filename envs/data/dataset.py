"""`Dataset`: the tasks of every split plus where their corpus lives; `resolve_dataset` turns the
user-facing `data=` argument into one.

Why one resolver: `gym.make(..., data=...)`, the CLI and the trainer all accept the same specs
("synthetic:multihop?seed=1", a parquet path, a FlashRAG jsonl, a world directory, a Dataset),
and they must agree on what each means and fail with the same clear message otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import parse_qs

from treegym.envs.data.task import Task

if TYPE_CHECKING:  # pragma: no cover
    from treegym.envs.data.synthetic import World

# Named task-kind selections for "synthetic:<name>".
KIND_GROUPS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "multihop": ("bridge", "comparison", "bridge3"),
    "singlehop": ("single",),
}

ACCEPTED_FORMS = (
    '"synthetic" (all task kinds), "synthetic:multihop", "synthetic:singlehop", or '
    '"synthetic:<kind>[,<kind>...]" with kinds single/bridge/comparison/bridge3, each optionally '
    'followed by "?seed=N"; a Search-R1 .parquet file; a FlashRAG .jsonl file; a directory '
    'written by `treegym world` (train/dev/test .parquet or .jsonl, optional corpus.jsonl); '
    'or a treegym.envs.data.Dataset'
)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Tasks by split, the corpus they are answerable from (if known) and, for the synthetic
    world, the `World` itself (the web env renders it; the tokenizer builder reads its names).

    A dataset read from a single file has one split; `tasks(split)` returns it whatever split is
    asked for, since the file *is* the data the user chose. Compared and hashed by identity, so
    it can key caches (retrievers, indexes) without hashing thousands of tasks.
    """

    name: str
    splits: Mapping[str, tuple[Task, ...]]
    corpus_path: Path | None = None
    world: "World | None" = field(default=None, repr=False, compare=False)
    single_file: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", {k: tuple(v) for k, v in self.splits.items()})
        if self.corpus_path is not None:
            object.__setattr__(self, "corpus_path", Path(self.corpus_path))
        object.__setattr__(self, "_index", {t.id: t for ts in self.splits.values() for t in ts})

    def tasks(self, split: str = "train") -> tuple[Task, ...]:
        if split in self.splits:
            return self.splits[split]
        if self.single_file and len(self.splits) == 1:
            return next(iter(self.splits.values()))
        raise ValueError(f"dataset {self.name!r} has no split {split!r}; "
                         f"available: {sorted(self.splits)}")

    def task(self, task_id: str) -> Task:
        """The task with this id, in any split."""
        try:
            return self._index[task_id]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"dataset {self.name!r} has no task {task_id!r}") from None

    def __len__(self) -> int:
        return sum(len(v) for v in self.splits.values())

    def fingerprint(self) -> str:
        """sha256 over every split's task ids, questions, answers and supporting ids.

        What env snapshots are stamped with (`EnvState.origin`): two datasets that share a name
        (two files called `test.jsonl`, two synthetic worlds with the same seed and other
        parameters) still differ here, and the same data read in another process matches.
        Computed once per Dataset (170k Search-R1-sized tasks: ~0.4 s on one busy core).
        """
        cached = vars(self).get("_fingerprint")
        if cached is None:
            digest = hashlib.sha256()
            for split in sorted(self.splits):
                digest.update(split.encode("utf-8", "surrogatepass") + b"\x1d")
                text = "\x1e".join(f"{t.id}\x1f{t.question}\x1f{chr(0x1c).join(t.answers)}\x1f"
                                   f"{chr(0x1c).join(t.supporting_ids)}" for t in self.splits[split])
                digest.update(text.encode("utf-8", "surrogatepass"))
            cached = digest.hexdigest()
            object.__setattr__(self, "_fingerprint", cached)
        return cached


def _parse_synthetic(spec: str) -> tuple[tuple[str, ...] | None, int, str]:
    from treegym.envs.data.synthetic import KINDS

    base, _, query = spec.partition("?")
    seed = 0
    if query:
        qs = parse_qs(query, keep_blank_values=True, strict_parsing=False)
        unknown = set(qs) - {"seed"}
        if unknown or not qs:
            raise ValueError(f"bad dataset spec {spec!r}: unknown option(s) {sorted(unknown)}; "
                             f"only ?seed=N is accepted")
        try:
            seed = int(qs["seed"][-1])
        except ValueError:
            raise ValueError(f"bad dataset spec {spec!r}: seed must be an integer") from None
    _, _, group = base.partition(":")
    group = group or "all"
    if group in KIND_GROUPS:
        return KIND_GROUPS[group], seed, group
    kinds = tuple(k.strip() for k in group.split(","))
    if all(k in KINDS for k in kinds):
        return kinds, seed, group
    raise ValueError(f"bad dataset spec {spec!r}: unknown selection {group!r}. Accepted forms: "
                     f"{ACCEPTED_FORMS}")


def _from_directory(p: Path) -> Dataset:
    from treegym.envs.data.loaders import SPLITS, _split_file, load_tasks

    splits = {s: tuple(load_tasks(f, s)) for s in SPLITS if (f := _split_file(p, s)) is not None}
    if not splits:
        raise ValueError(f"{p}: directory has no train/dev/test .parquet or .jsonl files. "
                         f"Accepted forms: {ACCEPTED_FORMS}")
    corpus = p / "corpus.jsonl"
    world = None
    info_path = p / "world.json"
    if info_path.exists():
        world = _world_from_info(info_path)
    return Dataset(name=p.name, splits=splits, corpus_path=corpus if corpus.exists() else None,
                   world=world)


def _world_from_info(info_path: Path) -> "World | None":
    """Regenerate the in-memory World of a `treegym world` directory when this code still makes
    the same world (same version); otherwise the files alone are used."""
    from treegym.envs.data.synthetic import DEFAULT_PARAMS, WORLD_VERSION, _cached_world

    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{info_path}: unreadable world.json ({exc})") from None
    if not isinstance(info, dict) or info.get("version") != WORLD_VERSION:
        return None
    params = info.get("params") or {}
    overrides = {k: v for k, v in params.items() if k in DEFAULT_PARAMS and DEFAULT_PARAMS[k] != v}
    seed = info.get("seed")
    if not isinstance(seed, int):
        return None
    world = _cached_world(seed, overrides)
    # A hand-edited or foreign world.json must not attach a world that disagrees with the files.
    counts = info.get("counts") or {}
    if counts.get("docs") != len(world.docs) or counts.get("tasks") != world.counts()["tasks"]:
        return None
    return world


def resolve_dataset(spec: Any) -> Dataset:
    """Turn a `data=` argument into a Dataset. See ACCEPTED_FORMS; anything else raises a
    ValueError that lists them."""
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, str) and (spec == "synthetic" or spec.startswith(("synthetic:", "synthetic?"))):
        from treegym.envs.data.synthetic import synthetic_dataset

        kinds, seed, _ = _parse_synthetic(spec)
        return synthetic_dataset(seed=seed, kinds=kinds)
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec).expanduser()
        if p.is_dir():
            return _from_directory(p)
        if p.suffix in (".parquet", ".jsonl", ".json"):
            if not p.exists():
                raise ValueError(f"{p}: no such file")
            from treegym.envs.data.loaders import load_tasks

            tasks = tuple(load_tasks(p))
            return Dataset(name=p.stem, splits={p.stem: tasks}, single_file=True)
    raise ValueError(f"unknown dataset {spec!r}. Accepted forms: {ACCEPTED_FORMS}")


__all__ = ["Dataset", "resolve_dataset", "KIND_GROUPS", "ACCEPTED_FORMS"]
