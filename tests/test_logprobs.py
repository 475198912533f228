"""The one log-prob function: packed tree batches give the duplicated layout's log-probs, loss and
gradients (property tests over random trees, plus chain groups, step and token trees and web
episodes sampled from the real envs), hand values, bad input, and that it stays the only one."""

from __future__ import annotations

import math
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import treegym
import treegym.train.logprobs as L
from treegym.train import distributed as D
from treegym.train.logprobs import (ForwardBatch, check_context, check_model_takes_tree_mask,
                                    masked_logprobs)
from treegym.tree import advantages as A
from treegym.tree import rollout, to_batch
from treegym.tree.batch import Batch
from test_tree_support import BytePolicy

VOCAB = 256  # byte ids (BytePolicy) fit
LOSS_KW = dict(clip=0.2, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, grad_clip=None)


def tiny_model(max_positions: int = 4096, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model()


def _with_signal(batch: Batch, seed: int = 0) -> Batch:
    """Old and reference log-probs off the model's (so ratios clip and the KL is non-zero) and
    per-row advantages on the loss tokens, like a real step."""
    rng = np.random.default_rng(seed)
    m = batch.loss_mask.astype(bool)
    batch.old_logprobs = np.where(m, -2.0 + 0.5 * rng.normal(size=m.shape), 0).astype(np.float32)
    batch.advantages = np.where(m, rng.normal(size=(m.shape[0], 1)), 0).astype(np.float32)
    batch.ref_logprobs = np.where(m, -2.0 + 0.3 * rng.normal(size=m.shape), 0).astype(np.float32)
    return batch


def _step(model, sb: D.StepBatch, micro: int | None = None):
    """One `policy_update_step` with a zero learning rate: its loss, metrics and gradients."""
    model.zero_grad(set_to_none=True)
    stats = D.policy_update_step(model, torch.optim.SGD(model.parameters(), lr=0.0), sb,
                                 micro_batch_rows=micro, compute_entropy=True, **LOSS_KW)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return stats, grads


def assert_packed_equals_duplicated(model, batch: Batch, micro: int | None = None) -> dict:
    """Log-probs and entropies at every token, then loss, metrics and every gradient of one
    update step: packed == duplicated within 1e-5 (fp32)."""
    dup, packed = D.StepBatch.from_any(batch), D.StepBatch.from_any(batch, packed=True)
    assert packed.fwd.num_tokens <= dup.fwd.num_tokens
    every = torch.as_tensor(batch.attention_mask).clone()
    every[:, 0] = 0
    with torch.no_grad():
        lp_d, ent_d = masked_logprobs(model, dup.fwd, every, want_entropy=True)
        lp_p, ent_p = masked_logprobs(model, packed.fwd, every, want_entropy=True)
    torch.testing.assert_close(lp_p, lp_d, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_p, ent_d, rtol=0, atol=1e-5)
    assert not lp_p[~every.bool()].any()
    s_d, g_d = _step(model, dup)
    s_p, g_p = _step(model, packed, micro)
    for k in ("loss", "pg_loss", "kl", "entropy", "clipfrac", "approx_kl", "grad_norm", "tokens"):
        assert s_p[k] == pytest.approx(s_d[k], rel=1e-5, abs=1e-5), k
    assert set(g_p) == set(g_d) and g_d
    for n, g in g_d.items():
        torch.testing.assert_close(g_p[n], g, rtol=1e-5, atol=1e-5, msg=n)
    return {"dup": dup.fwd.num_tokens, "packed": packed.fwd.num_tokens, "grad_norm": s_d["grad_norm"]}


# ----------------------------------------------------------------------------------------------
# random trees (hypothesis)


@st.composite
def random_batches(draw) -> Batch:
    """1-3 prompt groups; each a prompt and leaves that fork off an earlier leaf (or the prompt)
    at a random depth and continue with random tokens from a small alphabet, so identical
    continuations merge by accident too; random loss masks (action vs observation tokens)."""
    rows, uids = [], []
    for g in range(draw(st.integers(1, 3))):
        prompt = draw(st.lists(st.integers(2, 12), min_size=1, max_size=6))
        group = [prompt + draw(st.lists(st.integers(2, 12), min_size=1, max_size=6))]
        for _ in range(draw(st.integers(0, 4))):
            base = group[draw(st.integers(0, len(group) - 1))]
            cut = draw(st.integers(len(prompt), len(base)))
            group.append(base[:cut] + draw(st.lists(st.integers(2, 12), min_size=1, max_size=6)))
        rows += group
        uids += [f"p{g}"] * len(group)
    width = max(len(r) for r in rows)
    n = len(rows)
    ids = np.zeros((n, width), dtype=np.int64)
    attn = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = r, 1
    bits = np.array(draw(st.lists(st.booleans(), min_size=n * width, max_size=n * width)))
    loss = (bits.reshape(n, width) & attn.astype(bool)).astype(np.int64)
    loss[:, 0] = 0
    if not loss.any():
        loss[0, len(rows[0]) - 1] = 1
    z = np.zeros((n, width), dtype=np.float32)
    batch = Batch(input_ids=ids, attention_mask=attn, loss_mask=loss, advantages=z,
                  old_logprobs=z.copy(), position_ids=np.where(attn > 0, np.arange(width), 0),
                  rewards=np.zeros(n, dtype=np.float32), uids=uids)
    return _with_signal(batch, seed=n * width)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=random_batches(), micro=st.sampled_from([None, 1, 2]),
       block=st.sampled_from([4, 16, 128]))
def test_packed_equals_duplicated_on_random_trees(model, batch, micro, block):
    """`block`: the tree attention's query block; small blocks put several blocks (with different
    key sets, groups and a clamped tail) in every row."""
    default, L.BLOCK = L.BLOCK, block
    try:
        assert_packed_equals_duplicated(model, batch, micro)
    finally:
        L.BLOCK = default


# ----------------------------------------------------------------------------------------------
# trees sampled from the real envs


@pytest.fixture(scope="module")
def qa_env():
    env = gym.make("TreeSearchQA-v0", data="synthetic:multihop", max_tool_calls=2)
    yield env
    env.close()


def _drop_prompt(forests, keep: int = 60):
    """The env's instruction is ~1,000 bytes; a shorter root observation keeps the forward fast
    without changing the tree's shape (every leaf still shares it)."""
    for f in forests:
        for t in f.trees:
            t.root.obs_ids = tuple(t.root.obs_ids[-keep:])
    return forests


@pytest.mark.parametrize("kind", ["chain", "step", "token"])
def test_packed_equals_duplicated_on_sampled_qa_trees(model, qa_env, kind):
    tasks = list(qa_env.unwrapped.tasks[:2])
    if kind == "chain":
        forests, _ = rollout.chain(BytePolicy(), qa_env, tasks, G=4, seed=3)
    else:
        forests, _ = rollout.tree_grpo(BytePolicy(), qa_env, tasks, M=2, N=2, L=1, seed=3,
                                       granularity=kind)
    forests = _drop_prompt(forests)
    batch = _with_signal(to_batch(forests, A.tree_grpo(forests) if kind != "chain"
                                  else A.grpo(forests)))
    sizes = assert_packed_equals_duplicated(model, batch, micro=1)
    assert sizes["packed"] < sizes["dup"]


def test_packed_equals_duplicated_on_web_episodes(model):
    env = gym.make("TreeWebAgent-v0", max_tool_calls=2)
    try:
        policy = BytePolicy(actions=("<search>Vougrei Raifes</search>", "<answer>x</answer>",
                                     "<click>1</click>"))
        forests, _ = rollout.tree_grpo(policy, env, list(env.unwrapped.tasks[:2]), M=2, N=2, L=1,
                                       seed=4)
    finally:
        env.close()
    forests = _drop_prompt(forests)
    batch = _with_signal(to_batch(forests, A.tree_grpo(forests)))
    sizes = assert_packed_equals_duplicated(model, batch)
    assert sizes["packed"] < sizes["dup"]


# ----------------------------------------------------------------------------------------------
# hand values, bad input, one definition


def test_hand_values_with_a_uniform_model():
    """All weights 0: every next-token distribution is uniform, log p = -ln V, entropy ln V."""
    m = tiny_model()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    ids = torch.tensor([[5, 6, 7, 0], [5, 9, 0, 0]])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]])  # position 0 and padding: no prediction
    lp, ent = masked_logprobs(m, ForwardBatch.padded(ids, att), mask, want_entropy=True)
    want = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(lp, -math.log(VOCAB) * want)
    torch.testing.assert_close(ent, math.log(VOCAB) * want)


def test_a_packed_sequence_past_the_context_is_refused_by_name(model):
    rows = [[3] * 30 + [4] * 10, [3] * 30 + [5] * 10]  # depth 40 per leaf, 50 packed tokens
    ids = np.array(rows)
    z = np.zeros(ids.shape, dtype=np.float32)
    batch = Batch(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids),
                  advantages=z, old_logprobs=z, position_ids=np.tile(np.arange(40), (2, 1)),
                  rewards=np.zeros(2, dtype=np.float32), uids=["task-7/p3", "task-7/p3"])
    packed = D.StepBatch.from_any(batch, packed=True).fwd
    check_context(tiny_model(max_positions=40), packed)  # fits: positions are depths
    with pytest.raises(ValueError, match=r"prompt task-7/p3.*50 tokens.*length 40.*"
                                         r"max_position_embeddings=32"):
        check_context(tiny_model(max_positions=32), packed)


def test_an_attention_without_tree_masks_is_refused_by_name():
    m = tiny_model()
    check_model_takes_tree_mask(m)  # sdpa
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2'.*update.packed"):
        check_model_takes_tree_mask(m)


def test_eager_attention_gives_the_same_packed_logprobs(model, qa_env):
    forests, _ = rollout.tree_grpo(BytePolicy(), qa_env, list(qa_env.unwrapped.tasks[:1]), M=1,
                                   N=2, L=1, seed=5)
    batch = to_batch(_drop_prompt(forests))
    eager = tiny_model()
    eager.config._attn_implementation = "eager"
    fwd = D.StepBatch.from_any(batch, packed=True).fwd
    every = torch.as_tensor(batch.attention_mask)
    with torch.no_grad():
        a, _ = masked_logprobs(model, fwd, every)
        b, _ = masked_logprobs(eager, fwd, every)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


PACKAGE = Path(treegym.__file__).resolve().parent


def test_one_definition_of_masked_logprobs():
    """Taking the log-softmax of a model's logits (or its cross-entropy) happens in
    train/logprobs.py only; agents/sampling.py is the sampler, which draws from the
    temperature-scaled distribution it returns the log-prob of."""
    pattern = re.compile(r"log_softmax|cross_entropy|logsumexp|\.logits\b")
    hits = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if not {"tests", ".venv", "build"} & set(p.relative_to(PACKAGE).parts)
                  and pattern.search(p.read_text()))
    assert hits == ["agents/hf.py", "agents/sampling.py", "train/logprobs.py"], hits
    # agents/hf.py only hands the last position's logits to the sampler
    assert not re.search(r"log_softmax|cross_entropy|logsumexp", (PACKAGE / "agents/hf.py").read_text())
    gone = re.compile(r"def (sequence_logprobs|loss_token_logprobs|packed_token_logprobs|"
                      r"token_logprobs|entropy_from_logits|masked_logprobs)\(")
    defs = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if not {"tests", ".venv", "build"} & set(p.relative_to(PACKAGE).parts)
                  for _ in gone.finditer(p.read_text()))
    assert defs == ["train/logprobs.py"], defs
