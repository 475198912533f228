"""verifiers (0.4, v1) evaluates treegym episodes through its own OpenEnv taskset, unchanged, against
a served treegym env and the committed warm start served as an OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import httpx
import pytest

pytest.importorskip("verifiers", reason='needs pip install "treegym[verifiers]"')
pytest.importorskip("openenv", reason='needs pip install "treegym[openenv]"')

from netutil import ServedApp, free_port  # noqa: E402
from treegym.integrations import verifiers as tg_vf  # noqa: E402
from treegym.integrations.openenv import ServeEnvProcess, make_app  # noqa: E402

WARMSTART = Path(__file__).resolve().parent.parent / "train" / "warmstart"


@pytest.fixture(scope="module")
def env_url():
    with ServedApp(make_app("TreeSearchQA-v0"), log_level="critical") as served:
        yield served.url


@pytest.fixture(scope="module")
def model_url():
    from treegym.agents.hf import HFPolicy
    with ServedApp(tg_vf.policy_app(HFPolicy(WARMSTART)), log_level="critical") as served:
        yield served.url + "/v1"


def test_config_and_load_environment_use_verifiers_own_openenv_taskset(env_url):
    from verifiers.v1.tasksets.openenv import OpenEnvEnv, OpenEnvTaskset
    env = tg_vf.load_environment(env_url, seeds=range(3))
    assert isinstance(env, OpenEnvEnv)
    tasks = list(env.taskset)
    assert isinstance(env.taskset, OpenEnvTaskset) and [t.data.reset for t in tasks] == [{"seed": i} for i in range(3)]
    assert tg_vf.resets(task_ids=["a"]) == [{"task_id": "a"}]
    with pytest.raises(ValueError):
        tg_vf.resets(seeds=[1], task_ids=["a"])


def test_policy_endpoint_speaks_openai_chat(model_url):
    from openai import OpenAI
    client = OpenAI(base_url=model_url, api_key="none")
    reply = client.chat.completions.create(model="treegym-tiny", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "Question: who?"}])
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="treegym-tiny", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "Question: who?"}])
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream)
    assert httpx.post(model_url + "/chat/completions", content=b"{nope").status_code == 400


@pytest.mark.slow
def test_readme_example_verifiers_evaluates_8_treegym_episodes_with_the_tiny_model(tmp_path, monkeypatch, capsys):
    """The README's example, as written, against `treegym serve-env` (its command) on free ports."""
    from readme_example import readme_example
    env = ServeEnvProcess()
    try:
        model_port = free_port()
        code = (readme_example("Use treegym from verifiers").replace("http://127.0.0.1:8000", env.url)
                .replace("8001", str(model_port)))
        monkeypatch.chdir(tmp_path)  # verifiers writes its outputs under the working directory
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        episodes = namespace["episodes"]
    finally:
        env.stop()
    assert len(episodes) == 8 and capsys.readouterr().out.count(",") == 7
    local = gym.make("TreeSearchQA-v0")
    for ep in episodes:
        assert ep.ok and not ep.errors and ep.num_output_tokens > 0
        (trace,) = ep.traces
        replies = [n.message.content for n in trace.nodes if n.message.role == "assistant"]
        assert replies
        # verifiers' summed reward equals the same replies replayed in-process (as its taskset sends them)
        local.reset(seed=ep.task.data.reset["seed"])
        total, done = 0.0, False
        for reply in replies:
            if done:
                break
            _, r, term, trunc, _ = local.step(reply.strip())
            total, done = total + float(r), term or trunc
        assert trace.rewards["openenv_reward"].score == pytest.approx(total)


def test_verifiers_version_outside_the_range_names_it(monkeypatch):
    import importlib.metadata
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.9")
    with pytest.raises(ImportError, match=r"verifiers>=0\.4\.0,<0\.5.*found verifiers 0\.1\.9"):
        tg_vf._check_verifiers()
