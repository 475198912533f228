"""treegym served through the real OpenEnv server (uvicorn on 127.0.0.1), driven by OpenEnv clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("openenv", reason='needs pip install "treegym[openenv]"')

import httpx  # noqa: E402
from openenv import GenericEnvClient  # noqa: E402

import treegym  # noqa: E402
from treegym.agents import RandomPolicy  # noqa: E402
from treegym.integrations import openenv as tg_openenv  # noqa: E402
from treegym.integrations.openenv import (RemoteEnv, RemoteEnvError, ServeEnvProcess, ServerLimits,  # noqa: E402
                                          TreeGymEnvClient, make_app)
from treegym.tree import rollout  # noqa: E402
from netutil import ServedApp  # noqa: E402
from readme_example import readme_example  # noqa: E402

ACTIONS = ["<search> capital </search>", "no tags at all", "<search> born </search>", "<answer> x </answer>"]


class Served(ServedApp):
    def __init__(self, limits: ServerLimits = ServerLimits(), **kwargs):
        app = make_app("TreeSearchQA-v0", limits, data="synthetic:multihop", **kwargs)
        self.store = app.state.treegym_store
        super().__init__(app, log_level="error", ws_max_size=limits.max_request_bytes)


@pytest.fixture(scope="module")
def served():
    s = Served()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local():
    env = gym.make("TreeSearchQA-v0", data="synthetic:multihop")
    yield env
    env.close()


def _wait_sessions(store, n, timeout=5.0):
    t0 = time.time()
    while len(store) != n and time.time() - t0 < timeout:
        time.sleep(0.02)
    return len(store)


def _local_episode(local, seed, actions):
    env = treegym.fork(local)
    out = [env.reset(seed=seed)[0]]
    for a in actions:
        obs, reward, term, trunc, _ = env.step(a)
        out.append((obs, reward, term or trunc))
    return out


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_full_episode_and_fork_match_in_process(served, local, transport):
    before = len(served.store)
    with TreeGymEnvClient(served.url, transport=transport) as client:
        r = client.reset(seed=3)
        got = [r.observation.text]
        for i, a in enumerate(ACTIONS):
            if i == 2:
                token = client.snapshot()
                branch = client.fork()
            r = client.step(a)
            got.append((r.observation.text, r.reward, r.done))
        assert got == _local_episode(local, 3, ACTIONS)
        assert client.state().terminated and r.done
        # the fork continues from after step 2, untouched by the parent's last two steps
        r2 = branch.step(ACTIONS[2])
        assert (r2.observation.text, r2.reward, r2.done) == got[3]
        assert branch.state().turn == 3
        branch.close()
        # restore rewinds the (finished) parent to the token's state
        state = client.restore(token)
        assert state.turn == 2 and not state.terminated
        r3 = client.step(ACTIONS[2])
        assert r3.observation.text == got[3][0]
    assert _wait_sessions(served.store, before) == before  # nothing leaked


def test_async_client_and_generic_openenv_client(served, local):
    async def run():
        async with TreeGymEnvClient(served.url) as client:
            r = await client.reset(seed=5)
            r = await client.step("<answer> x </answer>")
            child = await client.fork()
            await child.close()
            return r
    r = asyncio.run(run())
    assert r.done and r.reward == _local_episode(local, 5, ["<answer> x </answer>"])[1][1]
    # OpenEnv's own GenericEnvClient (what verifiers uses) speaks to the server unchanged
    with GenericEnvClient(base_url=served.url).sync() as env:
        r = env.reset(seed=5)
        assert "Question:" in r.observation["text"]
        r = env.step({"text": "<answer> x </answer>"})
        assert r.done is True and isinstance(r.reward, float)


def test_tree_rollout_runs_against_the_served_env(served, local):
    tasks = [t.id for t in local.unwrapped.tasks[:2]]
    policy = RandomPolicy(seed=7, answer_prob=0.4)
    with TreeGymEnvClient(served.url, transport="http") as client:
        forests, budget = rollout.tree_grpo(policy, client, tasks, M=2, N=2, L=1, seed=4)
    want, want_budget = rollout.tree_grpo(policy, local, tasks, M=2, N=2, L=1, seed=4)
    assert budget.leaves == want_budget.leaves == 2 * 2 * 3
    for f, g in zip(forests, want):
        assert [(l.reward, [s.obs_text for s in l.steps()]) for l in f.leaves()] == \
               [(l.reward, [s.obs_text for s in l.steps()]) for l in g.leaves()]
    forests, _ = rollout.chain(policy, RemoteEnv(served.url), tasks, G=2, seed=1)
    assert sum(len(f.leaves()) for f in forests) == 4


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(served):
    http = httpx.Client(base_url=served.url)
    bad = [
        http.post("/step", json={"action": {"text": "x"}}),                               # no session id
        http.post("/step", json={"action": {"text": "x"}, "session_id": "nope"}),           # unknown session
        http.post("/step", content=b"{not json", headers={"content-type": "application/json"}),
        http.post("/step", json={"action": {"text": "x" * 70_000}, "session_id": "a"}),     # oversized action
        http.post("/restore", json={"session_id": "a", "token": "zzz.yyy"}),                # foreign token
        http.post("/fork", json={}),
        http.post("/reset", json={"task_id": "no-such-task"}),
        http.post("/reset", content=b"x" * (2 << 20)),                                      # oversized body
    ]
    for r in bad:
        assert 400 <= r.status_code < 500, r.text
        assert isinstance(r.json(), dict)
    assert [r.status_code for r in bad[:2]] == [400, 404] and bad[-1].status_code == 413
    sid = http.post("/reset", json={"seed": 1}).json()["observation"]["session_id"]
    tok = http.post("/snapshot", json={"session_id": sid}).json()["token"]
    stale = tok.split(".")[0] + ".forgotten"
    r = http.post("/restore", json={"session_id": sid, "token": stale})
    assert r.status_code == 410 and "stale" in r.json()["error"]
    http.post("/step", json={"action": {"text": "<answer> a </answer>"}, "session_id": sid})
    r = http.post("/step", json={"action": {"text": "<answer> a </answer>"}, "session_id": sid})
    assert r.status_code == 409 and r.json()["code"] == "reset_needed"
    assert http.post("/close", json={"session_id": sid}).json() == {"closed": True}
    assert http.get("/health").status_code == 200


def test_snapshot_from_another_dataset_is_refused():
    other = Served(split="test")
    try:
        with TreeGymEnvClient(other.url, transport="http") as a:
            a.reset(seed=0)
            token = a.snapshot()
        mine = Served()
        try:
            with TreeGymEnvClient(mine.url, transport="http") as b:
                b.reset(seed=0)
                with pytest.raises(RemoteEnvError, match="another env or dataset"):
                    b.restore(token)
        finally:
            mine.stop()
    finally:
        other.stop()


def test_websocket_errors_dropped_sockets_and_limits():
    s = Served(ServerLimits(max_sessions=3, idle_timeout_s=0.5))
    try:
        with TreeGymEnvClient(s.url) as c:
            with pytest.raises(RuntimeError, match="reset"):
                c.step("<search> x </search>")
            c.reset(seed=0)
            with pytest.raises(RuntimeError, match="Invalid message|VALIDATION"):
                c.step("y" * 70_000)
            with pytest.raises(RemoteEnvError, match="stale"):
                c.restore(c.snapshot().split(".")[0] + ".gone")
            assert c.step("<search> x </search>").done is False  # the session survived
            time.sleep(0.7)  # idle past the timeout: the connection's session expires
            with pytest.raises(RuntimeError, match="expired"):
                c.step("<search> x </search>")
            assert "Question:" in c.reset(seed=0).observation.text  # a reset opens a fresh one
        assert _wait_sessions(s.store, 0) == 0
        # malformed JSON on a socket: an error message to that client, and the socket keeps working
        from websockets.sync.client import connect
        with connect(s.url.replace("http://", "ws://") + "/ws") as ws:
            ws.send("{not json")
            err = json.loads(ws.recv())
            assert err["type"] == "error" and err["data"]["code"] == "INVALID_JSON"
            ws.send(json.dumps({"type": "step", "data": {"text": "x", "bogus": 1}}))
            assert json.loads(ws.recv())["type"] == "error"
            ws.send(json.dumps({"type": "reset", "data": {"seed": 2}}))
            assert "Question:" in json.loads(ws.recv())["data"]["observation"]["text"]
        assert _wait_sessions(s.store, 0) == 0
        # a socket that drops mid-episode frees its session
        code = (f"from treegym.integrations.openenv import TreeGymEnvClient\n"
                f"c = TreeGymEnvClient({s.url!r}).sync(); c.connect(); c.reset(seed=1)\n"
                f"c.step('<search> a </search>'); import os; os._exit(0)\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert _wait_sessions(s.store, 0) == 0
        # max sessions: a 4th HTTP session is refused with 503 JSON; idle ones expire
        http = httpx.Client(base_url=s.url)
        ids = [http.post("/reset", json={}).json()["observation"]["session_id"] for _ in range(3)]
        r = http.post("/reset", json={})
        assert r.status_code == 503 and "limit" in r.json()["error"]
        time.sleep(0.7)
        assert http.post("/step", json={"action": {"text": "x"}, "session_id": ids[0]}).status_code == 404
        assert http.get("/treegym").json()["sessions"] == 0
    finally:
        s.stop()


def test_serve_env_cli_rejects_bad_env_and_kwargs(capsys):
    assert tg_openenv.cli_main(["--env", "NoSuchEnv-v0"]) == 2
    assert "unknown env 'NoSuchEnv-v0'" in capsys.readouterr().err
    assert tg_openenv.cli_main(["--env", "TreeSearchQA-v0", "--topk", "0"]) == 2
    assert "topk" in capsys.readouterr().err
    assert tg_openenv.cli_main(["--env", "TreeSearchQA-v0", "--bogus"]) == 2


def test_openenv_version_outside_the_range_names_it(monkeypatch):
    import importlib.metadata
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.0")
    with pytest.raises(ImportError, match=r"openenv>=0\.4\.1,<0\.4\.2.*found openenv 0\.10\.0"):
        tg_openenv._check_openenv()

    def only_openenv_core(name):
        if name == "openenv-core":
            return "0.3.0"
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", only_openenv_core)
    with pytest.raises(ImportError, match=r"openenv>=0\.4\.1,<0\.4\.2.*openenv-core 0\.3\.0"):
        tg_openenv._check_openenv()


def test_schema_has_one_required_text_field(served):
    schema = httpx.get(f"{served.url}/schema").json()["action"]
    assert schema["required"] == ["text"]
    assert json.dumps(schema)


def test_readme_openenv_example_runs_against_serve_env(capsys):
    command = readme_example("Use treegym from OpenEnv", "bash").split("#")[0].split()
    assert command[:4] == ["treegym", "serve-env", "--env", "TreeSearchQA-v0"]
    server = ServeEnvProcess(command[3], [a for a in command[4:] if a not in ("--port", "8000")])
    try:
        code = readme_example("Use treegym from OpenEnv").replace("http://127.0.0.1:8000", server.url)
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        assert namespace["budget"].leaves == 12
        assert capsys.readouterr().out.split() == ["0.0", "True", "12"]
        assert httpx.get(server.url + "/treegym").json()["sessions"] == 0  # the rollout's forks were freed
    finally:
        server.stop()


_OPS = st.lists(st.one_of(
    st.tuples(st.just("step"), st.sampled_from(ACTIONS + ["<search> Paris </search>", "", "<answer></answer>"])),
    st.tuples(st.just("snapshot"), st.just(None)),
    st.tuples(st.just("restore"), st.integers(0, 5)),
    st.tuples(st.just("fork"), st.just(None))), max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 50), ops=_OPS)
def test_served_forks_snapshots_and_restores_match_in_process(served, local, seed, ops):
    """Any interleaving of steps, snapshots, restores and forks on a served env (RemoteEnv, as the
    rollouts use it) gives exactly what the same calls give in-process."""
    remote, mine = RemoteEnv(served.url), treegym.fork(local)
    got, want = [remote.reset(seed=seed)[0]], [mine.reset(seed=seed)[0]]
    snaps: list = []
    for op, arg in ops:
        if op == "step":
            for env, out in ((remote, got), (mine, want)):
                try:
                    obs, r, term, trunc, _ = env.step(arg)
                    out.append((obs, float(r), term, trunc))
                except gym.error.ResetNeeded:
                    out.append("reset-needed")
        elif op == "snapshot":
            snaps.append((treegym.snapshot(remote), treegym.snapshot(mine)))
        elif op == "restore" and snaps:
            a, b = snaps[arg % len(snaps)]
            treegym.restore(remote, a)
            treegym.restore(mine, b)
        elif op == "fork":
            remote, mine = treegym.fork(remote), treegym.fork(mine)
        assert got == want
    assert remote.state.transcript == treegym.envs.core.unwrapped_forkable(mine).state.transcript


def test_concurrent_websocket_sessions_with_forks_stay_independent(served, local):
    """4 clients at once, each stepping and forking its own episodes: every observation equals the
    same actions in-process, and nothing is left open."""
    before, errors = len(served.store), []

    def job(k):
        try:
            mine = treegym.fork(local)
            with TreeGymEnvClient(served.url) as c:
                for ep in range(3):
                    seed = 100 * k + ep
                    assert c.reset(seed=seed).observation.text == mine.reset(seed=seed)[0]
                    for i, a in enumerate(ACTIONS):
                        if i == 1:
                            branch, twin = c.fork(), treegym.fork(mine)
                            assert branch.step(ACTIONS[-1]).reward == twin.step(ACTIONS[-1])[1]
                            branch.close()
                        r, want = c.step(a), mine.step(a)
                        assert (r.observation.text, r.reward) == (want[0], want[1])
        except Exception as exc:  # reported below with the client number
            errors.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=job, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert _wait_sessions(served.store, before) == before
