"""treegym in GEM (the real `gem-llm`): its registry makes our env, its SyncVectorEnv steps it,
and spawn / get_state / set_state fork and restore episodes mid-way."""

from __future__ import annotations

import gymnasium as gym
import pytest

gem = pytest.importorskip("gem", reason="needs the gem extra: pip install 'treegym[gem]'")

from treegym.integrations import gem as tg_gem  # noqa: E402

SEARCH = "<think>look it up</think><search>capital</search>"


def _answer(env) -> str:
    return f"<answer>{env.env.unwrapped.task.answers[0]}</answer>"


def test_gem_make_gives_the_same_episode_as_gym_make():
    env = gem.make("treegym/TreeSearchQA-v0", max_tool_calls=2)
    ref = gym.make("TreeSearchQA-v0", max_tool_calls=2)
    assert env.reset(seed=3)[0] == ref.reset(seed=3)[0]
    assert env.step(SEARCH)[0] == ref.step(SEARCH)[0]
    obs, reward, terminated, truncated, info = env.step(_answer(env))
    assert (reward, terminated, truncated) == (1.0, True, False) and info["tool_calls"] == 1
    assert "treegym/TreeWebAgent-v0" in gem.envs.registration.ENV_REGISTRY
    tg_gem.register()  # idempotent


def test_spawn_same_state_forks_mid_episode_and_set_state_restores():
    env = gem.make("treegym/TreeSearchQA-v0", max_tool_calls=2)
    env.reset(seed=0)
    env.step(SEARCH)
    state = env.get_state()
    branch = env.spawn(same_state=True)
    assert branch.get_state() == state and branch.env is not env.env
    obs_b, r_b, done_b, _, info_b = branch.step(_answer(branch))
    assert done_b and r_b == 1.0 and info_b["turn"] == 2  # continued from turn 1, not from reset
    # the original is untouched by the branch and goes another way
    obs_a, _, done_a, _, info_a = env.step("<search>another query</search>")
    assert not done_a and info_a["turn"] == 2 and obs_a.startswith("\n\n<information>")
    env.set_state(state)  # back to after the first search
    assert env.step(_answer(env))[:3] == (obs_b, r_b, done_b)
    with pytest.raises(TypeError, match="get_state"):
        env.set_state({"first_obs": "x", "answer": "y"})
    with pytest.raises(ValueError, match="same_state=True"):
        env.spawn(same_state=True, seed=5)
    fresh = env.spawn(seed=7)
    assert fresh.reset()[0] == gem.make("treegym/TreeSearchQA-v0", seed=7).reset()[0]


@pytest.mark.parametrize("async_mode", [False, True])  # True: GEM's thread-pool AsyncVectorEnv
def test_gem_vector_env_steps_and_autoresets_our_env(async_mode):
    vec = gem.make_vec(["treegym/TreeSearchQA-v0"] * 3, seed=10, max_tool_calls=1,
                       async_mode=async_mode)
    obs, infos = vec.reset()
    assert len(set(obs)) == 3  # seed + i: three different tasks
    for o, i in zip(obs, range(3)):
        assert o == gym.make("TreeSearchQA-v0", max_tool_calls=1).reset(seed=10 + i)[0]
    obs, rewards, term, trunc, infos = vec.step([SEARCH] * 3)
    assert not term.any() and all(o.startswith("\n\n<information>") for o in obs)
    for o, e in zip(obs, vec.envs):  # what a lone env returns for the same step
        ref = gym.make("TreeSearchQA-v0", max_tool_calls=1)
        ref.reset(options={"task_id": e.env.unwrapped.task.id})
        assert o == ref.step(SEARCH)[0]
    answers = [_answer(e) for e in vec.envs]
    obs, rewards, term, trunc, infos = vec.step([answers[0], "<answer>wrong</answer>", "no tags"])
    assert list(rewards) == [1.0, 0.0, 0.0]
    assert list(term) == [True, True, False] and list(trunc) == [False, False, True]
    # GEM's SAME_STEP autoreset: the finished envs already show a new prompt
    assert all(o.startswith(vec.envs[0].env.unwrapped.state.prompt[:40]) for o in obs)


def test_readme_example_runs():
    from readme_example import run_readme_example

    ns = run_readme_example("Use treegym from GEM")
    assert ns["branch"].get_state() != ns["state"]  # the branch moved on, the original did not
    assert len(ns["obs"]) == 4 and len(set(ns["prompts"])) == 4


@pytest.mark.parametrize("module,blocked,extra", [("gem", "gem", "gem"), ("skyrl", "skyrl_gym", "skyrl"),
                                                  ("trl", "trl", "trl")])
def test_each_integration_imports_alone_and_names_its_extra(module, blocked, extra):
    """Without its library a module raises ImportError naming the extra; the others still import."""
    import subprocess
    import sys

    others = [m for m in ("gem", "skyrl") if m != module]
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"for m in {others!r}: __import__('treegym.integrations.' + m)\n"
            f"try:\n    import treegym.integrations.{module}\nexcept ImportError as e:\n    print(e)\n"
            f"else:\n    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f'pip install "treegym[{extra}]"' in out.stdout, out.stdout


def test_gem_observation_wrapper_accumulates_our_episode():
    from gem.wrappers.wrapper_factory import WRAPPER_FACTORY

    env = WRAPPER_FACTORY["concat_with_action"](gem.make("treegym/TreeSearchQA-v0"))
    prompt, _ = env.reset(seed=0)
    obs, *_ = env.step(SEARCH)
    assert obs.startswith(prompt) and SEARCH in obs and "<information>" in obs.split(SEARCH, 1)[1]
