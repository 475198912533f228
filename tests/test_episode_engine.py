"""The one episode engine (`agents.episode.Engine`): every caller gets the same episodes, limits end
episodes cleanly, and the package keeps one engine, one `Episode` type and one seed derivation."""

from __future__ import annotations

import ast
from pathlib import Path

import gymnasium as gym
import pytest

import treegym
from treegym.agents import Episode, GenRequest, OraclePolicy, RandomPolicy, ReplayPolicy, run_episode
from treegym.agents.episode import Engine, PolicyOutputError, derive_seed, play, start_episode
from treegym.agents.tokenizer import ByteTokenizer
from treegym.envs.data.synthetic import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return synthetic_dataset(seed=3, n_people=40, n_cities=8, n_countries=3, n_orgs=6, n_works=10,
                             n_questions=60)


@pytest.fixture()
def env(world):
    return gym.make("TreeSearchQA-v0", data=world, split="test", reward="em")


def test_eval_sft_and_run_episode_record_the_same_episode(env, world):
    """Evaluation, SFT data and `run_episode` are one engine: the oracle's episode of a task has
    the same ids, mask, transcript, answer and reward whichever of them ran it."""
    from treegym.train.evaluate import run_episodes
    from treegym.train.sft import oracle_transcripts

    oracle = OraclePolicy(world, max_searches=3)
    tasks = list(env.unwrapped.tasks[:6])
    evals = run_episodes(oracle, env, tasks, max_new_tokens=400, temperature=1.0)
    plan = {}
    for task, ev in zip(tasks, evals):
        one = run_episode(oracle, treegym.fork(env), task_id=task.id, max_new_tokens=400)
        assert isinstance(ev, Episode) and type(ev) is type(one)
        assert (ev.token_ids, ev.action_mask, ev.transcript) == (one.token_ids, one.action_mask, one.transcript)
        assert ev.answer == one.answer and ev.reward == one.reward == ev.em == 1.0
        assert oracle.decode(ev.token_ids) == ev.transcript
        plan[task.id] = list(ev.actions)
    rows = oracle_transcripts(env, tasks, oracle, lambda t: plan[t.id])
    assert rows == [(ev.token_ids, ev.action_mask) for ev in evals]


def test_an_episode_does_not_depend_on_its_batch(env):
    """Seeds come from (seed, task index, sample, turn), not from the batch: sampling one task
    alone or among others gives the same tokens."""
    from treegym.train.evaluate import run_episodes

    pol = RandomPolicy(0, answer_prob=0.3)
    tasks = list(env.unwrapped.tasks[:4])
    together = run_episodes(pol, env, tasks, samples=2, temperature=1.0, seed=5)
    engine = Engine(pol, max_new_tokens=32, max_turns=5)
    alone = play(engine, [start_episode(pol, treegym.fork(env), options={"task_id": tasks[2].id},
                                        sample_seed=(5, 2, 1), task=tasks[2])])[0]
    assert together[2 * 2 + 1].token_ids == alone.token_ids
    assert [(e.task_id, e.sample) for e in together] == [(t.id, s) for t in tasks for s in (0, 1)]


def test_turn_limit_and_context_limit_end_an_episode_truncated(env):
    tok = ByteTokenizer()
    ep = run_episode(ReplayPolicy([tok.encode("not an action")] * 3), env, seed=0, max_turns=2)
    assert len(ep.turns) == 2 and ep.truncated and not ep.terminated
    assert ep.turns[-1].info.get("turn_limit") is True
    assert ep.invalid_actions == 2 and ep.answer is None and ep.em == 0.0

    class Short(ReplayPolicy):
        context_length = 0  # set below: room for the prompt and one short action only

    pol = Short([tok.encode("<search> a </search>"), tok.encode("<answer> x </answer>")])
    obs, _ = treegym.fork(env).reset(seed=1)
    Short.context_length = len(pol.encode_prompt(obs)) + 30
    ep = run_episode(pol, env, seed=1, max_new_tokens=25)
    assert ep.truncated and ep.turns[-1].info.get("context_exhausted") is True
    assert len(ep.turns) == 1 and len(ep.token_ids) == len(ep.action_mask) == len(ep.logprobs)


def test_engine_names_the_request_a_policy_broke(env):
    class Short(ReplayPolicy):
        def generate(self, requests):
            res = super().generate(requests)
            res[0].logprobs = res[0].logprobs[:-1]
            return res

    pol = Short([ByteTokenizer().encode("<answer> x </answer>")])
    with pytest.raises(PolicyOutputError, match=r"request 0 \(episode 0.*log-probs"):
        run_episode(pol, env, seed=0)


def test_derive_seed_is_stable_and_spread():
    # fixed values: changing them silently changes every sampled rollout and benchmark number
    assert derive_seed(0, 0, "reset") == derive_seed(0, 0, "reset")
    assert derive_seed(1, 2, 3) != derive_seed(1, 2, 4) != derive_seed(2, 1, 3)
    assert all(0 <= derive_seed(i, "x") < 2**31 - 1 for i in range(100))
    assert GenRequest((1,), seed=derive_seed(7, 0, 0)).seed == derive_seed(7, 0, 0)


def _defs(pred) -> list[str]:
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "build", "benchmarks", "examples"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if pred(node, path):
                found.append(f"{rel}:{node.lineno}")
    return found


def test_one_episode_type_one_engine_one_seed_derivation():
    """The deleted copies stay deleted: one `Episode` class, one place that calls a policy's
    `generate` in a loop, one function that hashes parts into a seed."""
    episodes = _defs(lambda n, p: isinstance(n, ast.ClassDef) and n.name == "Episode")
    assert episodes == ["agents/episode.py:" + episodes[0].split(":")[1]] and len(episodes) == 1

    def calls_generate(n, p):
        return (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr == "generate" and isinstance(n.func.value, ast.Attribute)
                and n.func.value.attr == "policy")
    assert [s.split(":")[0] for s in _defs(calls_generate)] == ["agents/episode.py"]

    def hashes_a_seed(n, p):
        if not isinstance(n, ast.FunctionDef) or "seed" not in n.name and "derive" not in n.name:
            return False
        return n.name in ("derive_seed", "_derive", "_seed") or any(isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name)
                   and x.value.id == "hashlib" for x in ast.walk(n))
    assert [s.split(":")[0] for s in _defs(hashes_a_seed)] == ["agents/episode.py"]
