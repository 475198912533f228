"""treegym inside TRL: `trl.GRPOTrainer` (the real one, on CPU) trains the committed warm start on
treegym episodes through `TreegymRollout`, and `TreeGRPOTrainer` trains with Tree-GRPO's
advantages. What TRL receives is checked against treegym's own records, token for token."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("trl", reason="needs the trl extra: pip install 'treegym[trl]'")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from treegym.integrations import trl as tg_trl  # noqa: E402
from treegym.train.sft import WARMSTART_DIR  # noqa: E402
from treegym.tree import advantages as A  # noqa: E402


@pytest.fixture(scope="module")
def env():
    e = gym.make("TreeSearchQA-v0", data="synthetic")
    yield e
    e.close()


class _Recording:
    """Mixed into the real trainers: records what their scoring step produced (what the loss uses)."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        # TRL's own log-probs of the completions under the weights that sampled them
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():
            trl_logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, att, out["completion_ids"].shape[1], batch_size=len(ids))
        self.recorded.append((out, self.rollout_func.last_forests, trl_logps))
        return out


class RecordingGRPO(_Recording, tg_trl.trl.GRPOTrainer):
    pass


class RecordingTreeGRPO(_Recording, tg_trl.TreeGRPOTrainer):
    pass


def _train(env, tmp_path, *, sampler, steps=3, **kw):
    from trl import GRPOConfig

    rollout = tg_trl.TreegymRollout(env, sampler=sampler, max_new_tokens=24, **kw)
    group = rollout.group_size or 4
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * group,
                      num_generations=group, max_steps=steps, learning_rate=2e-3,
                      logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                      disable_tqdm=True, seed=0, bf16=False)  # TRL's default bf16 autocast
    # would score the completions in bf16 while treegym sampled in fp32 (|d log p| up to ~0.05)
    cls = RecordingGRPO if sampler == "chain" else RecordingTreeGRPO
    trainer = cls(model=str(WARMSTART_DIR), reward_funcs=tg_trl.env_reward, args=args,
                  train_dataset=rollout.dataset(16), rollout_func=rollout)
    trainer.recorded = []
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    changed = sum(float((before[k] - v.detach()).abs().sum()) for k, v in trainer.model.named_parameters())
    return trainer, rollout, changed


def _leaf_mask(leaf):
    """treegym's action mask of a leaf's episode after the prompt, from its T-A-O nodes."""
    mask, ids = [], []
    for node in leaf.path():
        mask += [1] * len(node.action_ids) + [0] * len(node.obs_ids)
        ids += list(node.action_ids) + list(node.obs_ids)
    return mask, ids


@pytest.mark.timeout(300)
def test_grpo_trainer_trains_on_treegym_episodes_with_the_env_mask(env, tmp_path, one_torch_thread):
    trainer, rollout, changed = _train(env, tmp_path, sampler="chain")
    assert trainer.state.global_step == 3
    assert changed > 0, "three GRPO steps did not change the weights"
    assert len(trainer.recorded) == 3
    saw_observation = False
    for out, forests, trl_logps in trainer.recorded:
        leaves = [leaf for f in forests for leaf in f.leaves()]
        assert len(leaves) == out["completion_ids"].shape[0] == 8
        for i, leaf in enumerate(leaves):
            mask, ids = _leaf_mask(leaf)
            n = len(ids)
            assert out["completion_ids"][i, :n].tolist() == ids
            assert out["completion_mask"][i].sum().item() == n
            assert out["tool_mask"][i, :n].tolist() == mask  # the mask TRL's loss multiplies in
            assert list(out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist()) == list(
                forests[i].prompt_ids)
            lps = [lp for node in leaf.path() for lp in list(node.logprobs) + [0.0] * len(node.obs_ids)]
            assert np.allclose(out["sampling_per_token_logps"][i, :n].numpy(), lps)
            saw_observation |= 0 in mask
        # the behaviour log-probs are what TRL's own forward pass gives the sampled tokens
        m = (out["completion_mask"] * out["tool_mask"]).bool()
        assert torch.allclose(trl_logps[m], out["sampling_per_token_logps"][m], atol=2e-3)
    assert saw_observation, "no episode searched: the env mask was never exercised"
    rewards = [h["rewards/env_reward/mean"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 3


@pytest.mark.timeout(300)
def test_tree_grpo_inside_trl_trains_with_treegym_advantages(env, tmp_path, one_torch_thread):
    trainer, rollout, changed = _train(env, tmp_path, sampler="tree_grpo", M=2, N=2, L=1, K=2)
    assert rollout.group_size == 4
    assert trainer.state.global_step == 3
    nonzero = False
    for out, forests, _ in trainer.recorded:
        expected = A.tree_grpo(forests)
        leaves = [leaf for f in forests for leaf in f.leaves()]
        assert len(leaves) == out["advantages"].shape[0] == 8
        assert {len(f.leaves()) for f in forests} == {4}  # the group is the prompt's kept leaves
        for i, leaf in enumerate(leaves):
            mask, ids = _leaf_mask(leaf)
            n = len(ids)
            assert out["tool_mask"][i, :n].tolist() == mask
            got = out["advantages"][i, :n].numpy()
            want = np.asarray(mask, dtype=np.float32) * np.float32(expected[leaf][0])
            assert np.allclose(got, want, atol=1e-6)
            nonzero |= bool(np.any(got != 0))
    assert nonzero, "every Tree-GRPO advantage was 0: pick a seed with reward variance"
    assert changed > 0


def test_rollout_refuses_a_mismatched_group_and_foreign_prompts(env):
    rollout = tg_trl.TreegymRollout(env, sampler="tree_grpo", M=2, N=1, L=1)
    assert rollout.group_size == 4
    ds = rollout.dataset(2)
    p = ds["prompt"]
    assert rollout.task_id(p[0]) == ds["task_id"][0]
    with pytest.raises(ValueError, match="group_size = 4"):
        tg_trl._groups([rollout.task_id(x) for x in [p[0]] * 3 + [p[1]] * 3], 4)
    with pytest.raises(ValueError, match="not one prompt repeated"):
        tg_trl._groups([rollout.task_id(x) for x in [p[0]] * 3 + [p[1]]], 4)
    with pytest.raises(ValueError, match="TreegymRollout.dataset"):
        rollout.task_id("What is the capital of France?")
    with pytest.raises(ValueError, match="sampler"):
        tg_trl.TreegymRollout(env, sampler="beam")
    with pytest.raises(ValueError, match="K must be"):
        tg_trl.TreegymRollout(env, sampler="tree_grpo", N=1, L=1, K=3)
    with pytest.raises(TypeError):
        tg_trl.TreegymRollout(object())


def test_version_outside_the_tested_range_names_it():
    from treegym.integrations._requires import check_version

    check_version("trl", "1.16.0", tg_trl.TRL_SPEC, "trl")
    with pytest.raises(ImportError, match=r"trl>=1\.16\.0,<1\.17.*treegym\[trl\]"):
        check_version("trl", "0.29.1", tg_trl.TRL_SPEC, "trl")
    from treegym.integrations._requires import require

    with pytest.raises(ImportError, match=r"supports trl>=9\.0 .*found trl 1\.16"):
        require("trl", "trl", ">=9.0", "trl")  # the installed trl, outside a range
    with pytest.raises(ImportError, match=r"treegym\[trl\]"):
        require("no_such_module_treegym", "no-such-dist", ">=1", "trl")


@pytest.mark.timeout(300)
def test_readme_example_runs(tmp_path, monkeypatch, one_torch_thread):
    from readme_example import run_readme_example

    monkeypatch.chdir(tmp_path)
    ns = run_readme_example("Use treegym from TRL")
    assert ns["trainer"].state.global_step == 2 and len(ns["leaves"]) == 8


@pytest.mark.parametrize("estimator", ["tree_grpo", "treerl", "gigpo"])
def test_per_token_advantages_reach_trl_rows_step_by_step(env, estimator):
    """Node-level estimators give each step its own value; the row TRL gets keeps that, token by
    token (0 on observation tokens), for every leaf of every tree."""
    from treegym.agents import RandomPolicy
    from treegym.tree import rollout, to_batch

    forests, _ = rollout.tree_grpo(RandomPolicy(seed=1), env, env.unwrapped.tasks[:3], M=2, N=2,
                                   L=1, seed=0, max_new_tokens=200)
    adv = getattr(A, estimator)(forests)
    rows = tg_trl._to_trl(forests, adv, expected=3 * 2 * 3)
    for i, leaf in enumerate(leaf for f in forests for leaf in f.leaves()):
        want = []
        for node, value in zip(leaf.path(), adv[leaf]):
            want += [value] * len(node.action_ids) + [0.0] * len(node.obs_ids)
        assert np.allclose(rows["treegym_advantage"][i], want)
        assert rows["env_reward"][i] == leaf.reward
    assert to_batch(forests, adv).advantages.shape[0] == len(rows["completion_ids"])
    if estimator != "tree_grpo":  # the per-step case is really exercised
        assert any(len(set(np.round(adv[leaf], 9))) > 1 for f in forests for leaf in f.leaves())
