"""The RL trainer, SFT and evaluation on a small world and a very small model (real objects)."""

import copy
import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import treegym
from treegym.envs.data.synthetic import synthetic_dataset
from treegym.train.config import TrainConfig, UpdateConfig
from treegym.train.trainer import Trainer
from treegym.tree import to_batch


@pytest.fixture(scope="module")
def small_world():
    return synthetic_dataset(3, n_people=40, n_cities=8, n_countries=3, n_orgs=8, n_works=10,
                             n_questions=120)


@pytest.fixture(scope="module")
def sft_model(small_world, tmp_path_factory):
    """A 1-layer model after a short action-only SFT: it emits well-formed actions often enough
    that rewards vary within a group (a random init never answers, so every advantage is 0)."""
    from treegym.agents.tiny import build_tiny_model, corpus_titles
    from treegym.train.sft import run_sft

    root = tmp_path_factory.mktemp("sft")
    init = build_tiny_model(small_world.corpus_path, root / "init",
                            entity_names=corpus_titles(small_world.corpus_path), vocab_size=400,
                            n_layer=1, d_model=32, n_head=2, max_position_embeddings=1024)
    meta = run_sft(small_world, root / "sft", model_dir=init, lm_steps=10, act_steps=40, batch=8,
                   lr=1e-2, act_lr=1e-2, eval_every=0, eval_n=4, log=lambda *_: None)
    assert meta["lm_steps"] == 10 and meta["act_steps"] == 40
    assert (root / "sft" / "model.safetensors").is_file()
    return root / "sft"


def _cfg(model, out, **kw):
    cfg = TrainConfig(model=str(model), out=str(out), steps=3, prompts_per_step=2,
                      minibatch_prompts=1, seed=0, save_every=2, save_trees_every=1,
                      progress=False, tensorboard=True, threads=1, reward="format_em", eval_tasks=4)
    cfg.rollout.G = 3
    cfg.rollout.max_new_tokens = 12
    cfg.optim.lr = 1e-3
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_sft_lowers_the_loss(sft_model):
    meta = json.loads((sft_model / "sft_meta.json").read_text())
    # the action-only loss after 40 steps is far below the uniform-guess loss ln(vocab)
    vocab = json.loads((sft_model / "config.json").read_text())["vocab_size"]
    assert meta["act_final_loss"] < 0.6 * np.log(vocab)


def test_updates_lower_the_pg_loss_and_change_weights(sft_model, small_world, tmp_path):
    from treegym.train.loss import policy_loss
    from treegym.train.logprobs import ForwardBatch, masked_logprobs
    from treegym.train.trainer import Trainer
    from treegym.tree import to_batch

    cfg = _cfg(sft_model, tmp_path, algo="tree_grpo")
    cfg.optim.lr = 1e-4  # small steps: a first-order decrease, whichever batch the seed draws
    tr = Trainer(cfg, dataset=small_world)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    # a batch with signal: sample until some prompt has leaves with different rewards
    for _ in range(6):
        forests, _ = tr.rollout(tr.next_tasks())
        batch = to_batch(forests, tr.advantages(forests), pad_id=tr.policy.pad_id)
        if np.abs(batch.advantages).sum() > 0:
            break
        tr.step += 1
    assert np.abs(batch.advantages).sum() > 0, "no reward variance in 6 rollouts"
    ids, att = torch.as_tensor(batch.input_ids), torch.as_tensor(batch.attention_mask)
    mask, adv = torch.as_tensor(batch.loss_mask), torch.as_tensor(batch.advantages)
    with torch.no_grad():
        old, _ = masked_logprobs(tr.model, ForwardBatch.padded(ids, att), mask)
    start = float(policy_loss(old, old, adv, mask))
    for _ in range(3):
        stats = tr.update(batch)
        assert np.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    with torch.no_grad():
        new, _ = masked_logprobs(tr.model, ForwardBatch.padded(ids, att), mask)
    assert float(policy_loss(new, old, adv, mask)) < start
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_three_step_run_writes_the_run_dir(sft_model, small_world, tmp_path):
    from treegym.train.checkpoint import list_checkpoints
    from treegym.train.config import load_yaml
    from treegym.train.trainer import Trainer
    from treegym.tree import load_jsonl

    cfg = _cfg(sft_model, tmp_path, algo="grpo", eval_every=3)
    tr = Trainer(cfg, dataset=small_world)
    recs = tr.train()
    assert [r["step"] for r in recs] == [1, 2, 3]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "dev/greedy/em" in json.loads(lines[-1])
    assert all(abs(r["rollout_logprob_diff"]) < 1e-3 for r in recs)  # sampler and trainer agree
    assert load_yaml(tmp_path / "config.yaml") == cfg
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    forests, budget = load_jsonl(tmp_path / "trees" / "step_000003.jsonl")
    assert len(forests) == 2 and all(len(f.leaves()) == 3 for f in forests)
    assert list((tmp_path / "tb").iterdir())


def test_resume_is_bit_exact(sft_model, small_world, tmp_path):
    from treegym.train.trainer import Trainer

    full = Trainer(_cfg(sft_model, tmp_path / "full", steps=4, save_every=100), dataset=small_world)
    full.train()
    part = Trainer(_cfg(sft_model, tmp_path / "part", steps=2, save_every=100), dataset=small_world)
    part.train()
    resumed = Trainer(_cfg(sft_model, tmp_path / "part", steps=4, save_every=100, resume=True),
                      dataset=small_world)
    assert resumed.step == 2 and resumed.cursor == 4
    resumed.train()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    fa = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    pa = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in fa] == [r["reward"] for r in pa]
    assert [r["loss"] for r in fa] == [r["loss"] for r in pa]


def test_trainer_cli_errors(capsys, tmp_path):
    from treegym.train.trainer import cli_main

    assert cli_main(["--out", str(tmp_path)]) == 2
    assert "model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--model", "x", "--rollout.Gx", "2"])
    assert cli_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_eval_matches_env_rewards(small_world):
    """Eval numbers on scripted policies equal the rewards the env itself hands out."""
    from treegym.agents.scripted import OraclePolicy, RandomPolicy
    from treegym.envs.rewards import exact_match
    from treegym.train.evaluate import run_episodes, summarize

    env = gym.make("TreeSearchQA-v0", data=small_world, split="test", reward="em")
    tasks = list(env.unwrapped.tasks)
    for policy in (OraclePolicy(small_world, max_searches=3), RandomPolicy(seed=0, answer_prob=0.5)):
        eps = run_episodes(policy, env, tasks, max_new_tokens=400, temperature=1.0, seed=1)
        # replay the same actions one episode at a time on a fresh fork, reading the env's reward
        for ep, task in zip(eps, tasks):
            e = treegym.fork(env)
            e.reset(options={"task_id": task.id})
            reward = 0.0
            for step in ep.actions:
                _, reward, term, trunc, _ = e.step(step)
                if term or trunc:
                    break
            assert ep.reward == reward == ep.em
            assert ep.em == (exact_match(ep.answer, task.answers) if ep.answer is not None else 0.0)
        m = summarize(eps)
        assert m["em"] == pytest.approx(np.mean([e.reward for e in eps]))
        if isinstance(policy, OraclePolicy):
            assert m["em"] == 1.0 and m["invalid_actions"] == 0
    rand = summarize(run_episodes(RandomPolicy(seed=0, answer_prob=0.5), env, tasks, samples=3,
                                  max_new_tokens=400, temperature=1.0))
    assert "pass@3" in rand and rand["pass@3"] >= rand["em"]



def test_eval_reports_cut_actions_budget_and_context(small_world):
    """`summarize` says why episodes failed: actions cut by max_new_tokens, the tool budget run
    out, the context full. The oracle hits none of them; the same oracle with a 2-token budget has
    every action cut, so every turn is invalid until the forced-answer turn truncates it."""
    from treegym.agents.scripted import OraclePolicy
    from treegym.train.evaluate import run_episodes, summarize

    env = gym.make("TreeSearchQA-v0", data=small_world, split="test", reward="em")
    tasks = list(env.unwrapped.tasks)[:6]
    oracle = OraclePolicy(small_world, max_searches=3)
    ok = summarize(run_episodes(oracle, env, tasks, max_new_tokens=400))
    assert ok["em"] == ok["answered"] == 1.0
    assert ok["cut_actions"] == ok["out_of_budget"] == ok["context_exhausted"] == 0.0
    kinds = {k.split("/", 1)[1] for k in ok if k.startswith("em/")}
    assert kinds and all(ok[f"f1/{k}"] == ok[f"em/{k}"] == 1.0 for k in kinds)

    cut = summarize(run_episodes(oracle, env, tasks, max_new_tokens=2))
    assert cut["answered"] == cut["em"] == 0.0
    assert cut["out_of_budget"] == 1.0 and cut["context_exhausted"] == 0.0
    assert cut["cut_actions"] == cut["turns"] == cut["invalid_actions"] == 4.0  # 3 calls + forced turn


# -- TreeWebAgent-v0 through the same SFT, trainer and eval (issue 5's `--env`) -------------------

WEB = "TreeWebAgent-v0"


@pytest.fixture(scope="module")
def web_sft_model(small_world, sft_model, tmp_path_factory):
    """The QA SFT model grown into a web agent: web tags added, a short SFT on browsing paths."""
    from treegym.train.sft import run_sft

    out = tmp_path_factory.mktemp("websft") / "sft"
    meta = run_sft(small_world, out, model_dir=sft_model, lm_steps=5, act_steps=30, batch=8,
                   lr=1e-2, act_lr=1e-2, eval_every=0, eval_n=4, env_id=WEB, log=lambda *_: None)
    assert meta["env"] == WEB and meta["act_steps"] == 30
    return out


def test_add_tags_keeps_the_model_and_adds_single_tokens(sft_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treegym.agents.tiny import WEB_TAGS, add_tags

    out = add_tags(sft_model, tmp_path / "a", max_positions=2048)
    tok, old_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(sft_model)
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in WEB_TAGS)
    assert len(tok) == len(old_tok) + len(WEB_TAGS)
    new, old = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(sft_model)
    assert new.config.max_position_embeddings == 2048
    ids = torch.tensor([old_tok.encode("<search> a city </search>", add_special_tokens=False)])
    with torch.no_grad():  # the old vocabulary's logits are unchanged
        assert torch.allclose(new(ids).logits[..., :len(old_tok)], old(ids).logits, atol=1e-5)
    again = add_tags(out, tmp_path / "b")  # idempotent, and the same bytes for the same input
    assert len(AutoTokenizer.from_pretrained(again)) == len(tok)
    assert (add_tags(sft_model, tmp_path / "c", max_positions=2048) / "model.safetensors").read_bytes() == \
        (out / "model.safetensors").read_bytes()


def test_web_sft_trains_on_browsing_transcripts(web_sft_model, small_world):
    from treegym.agents.hf import HFPolicy
    from treegym.train.evaluate import make_env
    from treegym.train.sft import oracle_plan, oracle_transcripts

    pol = HFPolicy(web_sft_model)
    env = make_env(small_world, "train", WEB)
    plan = oracle_plan(env, small_world)
    tasks = list(env.unwrapped.tasks[:20])
    acts = [plan(t) for t in tasks]
    assert all(a[0].startswith("<search>") and a[-1].startswith("<answer>") for a in acts)
    assert sum(a[1].startswith("<click>") for a in acts) >= 0.9 * len(acts)  # the found result is clicked
    assert not any("<think>" in x for a in acts for x in a)  # bare tool calls, as in the QA SFT
    rows = oracle_transcripts(env, tasks, pol, plan)
    assert all(sum(m) > 0 and len(ids) == len(m) for ids, m in rows)
    meta = json.loads((web_sft_model / "sft_meta.json").read_text())
    vocab = json.loads((web_sft_model / "config.json").read_text())["vocab_size"]
    assert meta["act_final_loss"] < 0.6 * np.log(vocab)


def test_trainer_runs_on_the_web_env(web_sft_model, small_world, tmp_path):
    from treegym.train.trainer import Trainer

    cfg = _cfg(web_sft_model, tmp_path, algo="tree_grpo", env=WEB, reward=None, steps=2, eval_every=2)
    cfg.rollout.max_new_tokens = 24
    tr = Trainer(cfg, dataset=small_world)
    base = tr.env.unwrapped
    assert base.spec.id.endswith(WEB) if base.spec else True
    assert base.reward_name == "f1" and base.max_tool_calls == 5  # the web env's own defaults
    recs = tr.train()
    assert [r["step"] for r in recs] == [1, 2] and "dev/greedy/f1" in recs[-1]
    assert all(abs(r["rollout_logprob_diff"]) < 1e-3 for r in recs)


def test_web_eval_matches_env_rewards(small_world):
    """run_episodes on TreeWebAgent-v0 reads the env's F1 reward and the answer it executed."""
    from treegym.agents.scripted import ReplayPolicy
    from treegym.agents.tokenizer import ByteTokenizer
    from treegym.envs.rewards import f1_score
    from treegym.envs.web_agent import oracle_actions
    from treegym.train.evaluate import make_env, run_episodes

    env = make_env(small_world, "test", WEB)
    base = env.unwrapped
    tok = ByteTokenizer()
    for task in base.tasks[:10]:
        acts = oracle_actions(base.site, task)
        for answer, want in ((task.answers[0], 1.0), ("nobody knows " + task.answers[0], None)):
            acts = acts[:-1] + [f"<answer> {answer} </answer>"]
            policy = ReplayPolicy([tok.encode(a) for a in acts], tokenizer=tok)
            [ep] = run_episodes(policy, env, [task], max_new_tokens=10_000)
            assert ep.answer == answer and ep.reward == ep.f1 == f1_score(answer, task.answers)
            assert want is None or ep.f1 == want


def test_rl_prompts_come_from_the_configured_split(sft_model, small_world, tmp_path):
    from treegym.train.trainer import Trainer

    tr = Trainer(_cfg(sft_model, tmp_path, split="dev", eval_split="test", steps=0), dataset=small_world)
    assert {t.id for t in tr.tasks} == {t.id for t in small_world.tasks("dev")}
    assert tr.dev_env().unwrapped.split == "test"
    with pytest.raises(ValueError, match="holdout"):
        Trainer(_cfg(sft_model, tmp_path / "x", split="holdout"), dataset=small_world)


def test_rollouts_on_an_sglang_server_synced_every_step_match_local_rollouts(sft_model, small_world, tmp_path,
                                                                            one_torch_thread):
    """`TrainConfig.rollout_server`: the rollouts come from an SGLang server (the protocol
    stand-in, over real HTTP) that gets the trainer's weights before every step. The stand-in
    samples exactly like the local backend, so the run must equal a local-rollout run; a server
    left on the start weights would sample other tokens from step 2 on."""
    from safetensors.torch import load_file
    from sglang_standin import StandinServer

    from treegym.agents.hf import HFPolicy
    from treegym.train.trainer import Trainer

    local = Trainer(_cfg(sft_model, tmp_path / "local", algo="grpo", steps=3, tensorboard=False),
                    dataset=small_world, log=lambda *_: None)
    local_records = local.train()
    with StandinServer(HFPolicy(sft_model), deterministic=True) as srv:  # seeds honoured
        remote = Trainer(_cfg(sft_model, tmp_path / "remote", algo="grpo", steps=3, tensorboard=False,
                              rollout_server=srv.url), dataset=small_world, log=lambda *_: None)
        assert remote.rollout_policy is not remote.policy
        remote_records = remote.train()
        served = {k: v.clone() for k, v in srv.app.state.policy.model.state_dict().items()}
    assert [r["reward"] for r in remote_records] == [r["reward"] for r in local_records]
    assert [r["tokens_per_prompt"] for r in remote_records] == [r["tokens_per_prompt"] for r in local_records]
    for name, value in local.model.state_dict().items():
        torch.testing.assert_close(remote.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    # the server holds what the trainer wrote before the last step's rollout (after step 2)
    pushed = load_file(str(tmp_path / "remote" / "rollout_weights" / "model.safetensors"))
    start = load_file(str(sft_model / "model.safetensors"))
    changed = [k for k in pushed if k in served and not torch.equal(pushed[k], start[k])]
    assert changed, "the pushed weights are still the start weights"
    for k in changed:
        assert torch.equal(served[k], pushed[k])


# ----------------------------------------------------------------------------------------------
# Trainer.update: packing and each TrainConfig.update skip change no number; a minibatch without
# a sampled token is skipped and counted


def _ucfg(model, out, update: UpdateConfig, algo: str = "tree_grpo", epochs: int = 2
          ) -> TrainConfig:
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
def batches(sft_model, small_world, tmp_path_factory):
    """Real batches with signal: a tree_grpo step and a chain (grpo) step."""
    out = {}
    for algo in ("tree_grpo", "grpo"):
        tr = Trainer(_ucfg(sft_model, tmp_path_factory.mktemp(algo), UpdateConfig(), algo=algo),
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


def _update(sft_model, world, tmp, batch, update: UpdateConfig, *, fresh: bool):
    """One update from the start weights; `fresh=False` makes the policy differ from the
    reference first (as on every step after the first), by one update on the same batch."""
    tr = Trainer(_ucfg(sft_model, tmp, update), dataset=world)
    if not fresh:
        tr.update(batch)
    stats = tr.update(batch)
    return stats, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


@pytest.mark.parametrize("algo", ["tree_grpo", "grpo"])
@pytest.mark.parametrize("switch", ["packed", "old_from_update", "ref_while_unchanged", "all"])
def test_each_update_switch_changes_no_number(sft_model, small_world, batches, tmp_path, algo,
                                              switch):
    """Three prompts in minibatches of one, two epochs, KL on: with the switch on, the update's
    metrics and the weights after it equal the all-off update's within 1e-5 (fp32), on a fresh
    run (where the reference pass is skipped) and on a later step (where it is not)."""
    on = (UpdateConfig() if switch == "all" else dataclasses.replace(ALL_OFF, **{switch: True}))
    for fresh in (True, False):
        base, w_base = _update(sft_model, small_world, tmp_path / f"off{fresh}", batches[algo],
                               ALL_OFF, fresh=fresh)
        got, w_got = _update(sft_model, small_world, tmp_path / f"on{fresh}", batches[algo], on,
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


def test_a_minibatch_without_sampled_tokens_is_skipped_and_counted(sft_model, small_world,
                                                                    batches, tmp_path):
    batch = copy.deepcopy(batches["tree_grpo"])
    first = batch.uids[0]
    for i, u in enumerate(batch.uids):  # the first prompt's leaves: prompt and observations only
        if u == first:
            batch.loss_mask[i] = 0
            batch.advantages[i] = 0
    tr = Trainer(_ucfg(sft_model, tmp_path, UpdateConfig(), epochs=1), dataset=small_world)
    stats = tr.update(batch)
    assert stats["skipped_minibatches"] == 1.0
    assert all(np.isfinite(stats[k]) for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"))
    assert tr.scheduler.last_epoch == 2  # two optimizer steps for three minibatches
