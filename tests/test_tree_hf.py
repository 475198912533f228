"""Tree rollouts with the tiny transformers model through HFPolicy: log-probs line up end to end."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from treegym.tree import advantages as A
from treegym.tree import rollout, to_batch
from treegym.train.logprobs import ForwardBatch, masked_logprobs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from treegym.agents.hf import HFPolicy
    from treegym.agents.tiny import build_tiny_model

    env = gym.make("TreeSearchQA-v0", data="synthetic:multihop", max_tool_calls=2)
    corpus = env.unwrapped.dataset.corpus_path
    model_dir = build_tiny_model(corpus, tmp_path_factory.mktemp("tiny"), vocab_size=600,
                                 n_layer=1, d_model=32, n_head=2)
    policy = HFPolicy(model_dir)
    tasks = list(env.unwrapped.tasks[:2])
    forests, budget = rollout.tree_grpo(policy, env, tasks, M=2, N=2, L=1, seed=0,
                                        max_new_tokens=12, granularity="token")
    yield policy, forests, budget
    env.close()


@pytest.mark.slow  # ~35 s on 2 busy cores: builds the tokenizer + model, imports transformers
def test_behaviour_logprobs_match_a_recomputation_and_the_packed_form(setup):
    """old_logprobs from generation == the model's log-probs of the batch rows == the packed
    forward's log-probs: the token ids that were sampled are exactly the ids trained on."""
    policy, forests, budget = setup
    assert budget.leaves == 2 * 2 * 3 and budget.generated_tokens > 0
    batch = to_batch(forests, A.tree_grpo(forests))
    packed = batch.pack()
    assert packed.num_tokens < batch.num_tokens
    every = torch.as_tensor(batch.attention_mask).clone()
    every[:, 0] = 0
    with torch.no_grad():
        dup = masked_logprobs(policy.model, ForwardBatch.padded(batch.input_ids,
                                                                batch.attention_mask), every)[0]
        from_packed = masked_logprobs(policy.model, ForwardBatch.from_packed(packed), every)[0]
    dup, from_packed = dup.numpy(), from_packed.numpy()
    m = batch.loss_mask.astype(bool)
    assert np.allclose(dup[m], batch.old_logprobs[m], atol=2e-3)
    real = batch.attention_mask.astype(bool)
    real[:, 0] = False
    assert np.allclose(dup[real], from_packed[real], atol=1e-4)
