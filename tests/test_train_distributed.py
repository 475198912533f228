"""The distributed policy update equals the single-process one (2 processes, gloo, CPU).

Why this test: data-parallel RL silently goes wrong when each rank averages over its own tokens
(ranks with short rollouts get overweighted) or when the gradient reduction's averaging is not
undone. Here two real torchrun workers each take their rows of one fixed batch (uneven token
counts, uneven micro-batch counts), run one update with FSDP2 and then with DDP, and loss, every
gradient, the grad norm and the updated weights must match the single-process step on the whole
batch at fp32 tolerances. The rank-0 checkpoint written from the sharded model must hold the same
weights and load back into a sharded model.

This file is also the torchrun worker script (`python -m torch.distributed.run ... this_file OUT`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from netutil import free_port
from treegym.train import distributed as D
from treegym.train.loss import AGG_MODES, total_loss
from treegym.train.logprobs import ForwardBatch, masked_logprobs

ROWS, WIDTH, VOCAB = 7, 20, 96
MICRO = 3  # rank 0 gets 4 rows (2 micro-batches), rank 1 gets 3 (1 + a dummy): exercises both
LOSS_KW = dict(clip=0.2, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01, grad_clip=1.0)


def logprobs_of_every_token(model, ids, attn, want_entropy=False):
    """Log-probs (and entropies) at every real position but the first, padded layout."""
    mask = torch.as_tensor(attn).clone()
    mask[:, 0] = 0
    return masked_logprobs(model, ForwardBatch.padded(ids, attn), mask, want_entropy=want_entropy)


def tiny_model(seed: int = 0):
    """~0.2M-parameter Llama with tied embeddings, the shape `treegym.agents.tiny` builds."""
    from transformers import AutoModelForCausalLM

    from treegym.agents.tiny import build_config

    cfg = build_config("llama", vocab_size=VOCAB, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                       max_position_embeddings=64, eos_id=1, pad_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def fixed_batch() -> dict[str, np.ndarray]:
    """Right-padded rows of different lengths; a prompt, then action tokens (loss) interleaved
    with observation tokens (no loss), like `treegym.tree.to_batch` produces. Old/ref log-probs
    are the model's own plus noise, so ratios leave the clip range and the KL is non-zero."""
    rng = np.random.default_rng(123)
    ids = rng.integers(2, VOCAB, size=(ROWS, WIDTH))
    lengths = np.array([20, 9, 14, 6, 17, 11, 20])
    attn = (np.arange(WIDTH)[None] < lengths[:, None]).astype(np.int64)
    ids = ids * attn
    loss = np.zeros_like(attn)
    for r, n in enumerate(lengths):
        loss[r, 3:n] = rng.random(n - 3) < 0.6
    loss[3] = 0  # a row without a sampled token (e.g. cut by max_length): counts as a row only
    adv = np.where(loss > 0, rng.normal(size=(ROWS, 1)) + 0.3 * rng.normal(size=(ROWS, WIDTH)), 0.0)
    with torch.no_grad():
        lp, _ = logprobs_of_every_token(tiny_model(), torch.as_tensor(ids), torch.as_tensor(attn))
    lp = lp.numpy()
    old = np.where(loss > 0, lp + 0.4 * rng.normal(size=lp.shape), 0.0)
    ref = np.where(loss > 0, lp + 0.2 * rng.normal(size=lp.shape), 0.0)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
            "advantages": adv.astype(np.float32), "old_logprobs": old.astype(np.float32),
            "ref_logprobs": ref.astype(np.float32)}


def make_optimizer(model):
    """AdamW with eps 1e-3: Adam's first step is lr*g/(|g|+eps), which for |g| << 1e-8 (the
    default eps) turns 1e-10 of all-reduce rounding into a different sign of the update; a larger
    eps keeps the update a well-conditioned function of the gradient, so comparing weights tests
    the gradients rather than float noise."""
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.01)


def run_step(model, batch, info=None, micro=None):
    opt = make_optimizer(model)
    stats = D.policy_update_step(model, opt, batch, info=info, micro_batch_rows=micro, **LOSS_KW)
    return stats, opt


# ----------------------------------------------------------------------------------------------
# torchrun worker


def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    info = D.init_distributed()
    assert info.world_size == 2 and info.backend == "gloo", info
    batch = fixed_batch()
    local = D.shard_rows(batch, info.rank, info.world_size)
    results = {}
    for strategy in ("fsdp", "ddp"):
        model = D.shard_model(tiny_model(), info, strategy=strategy)
        every = local.fwd.gather >= 0  # every real token (the first of a row gets 0)
        lp, ent = D.rank_logprobs(model, local, micro_batch_rows=MICRO, want_entropy=True,
                                  loss_mask=every)
        lp_loss, _ = D.rank_logprobs(model, local, micro_batch_rows=MICRO)
        torch.save({"logp": lp, "entropy": ent, "logp_loss": lp_loss},
                   Path(out_dir) / f"lp_{strategy}_rank{info.rank}.pt")
        stats, opt = run_step(model, local, info=info, micro=MICRO)
        grads = D.gather_full_grads(model)
        if strategy == "fsdp":
            ckpt = D.save_checkpoint_rank0(Path(out_dir) / "run", 1, model, opt)
            D.save_pretrained_rank0(model, Path(out_dir) / "hf")  # what SGLang would reload
            weights = D.gather_full_state_dict(model)
            # resume into a fresh sharded model + optimizer: same weights, same Adam moments
            fresh = D.shard_model(tiny_model(seed=7), info, strategy="fsdp")
            fresh_opt = make_optimizer(fresh)
            D.load_checkpoint_distributed(Path(out_dir) / "run/checkpoints/step_000001", fresh,
                                          fresh_opt)
            reloaded = D.gather_full_state_dict(fresh)
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_optimizer_state_dict)
            o1 = get_optimizer_state_dict(model, opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            o2 = get_optimizer_state_dict(fresh, fresh_opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            if info.is_main:
                torch.save({"reloaded": reloaded, "opt_saved": o1, "opt_loaded": o2,
                            "ckpt": str(ckpt)}, Path(out_dir) / "resume.pt")
        else:
            weights = D.gather_full_state_dict(model)
        results[strategy] = {"stats": stats, "grads": grads, "weights": weights}
        (Path(out_dir) / f"stats_{strategy}_rank{info.rank}.json").write_text(json.dumps(stats))
    # the bf16 MixedPrecisionPolicy used on GPUs, exercised on CPU/gloo (bf16 compute, fp32
    # master weights and gradient reduction)
    model = D.shard_model(tiny_model(), info, strategy="fsdp", mixed_precision=True)
    stats, _ = run_step(model, local, info=info, micro=MICRO)
    results["fsdp_bf16"] = {"stats": stats, "grads": D.gather_full_grads(model),
                            "weights": D.gather_full_state_dict(model)}
    if info.is_main:
        torch.save(results, Path(out_dir) / "dist.pt")
    # Both ranks reach the teardown together: a rank that destroys the gloo group while its peer
    # is still working (here: rank 0 saving) can abort in gloo's C++ threads ("terminate called
    # without an active exception"), which failed this test once in a fresh-clone run.
    D.barrier()
    D.cleanup_distributed()


# ----------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def single():
    """The reference: one process, whole batch, no micro-batching."""
    torch.set_num_threads(1)
    model = tiny_model()
    stats, _ = run_step(model, fixed_batch())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"stats": stats, "grads": grads, "weights": weights}


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, torch.load(out / "dist.pt", weights_only=False)


def test_single_process_step_is_the_plain_total_loss(single):
    """With one process the helper reduces to train.loss.total_loss on the whole batch."""
    b = {k: torch.as_tensor(v) for k, v in fixed_batch().items()}
    with torch.no_grad():
        logp, ent = logprobs_of_every_token(tiny_model(), b["input_ids"], b["attention_mask"], True)
        loss, _ = total_loss(logp, b["old_logprobs"], b["advantages"], b["loss_mask"].float(),
                             ref_logp=b["ref_logprobs"], entropy=ent, kl_coef=LOSS_KW["kl_coef"],
                             entropy_coef=LOSS_KW["entropy_coef"])
    assert single["stats"]["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert single["stats"]["tokens"] == float(b["loss_mask"][:, 1:].sum())
    assert single["stats"]["grad_norm"] > LOSS_KW["grad_clip"]  # the clip path is exercised


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_match_one_batch(agg):
    """Micro-batches are split exactly like ranks split the batch (each with its own, trimmed,
    rows), so this checks every aggregation's global denominator without spawning processes."""
    ref, split = tiny_model(), tiny_model()
    s_ref = D.policy_update_step(ref, make_optimizer(ref), fixed_batch(), agg=agg, **LOSS_KW)
    s_mb = D.policy_update_step(split, make_optimizer(split), fixed_batch(), agg=agg,
                                micro_batch_rows=2, **LOSS_KW)
    for k in ("loss", "pg_loss", "kl", "entropy", "clipfrac", "grad_norm"):
        assert s_mb[k] == pytest.approx(s_ref[k], rel=1e-5, abs=1e-7), k
    ref_grads = dict(ref.named_parameters())
    for n, p in split.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_gloo_processes_equal_single_process(two_procs, single, strategy):
    out, results = two_procs
    res = results[strategy]
    s0 = json.loads((out / f"stats_{strategy}_rank0.json").read_text())
    s1 = json.loads((out / f"stats_{strategy}_rank1.json").read_text())
    assert s0 == pytest.approx(s1, rel=1e-9)  # every rank reports the same global metrics
    for k in ("loss", "pg_loss", "kl", "entropy", "clipfrac", "approx_kl", "grad_norm",
              "tokens", "rows"):
        assert res["stats"][k] == pytest.approx(single["stats"][k], rel=1e-5, abs=1e-7), k
    assert set(res["grads"]) == set(single["grads"])
    for n, g in single["grads"].items():
        torch.testing.assert_close(res["grads"][n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert set(res["weights"]) == set(single["weights"])
    for n, w in single["weights"].items():
        torch.testing.assert_close(res["weights"][n], w, rtol=1e-5, atol=1e-6, msg=n)
    # the step really moved the weights (a no-op update would also "match")
    init = tiny_model().state_dict()
    moved = max(float((single["weights"][n] - init[n]).abs().max()) for n in init)
    assert moved > 1e-3


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_sharded_logprobs_equal_a_full_forward(two_procs, strategy):
    """Old/ref log-probs computed per rank (FSDP2 forwards in lockstep) equal one forward."""
    out, _ = two_procs
    parts = [torch.load(out / f"lp_{strategy}_rank{r}.pt") for r in range(2)]
    b = fixed_batch()
    ids, attn = torch.as_tensor(b["input_ids"]), torch.as_tensor(b["attention_mask"])
    with torch.no_grad():
        lp, ent = logprobs_of_every_token(tiny_model(), ids, attn, want_entropy=True)
    real = attn.bool()
    got_lp = torch.cat([p["logp"] for p in parts])
    got_ent = torch.cat([p["entropy"] for p in parts])
    assert got_lp.shape == ids.shape
    torch.testing.assert_close(got_lp[real], lp[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_ent[real], ent[real], rtol=1e-5, atol=1e-6)
    assert float(got_lp[real].abs().sum()) > 1.0
    # the loss-token-only head (what the update uses) agrees on loss tokens, is 0 elsewhere
    loss = torch.as_tensor(b["loss_mask"]).bool()
    loss[:, 0] = False
    got_loss = torch.cat([p["logp_loss"] for p in parts])
    torch.testing.assert_close(got_loss[loss], lp[loss], rtol=1e-5, atol=1e-6)
    assert not got_loss[~loss].any()


def test_bf16_mixed_precision_stays_close_with_fp32_master_weights(two_procs, single):
    _, results = two_procs
    res = results["fsdp_bf16"]
    for k in ("loss", "pg_loss", "grad_norm"):
        assert res["stats"][k] == pytest.approx(single["stats"][k], rel=2e-2), k
    assert all(w.dtype == torch.float32 for w in res["weights"].values())
    assert all(g.dtype == torch.float32 for g in res["grads"].values())
    # bf16 compute really happened: not bit-identical to the fp32 run
    assert res["stats"]["loss"] != single["stats"]["loss"]
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in res["grads"].values()]),
        torch.cat([single["grads"][n].flatten() for n in res["grads"]]), dim=0)
    assert cos > 0.99


def test_rank0_checkpoint_holds_the_updated_weights_and_resumes(two_procs, single):
    from safetensors.torch import load_file

    from treegym.train.checkpoint import latest_checkpoint

    out, _ = two_procs
    ckpt = latest_checkpoint(out / "run")
    assert ckpt is not None and ckpt.name == "step_000001"
    saved = load_file(str(ckpt / "model.safetensors"))
    for n, w in saved.items():
        torch.testing.assert_close(w, single["weights"][n], rtol=1e-5, atol=1e-6, msg=n)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "hf").state_dict()
    for n, w in single["weights"].items():
        torch.testing.assert_close(hf[n], w, rtol=1e-5, atol=1e-6, msg=n)
    resume = torch.load(out / "resume.pt", weights_only=False)
    for n, w in single["weights"].items():
        torch.testing.assert_close(resume["reloaded"][n], w, rtol=1e-5, atol=1e-6, msg=n)
    st1, st2 = resume["opt_saved"]["state"], resume["opt_loaded"]["state"]
    assert set(st1) == set(st2) and st1
    for n in st1:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(st2[n][k], st1[n][k], msg=f"{n}.{k}")


def test_bad_inputs_fail_with_clear_errors():
    b = fixed_batch()
    with pytest.raises(ValueError, match="old_logprobs"):
        D.StepBatch.from_any({k: v for k, v in b.items() if k != "old_logprobs"})
    with pytest.raises(ValueError, match="advantages"):
        D.StepBatch.from_any({**b, "advantages": b["advantages"][:, :5]})
    with pytest.raises(ValueError, match="outside"):
        D.shard_rows(b, 2, 2)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_distributed(env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="strategy"):
        D.shard_model(tiny_model(), D.DistInfo(), strategy="zero3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="agg"):
        run_model = tiny_model()
        D.policy_update_step(run_model, torch.optim.SGD(run_model.parameters(), lr=0.1), b,
                             agg="mean")


def test_accepts_tree_batches():
    """`treegym.tree.to_batch`'s numpy `Batch` goes in as it is (no ref log-probs there)."""
    from treegym.tree.batch import Batch

    b = fixed_batch()
    tb = Batch(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
               loss_mask=b["loss_mask"], advantages=b["advantages"],
               old_logprobs=b["old_logprobs"], position_ids=np.zeros_like(b["input_ids"]),
               rewards=np.zeros(ROWS, dtype=np.float32))
    sb = D.StepBatch.from_any(tb)
    assert sb.ref_logprobs is None and sb.input_ids.dtype == torch.long
    torch.testing.assert_close(sb.advantages, torch.as_tensor(b["advantages"]))
    model = tiny_model()
    stats = D.policy_update_step(model, make_optimizer(model), tb, kl_coef=0.1)
    assert "kl" not in stats and stats["tokens"] == float(b["loss_mask"][:, 1:].sum())


def test_shard_rows_partitions_the_batch():
    b = D.StepBatch.from_any(fixed_batch())
    for world in (1, 2, 3, 8):
        parts = [D.shard_rows(b, r, world) for r in range(world)]
        assert sum(p.rows for p in parts) == ROWS
        got = [row for p in parts for row in p.input_ids]  # each part trimmed to its width
        for g, want in zip(got, b.input_ids, strict=True):
            assert torch.equal(g, want[:len(g)]) and not want[len(g):].any()
    assert D.init_distributed(env={}).world_size == 1



# ----------------------------------------------------------------------------------------------
# the whole RL trainer under torchrun: `torchrun -m treegym.cli train ...` == one process


def _rl_args(model: Path, data: Path, out: Path, steps: int = 2) -> list[str]:
    """A small GRPO run with signal: 3 prompts x 3 chains per step, minibatches of 2 prompts, KL
    and entropy on. On 2 ranks that is uneven on purpose: rank 0 rolls out prompts 0 and 2, rank 1
    prompt 1, and each step's 1-prompt minibatch leaves one rank without rows (it joins the
    collectives with a zero-gradient padding micro-batch)."""
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--algo", "grpo",
            "--steps", str(steps), "--prompts-per-step", "3", "--minibatch-prompts", "2",
            "--seed", "0", "--save-every", "1", "--save-trees-every", "1", "--no-progress",
            "--threads", "1", "--reward", "format_em", "--eval-tasks", "2", "--rollout.G", "3",
            "--rollout.max-new-tokens", "12", "--optim.lr", "1e-3"]


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    """A small synthetic world (its directory, as a user would pass `--data`) and a 1-layer model
    after a short SFT, so rewards vary within groups and advantages are non-zero."""
    from treegym.agents.tiny import build_tiny_model, corpus_titles
    from treegym.envs.data.synthetic import synthetic_dataset
    from treegym.train.sft import run_sft

    torch.set_num_threads(1)
    world = synthetic_dataset(3, n_people=40, n_cities=8, n_countries=3, n_orgs=8, n_works=10,
                              n_questions=120)
    root = tmp_path_factory.mktemp("rl")
    init = build_tiny_model(world.corpus_path, root / "init",
                            entity_names=corpus_titles(world.corpus_path), vocab_size=400,
                            n_layer=1, d_model=32, n_head=2, max_position_embeddings=1024)
    run_sft(world, root / "sft", model_dir=init, lm_steps=10, act_steps=40, batch=8, lr=1e-2,
            act_lr=1e-2, eval_every=0, eval_n=4, log=lambda *_: None)
    return root, root / "sft", world.corpus_path.parent


def _trainer(args: list[str]):
    from treegym.train.config import TrainConfig, parse_args
    from treegym.train.trainer import Trainer

    return Trainer(parse_args(args, TrainConfig))


@pytest.fixture(scope="module")
def rl_single(rl_setup):
    """The reference, in this process (no torchrun, world size 1): 3 steps; the records and
    weights after step 2 (its checkpoint) and the weights after step 3."""
    from safetensors.torch import load_file

    root, model, data = rl_setup
    tr = _trainer(_rl_args(model, data, root / "single", steps=3))
    records = tr.train()
    step2 = load_file(str(root / "single" / "checkpoints" / "step_000002" / "model.safetensors"))
    step3 = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    return records[:2], step2, step3


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "treegym.cli", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _check_run(out: Path, single_records: list[dict], single_weights: dict, *_: Any) -> None:
    """Final weights, per-step metrics and the rank-0-only run directory of a torchrun run."""
    from safetensors.torch import load_file

    from treegym.train.checkpoint import latest_checkpoint
    from treegym.tree import load_jsonl

    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_000002"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == set(single_weights)  # the same files as one process (tied head once)
    start = load_file(str(out.parent / "sft" / "model.safetensors"))
    moved = max(float((single_weights[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # the run really trained (a no-op would also "match")
    for k, w in saved.items():
        torch.testing.assert_close(w, single_weights[k], rtol=1e-5, atol=2e-5, msg=k)
    # rank 0 alone wrote metrics.jsonl: one line per step, not one per rank
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r, s in zip(recs, single_records):
        # the same prompts, the same sampled tokens: rollout metrics are equal, not just close
        for k in ("reward", "reward_std", "solved_prompts", "leaves_per_prompt",
                  "tokens_per_prompt", "tool_calls_per_prompt", "llm_calls", "train_tokens"):
            assert r[k] == s[k], k
        for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "adv_abs_mean", "lr"):
            assert r[k] == pytest.approx(s[k], rel=1e-4, abs=1e-6), k
    assert abs(recs[-1]["adv_abs_mean"]) > 0  # advantages carried signal
    # the trees of both ranks' prompts, gathered in prompt order into one file
    forests, _ = load_jsonl(out / "trees" / "step_000002.jsonl")
    single_forests, _ = load_jsonl(out.parent / "single" / "trees" / "step_000002.jsonl")
    assert [f.uid for f in forests] == [f.uid for f in single_forests]
    assert [[l.full_action_ids for l in f.leaves()] for f in forests] == \
        [[l.full_action_ids for l in f.leaves()] for f in single_forests]
    assert (out / "config.yaml").is_file() and list((out / "tb").iterdir())


def test_torchrun_trainer_fsdp_with_resume_equals_single_process(rl_setup, rl_single):
    """FSDP2 over 2 gloo ranks: 1 step, then `--resume` for the 2nd (a second torchrun launch
    that loads the rank-0 checkpoint into freshly sharded ranks) == 2 steps in one process; and
    one process resuming that sharded run's checkpoint for a 3rd step == 3 steps in one process."""
    root, model, data = rl_setup
    out = root / "fsdp"
    _torchrun(_rl_args(model, data, out, steps=1) + ["--strategy", "fsdp"])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    proc = _torchrun(_rl_args(model, data, out, steps=2) + ["--strategy", "fsdp", "--resume"])
    assert proc.stdout.count('"step": 2') == 1  # the final eval is printed once, by rank 0
    _check_run(out, *rl_single)
    # torchrun -> one process: the name-keyed optimizer state goes back to positions
    tr = _trainer(_rl_args(model, data, out, steps=3) + ["--resume"])
    assert tr.step == 2 and tr.cursor == 6
    tr.train()
    for k, w in rl_single[2].items():
        torch.testing.assert_close(tr.model.state_dict()[k], w, rtol=1e-5, atol=2e-5, msg=k)


@pytest.mark.slow
def test_torchrun_trainer_ddp_resuming_a_single_process_run(rl_setup, rl_single):
    """DDP: step 1 in this process, step 2 by 2 ranks resuming its (position-keyed) checkpoint
    == 2 steps in one process."""
    root, model, data = rl_setup
    out = root / "ddp"
    _trainer(_rl_args(model, data, out, steps=1)).train()
    _torchrun(_rl_args(model, data, out) + ["--strategy", "ddp", "--resume"])
    _check_run(out, *rl_single)


def test_rollout_seeds_follow_the_prompt_not_the_rank(rl_setup):
    """What makes the equivalence possible: a rank rolling out prompts 1 and 3 of a step (with
    `prompt_index`) samples exactly what one process rolling out prompts 0..3 samples for them
    (tree_grpo: the seeds of chains, expansion choices and generations all follow the prompt)."""
    from treegym.agents.hf import HFPolicy
    from treegym.train.evaluate import make_env
    from treegym.tree import rollout as R

    _, model, data = rl_setup
    policy, env = HFPolicy(model), make_env(str(data), "train", reward="format_em")
    tasks = list(env.unwrapped.tasks[:4])
    kw = dict(M=2, N=1, L=1, seed=5, max_new_tokens=12, max_turns=6)
    whole, _ = R.tree_grpo(policy, env, tasks, **kw)
    part, _ = R.tree_grpo(policy, env, [tasks[1], tasks[3]], prompt_index=[1, 3], **kw)
    for got, want in zip(part, [whole[1], whole[3]]):
        assert got.uid == want.uid
        assert [l.full_action_ids for l in got.leaves()] == [l.full_action_ids for l in want.leaves()]
    plain, _ = R.tree_grpo(policy, env, [tasks[1], tasks[3]], **kw)  # without it: other seeds
    assert plain[0].uid != whole[1].uid
    with pytest.raises(ValueError, match="prompt_index"):
        R.chain(policy, env, tasks[:2], G=2, prompt_index=[0, 0])


if __name__ == "__main__":
    _worker(sys.argv[1])
    # The results are on disk and the group is destroyed; skip interpreter teardown, where
    # gloo's background threads can still abort the process after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
