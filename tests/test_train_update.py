"""`Trainer.update` on real rollouts: packing and each `TrainConfig.update` skip change no number;
a minibatch without a sampled token is skipped and counted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from treegym.envs.data.synthetic import synthetic_dataset
from treegym.train.config import TrainConfig, UpdateConfig
from treegym.train.trainer import Trainer
from treegym.tree import to_batch


@pytest.fixture(scope="module")
def small_world():
    return synthetic_dataset(3, n_people=40, n_cities=8, n_countries=3, n_orgs=8, n_works=10,
                             n_questions=120)


@pytest.fixture(scope="module")
def model_dir(small_world, tmp_path_factory):
    """A 1-layer model after a short SFT (rewards vary within a group, so advantages are not 0)."""
    from treegym.agents.tiny import build_tiny_model, corpus_titles
    from treegym.train.sft import run_sft

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("upd")
    init = build_tiny_model(small_world.corpus_path, root / "init",
                            entity_names=corpus_titles(small_world.corpus_path), vocab_size=400,
                            n_layer=1, d_model=32, n_head=2, max_position_embeddings=1024)
    run_sft(small_world, root / "sft", model_dir=init, lm_steps=10, act_steps=40, batch=8,
            lr=1e-2, act_lr=1e-2, eval_every=0, eval_n=4, log=lambda *_: None)
    return root / "sft"


def _cfg(model, out, update: UpdateConfig, algo: str = "tree_grpo", epochs: int = 2) -> TrainConfig:
    cfg = TrainConfig(model=str(model), out=str(out), steps=2, prompts_per_step=3,
                      minibatch_prompts=1, epochs=epochs, seed=0, save_every=100, save_trees_every=0,
                      progress=False, tensorboard=False, threads=1, reward="format_em",
                      algo=algo, update=update)
    cfg.rollout.G = 3
    cfg.rollout.max_new_tokens = 12
    cfg.optim.lr = 1e-3
    cfg.loss.kl_coef = 0.1  # large enough that a wrong reference would show
    return cfg


@pytest.fixture(scope="module")
def batches(model_dir, small_world, tmp_path_factory):
    """Real batches with signal: a tree_grpo step and a chain (grpo) step."""
    out = {}
    for algo in ("tree_grpo", "grpo"):
        tr = Trainer(_cfg(model_dir, tmp_path_factory.mktemp(algo), UpdateConfig(), algo=algo),
                     dataset=small_world)
        for _ in range(8):
            forests, _ = tr.rollout(tr.next_tasks())
            batch = to_batch(forests, tr.advantages(forests), pad_id=tr.policy.pad_id)
            if np.abs(batch.advantages).sum() > 0:
                break
        assert np.abs(batch.advantages).sum() > 0, "no reward variance"
        out[algo] = batch
    return out


ALL_OFF = UpdateConfig(packed=False, old_from_update=False, ref_while_unchanged=False)


def _update(model_dir, world, tmp, batch, update: UpdateConfig, *, fresh: bool):
    """One update from the start weights; `fresh=False` makes the policy differ from the
    reference first (as on every step after the first), by one update on the same batch."""
    tr = Trainer(_cfg(model_dir, tmp, update), dataset=world)
    if not fresh:
        tr.update(batch)
    stats = tr.update(batch)
    return stats, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


@pytest.mark.parametrize("algo", ["tree_grpo", "grpo"])
@pytest.mark.parametrize("switch", ["packed", "old_from_update", "ref_while_unchanged", "all"])
def test_each_update_switch_changes_no_number(model_dir, small_world, batches, tmp_path, algo,
                                              switch):
    """Three prompts in minibatches of one, two epochs, KL on: with the switch on, the update's
    metrics and the weights after it equal the all-off update's within 1e-5 (fp32), on a fresh
    run (where the reference pass is skipped) and on a later step (where it is not)."""
    on = (UpdateConfig() if switch == "all" else dataclasses.replace(ALL_OFF, **{switch: True}))
    for fresh in (True, False):
        base, w_base = _update(model_dir, small_world, tmp_path / f"off{fresh}", batches[algo],
                               ALL_OFF, fresh=fresh)
        got, w_got = _update(model_dir, small_world, tmp_path / f"on{fresh}", batches[algo], on,
                             fresh=fresh)
        for k in ("loss", "pg_loss", "kl", "entropy", "clipfrac", "approx_kl", "grad_norm",
                  "rollout_logprob_diff"):
            assert got[k] == pytest.approx(base[k], rel=1e-5, abs=1e-5), (k, fresh)
        assert base["kl"] > 0 or fresh  # the reference really differs on a later step
        for k, w in w_base.items():
            torch.testing.assert_close(w_got[k], w, rtol=1e-5, atol=1e-5, msg=k)
    if switch in ("packed", "all"):
        assert got["forward_tokens"] < got["leaf_tokens"]  # shared prefixes went through once
    else:
        assert got["forward_tokens"] == got["leaf_tokens"]


def test_a_minibatch_without_sampled_tokens_is_skipped_and_counted(model_dir, small_world,
                                                                    batches, tmp_path):
    batch = batches["tree_grpo"]
    first = batch.uids[0]
    for i, u in enumerate(batch.uids):  # the first prompt's leaves: prompt and observations only
        if u == first:
            batch.loss_mask[i] = 0
            batch.advantages[i] = 0
    tr = Trainer(_cfg(model_dir, tmp_path, UpdateConfig(), epochs=1), dataset=small_world)
    stats = tr.update(batch)
    assert stats["skipped_minibatches"] == 1.0
    assert all(np.isfinite(stats[k]) for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"))
    assert tr.scheduler.last_epoch == 2  # two optimizer steps for three minibatches
