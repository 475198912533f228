"""TreeWebAgent-v0 through its public API: Gymnasium conformance, the browsing protocol, bad
input, forking, and that the site is solvable by following links but not by guessing."""

from __future__ import annotations

import pickle
import random

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings, strategies as st

import treegym
from treegym.envs.data.synthetic import synthetic_dataset
from treegym.envs.web_agent import (ANSWER_NOW_NOTICE, INVALID_ACTION_FEEDBACK, STOP_STRINGS,
                                    TreeWebAgentEnv, WebState, parse_web_action)

SMALL = dict(n_people=120, n_cities=20, n_countries=4, n_orgs=15, n_works=40, n_questions=300)


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(0, **SMALL)


def make(data, **kwargs) -> gym.Env:
    return gym.make("TreeWebAgent-v0", site="synthetic", data=data, **kwargs)


def gold_urls(env) -> list[str]:
    u = env.unwrapped
    return [u.site.url_for_doc(d) for d in u.task.supporting_ids]


# -- Gymnasium conformance -------------------------------------------------------------------------

def test_check_env(data):
    check_env(TreeWebAgentEnv(site="synthetic", data=data), skip_render_check=True)


def test_make_defaults_and_public_attributes(data):
    env = make(data)
    obs, info = env.reset(seed=3)
    u = env.unwrapped
    assert isinstance(u, TreeWebAgentEnv)
    assert u.max_tool_calls == 5 and u.reward_name == "f1"
    assert u.stop_strings == STOP_STRINGS and "</visit>" in u.stop_strings
    assert obs.endswith(u.task.question + "\n") and "<visit>" in obs
    assert info == {"turn": 0, "tool_calls": 0, "valid_action": True, "task_id": u.task.id,
                     "remaining_tool_calls": 5, "tool": None, "url": None, "error": None}
    assert not any(a in obs.split("Question:")[0] for a in u.task.answers)
    assert env.reset(seed=3)[0] == obs  # seeded reset is deterministic


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs(data, mode):
    envs = gym.make_vec("TreeWebAgent-v0", num_envs=4, vectorization_mode=mode,
                        site="synthetic", data=data, max_tool_calls=2)
    try:
        obs, infos = envs.reset(seed=0)
        assert len(obs) == 4 and all("Question:" in o for o in obs)
        actions = ("<search>city</search>", "<visit>/index.html</visit>", "<click>1</click>", "x")
        seen, ended = [], []
        for _ in range(4):
            obs, rewards, term, trunc, infos = envs.step(actions)
            assert len(obs) == 4 and rewards.shape == (4,)
            seen += list(obs)
            ended.append(term | trunc)
        assert any("Page: " in o for o in seen) and any("Doc 1(Title: " in o for o in seen)
        assert np.all(ended[2])  # the forced-answer turn (max_tool_calls + 1) ends every episode
        assert all("Question:" in o for o in seen[-4:])  # and the next step resets them
    finally:
        envs.close()


# -- the protocol ----------------------------------------------------------------------------------

def test_search_visit_click_scroll_answer(data):
    env = make(data, max_obs_chars=400, max_tool_calls=6)
    env.reset(options={"task_id": data.tasks("train")[0].id})
    u = env.unwrapped
    first = u.site.pages[gold_urls(env)[0]]
    obs, r, term, trunc, info = env.step(f"<think>go</think><search>{first.title}</search> trailing")
    assert info["tool"] == "search" and f"URL: {first.url}" in obs
    assert first.snippet in obs
    obs, *_ , info = env.step("<visit>/index.html</visit>")
    assert info["url"] == "/index.html" and "Page: " in obs
    obs, *_ , info = env.step("<click>[5]</click>")  # "People": a list longer than one part
    people = u.site.pages[info["url"]]
    assert "part 1 of" in obs and "<next_page>" in obs
    obs2, *_ , info = env.step("<next_page>")
    assert "part 2 of" in obs2 and info["url"] == people.url
    # Link numbers are the page's, whichever part is shown ([2] is in part 1).
    assert "][2]" not in obs2
    obs, *_ , info = env.step("<click>2</click>")
    assert info["url"] == people.links[1]
    assert u.state.visited == ("/index.html", people.url, people.links[1])
    env.step("<visit>/index.html</visit>")  # visited again: not listed twice
    assert u.state.visited == ("/index.html", people.url, people.links[1])
    obs, r, term, trunc, info = env.step(f"<answer>{u.task.answers[0]}</answer>")
    assert term and not trunc and r == 1.0 and obs == ""
    with pytest.raises(ResetNeeded):
        env.step("<answer>x</answer>")


def test_budget_forces_an_answer(data):
    env = make(data, max_tool_calls=2)
    env.reset(seed=1)
    obs, *_ = env.step("<visit>/</visit>")
    assert not obs.endswith(ANSWER_NOW_NOTICE)
    obs, r, term, trunc, info = env.step("<visit>/</visit>")
    assert obs.endswith(ANSWER_NOW_NOTICE) and info["remaining_tool_calls"] == 0
    obs, r, term, trunc, info = env.step("<search>more</search>")
    assert trunc and not term and r == 0.0


@pytest.mark.parametrize("reward, answer, expected", [
    ("f1", "{gold} extra", 2 / 3), ("em", "{gold} extra", 0.0), ("em", "{gold}", 1.0),
    ("format_em", "{gold}", 1.0),
])
def test_rewards(data, reward, answer, expected):
    task = next(t for t in data.tasks("train") if len(t.answers[0].split()) == 1)
    env = make(data, reward=reward)
    env.reset(options={"task_id": task.id})
    env.step("<think>look</think>\n<visit>/index.html</visit>")
    _, r, term, *_ = env.step("<think>ok</think>\n<answer>" + answer.format(gold=task.answers[0])
                              + "</answer>")
    assert term and r == pytest.approx(expected)


def test_format_em_penalises_malformed_trajectories(data):
    task = data.tasks("train")[0]
    env = make(data, reward="format_em")
    env.reset(options={"task_id": task.id})
    env.step("<click>1</click>")  # no <think> before the tool call
    *_, r = env.step(f"<answer>{task.answers[0]}</answer>")[:2]
    assert r == pytest.approx(0.8)


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("action, message", [
    ("<visit>http://example.com/</visit>", "off-site"),
    ("<visit>file:///etc/passwd</visit>", "file://"),
    ("<visit>../../../../etc/passwd</visit>", "leaves the site"),
    ("<visit>/wiki/no_such_page.html</visit>", "page not found"),
    ("<visit>http://[oops</visit>", "malformed"),
    ("<click>1</click>", "no page is open"),
    ("<next_page>", "no page is open"),
])
def test_bad_urls_are_error_observations(data, action, message):
    env = make(data)
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step(action)
    assert not (term or trunc) and info["valid_action"]
    assert obs.startswith("\n\n<information>Error: ") and message in obs and message in info["error"]
    assert env.unwrapped.state.url is None


def test_bad_link_numbers_on_a_page(data):
    env = make(data, max_tool_calls=10)
    env.reset(seed=0)
    env.step("<visit>/index.html</visit>")
    for arg in ("0", "999", "-1", "two", "1.5"):
        obs, *_ , info = env.step(f"<click>{arg}</click>")
        assert obs.startswith("\n\n<information>Error: ") and info["url"] == "/index.html"
        assert info["tool_calls"] == info["turn"]  # a failed tool call still costs a turn


@pytest.mark.parametrize("action", ["", "no tags", "<visit>/index.html", "<visit></visit>",
                                    "<search><visit>/</visit></search>", "<click> </click>",
                                    "x" * 1_000_000, "<visit>" + "a" * 1_000_000 + "</visit>",
                                    "\ud800<search>\x00</search>"])
def test_invalid_actions_get_feedback(data, action):
    env = make(data)
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step(action)
    assert obs == INVALID_ACTION_FEEDBACK and not info["valid_action"] and not (term or trunc)
    assert info["turn"] == 1 and info["tool_calls"] == 0


def test_non_str_action_and_step_before_reset(data):
    env = TreeWebAgentEnv(site="synthetic", data=data)
    with pytest.raises(ResetNeeded):
        env.step("<visit>/</visit>")
    env.reset(seed=0)
    with pytest.raises(TypeError):
        env.step(123)
    assert env.state.turn == 0


def test_parse_web_action_first_tag_decides():
    assert parse_web_action("<next_page> <visit>/a</visit>").tool == "next_page"
    assert parse_web_action("<visit>/a</visit> <next_page>").tool == "visit"
    assert parse_web_action("<next_page/>").tool == "next_page"
    assert parse_web_action("<visit>/a <next_page></visit>").valid is False


def test_constructor_errors(data, tmp_path):
    with pytest.raises(ValueError, match="unknown reward"):
        TreeWebAgentEnv(site="synthetic", data=data, reward="bleu")
    with pytest.raises(ValueError, match="unknown site"):
        TreeWebAgentEnv(site=str(tmp_path / "nope"), data=data)
    (tmp_path / "p.html").write_text("<p>hi</p>")
    with pytest.raises(ValueError, match="pass data="):
        TreeWebAgentEnv(site=str(tmp_path))


# -- forking ---------------------------------------------------------------------------------------

_ACTIONS = st.one_of(
    st.sampled_from(["<visit>/index.html</visit>", "<click>1</click>", "<click>2</click>",
                     "<click>5</click>", "<next_page>", "<search>city</search>", "nothing",
                     "<visit>../x</visit>", "<answer>Zzz</answer>"]),
    st.builds(lambda n: f"<click>{n}</click>", st.integers(-2, 60)),
)


def _run(env, actions):
    out = []
    for a in actions:
        if env.unwrapped.state.done:
            break
        obs, r, term, trunc, info = env.step(a)
        out.append((obs, r, term, trunc, info["url"]))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.lists(_ACTIONS, max_size=4), parent=st.lists(_ACTIONS, max_size=4),
       child=st.lists(_ACTIONS, max_size=4), seed=st.integers(0, 50))
def test_fork_independence(data, prefix, parent, child, seed):
    env = make(data, max_tool_calls=6, max_obs_chars=300)
    env.reset(seed=seed)
    _run(env, prefix)
    snap = treegym.snapshot(env)
    branch = treegym.fork(env)
    _run(branch, child)
    got = _run(env, parent)
    # Replaying the parent's actions from the snapshot gives the same results.
    treegym.restore(env, snap)
    assert _run(env, parent) == got
    # A fresh env on the same path agrees too: the branch's steps changed nothing shared.
    fresh = make(data, max_tool_calls=6, max_obs_chars=300)
    fresh.reset(seed=seed)
    _run(fresh, prefix)
    assert _run(fresh, parent) == got


def test_snapshot_is_small_and_picklable(data):
    env = make(data)
    env.reset(seed=0)
    for a in ("<visit>/index.html</visit>", "<click>1</click>", "<click>3</click>"):
        env.step(a)
    snap = treegym.snapshot(env)
    blob = pickle.dumps(snap)
    assert len(blob) < 20_000
    state = pickle.loads(blob).state
    assert isinstance(state, WebState) and state.url == env.unwrapped.state.url
    other = make(data)
    other.reset(seed=5)
    treegym.restore(other, pickle.loads(blob))
    assert other.unwrapped.state == env.unwrapped.state
    assert other.step("<next_page>")[0] == env.step("<next_page>")[0]


# -- solvable by browsing, not by guessing -------------------------------------------------------------

def oracle_episode(env, task_id: str) -> tuple[float, str]:
    """Follow the gold link path with the public API: search the first hop, open its page, then
    click the link to each next hop (or visit it when not linked, e.g. a comparison's second
    entity), then answer."""
    env.reset(options={"task_id": task_id})
    u = env.unwrapped
    urls = gold_urls(env)
    seen = []
    obs, *_ = env.step(f"<think>find it</think>\n<search>{u.task.meta['hops'][0]}</search>")
    seen.append(obs)
    assert f"URL: {urls[0]}" in obs  # the entity's page is found by its name
    obs, *_ = env.step(f"<think>open</think>\n<visit>{urls[0]}</visit>")
    seen.append(obs)
    for url in urls[1:]:
        page = u.page
        if url in page.links:
            action = f"<click>{page.links.index(url) + 1}</click>"
        else:
            action = f"<visit>{url}</visit>"
        obs, *_ , info = env.step(f"<think>next</think>\n{action}")
        assert info["url"] == url
        seen.append(obs)
    answer = u.task.answers[0]
    _, reward, term, *_ = env.step(f"<think>done</think>\n<answer>{answer}</answer>")
    assert term
    return reward, "".join(seen)


def test_oracle_following_gold_links_scores_high(data):
    from treegym.envs.rewards import normalize_answer

    env = make(data, split="test")
    tasks = data.tasks("test")
    rewards = []
    for task in tasks:
        reward, seen = oracle_episode(env, task.id)
        rewards.append(reward)
        # The answer was on a visited page (not only in the oracle's head).
        assert any(normalize_answer(a) in normalize_answer(seen) for a in task.answers), task
    assert np.mean(rewards) >= 0.95
    kinds = {t.kind for t in tasks}
    assert {"bridge", "comparison"} <= kinds


def test_random_policy_scores_near_zero(data):
    env = make(data, split="test")
    rng = random.Random(0)
    words = ["city", "born", "the", "company", "/index.html", "Republic", "1900"]
    rewards = []
    for episode in range(60):
        env.reset(seed=episode)
        done = False
        while not done:
            a = rng.choice([f"<search>{rng.choice(words)}</search>", f"<click>{rng.randint(1, 8)}</click>",
                            "<visit>/index.html</visit>", "<next_page>", "gibberish",
                            f"<answer>{rng.choice(words)}</answer>"])
            _, r, term, trunc, _ = env.step(a)
            done = term or trunc
        rewards.append(r)
    assert np.mean(rewards) < 0.05


# -- site=DIR --------------------------------------------------------------------------------------

def test_html_folder_site_with_own_tasks(tmp_path):
    import json

    root = tmp_path / "mirror"
    (root / "p").mkdir(parents=True)
    (root / "index.html").write_text("<title>Home</title><a href='p/one.html'>One</a>"
                                     "<a href='http://example.com'>out</a>")
    (root / "p" / "one.html").write_text("<title>One</title><p>The capital is Qorvath.<div>"
                                         "<a href='../index.html'>home</a>")
    (root / "p" / "broken.html").write_text("<div><p>unclosed <a href='one.html'>one")
    (root / "blob.html").write_bytes(b"\x00\xff\x00")
    (tmp_path / "secret.txt").write_text("SECRET-123")
    questions = tmp_path / "test.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "What is the capital?",
                                     "golden_answers": ["Qorvath"]}) + "\n")
    env = gym.make("TreeWebAgent-v0", site=str(root), data=str(questions), split="test")
    u = env.unwrapped
    assert [e.path for e in u.site.errors] == ["blob.html"]
    env.reset(seed=0)
    obs, *_ = env.step("<search>capital</search>")
    assert "URL: /p/one.html" in obs
    obs, *_ = env.step("<visit>/p/broken.html</visit>")
    assert "unclosed" in obs and "[one][1]" in obs
    obs, *_ = env.step("<click>1</click>")
    assert "Qorvath" in obs
    obs, *_ = env.step("<visit>../../secret.txt</visit>")
    assert "SECRET" not in obs and "Error" in obs
    _, r, term, *_ = env.step("<answer>Qorvath</answer>")
    assert term and r == 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_obs_chars=st.integers(64, 1500), which=st.integers(0, 10_000))
def test_page_observations_fit_max_obs_chars(data, max_obs_chars, which):
    env = make(data, max_obs_chars=max_obs_chars, max_tool_calls=20)
    env.reset(seed=0)
    u = env.unwrapped
    urls = sorted(u.site.pages)
    obs, *_ = env.step(f"<visit>{urls[which % len(urls)]}</visit>")
    for _ in range(18):
        assert len(obs) <= len("\n\n<information></information>\n\n") + max_obs_chars
        assert obs.endswith("</information>\n\n")
        if "<next_page>" not in obs:
            break
        obs, *_ = env.step("<next_page>")


@pytest.mark.parametrize("clicks", [False, True])
def test_oracle_actions_helper_solves_tasks_with_format_reward(data, clicks):
    from treegym.envs.web_agent import oracle_actions

    env = make(data, split="dev", reward="format_em")
    u = env.unwrapped
    rewards, opened_by_click = [], []
    for task in data.tasks("dev"):
        env.reset(options={"task_id": task.id})
        path = oracle_actions(u.site, task, search=u.result_urls if clicks else None)
        opened_by_click.append("<click>" in path[1])
        for action in path:
            _, r, term, trunc, info = env.step(action)
            assert info["valid_action"] and info["error"] is None
        assert term
        rewards.append(r)
    assert np.mean(rewards) == 1.0  # well-formed and correct
    # with the results in hand the oracle clicks the first hop's result (title queries find it)
    assert np.mean(opened_by_click) >= (0.9 if clicks else 0.0) and (clicks or not any(opened_by_click))


def test_click_opens_a_search_result(data):
    env = make(data, max_tool_calls=12, topk=3)
    env.reset(options={"task_id": data.tasks("train")[0].id})
    u = env.unwrapped
    first = u.site.pages[gold_urls(env)[0]]
    obs, *_, info = env.step(f"<search>{first.title}</search>")
    shown = u.result_urls(first.title)
    assert u.state.results == shown and len(shown) == 3 and u.state.url is None
    assert [f"URL: {url})" in obs for url in shown] == [True] * 3
    obs, *_, info = env.step("<next_page>")  # the results are shown in full
    assert "shown in full" in info["error"] and u.state.results == shown
    for bad in ("0", "4", "-1", "two"):
        obs, *_, info = env.step(f"<click>{bad}</click>")
        assert obs.startswith("\n\n<information>Error: ") and u.state.results == shown
    obs, *_, info = env.step("<click> 2 </click>")
    assert info["url"] == shown[1] and u.state.results is None and f"({shown[1]})" in obs
    page = u.site.pages[shown[1]]
    if page.links:  # now a page is on screen again: click follows its links
        obs, *_, info = env.step("<click>1</click>")
        assert info["url"] == page.links[0]
    env.step("<search>zzzzqqq</search>")  # nothing found: nothing to click
    if u.state.results == ():
        obs, *_, info = env.step("<click>1</click>")
        assert "found nothing" in info["error"]
    # a fork keeps the results on screen; the parent's later steps do not leak into it
    env.step(f"<search>{first.title}</search>")
    child = treegym.fork(env)
    env.step("<click>1</click>")
    assert child.unwrapped.state.results == shown and env.unwrapped.state.results is None


def test_world_directory_serves_its_site_and_tasks(tmp_path):
    from treegym.cli import main
    from treegym.envs.web_agent import oracle_actions

    out = tmp_path / "w"
    assert main(["world", "--seed", "4", "--out", str(out), "--n-people", "60", "--n-cities", "10",
                 "--n-countries", "3", "--n-orgs", "8", "--n-works", "15", "--n-questions", "80"]) == 0
    env = gym.make("TreeWebAgent-v0", site=str(out), split="test")
    u = env.unwrapped
    assert u.site.errors == () and len(u.site) > 100
    assert u.site.pages == TreeWebAgentEnv(site="synthetic", data=str(out), split="test").site.pages
    for task in u.tasks[:10]:
        env.reset(options={"task_id": task.id})
        for action in oracle_actions(u.site, task):
            _, r, term, *_ = env.step(action)
        assert term and r == 1.0


_TRAVERSAL = st.lists(st.sampled_from(["..", ".", "%2e%2e", "%2E%2E", "..%2f..", "secret.txt",
                                       "secret.html", "p", "one.html", "", "%00", "~", "etc"]),
                      max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from(["", "/", "file://", "file:///", "http://site.local/", "//x/"]),
       parts=_TRAVERSAL, click=st.booleans())
def test_env_never_reads_outside_the_site_folder(tmp_path_factory, prefix, parts, click):
    env = _folder_env(tmp_path_factory)
    env.reset(seed=0)
    env.step("<visit>/p/one.html</visit>")
    obs, *_ = env.step(f"<visit>{prefix + '/'.join(parts)}</visit>")
    if click:
        obs += env.step("<click>1</click>")[0]
    assert "SECRET" not in obs


_FOLDER: dict[str, gym.Env] = {}


def _folder_env(factory) -> gym.Env:
    if "env" not in _FOLDER:
        import json
        import os

        base = factory.mktemp("web")
        (base / "site" / "p").mkdir(parents=True)
        (base / "site" / "index.html").write_text("<a href='p/one.html'>one</a>")
        (base / "site" / "p" / "one.html").write_text("<a href='../index.html'>home</a> Qorvath")
        (base / "secret.html").write_text("<p>SECRET-1</p>")
        (base / "secret.txt").write_text("SECRET-2")
        os.symlink(base / "secret.html", base / "site" / "p" / "secret.html")
        q = base / "test.jsonl"
        q.write_text(json.dumps({"question": "Capital?", "golden_answers": ["Qorvath"]}) + "\n")
        _FOLDER["env"] = gym.make("TreeWebAgent-v0", site=str(base / "site"), data=str(q),
                                  split="test", max_tool_calls=10)
    return _FOLDER["env"]
