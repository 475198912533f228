"""to_batch / pack / serialisation / view, on trees sampled from the real env."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest

import treegym
from treegym.cli import main as treegym_main
from treegym.tree import advantages as A
from treegym.tree import load_jsonl, rollout, save_jsonl, to_batch
from treegym.tree.serialize import forest_to_json
from test_tree_support import BytePolicy, build_forest


@pytest.fixture(scope="module")
def env():
    e = gym.make("TreeSearchQA-v0", data="synthetic:multihop", max_tool_calls=3)
    yield e
    e.close()


@pytest.fixture(scope="module")
def sampled(env):
    tasks = list(env.unwrapped.tasks[:2])
    step, b1 = rollout.tree_grpo(BytePolicy(), env, tasks, M=2, N=2, L=1, K=2, seed=1)
    token, b2 = rollout.tree_grpo(BytePolicy(), env, tasks, M=2, N=2, L=2, seed=2,
                                  granularity="token", want_entropies=True)
    return {"step": (step, b1), "token": (token, b2)}


@pytest.mark.parametrize("kind", ["step", "token"])
@pytest.mark.parametrize("estimator", ["tree_grpo", "treerl", "gigpo"])
def test_masks_cover_exactly_the_sampled_tokens(sampled, kind, estimator):
    forests, _ = sampled[kind]
    adv = A.compute(estimator, forests)
    batch = to_batch(forests, adv)
    leaves = [l for f in forests for l in f.leaves()]
    assert batch.input_ids.shape[0] == len(leaves) == len(batch.leaves)
    for i, leaf in enumerate(leaves):
        n = int(batch.attention_mask[i].sum())
        assert np.all(batch.attention_mask[i, :n] == 1) and np.all(batch.attention_mask[i, n:] == 0)
        ids = batch.input_ids[i, :n].tolist()
        assert ids == leaf.context_ids()
        sampled_ids = [t for s in leaf.steps() for t in s.full_action_ids]
        m = batch.loss_mask[i, :n].astype(bool)
        assert [t for t, keep in zip(ids, m) if keep] == sampled_ids
        # everything else is the prompt and the observations, in order
        rest = list(leaf.path()[0].parent.obs_ids) + [t for s in leaf.steps() for t in s.obs_ids]
        assert sorted(t for t, keep in zip(ids, m) if not keep) == sorted(rest)
        # old log-probs and advantages: one value per sampled token, 0 elsewhere
        owner_lps, owner_adv = [], []
        for owner, kind_, a, b in leaf.segments_after():
            if kind_ == "action":
                owner_lps += list(owner.logprobs[a:b])
                owner_adv += [adv[leaf][leaf.path().index(owner)]] * (b - a)
        assert np.allclose(batch.old_logprobs[i][m[: n].nonzero()[0]], owner_lps)
        assert np.allclose(batch.advantages[i, :n][m], owner_adv)
        assert np.all(batch.advantages[i][~batch.loss_mask[i].astype(bool)] == 0)
        assert np.all(batch.old_logprobs[i][~batch.loss_mask[i].astype(bool)] == 0)
        assert batch.rewards[i] == leaf.reward
    if kind == "token":
        assert batch.entropies is not None
        assert np.allclose(batch.entropies, -batch.old_logprobs * batch.loss_mask)


@pytest.mark.parametrize("kind", ["step", "token"])
def test_packed_form_stores_each_prefix_once(sampled, kind):
    forests, _ = sampled[kind]
    batch = to_batch(forests)
    packed = batch.pack()
    assert packed.num_tokens < batch.num_tokens
    assert packed.uids == [f.uid for f in forests]  # one packed row per prompt group
    real = batch.attention_mask.astype(bool)
    assert np.array_equal(packed.unpack(packed.input_ids)[real], batch.input_ids[real])
    assert np.array_equal(packed.unpack(packed.position_ids)[real], batch.position_ids[real])
    assert np.all(packed.gather_index[~real] == -1)
    s = packed.input_ids.shape[1]
    for r, uid in enumerate(batch.uids):  # a leaf lives in its prompt's packed row
        assert set((packed.gather_index[r][real[r]] // s).tolist()) == {packed.uids.index(uid)}
    mask = packed.attention_mask()
    for p in range(len(packed.uids)):
        n = int(packed.lengths[p])
        for i in range(0, n, 13):  # a token sees itself and exactly its ancestors
            anc, q = {i}, packed.parent[p, i]
            while q >= 0:
                anc.add(int(q))
                q = packed.parent[p, q]
            assert set(np.nonzero(mask[p, i])[0].tolist()) == anc
            assert packed.position_ids[p, i] == len(anc) - 1
        # distinct prefixes: no two packed tokens of a row share (parent, token)
        pairs = list(zip(packed.parent[p, :n].tolist(), packed.input_ids[p, :n].tolist()))
        assert len(pairs) == len(set(pairs))
        assert not mask[p, n:, :n].any()  # padding sees only itself


def test_to_batch_bad_input():
    f = build_forest("p", [[1.0, 0.0]])
    with pytest.raises(ValueError, match="no advantages"):
        to_batch([f], {})
    for leaf in f.leaves():
        leaf.kept = False
    with pytest.raises(ValueError, match="no kept leaves"):
        to_batch([f])
    g = build_forest("q", [[1.0, [0.0]]])
    b = to_batch(g, max_length=4)
    assert b.input_ids.shape == (2, 4)


def test_jsonl_round_trip_is_lossless(sampled, env, tmp_path):
    for kind in ("step", "token"):
        forests, budget = sampled[kind]
        A.assign(A.tree_grpo(forests))
        path = save_jsonl(tmp_path / f"{kind}.jsonl", forests, budget)
        loaded, b2 = load_jsonl(path)
        assert b2 == budget
        assert [forest_to_json(f) for f in loaded] == [forest_to_json(f) for f in forests]
        assert loaded[0].task == forests[0].task
        b_orig, b_load = to_batch(forests, A.gigpo(forests)), to_batch(loaded, A.gigpo(loaded))
        for name in ("input_ids", "loss_mask", "advantages", "old_logprobs", "attention_mask"):
            assert np.array_equal(getattr(b_orig, name), getattr(b_load, name))


def test_snapshots_round_trip_and_resume(sampled, env, tmp_path):
    forests, _ = sampled["step"]
    path = save_jsonl(tmp_path / "snap.jsonl", forests[:1], include_snapshots=True)
    loaded, _ = load_jsonl(path)
    node = next(n for n in loaded[0].nodes() if not n.is_leaf and not n.is_root)
    branch = treegym.fork(env)
    treegym.restore(branch, node.snapshot)
    root = node.path()[0].parent
    assert branch.unwrapped.state.transcript == root.obs_text + "".join(
        s.action_text + s.obs_text for s in node.steps())
    assert branch.unwrapped.state.turn == node.depth
    branch.step("<answer> x </answer>")  # the restored episode continues


def test_load_jsonl_reports_bad_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"type": "header"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_jsonl(p)
    p.write_text('{"type": "nope"}\n')
    with pytest.raises(ValueError, match="unknown record type"):
        load_jsonl(p)


def test_view_writes_a_self_contained_page(sampled, tmp_path):
    forests, budget = sampled["step"]
    src = save_jsonl(tmp_path / "trees.jsonl", forests, budget)
    out = tmp_path / "tree.html"
    assert treegym_main(["view", str(src), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<details") >= len(forests[0].nodes())
    assert "reward" in page and "adv " in page and "llm_calls" in page
    assert forests[0].task.question in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)  # no network
    assert "<script" not in page
    assert treegym_main(["view", str(tmp_path / "missing.jsonl")]) == 2
