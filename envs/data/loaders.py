"""Read (and write) QA tasks in the formats the field uses: Search-R1 parquet, FlashRAG jsonl, and
directories written by `treegym world`.

Why here and not in the env: every consumer (env, oracle, SFT data, evaluation) wants the same
`Task` records whatever the source, and a malformed file must fail once, early, with the file
and the row/line named, instead of deep inside a rollout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from treegym.envs.data.task import Task

# The Search-R1 instruction lives in the env's protocol module (one source of truth for the
# byte-exact prompt); Search-R1 files put it before "Question: {q}".
from treegym.envs.protocol import INSTRUCTION as SEARCH_R1_INSTRUCTION
from treegym.envs.protocol import make_prompt

QUESTION_MARKER = "Question:"
SPLITS: tuple[str, ...] = ("train", "dev", "test")

# Optional web-task fields of a question row, kept in `Task.meta` under these keys: the URL the
# web agent starts from (TreeWebAgent-v0 names it in the prompt) and the pages a solver opens in
# order (the scripted oracle and SFT data follow them). The QA env ignores both.
START_KEY = "start"
GOLD_PATH_KEY = "gold_path"


# ---------------------------------------------------------------------------------------------
# Writing (used by World.write; public so users can export their own tasks)


def search_r1_rows(tasks: Sequence[Task], split: str, data_source: str) -> list[dict[str, Any]]:
    """Tasks as Search-R1 parquet rows (data_source, prompt, ability, reward_model, extra_info,
    question, golden_answers) plus our own id, supporting_ids, kind and meta (JSON), so a
    round trip loses nothing."""
    rows = []
    for i, t in enumerate(tasks):
        rows.append({
            "data_source": data_source,
            "prompt": [{"role": "user", "content": make_prompt(t.question)}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": list(t.answers)}},
            "extra_info": {"split": split, "index": i},
            "question": t.question,
            "golden_answers": list(t.answers),
            "id": t.id,
            "supporting_ids": list(t.supporting_ids),
            "kind": t.kind,
            "meta": json.dumps(dict(t.meta), sort_keys=True, ensure_ascii=False),
        })
    return rows


def write_search_r1_parquet(tasks: Sequence[Task], path: str | os.PathLike[str], *, split: str,
                            data_source: str = "treegym") -> Path:
    """Write tasks as one Search-R1 parquet file (deterministic bytes for the same tasks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()),
                                    ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))])),
        ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
        ("question", pa.string()),
        ("golden_answers", pa.list_(pa.string())),
        ("id", pa.string()),
        ("supporting_ids", pa.list_(pa.string())),
        ("kind", pa.string()),
        ("meta", pa.string()),
    ])
    table = pa.Table.from_pylist(search_r1_rows(tasks, split, data_source), schema=schema)
    path = Path(path)
    pq.write_table(table, path, compression="zstd")
    return path


# ---------------------------------------------------------------------------------------------
# Reading


def _answers_list(value: Any) -> list[str] | None:
    """A list of non-empty answer strings, or None if `value` is not one."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        return None
    out = []
    for a in items:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str):
            return None
        if a.strip():
            out.append(a)
    return out


def _question_from_prompt(prompt: Any, where: str) -> str:
    """The question inside a Search-R1 prompt: the user message's content after the
    first "Question:" (the instruction before it varies between Search-R1 templates, but none
    contains the marker, while a question itself might)."""
    content = None
    if isinstance(prompt, str):
        content = prompt
    else:
        try:
            messages = list(prompt)
        except TypeError:
            messages = []
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                content = m["content"]
    if content is None:
        raise ValueError(f"{where}: no `question` column and `prompt` has no user message")
    if QUESTION_MARKER in content:
        content = content.split(QUESTION_MARKER, 1)[1]
    question = content.strip()
    if not question:
        raise ValueError(f"{where}: empty question in `prompt`")
    return question


def _meta(value: Any, where: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        meta = json.loads(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: `meta` is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: `meta` must be a JSON object")
    return meta


def _web_fields(row: dict[str, Any], meta: dict[str, Any], where: str) -> dict[str, Any]:
    """`meta` with the row's `start` (a URL) and `gold_path` (a list of URLs) checked and added.

    Top-level keys win over the same keys inside `meta` (which is where `search_r1_rows` writes
    them, so a written file reads back the same)."""
    start = row.get(START_KEY)
    start = meta.get(START_KEY) if start is None else start
    if start is not None:
        if not isinstance(start, str) or not start.strip():
            raise ValueError(f"{where}: `{START_KEY}` must be a non-empty URL string, got {start!r}")
        meta = {**meta, START_KEY: start.strip()}
    path = row.get(GOLD_PATH_KEY)
    path = meta.get(GOLD_PATH_KEY) if path is None else path
    if path is not None:
        try:
            urls = [] if isinstance(path, str) else list(path)
        except TypeError:
            urls = []
        if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise ValueError(f"{where}: `{GOLD_PATH_KEY}` must be a non-empty list of URL strings "
                             f"(the pages a solver opens, in order), got {path!r}")
        meta = {**meta, GOLD_PATH_KEY: tuple(u.strip() for u in urls)}
    return meta


def _supporting(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise ValueError(f"{where}: `supporting_ids` must be a list of doc ids, got a string")
    try:
        return tuple(str(v) for v in value)
    except TypeError:
        raise ValueError(f"{where}: `supporting_ids` must be a list of doc ids") from None


def _make_task(row: dict[str, Any], where: str, default_id: str) -> Task:
    question = row.get("question")
    if question is None:
        if "prompt" not in row:
            raise ValueError(f"{where}: missing `question` (and no Search-R1 `prompt`)")
        question = _question_from_prompt(row["prompt"], where)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: `question` must be a non-empty string, got {question!r}")
    answers = None
    rm = row.get("reward_model")
    if isinstance(rm, dict) and isinstance(rm.get("ground_truth"), dict):
        answers = _answers_list(rm["ground_truth"].get("target"))
    if not answers:
        answers = _answers_list(row.get("golden_answers"))
    if not answers:
        raise ValueError(f"{where}: no gold answers (need non-empty "
                         f"`reward_model.ground_truth.target` or `golden_answers`)")
    task_id = row.get("id")
    task_id = default_id if task_id is None or task_id == "" else str(task_id)
    kind = row.get("kind")
    return Task(id=task_id, question=question.strip(), answers=tuple(answers),
                supporting_ids=_supporting(row.get("supporting_ids"), where),
                kind=kind if isinstance(kind, str) and kind else "unknown",
                meta=_web_fields(row, _meta(row.get("meta"), where), where))


_PARQUET_COLUMNS = frozenset({"question", "prompt", "reward_model", "golden_answers", "id",
                              "supporting_ids", "kind", "meta", "extra_info", START_KEY,
                              GOLD_PATH_KEY})


def _column(table: Any, name: str, *fields: str) -> list[Any] | None:
    """One column (or a nested struct field of it) as a Python list; None if absent.

    Column-wise on purpose: `Table.to_pylist()` builds a dict per row for every nested struct
    and is ~10x slower on a 170k-row Search-R1 train file.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in table.column_names:
        return None
    col = table.column(name)
    try:
        for f in fields:
            col = pc.struct_field(col, f)
    except (KeyError, TypeError, ValueError, pa.ArrowException):
        return None
    return col.to_pylist()


def load_search_r1_parquet(path: str | os.PathLike[str], split: str | None = None) -> list[Task]:
    """Tasks from a Search-R1 parquet file. Ids come from an `id` column, else
    `{split}_{extra_info.index}` (else the row number). Errors name the file and row."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        cols = set(pq.read_schema(path).names)
        # Only the columns a Task needs: real Search-R1 files carry others (e.g. long metadata),
        # and `prompt` only when some question must be recovered from it.
        wanted = cols & _PARQUET_COLUMNS - {"prompt"}
        table = pq.read_table(path, columns=sorted(wanted))
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
    if "question" not in cols and "prompt" not in cols:
        raise ValueError(f"{path}: missing column `question` or `prompt` "
                         f"(columns: {sorted(cols)})")
    if "reward_model" not in cols and "golden_answers" not in cols:
        raise ValueError(f"{path}: missing column `reward_model` or `golden_answers` "
                         f"(columns: {sorted(cols)})")
    n = table.num_rows
    questions = _column(table, "question")
    prompts = None
    if "prompt" in cols and (questions is None or any(q is None for q in questions)):
        prompts = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    targets = _column(table, "reward_model", "ground_truth", "target")
    if targets is None and "reward_model" in cols:  # an unusual struct layout: go row by row
        targets = [rm.get("ground_truth", {}).get("target") if isinstance(rm, dict)
                   and isinstance(rm.get("ground_truth"), dict) else None
                   for rm in table.column("reward_model").to_pylist()]
    other = {name: _column(table, name) for name in ("golden_answers", "id", "supporting_ids",
                                                     "kind", "meta", START_KEY, GOLD_PATH_KEY)}
    indexes = _column(table, "extra_info", "index")
    split_name = split or path.stem
    tasks = []
    for i in range(n):
        row: dict[str, Any] = {k: v[i] for k, v in other.items() if v is not None}
        if questions is not None and questions[i] is not None:
            row["question"] = questions[i]
        elif prompts is not None:
            row["prompt"] = prompts[i]
        if targets is not None:
            row["reward_model"] = {"ground_truth": {"target": targets[i]}}
        index = indexes[i] if indexes is not None else None
        default_id = f"{split_name}_{index if index is not None else i}"
        tasks.append(_make_task(row, f"{path}: row {i}", default_id))
    _check_unique_ids(tasks, path)
    return tasks


def load_flashrag_jsonl(path: str | os.PathLike[str], split: str | None = None) -> list[Task]:
    """Tasks from FlashRAG jsonl (one object a line: `question`, `golden_answers`, optional
    `id`, `supporting_ids`, `kind`, `meta`, and for the web env `start` and `gold_path`). Blank
    lines are skipped; errors name the file and line (1-based)."""
    path = Path(path)
    split_name = split or path.stem
    tasks = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot open ({exc.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "question" not in row:
                raise ValueError(f"{where}: missing `question`")
            if "golden_answers" not in row and "reward_model" not in row:
                raise ValueError(f"{where}: missing `golden_answers`")
            tasks.append(_make_task(row, where, f"{split_name}_{len(tasks)}"))
    if not tasks:
        raise ValueError(f"{path}: no tasks (empty file)")
    _check_unique_ids(tasks, path)
    return tasks


def _check_unique_ids(tasks: Iterable[Task], path: Path) -> None:
    seen: set[str] = set()
    for t in tasks:
        if t.id in seen:
            raise ValueError(f"{path}: duplicate task id {t.id!r}")
        seen.add(t.id)


def _split_file(directory: Path, split: str) -> Path | None:
    for ext in (".parquet", ".jsonl"):
        p = directory / f"{split}{ext}"
        if p.exists():
            return p
    return None


def load_tasks(path: str | os.PathLike[str], split: str | None = None) -> list[Task]:
    """Tasks from a Search-R1 `.parquet`, a FlashRAG `.jsonl`, or a directory holding
    `{split}.parquet` / `{split}.jsonl` (as written by `treegym world`; `split` defaults to
    "train" there). Any malformed input raises ValueError naming the file and row/line."""
    p = Path(path)
    if p.is_dir():
        s = split or "train"
        f = _split_file(p, s)
        if f is None:
            found = sorted(x.name for x in p.iterdir() if x.suffix in (".parquet", ".jsonl"))
            raise ValueError(f"{p}: no {s}.parquet or {s}.jsonl (found: {found})")
        return load_tasks(f, s)
    if not p.exists():
        raise ValueError(f"{p}: no such file or directory")
    if p.suffix == ".parquet":
        return load_search_r1_parquet(p, split)
    if p.suffix in (".jsonl", ".json"):
        return load_flashrag_jsonl(p, split)
    raise ValueError(f"{p}: unknown task file type {p.suffix!r}; expected .parquet (Search-R1), "
                     f".jsonl (FlashRAG) or a directory written by `treegym world`")


__all__ = ["SEARCH_R1_INSTRUCTION", "QUESTION_MARKER", "START_KEY", "GOLD_PATH_KEY", "search_r1_rows",
           "write_search_r1_parquet", "load_search_r1_parquet", "load_flashrag_jsonl", "load_tasks"]
