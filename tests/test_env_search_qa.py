"""TreeSearchQA-v0 through its public API: Gymnasium conformance, the Search-R1 episode rule,
every bad input of issue 3, rewards, retriever/data options, vector envs, and the oracle/random
solvability check on the synthetic world."""

import random
import subprocess
import sys
import warnings

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env

import treegym
from treegym.envs.protocol import (ANSWER_NOW_NOTICE, INVALID_ACTION_FEEDBACK, STOP_STRINGS,
                                   make_prompt)
from treegym.envs.search_qa import TreeSearchQAEnv
from treegym.envs.wrappers import TranscriptObservation
from treegym.retrieval_index.base import Hit

INFO_KEYS = {"turn", "tool_calls", "valid_action", "task_id", "remaining_tool_calls"}


@pytest.fixture
def env():
    e = gym.make("TreeSearchQA-v0")
    yield e
    e.close()


def title_of(env, doc_id):
    return env.unwrapped.dataset.world.doc(doc_id).title


def oracle_episode(env, task_id=None, seed=None, think=True):
    """Search the supporting docs' titles in hop order, then answer the first gold answer."""
    options = {"task_id": task_id} if task_id is not None else None
    env.reset(seed=seed, options=options)
    u = env.unwrapped
    t = "<think>I need to look this up.</think>" if think else ""
    for doc_id in u.task.supporting_ids[: u.max_tool_calls]:
        obs, reward, term, trunc, info = env.step(f"{t}<search> {title_of(env, doc_id)} </search>")
        assert not (term or trunc) and info["valid_action"]
    return env.step(f"{t}<answer> {u.task.answers[0]} </answer>")


# ------------------------------------------------------------------------------------------
# Gymnasium conformance


def test_check_env_passes_without_warnings():
    e = gym.make("TreeSearchQA-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(e.unwrapped)


def test_make_with_namespace_in_fresh_interpreter():
    code = ("import gymnasium as gym\n"
            "env = gym.make('treegym:TreeSearchQA-v0')\n"
            "obs, info = env.reset(seed=3)\n"
            "assert obs.startswith('Answer the given question.'), obs[:40]\n"
            "print(type(env.unwrapped).__name__, info['task_id'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("TreeSearchQAEnv ")


def test_reset_returns_full_prompt_and_info(env):
    obs, info = env.reset(seed=0)
    u = env.unwrapped
    assert obs == make_prompt(u.task.question)
    assert INFO_KEYS <= set(info) and info["turn"] == 0 and info["task_id"] == u.task.id
    assert info["remaining_tool_calls"] == 3
    assert env.observation_space.contains(obs)
    assert u.stop_strings == STOP_STRINGS and u.max_tool_calls == 3
    assert u.dataset is not None and u.retriever is not None
    assert not any(a in obs for a in u.task.answers if a not in u.task.question)


def test_reset_seed_and_task_id_pick_tasks_deterministically(env):
    ids = [env.reset(seed=s)[1]["task_id"] for s in (5, 6, 5)]
    assert ids[0] == ids[2]
    other = gym.make("TreeSearchQA-v0")
    assert other.reset(seed=5)[1]["task_id"] == ids[0]
    assert len({env.reset(seed=s)[1]["task_id"] for s in range(20)}) > 10
    tid = env.unwrapped.tasks[17].id
    assert env.reset(options={"task_id": tid})[1]["task_id"] == tid
    with pytest.raises(ValueError, match="unknown task_id"):
        env.reset(options={"task_id": "no-such-task"})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"taskid": tid})


def test_search_observation_is_a_delta_in_search_r1_format(env):
    env.reset(seed=1)
    u = env.unwrapped
    title = title_of(env, u.task.supporting_ids[0])
    obs, reward, term, trunc, info = env.step(f"<think>x</think>\n<search>{title}</search>")
    assert obs.startswith("\n\n<information>Doc 1(Title: ") and obs.endswith("</information>\n\n")
    assert f"(Title: {title})" in obs
    assert obs.count("\nDoc ") == 2  # top-3: Doc 2 and Doc 3 start new lines
    assert (reward, term, trunc) == (0.0, False, False)
    assert info["valid_action"] and info["tool_calls"] == 1 and info["turn"] == 1
    assert info["remaining_tool_calls"] == 2
    assert env.observation_space.contains(obs)


def test_topk_and_max_obs_chars_bound_the_observation():
    e = gym.make("TreeSearchQA-v0", topk=1, max_obs_chars=40)
    e.reset(seed=1)
    obs = e.step("<search>born in</search>")[0]
    assert obs.count("Doc ") == 1
    assert len(obs) == len("\n\n<information>") + 40 + len("</information>\n\n")


# ------------------------------------------------------------------------------------------
# Episode rule (Search-R1): invalid actions cost a turn; after max_tool_calls turns the agent
# is told to answer; at turn max_tool_calls+1 anything but an answer truncates with reward 0.


def test_budget_exhausted_then_non_answer_truncates(env):
    env.reset(seed=2)
    o1, *_ = env.step("<search>one</search>")
    o2, *_, info2 = env.step("not an action")
    assert o2.startswith(INVALID_ACTION_FEEDBACK) and not info2["valid_action"]
    assert info2["tool_calls"] == 1 and info2["turn"] == 2
    o3, r3, t3, tr3, info3 = env.step("<search>three</search>")
    assert o3.endswith(ANSWER_NOW_NOTICE) and not ANSWER_NOW_NOTICE in o1 + o2
    assert info3["remaining_tool_calls"] == 0
    o4, r4, t4, tr4, info4 = env.step("<search>four</search>")
    assert (o4, r4, t4, tr4) == ("", 0.0, False, True)
    assert info4["turn"] == 4 and info4["tool_calls"] == 2 and not info4["valid_action"]
    with pytest.raises(ResetNeeded):
        env.step("<answer>late</answer>")


def test_answer_on_the_forced_turn_is_scored(env):
    env.reset(seed=4)
    for _ in range(3):
        env.step("<search>x</search>")
    obs, reward, term, trunc, info = env.step(f"<answer>{env.unwrapped.task.answers[0]}</answer>")
    assert (obs, reward, term, trunc) == ("", 1.0, True, False)


def test_wrong_answer_scores_zero_and_terminates(env):
    env.reset(seed=4)
    obs, reward, term, trunc, info = env.step("<answer>certainly not this</answer>")
    assert (reward, term, trunc, info["tool"]) == (0.0, True, False, "answer")


def test_zero_tool_calls_means_answer_now():
    e = gym.make("TreeSearchQA-v0", max_tool_calls=0)
    obs, _ = e.reset(seed=0)
    assert obs.endswith(ANSWER_NOW_NOTICE)
    assert e.step("<search>x</search>")[3] is True
    e.reset(seed=0)
    assert e.step(f"<answer>{e.unwrapped.task.answers[0]}</answer>")[1:3] == (1.0, True)


def test_step_before_reset_and_after_end_raise_reset_needed(env):
    with pytest.raises(ResetNeeded):
        env.step("<answer>x</answer>")
    raw = TreeSearchQAEnv()
    with pytest.raises(ResetNeeded):
        raw.step("<answer>x</answer>")
    raw.reset(seed=0)
    raw.step("<answer>x</answer>")
    with pytest.raises(ResetNeeded, match="ended"):
        raw.step("<answer>x</answer>")


# ------------------------------------------------------------------------------------------
# Bad input: an observation, not an exception (issue 3's list, one test each)


def assert_invalid_and_goes_on(env, action):
    env.reset(seed=7)
    obs, reward, term, trunc, info = env.step(action)
    assert obs == INVALID_ACTION_FEEDBACK and not info["valid_action"]
    assert (reward, term, trunc) == (0.0, False, False) and info["turn"] == 1
    obs2, *_ = env.step("<search>next</search>")  # the episode goes on
    assert obs2.startswith("\n\n<information>")


def test_bad_empty_action(env):
    assert_invalid_and_goes_on(env, "")


def test_bad_no_tags(env):
    assert_invalid_and_goes_on(env, "I believe the answer is Paris.")


def test_bad_unclosed_tag(env):
    assert_invalid_and_goes_on(env, "<search>who is")


def test_bad_nested_tags(env):
    assert_invalid_and_goes_on(env, "<search><answer>x</answer></search>")


def test_bad_empty_search(env):
    assert_invalid_and_goes_on(env, "<search></search>")


def test_bad_one_megabyte_action(env):
    assert_invalid_and_goes_on(env, "<search>q</search>" + "A" * (1 << 20))
    assert len(env.unwrapped.state.steps[0].action) > 1 << 20  # recorded verbatim, not executed


def test_two_tags_first_one_decides(env):
    env.reset(seed=7)
    obs, reward, term, trunc, info = env.step("<search>alpha</search><answer>beta</answer>")
    assert info["tool"] == "search" and not term and obs.startswith("\n\n<information>")
    env.reset(seed=7)
    obs, reward, term, trunc, info = env.step("<answer>beta</answer><search>alpha</search>")
    assert info["tool"] == "answer" and term


def test_control_characters_and_surrogates_do_not_crash(env):
    env.reset(seed=7)
    title = title_of(env, env.unwrapped.task.supporting_ids[0])
    obs, *_, info = env.step(f"<search>\x00{title}\ud800\x1b\u200b</search>")
    assert info["valid_action"] and f"(Title: {title})" in obs
    obs.encode("utf-8")
    obs, *_, info = env.step("<search>\ud800\x00\x07</search>")  # nothing left after cleaning
    assert obs == INVALID_ACTION_FEEDBACK
    obs, reward, term, *_ = env.step("<answer>\udfff\x00</answer>")
    assert obs.endswith(ANSWER_NOW_NOTICE) and not term


@pytest.mark.parametrize("bad", [None, 42, b"<answer>x</answer>", ["<answer>x</answer>"]])
def test_non_str_action_type_error_and_episode_goes_on(env, bad):
    env.reset(seed=7)
    with pytest.raises(TypeError, match="str"):
        env.step(bad)
    obs, reward, term, trunc, info = env.step("<search>ok</search>")
    assert info["turn"] == 1 and obs.startswith("\n\n<information>")


@pytest.mark.parametrize("bad", ["no-such-dataset", "synthetic:nonsense", 3])
def test_unknown_data_lists_accepted_forms(bad):
    with pytest.raises(ValueError) as err:
        gym.make("TreeSearchQA-v0", data=bad)
    msg = str(err.value)
    assert "synthetic" in msg and "parquet" in msg and "jsonl" in msg


def test_unknown_retriever_lists_accepted_forms():
    for bad in ("bm99", "/no/such/index/dir", 3):
        with pytest.raises(ValueError) as err:
            gym.make("TreeSearchQA-v0", retriever=bad)
        msg = str(err.value)
        assert "'bm25'" in msg and "http" in msg and "directory" in msg and "search(queries, k)" in msg


@pytest.mark.parametrize("kwargs,match", [
    ({"reward": "bleu"}, "unknown reward"), ({"topk": 0}, "topk"), ({"topk": "3"}, "topk"),
    ({"max_tool_calls": -1}, "max_tool_calls"), ({"split": "validation"}, "no split 'validation'"),
    ({"max_obs_chars": 0}, "max_obs_chars"), ({"render_mode": "human"}, "render_mode"),
])
@pytest.mark.filterwarnings("ignore:.*render_mode")  # gymnasium warns before we raise
def test_bad_options_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gym.make("TreeSearchQA-v0", **kwargs)


# ------------------------------------------------------------------------------------------
# Rewards through the env


def test_f1_and_format_em_rewards():
    e = gym.make("TreeSearchQA-v0", reward="f1", split="test")
    tid = next(t.id for t in e.unwrapped.tasks if len(t.answers[0].split()) >= 2)
    e.reset(options={"task_id": tid})
    gold = e.unwrapped.task.answers[0]
    assert e.step(f"<answer>{gold.split()[0]} zzz</answer>")[1] == pytest.approx(0.5)

    fe = gym.make("TreeSearchQA-v0", reward="format_em", split="test")
    assert oracle_episode(fe, task_id=tid)[1] == 1.0                       # think + correct
    assert oracle_episode(fe, task_id=tid, think=False)[1] == pytest.approx(0.8)  # no <think>
    fe.reset(options={"task_id": tid})
    assert fe.step("<think>guess</think><answer>nobody</answer>")[1] == pytest.approx(0.2)
    fe.reset(options={"task_id": tid})
    assert fe.step("<answer>nobody</answer>")[1] == pytest.approx(0.1)
    # the answer-now notice and text after the closing tag do not break the format
    fe.reset(options={"task_id": tid})
    for _ in range(3):
        fe.step("<think>t</think><search>x</search> trailing")
    assert fe.step(f"<think>t</think><answer>{gold}</answer> bye")[1] == 1.0
    # no answer by turn max_tool_calls + 1: truncated, reward 0 even if well-formed so far
    fe.reset(options={"task_id": tid})
    for _ in range(4):
        out = fe.step("<think>t</think><search>x</search>")
    assert out[1:4] == (0.0, False, True)


# ------------------------------------------------------------------------------------------
# Data and retriever options, shared resources


class TinyRetriever:
    """A user-supplied Retriever: any object with search(queries, k)."""

    def __init__(self):
        self.calls = 0

    def search(self, queries, k):
        self.calls += len(queries)
        return [[Hit(f"d{i}", 1.0, f"T{i}", f"text for {q}") for i in range(k)] for q in queries]


def test_retriever_object_is_used_and_cached():
    mine = TinyRetriever()
    e = gym.make("TreeSearchQA-v0", retriever=mine, topk=2)
    e.reset(seed=0)
    obs = e.step("<search>hello</search>")[0]
    assert obs == "\n\n<information>Doc 1(Title: T0) text for hello\nDoc 2(Title: T1) text for hello</information>\n\n"
    f = treegym.fork(e)
    f.step("<search>hello</search>")
    e2 = gym.make("TreeSearchQA-v0", retriever=mine, topk=2)
    e2.reset(seed=1)
    e2.step("<search>hello</search>")
    assert mine.calls == 1  # one query cache shared by the env, its fork and a second env


def test_index_directory_and_url_retrievers(tmp_path):
    from treegym.retrieval_index import build_index

    base = gym.make("TreeSearchQA-v0").unwrapped
    build_index(base.dataset.corpus_path, kind="bm25", out_dir=tmp_path / "idx")
    e = gym.make("TreeSearchQA-v0", retriever=str(tmp_path / "idx"))
    e.reset(seed=1)
    title = title_of(e, e.unwrapped.task.supporting_ids[0])
    assert f"(Title: {title})" in e.step(f"<search>{title}</search>")[0]
    try:
        from treegym.retrieval_index.remote import RemoteRetriever
    except ImportError:  # the retrieval-dense helper's module; the URL form needs it
        pytest.fail("treegym.retrieval_index.remote.RemoteRetriever is missing")
    from treegym.retrieval_index.remote import RemoteRetrieverError

    # a URL is checked once at make (nothing listens on port 9); URL envs that work: test_search_r1_compat.py
    with pytest.raises(RemoteRetrieverError, match=r"127\.0\.0\.1:9/retrieve"):
        gym.make("TreeSearchQA-v0", retriever="http://127.0.0.1:9/retrieve")


def test_resources_are_shared_between_envs_and_forks():
    a, b = gym.make("TreeSearchQA-v0"), gym.make("TreeSearchQA-v0")
    assert a.unwrapped.retriever is b.unwrapped.retriever
    assert a.unwrapped.dataset is b.unwrapped.dataset
    a.reset(seed=0)
    f = treegym.fork(a)
    assert f.unwrapped.retriever is a.unwrapped.retriever and f.unwrapped is not a.unwrapped


def test_dataset_object_and_split():
    base = gym.make("TreeSearchQA-v0").unwrapped
    e = gym.make("TreeSearchQA-v0", data=base.dataset, split="dev")
    assert e.unwrapped.dataset is base.dataset and e.unwrapped.tasks == base.dataset.tasks("dev")


# ------------------------------------------------------------------------------------------
# Vector envs


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_make_vec_runs_episodes(mode):
    gym.make("TreeSearchQA-v0")  # build world + index once before workers start
    venv = gym.make_vec("TreeSearchQA-v0", num_envs=4, vectorization_mode=mode)
    try:
        if mode == "sync":  # one dataset, one index, one query cache for all sub-envs
            cores = [sub.unwrapped for sub in venv.envs]
            assert len({id(c.retriever) for c in cores}) == 1 and len({id(c.dataset) for c in cores}) == 1
        obs, info = venv.reset(seed=0)
        assert len(obs) == 4 and all(o.startswith("Answer the given question.") for o in obs)
        assert list(info["turn"]) == [0, 0, 0, 0]
        finished = 0
        for _ in range(6):
            obs, rew, term, trunc, info = venv.step(
                ["<search>born</search>", "<answer>x</answer>", "junk", "<search>city</search>"])
            finished += int((term | trunc).sum())
            assert all(isinstance(o, str) for o in obs)
        assert finished >= 4
        obs, *_ = venv.step(["<search>Paris</search>"] * 4)
        assert any(o.startswith("\n\n<information>") for o in obs)
    finally:
        venv.close()


def test_transcript_observation_wrapper():
    e = TranscriptObservation(gym.make("TreeSearchQA-v0"))
    obs, _ = e.reset(seed=3)
    full = obs
    for action in ("<search>a</search>", "junk"):
        obs, *_ = e.step(action)
        assert obs.startswith(full + action) and e.observation_space.contains(obs)
        full = obs
    assert full == e.unwrapped.state.transcript
    f = treegym.fork(e)
    fo, *_ = f.step("<answer>x</answer>")
    assert fo == full + "<answer>x</answer>"
    assert e.step("<search>b</search>")[0].startswith(full + "<search>b</search>")


# ------------------------------------------------------------------------------------------
# Solvable by search, not by guessing


def test_oracle_solves_test_split_and_random_policy_does_not():
    e = gym.make("TreeSearchQA-v0", split="test")
    tasks = e.unwrapped.tasks
    assert len(tasks) >= 200
    oracle = [oracle_episode(e, task_id=t.id)[1] for t in tasks]
    assert sum(oracle) / len(oracle) >= 0.95

    rng = random.Random(0)
    world = e.unwrapped.dataset.world
    titles = [d.title for d in world.docs]
    scores = []
    for t in tasks[:200]:
        e.reset(options={"task_id": t.id})
        words = t.question.rstrip("?").split()
        for _ in range(rng.randint(0, 3)):
            _, r, te, tr, _ = e.step(f"<think>hmm</think><search>{rng.choice(words)}</search>")
        _, r, te, tr, _ = e.step(f"<answer>{rng.choice(titles)}</answer>")
        assert te
        scores.append(r)
    assert sum(scores) / len(scores) <= 0.05


_PROPERTY_ENV = {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), acts=st.lists(st.one_of(
    st.text(max_size=40), st.text(max_size=40).map(lambda t: f"<search>{t}</search>"),
    st.text(max_size=20).map(lambda t: f"<answer>{t}</answer>")), max_size=6))
def test_any_action_sequence_keeps_the_contract(seed, acts):
    """Whatever the policy writes: observations stay in the space, info has its keys, turns
    count up by one, and the episode ends by turn max_tool_calls + 1."""
    e = _PROPERTY_ENV.setdefault("e", gym.make("TreeSearchQA-v0"))
    obs, info = e.reset(seed=seed)
    assert e.observation_space.contains(obs)
    for i, a in enumerate(acts, 1):
        obs, r, term, trunc, info = e.step(a)
        assert e.observation_space.contains(obs) and INFO_KEYS <= set(info)
        assert info["turn"] == i and 0 <= info["tool_calls"] <= min(i, 3)
        assert r in (0.0, 1.0) and (r == 0.0 or term)
        if term or trunc:
            assert i <= 4
            break
        assert i < 4


def test_flashrag_jsonl_file_with_a_user_retriever(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"id": "q1", "question": "Capital of France?", "golden_answers": ["Paris"]}\n'
                    '{"id": "q2", "question": "Capital of Italy?", "golden_answers": ["Rome"]}\n')
    e = gym.make("TreeSearchQA-v0", data=str(path), retriever=TinyRetriever(), split="test")
    obs, info = e.reset(options={"task_id": "q2"})
    assert obs.endswith("Question: Capital of Italy?\n")
    assert e.step("<search>italy</search>")[0].startswith("\n\n<information>Doc 1(Title: T0)")
    assert e.step("<answer> rome </answer>")[1:3] == (1.0, True)
    with pytest.raises(ValueError, match="has no corpus"):  # bm25 needs a corpus to index
        gym.make("TreeSearchQA-v0", data=str(path))
