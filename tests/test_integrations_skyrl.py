"""treegym as a SkyRL-gym text env (the real `skyrl-gym`): made through its registry with the
Search-R1 recipe's config keys and dataset-row extras, init/step until done."""

from __future__ import annotations

import gymnasium as gym
import pytest

skyrl_gym = pytest.importorskip("skyrl_gym", reason="needs the skyrl extra: pip install 'treegym[skyrl]'")

from omegaconf import DictConfig  # noqa: E402

from treegym.integrations import skyrl as tg_skyrl  # noqa: E402


def test_skyrl_gym_steps_a_treegym_episode():
    ref = gym.make("TreeSearchQA-v0", topk=2)
    task = ref.unwrapped.tasks[5]
    # a Search-R1 row as SkyRL passes it: question in extra_info, gold in reward_spec, max_turns
    extras = {"reward_spec": {"method": "rule", "ground_truth": {"target": list(task.answers)}},
              "extra_info": {"question": task.question, "index": 5}, "max_turns": 3}
    env = skyrl_gym.make("treegym", env_config=DictConfig({"topk": 2, "timeout": 30}), extras=extras)
    assert isinstance(env, tg_skyrl.TreegymTextEnv) and env.max_turns == 3
    chat, meta = env.init([{"role": "system", "content": "You are helpful."},
                           {"role": "user", "content": "recipe prompt"}])
    prompt, _ = ref.reset(options={"task_id": task.id})
    assert chat == [{"role": "system", "content": "You are helpful."},
                    {"role": "user", "content": prompt}] and meta["task_id"] == task.id
    out = env.step("<search>capital</search>")
    assert out["done"] is False and out["reward"] == 0.0
    assert out["observations"] == [{"role": "user", "content": ref.step("<search>capital</search>")[0]}]
    branch = env.fork()
    wrong = branch.step("<answer>nobody</answer>")
    assert wrong["done"] and wrong["reward"] == 0.0 and wrong["observations"] == []
    right = env.step(f"<answer>{task.answers[0]}</answer>")
    assert right["done"] and right["reward"] == 1.0 and right["metadata"]["tool_calls"] == 1
    assert env.get_metrics() == {"turns": 2, "tool_calls": 1, "reward": 1.0}


def test_bad_config_and_unknown_task_are_clear_errors():
    with pytest.raises(ValueError, match="unknown treegym env_config keys"):
        skyrl_gym.make("treegym", env_config={"serch_url": "x"}, extras={"task_id": "s0-train-00000"})
    with pytest.raises(ValueError, match="no task"):
        skyrl_gym.make("treegym", env_config={}, extras={"extra_info": {"question": "Who?"}})
    with pytest.raises(ValueError, match="extras name no task"):
        skyrl_gym.make("treegym", env_config={}, extras={})
    env = skyrl_gym.make("treegym", env_config={"max_tool_calls": 0}, extras={"task_id": "s0-train-00000", "max_turns": 5})
    assert env.max_turns == 1  # the config wins over SkyRL's max_turns
    with pytest.raises(ValueError, match="replace=True"):
        tg_skyrl.register("search")
    tg_skyrl.register("treegym")  # idempotent


def test_readme_example_runs():
    from readme_example import run_readme_example

    ns = run_readme_example("Use treegym from SkyRL")
    assert ns["out"]["done"] and ns["env"].max_turns == 4
    assert ns["chat"][-1]["content"].startswith(ns["env"].env.unwrapped.state.prompt[:30])
