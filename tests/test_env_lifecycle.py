"""Env lifecycle through the public API, for both envs: `close()` releases the env's resources and
a closed env refuses every episode call; `restore` refuses a snapshot of another env, dataset or
site, naming both, while snapshots of the same env (forks, pickled copies, an env made the same
way) restore as before."""

from __future__ import annotations

import pickle

import gymnasium as gym
import pytest
from gymnasium.error import ClosedEnvironmentError
from hypothesis import HealthCheck, given, settings, strategies as st

import treegym
from treegym.envs.core import SnapshotMismatchError
from treegym.envs.data.synthetic import synthetic_dataset

SMALL = dict(n_people=120, n_cities=20, n_countries=4, n_orgs=15, n_works=40, n_questions=300)
ENV_IDS = ("TreeSearchQA-v0", "TreeWebAgent-v0")


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(0, **SMALL)


@pytest.fixture(scope="module")
def other_data():
    """Same seed and so the same name as `data`, different questions: told apart by content."""
    return synthetic_dataset(0, **dict(SMALL, n_questions=200))


def make(env_id, dataset, **kwargs):
    return gym.make(env_id, data=dataset, **kwargs)


def played(env, seed=0):
    env.reset(seed=seed)
    env.step("<search> capital </search>")
    return env


# -- close ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id", ENV_IDS)
def test_closed_env_refuses_every_episode_call(env_id, data):
    env = played(make(env_id, data))
    snap = treegym.snapshot(env)
    before = treegym.fork(env)  # made before close: a separate env, keeps working
    env.close()
    core = env.unwrapped
    assert core.retriever is None and core.dataset is None and core.tasks == ()
    assert core.state.task is None  # the episode (and its history) is released too
    calls = {"reset": lambda: env.reset(seed=0), "step": lambda: env.step("<answer>x</answer>"),
             "snapshot": lambda: treegym.snapshot(env), "fork": lambda: treegym.fork(env),
             "restore": lambda: treegym.restore(env, snap)}
    for name, call in calls.items():
        with pytest.raises(ClosedEnvironmentError, match=rf"{name}\(\) on a closed"):
            call()
    env.close()  # idempotent, as Gymnasium expects
    _, reward, terminated, *_ = before.step("<answer> x </answer>")
    assert terminated


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_closing_a_fork_leaves_the_parent_working(env_id, data):
    env = played(make(env_id, data))
    branch = treegym.fork(env)
    branch.close()
    obs, *_ = env.step("<search> city </search>")
    assert obs.startswith("\n\n<information>")
    assert treegym.fork(env) is not None


# -- restore identity check ------------------------------------------------------------------------

def test_snapshot_of_another_dataset_is_refused_naming_both(data, other_data):
    a, b = played(make("TreeSearchQA-v0", data)), played(make("TreeSearchQA-v0", other_data))
    assert data.name == other_data.name  # the names alone would not tell them apart
    snap, b_state = treegym.snapshot(a), b.unwrapped.state
    with pytest.raises(SnapshotMismatchError) as err:
        treegym.restore(b, snap)
    message = str(err.value)
    assert a.unwrapped.state.origin in message and b.unwrapped.state.origin in message
    assert data.fingerprint()[:12] in message and other_data.fingerprint()[:12] in message
    assert b.unwrapped.state is b_state  # nothing changed
    with pytest.raises(SnapshotMismatchError):
        b.unwrapped.restore(a.unwrapped.snapshot())  # the bare core API checks the same


def test_snapshot_of_another_env_is_refused(data):
    qa, web = played(make("TreeSearchQA-v0", data)), played(make("TreeWebAgent-v0", data))
    with pytest.raises(SnapshotMismatchError, match="TreeSearchQAEnv.*TreeWebAgentEnv"):
        treegym.restore(web, treegym.snapshot(qa))
    with pytest.raises(SnapshotMismatchError, match="TreeWebAgentEnv.*TreeSearchQAEnv"):
        treegym.restore(qa, treegym.snapshot(web))
    # ... also when the wrapper stacks differ too: the foreign state is what gets named
    with pytest.raises(SnapshotMismatchError):
        treegym.restore(web.unwrapped, treegym.snapshot(qa))


def test_snapshot_of_another_site_is_refused(data, tmp_path):
    import json

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<title>Home</title><p>Capital: Qorvath</p>")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Capital?", "golden_answers": ["Qorvath"]}))
    one = gym.make("TreeWebAgent-v0", site=str(tmp_path / "site"), data=str(questions))
    (tmp_path / "site2").mkdir()
    (tmp_path / "site2" / "index.html").write_text("<title>Home</title><p>Capital: Elsewhere</p>")
    two = gym.make("TreeWebAgent-v0", site=str(tmp_path / "site2"), data=str(questions))
    one.reset(seed=0)
    with pytest.raises(SnapshotMismatchError, match="site 'site'.*site 'site2'"):
        treegym.restore(two, treegym.snapshot(one))


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_env_snapshots_still_restore(env_id, data):
    env = played(make(env_id, data))
    snap = treegym.snapshot(env)
    branch = treegym.fork(env)
    branch.step("<answer> x </answer>")
    treegym.restore(branch, snap)  # a fork takes its parent's snapshots
    twin = make(env_id, data)  # made the same way: restores an unpickled snapshot
    treegym.restore(twin, pickle.loads(pickle.dumps(snap)))
    assert twin.unwrapped.state.transcript == env.unwrapped.state.transcript
    obs, *_ = twin.step("<search> city </search>")
    assert obs.startswith("\n\n<information>")


def test_same_data_loaded_twice_restores_and_hand_made_states_do_not(tmp_path):
    """The origin is content, not object identity: the same file read into two Dataset objects
    (as in two processes) gives interchangeable snapshots."""
    import json

    from treegym.envs.core import EnvState
    from treegym.envs.data import resolve_dataset
    from treegym.retrieval_index.base import Hit

    class Echo:  # a Retriever: any object with search(queries, k)
        def search(self, queries, k):
            return [[Hit("d1", 1.0, "T", q)] for q in queries]

    path = tmp_path / "qs.jsonl"
    path.write_text(json.dumps({"question": "Q?", "golden_answers": ["A"]}) + "\n")
    one, two = resolve_dataset(str(path)), resolve_dataset(str(path))
    assert one is not two and one.fingerprint() == two.fingerprint()
    a = gym.make("TreeSearchQA-v0", data=one, retriever=Echo())
    b = gym.make("TreeSearchQA-v0", data=two, retriever=Echo())
    a.reset(seed=0)
    a.step("<search> hello </search>")
    treegym.restore(b, pickle.loads(pickle.dumps(treegym.snapshot(a))))
    assert b.unwrapped.state.transcript == a.unwrapped.state.transcript
    with pytest.raises(SnapshotMismatchError, match="no recorded env"):
        treegym.restore(b, EnvState())


ACTIONS = st.sampled_from(["<search> capital </search>", "<search> born </search>",
                           "no tag", "<answer> x </answer>", "<visit> /index.html </visit>"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(ACTIONS, max_size=4), seed=st.integers(0, 50),
       source=st.sampled_from(ENV_IDS), target=st.sampled_from(ENV_IDS),
       same_data=st.booleans())
def test_restore_accepts_exactly_the_same_origin(envs, actions, seed, source, target, same_data):
    """Whatever the episode, a snapshot restores into its own env or a fork of it, and into an
    env of another class or dataset never (leaving that env's state untouched)."""
    a = envs[source, True]
    a.reset(seed=seed)
    for action in actions:
        if a.unwrapped.state.done:
            break
        a.step(action)
    snap = treegym.snapshot(a)
    b = treegym.fork(envs[target, same_data])
    if source == target and same_data:
        treegym.restore(b, snap)
        assert b.unwrapped.state is snap.state
    else:
        state = b.unwrapped.state
        with pytest.raises(SnapshotMismatchError):
            treegym.restore(b, snap)
        assert b.unwrapped.state is state


@pytest.fixture(scope="module")
def envs(data, other_data):
    out = {(env_id, same): make(env_id, data if same else other_data)
           for env_id in ENV_IDS for same in (True, False)}
    for env in out.values():
        env.reset(seed=0)
    return out
