"""Your own website and questions in TreeWebAgent-v0, through the public API only: a folder of
HTML pages, a question file with start URLs and gold paths (jsonl and parquet), one split rule for
both envs, clear errors for URLs that are not pages of the site, and the oracle / SFT plan
following the gold path."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest

import treegym  # noqa: F401  (registers the envs)
from treegym.envs.data import resolve_dataset
from treegym.envs.data.loaders import load_tasks, write_search_r1_parquet
from treegym.envs.web_agent import WEB_INSTRUCTION, oracle_actions

PAGES = {
    "index.html": "<title>Quill Project</title><h1>Quill</h1><p>A parser toolkit.</p>"
                  "<a href='team.html'>Team</a> <a href='projects/index.html'>Projects</a>",
    "team.html": "<title>Team</title><p>The parser is maintained by Ada Ventris.</p>"
                 "<a href='index.html'>Home</a> <a href='projects/parser.html'>Parser</a>",
    "projects/index.html": "<title>Projects</title><a href='parser.html'>Parser</a>"
                           "<a href='lexer.html'>Lexer</a>",
    "projects/parser.html": "<title>Parser</title><p>The parser was first released in 2011.</p>"
                            "<a href='lexer.html'>Lexer</a>",
    "projects/lexer.html": "<title>Lexer</title><p>The lexer is written in Zig.</p>",
}

QUESTIONS = [
    {"id": "who", "question": "Who maintains the parser?", "golden_answers": ["Ada Ventris"],
     "start": "/index.html", "gold_path": ["/index.html", "/team.html"]},
    # an absolute start URL and a gold path that does not repeat it
    {"id": "lang", "question": "Which language is the lexer written in?",
     "golden_answers": ["Zig"], "start": "http://site.local/projects/index.html",
     "gold_path": ["projects/lexer.html"]},
    # no start: the oracle searches the first page of the gold path
    {"id": "year", "question": "When was the parser first released?", "golden_answers": ["2011"],
     "gold_path": ["/projects/parser.html"]},
    # neither: an ordinary FlashRAG row
    {"id": "plain", "question": "What is Quill?", "golden_answers": ["a parser toolkit"]},
]


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom") / "site"
    for rel, html in PAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(html, encoding="utf-8")
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def questions(site_dir):
    return write_jsonl(site_dir.parent / "my_questions.jsonl", QUESTIONS)


@pytest.fixture(scope="module")
def env(site_dir, questions):
    e = gym.make("TreeWebAgent-v0", site=str(site_dir), data=str(questions), reward="em")
    yield e
    e.close()


def test_one_file_dataset_loads_without_split_in_both_envs(env, questions):
    u = env.unwrapped
    assert [t.id for t in u.tasks] == ["who", "lang", "year", "plain"]
    # The same file in the QA env, also without split= (any Retriever works; reuse the site's).
    qa = gym.make("TreeSearchQA-v0", data=str(questions), retriever=u.retriever)
    assert [t.id for t in qa.unwrapped.tasks] == [t.id for t in u.tasks]
    qa.close()
    # A file *is* its one split, so any split name selects it, in both envs alike.
    web = gym.make("TreeWebAgent-v0", site=u.site, data=str(questions), split="test")
    assert len(web.unwrapped.tasks) == 4


def test_prompt_names_the_start_url_and_only_then(env):
    obs, _ = env.reset(options={"task_id": "who"})
    assert obs == f"{WEB_INSTRUCTION}Who maintains the parser?\nStart page: /index.html\n"
    obs, _ = env.reset(options={"task_id": "lang"})  # written absolute, shown as the site's URL
    assert obs.endswith("Question: Which language is the lexer written in?\n"
                        "Start page: /projects/index.html\n")
    assert env.observation_space.contains(obs)
    obs, _ = env.reset(options={"task_id": "year"})
    assert obs == f"{WEB_INSTRUCTION}When was the parser first released?\n"
    assert "Ada Ventris" not in obs


def test_start_and_gold_path_are_kept_on_the_task(env):
    task = env.unwrapped.dataset.task("lang")
    assert task.meta["start"] == "http://site.local/projects/index.html"
    assert task.meta["gold_path"] == ("projects/lexer.html",)
    assert "start" not in env.unwrapped.dataset.task("plain").meta


def test_the_agent_can_follow_the_start_url(env):
    env.reset(options={"task_id": "who"})
    obs, *_, info = env.step("<visit> /index.html\x1b\u200b </visit>")  # control chars: cleaned
    assert info["valid_action"] and "Page: Quill Project (/index.html)" in obs
    assert "[Team][1]" in obs
    obs, *_ = env.step("<click> 1 </click>")
    assert "Ada Ventris" in obs
    _, reward, terminated, *_ = env.step("<answer> Ada Ventris </answer>")
    assert terminated and reward == 1.0


@pytest.mark.parametrize("task_id, first", [("who", "<visit> /index.html </visit>"),
                                            ("lang", "<visit> /projects/index.html </visit>"),
                                            ("year", "<search> Parser </search>")])
def test_oracle_follows_the_gold_path(env, task_id, first):
    u = env.unwrapped
    task = u.dataset.task(task_id)
    actions = oracle_actions(u.site, task, search=u.result_urls)
    assert first in actions[0]
    env.reset(options={"task_id": task_id})
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert info["valid_action"] and info["error"] is None, obs
    assert terminated and reward == 1.0
    if task_id == "lang":  # the lexer is linked from the start page: clicked, not visited
        assert "<click> 2 </click>" in actions[1]


def test_oracle_needs_some_path(env):
    with pytest.raises(ValueError, match="plain"):
        oracle_actions(env.unwrapped.site, env.unwrapped.dataset.task("plain"))


def test_sft_plan_follows_the_gold_path(env):
    from treegym.train.sft import oracle_plan

    plan = oracle_plan(env, env.unwrapped.dataset)
    assert plan(env.unwrapped.dataset.task("who")) == ["<visit> /index.html </visit>",
                                                      "<click> 1 </click>",
                                                      "<answer> Ada Ventris </answer>"]


def test_parquet_keeps_start_and_gold_path(env, site_dir, tmp_path):
    tasks = env.unwrapped.dataset.tasks()
    path = write_search_r1_parquet(tasks, tmp_path / "custom.parquet", split="test")
    again = load_tasks(path)
    assert [(t.id, t.meta.get("start"), t.meta.get("gold_path")) for t in again] == \
        [(t.id, t.meta.get("start"), t.meta.get("gold_path")) for t in tasks]
    e = gym.make("TreeWebAgent-v0", site=str(site_dir), data=str(path))
    obs, _ = e.reset(options={"task_id": "who"})
    assert obs.endswith("Start page: /index.html\n")
    # Plain `start` / `gold_path` columns next to Search-R1's own, as a user would add them.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"question": q["question"], "reward_model": {"ground_truth": {"target": q["golden_answers"]}},
         "start": q.get("start"), "gold_path": q.get("gold_path")} for q in QUESTIONS])
    pq.write_table(table, tmp_path / "columns.parquet")
    e = gym.make("TreeWebAgent-v0", site=str(site_dir), data=str(tmp_path / "columns.parquet"))
    assert [(t.meta.get("start"), t.meta.get("gold_path")) for t in e.unwrapped.tasks] == \
        [(q.get("start"), tuple(q["gold_path"]) if "gold_path" in q else None) for q in QUESTIONS]


@pytest.mark.parametrize("field, value, message", [
    ("start", "/nowhere.html", "'/nowhere.html' is not a page of site"),
    ("start", "http://example.com/index.html", "off-site"),
    ("gold_path", ["/index.html", "../../etc/passwd"], "leaves the site"),
])
def test_urls_that_are_not_pages_fail_at_make(site_dir, tmp_path, field, value, message):
    rows = [dict(QUESTIONS[0], **{field: value})]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as err:
        gym.make("TreeWebAgent-v0", site=str(site_dir), data=str(path))
    assert "task 'who'" in str(err.value)


@pytest.mark.parametrize("row, message", [
    ({"start": ""}, "`start` must be a non-empty URL"),
    ({"start": ["/index.html"]}, "`start` must be a non-empty URL"),
    ({"gold_path": "/index.html"}, "`gold_path` must be a non-empty list"),
    ({"gold_path": []}, "`gold_path` must be a non-empty list"),
    ({"gold_path": ["/index.html", 3]}, "`gold_path` must be a non-empty list"),
])
def test_malformed_web_fields_name_the_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[3], dict(QUESTIONS[0], **row)])
    with pytest.raises(ValueError, match=message) as err:
        resolve_dataset(str(path))
    assert "bad.jsonl: line 2" in str(err.value)


def test_the_readme_example_file_works(site_dir, tmp_path):
    """The question file shown in README.md (Environments) loads and runs on a site that has the
    pages it names, and the prompt is the one the README says."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Environments", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```jsonl\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "questions.jsonl"
    path.write_text(block, encoding="utf-8")
    env = gym.make("TreeWebAgent-v0", site=str(site_dir), data=str(path))
    shown = re.search(r'# ends "(.*?)"\n', section).group(1).encode().decode("unicode_escape")
    assert env.reset(options={"task_id": "who"})[0].endswith(shown)
    u = env.unwrapped
    for task in u.tasks:
        if task.meta.get("gold_path"):
            env.reset(options={"task_id": task.id})
            for action in oracle_actions(u.site, task, search=u.result_urls):
                _, reward, terminated, *_ = env.step(action)
            assert terminated and reward == 1.0
