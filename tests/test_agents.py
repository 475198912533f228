"""Agents without a model: byte tokenizer, sampling, scripted policies and the episode runner."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import treegym  # noqa: F401  (registers the envs)
from treegym.agents import (ByteTokenizer, GenRequest, OraclePolicy, RandomPolicy, ReplayPolicy,
                            run_episode)
from treegym.agents.sampling import make_generator, sample_next
from treegym.envs.protocol import parse_action


@pytest.fixture(scope="module")
def env():
    e = gym.make("TreeSearchQA-v0", data="synthetic", split="train", max_tool_calls=3)
    yield e
    e.close()


@pytest.fixture(scope="module")
def oracle(env):
    core = env.unwrapped
    return OraclePolicy(core.dataset, max_searches=core.max_tool_calls)


# -- byte tokenizer ------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_byte_tokenizer_round_trips_and_concatenates(a, b):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(a)) == a
    assert tok.encode(a + b) == tok.encode(a) + tok.encode(b)


def test_byte_tokenizer_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="outside"):
        ByteTokenizer().decode([65, 999])


# -- request validation --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, word", [({"max_new_tokens": 0}, "max_new_tokens"),
                                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                          ({"temperature": -0.1}, "temperature")])
def test_bad_sampling_parameters_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GenRequest((1, 2, 3), **kwargs)


# -- sampling ------------------------------------------------------------------------------------

def test_sampling_is_seeded_and_independent_of_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    a = sample_next(logits, [1.0] * 4, [0.9] * 4, [make_generator(s) for s in range(4)])[0]
    b = sample_next(logits, [1.0] * 4, [0.9] * 4, [make_generator(s) for s in range(4)])[0]
    alone = sample_next(logits[2:3], [1.0], [0.9], [make_generator(2)])[0]
    assert a.tolist() == b.tolist()
    assert alone.item() == a[2].item()


def test_sampling_logprob_is_temperature_scaled_and_top_p_cuts_the_tail():
    torch.manual_seed(1)
    logits = torch.randn(1, 30)
    ref = torch.log_softmax(logits / 0.7, -1)[0]
    probs = ref.exp()
    top = set(torch.argsort(probs, descending=True)[:1].tolist())
    for s in range(20):
        tok, lp, ent = sample_next(logits, [0.7], [1e-6], [make_generator(s)], want_entropy=True)
        assert tok.item() in top  # top_p ~ 0 keeps only the most likely token
        assert lp.item() == pytest.approx(ref[tok.item()].item(), abs=1e-6)
        assert ent.item() == pytest.approx(-(probs * ref).sum().item(), abs=1e-5)
    tok, lp, _ = sample_next(logits, [0.0], [1.0], [make_generator(0)])
    assert tok.item() == logits.argmax().item()
    assert lp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, tok].item(), abs=1e-6)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = make_generator(0)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample_next(logits, [1.0], [1.0], [gen])[0].item()] += 1
    assert counts[0] / 3000 == pytest.approx(0.5, abs=0.04)
    assert counts[2] / 3000 == pytest.approx(0.2, abs=0.04)
    # top_p = 0.75 keeps {0, 1} (0.5 + 0.3 reaches it) and renormalises to 0.625 / 0.375
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample_next(logits, [1.0], [0.75], [gen])[0].item()] += 1
    assert counts[2] == 0
    assert counts[0] / 3000 == pytest.approx(0.625, abs=0.04)


# -- scripted policies ---------------------------------------------------------------------------

def test_oracle_episode_gets_reward_one_on_every_task_kind(env, oracle):
    core = env.unwrapped
    tok = ByteTokenizer()
    seen = {}
    for task in core.tasks:
        if seen.get(task.kind, 0) >= 3:
            continue
        seen[task.kind] = seen.get(task.kind, 0) + 1
        ep = run_episode(oracle, env, task_id=task.id)
        assert ep.reward == 1.0, (task.kind, ep.transcript[-300:])
        assert ep.terminated and not ep.truncated
        # token ids are the truth: they decode to the transcript, which is the env's own
        assert tok.decode(ep.token_ids) == ep.transcript == core.state.transcript
        assert len(ep.turns) == len(task.supporting_ids) + 1
        assert ep.finish_reasons == ["stop"] * len(ep.turns)
    assert len(seen) >= 3


def test_mask_covers_exactly_the_sampled_tokens(env, oracle):
    ep = run_episode(oracle, env, seed=5)
    n = len(ep.token_ids)
    assert len(ep.action_mask) == len(ep.logprobs) == n
    assert ep.action_mask[:ep.prompt_len] == [0] * ep.prompt_len
    pos = ep.prompt_len
    for turn in ep.turns:
        k, m = len(turn.action_ids), len(turn.observation_ids)
        assert ep.token_ids[pos:pos + k] == turn.action_ids
        assert ep.action_mask[pos:pos + k] == [1] * k
        assert ep.action_mask[pos + k:pos + k + m] == [0] * m
        assert ep.token_ids[pos + k:pos + k + m] == turn.observation_ids
        pos += k + m
    assert pos == n
    assert ep.num_sampled_tokens == sum(len(t.action_ids) for t in ep.turns)
    assert all(lp == 0.0 for lp, m in zip(ep.logprobs, ep.action_mask) if m == 0)


def test_oracle_answers_when_the_search_budget_is_spent():
    env = gym.make("TreeSearchQA-v0", data="synthetic", split="train", max_tool_calls=1)
    core = env.unwrapped
    task = next(t for t in core.tasks if len(t.supporting_ids) >= 2)
    ep = run_episode(OraclePolicy(core.dataset), env, task_id=task.id)
    assert [parse_action(t.action_text).tool for t in ep.turns] == ["search", "answer"]
    assert ep.terminated


def test_oracle_finishes_a_fork_of_another_policys_episode(env, oracle):
    """Stateless: from a state reached by a random search (or an invalid action), it still
    searches every hop and answers correctly."""
    core = env.unwrapped
    task = next(t for t in core.tasks if len(t.supporting_ids) == 2)
    ep = run_episode(ReplayPolicy([ByteTokenizer().encode("<search> nothing useful </search>"),
                                   ByteTokenizer().encode("not an action")]), env,
                     task_id=task.id, max_new_tokens=100, max_turns=2)
    assert len(ep.turns) == 2 and not ep.terminated
    ids = list(ep.token_ids)
    for _ in range(3):
        res = oracle.generate([GenRequest(tuple(ids), stop=("</search>", "</answer>"))])[0]
        obs, reward, terminated, truncated, _ = env.step(res.text)
        ids += res.token_ids + oracle.encode(obs)
        if terminated or truncated:
            break
    assert reward == 1.0  # hops searched in turns 3 and 4 would exceed max_tool_calls=3 ...
    # ... so the oracle answered when the env said so, and still got it right


def test_random_policy_is_well_formed_and_deterministic(env):
    a = run_episode(RandomPolicy(seed=3), env, seed=11)
    b = run_episode(RandomPolicy(seed=3), env, seed=11)
    assert a.token_ids == b.token_ids
    for turn in a.turns:
        assert parse_action(turn.action_text).valid
    c = run_episode(RandomPolicy(seed=4), env, seed=11)
    assert c.prompt_ids == a.prompt_ids
    assert len(a.turns) >= 1


def test_scripted_policies_take_the_same_arguments(env):
    """Same first argument (the tasks), same keyword names in the same order."""
    import inspect

    oracle = list(inspect.signature(OraclePolicy).parameters)
    rand = list(inspect.signature(RandomPolicy).parameters)
    shared = ["source", "tokenizer", "max_searches", "think"]
    assert oracle[:4] == shared and rand[:4] == shared
    dataset = env.unwrapped.dataset
    for cls in (OraclePolicy, RandomPolicy):  # built alike, both run and honour the options
        policy = cls(dataset, tokenizer=ByteTokenizer(), max_searches=1, think=True)
        ep = run_episode(policy, env, seed=5)
        actions = [t.action_text for t in ep.turns]
        assert all(a.startswith("<think>") for a in actions)
        assert sum("<search>" in a for a in actions) <= 1
        assert "<answer>" in actions[-1]


def test_random_policy_source_and_old_positional_seed(env):
    dataset = env.unwrapped.dataset
    titles = {d.title for d in dataset.world.docs}
    assert set(RandomPolicy(dataset).vocabulary) == titles  # every doc's title, task-blind
    with pytest.warns(DeprecationWarning, match="seed="):
        old = RandomPolicy(3)
    assert old.seed == 3 and old.vocabulary == []
    assert run_episode(old, env, seed=11).token_ids == run_episode(
        RandomPolicy(seed=3), env, seed=11).token_ids


def test_replay_reproduces_an_episode(env, oracle):
    ep = run_episode(oracle, env, seed=21)
    again = run_episode(ReplayPolicy.from_episode(ep), env, seed=21)
    assert again.token_ids == ep.token_ids
    assert again.action_mask == ep.action_mask
    assert again.reward == ep.reward


def test_replay_runs_out_loudly():
    pol = ReplayPolicy([[65, 66]])
    pol.generate([GenRequest((1,))])
    with pytest.raises(RuntimeError, match="already replayed"):
        pol.generate([GenRequest((1,))])


def test_scripted_generation_respects_stop_strings_and_length(oracle, env):
    obs, _ = env.reset(seed=2)
    prompt = tuple(oracle.encode_prompt(obs))
    res = oracle.generate([GenRequest(prompt, stop=("</search>",))])[0]
    assert res.text.endswith("</search>") and res.finish_reason == "stop"
    assert res.logprobs == [0.0] * len(res.token_ids)
    cut = oracle.generate([GenRequest(prompt, max_new_tokens=4)])[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4
    assert cut.token_ids == res.token_ids[:4]
    early = oracle.generate([GenRequest(prompt, stop=("<search>",))])[0]
    assert early.text == "<search>"


def test_oracle_rejects_unknown_questions(oracle):
    with pytest.raises(ValueError, match="questions"):
        oracle.generate([GenRequest(tuple(ByteTokenizer().encode("Question: who am I?\n")))])


def test_run_episode_rejects_bad_arguments(env, oracle):
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_episode(oracle, env, max_new_tokens=0)


def test_policy_generate_rejects_non_requests(oracle):
    with pytest.raises(TypeError, match="GenRequest"):
        oracle.generate([(1, 2, 3)])


class _BrokenPolicy(ReplayPolicy):
    """A policy that breaks the contract: one log-prob short."""

    def generate(self, requests):
        res = super().generate(requests)
        for r in res:
            r.logprobs = r.logprobs[:-1]
        return res


def test_malformed_policy_results_are_caught(env):
    pol = _BrokenPolicy([ByteTokenizer().encode("<answer> x </answer>")])
    with pytest.raises(ValueError, match="log-probs"):
        run_episode(pol, env, seed=0)


def test_malformed_sglang_outputs_raise_clear_errors():
    from treegym.agents.sglang import SGLangError, parse_output

    req = GenRequest((1, 2))
    tok = ByteTokenizer()
    good = {"text": "AB", "meta_info": {"finish_reason": {"type": "stop", "matched": "B"},
                                        "output_token_logprobs": [[-0.5, 65, None], [-0.25, 66, None]],
                                        "cached_tokens": 1, "prompt_tokens": 2}}
    res = parse_output(good, req, tok, "http://x/generate")
    assert res.token_ids == [65, 66] and res.text == "AB" and res.finish_reason == "stop"
    assert res.logprobs == [-0.5, -0.25] and res.meta["cached_tokens"] == 1
    eos = {"meta_info": {"finish_reason": {"type": "stop", "matched": 256},
                         "output_token_logprobs": [[-0.1, 256, None]]}}
    assert parse_output(eos, req, tok, "u").finish_reason == "eos"
    for bad in ({}, {"meta_info": {}}, {"meta_info": {"output_token_logprobs": [[-1.0]]}},
                {"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [[-1.0, 1, None]]}},
                ["not", "a", "dict"]):
        with pytest.raises(SGLangError, match="http://x/generate"):
            parse_output(bad, req, tok, "http://x/generate")
    with pytest.raises(SGLangError, match="aborted"):
        parse_output({"meta_info": {"finish_reason": {"type": "abort", "message": "oom"},
                                    "output_token_logprobs": []}}, req, tok, "u")
