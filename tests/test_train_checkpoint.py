"""Checkpoints: atomic, verified, resumable; config: strict YAML/CLI."""

import random

import numpy as np
import pytest
import torch

from treegym.train.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                      restore, save_checkpoint, verify_checkpoint)
from treegym.train.config import ConfigError, TrainConfig, load_yaml, parse_args, save_yaml


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _train_step(model, opt, sched):
    ids = torch.randint(0, 50, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _setup(seed=0):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def test_save_restore_is_bit_exact(tmp_path):
    torch.manual_seed(1)
    model, opt, sched = _setup()
    _train_step(model, opt, sched)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(tmp_path, 1, model, opt, sched, extra={"cursor": 7})
    # continue without interruption
    _train_step(model, opt, sched)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_py = random.random()
    # fresh objects, restore, continue
    m2, o2, s2 = _setup(seed=99)
    state = restore(step_dir := list_checkpoints(tmp_path)[-1], m2, o2, s2)
    assert step_dir.name == "step_000001" and state["extra"]["cursor"] == 7 and state["step"] == 1
    _train_step(m2, o2, s2)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert random.random() == want_py


def test_corrupted_checkpoint_is_refused_and_previous_used(tmp_path):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, model, opt, sched)
    _train_step(model, opt, sched)
    bad = save_checkpoint(tmp_path, 2, model, opt, sched)
    weights = next(bad.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_checkpoint(bad)
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append).name == "step_000001"
    assert "step_000002" in warnings[0]
    # partial: manifest missing (crash before the last write)
    (bad / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        restore(bad, model)
    # a leftover temp dir from a crash is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step_000003-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002"]


def test_keep_prunes_old_checkpoints(tmp_path):
    model, opt, sched = _setup()
    for s in range(1, 5):
        save_checkpoint(tmp_path, s, model, opt, sched, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_config_yaml_roundtrip_and_cli_override(tmp_path):
    cfg = TrainConfig(algo="grpo", steps=3)
    cfg.rollout.G = 8
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg
    over = parse_args(["--config", str(tmp_path / "c.yaml"), "--optim.lr", "0.01"])
    assert over.rollout.G == 8 and over.algo == "grpo" and over.optim.lr == 0.01


@pytest.mark.parametrize("text,field", [
    ("stepz: 3\n", "stepz"),
    ("rollout:\n  Gx: 3\n", "rollout.Gx"),
    ("steps: three\n", "steps"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("algo: ppo\n", "algo"),
    ("rollout:\n  K: 1.5\n", "rollout.K"),
    ("env: TreeChess-v0\n", "env"),
    ("reward: accuracy\n", "reward"),
    ("max_tool_calls: lots\n", "max_tool_calls"),
])
def test_config_errors_name_the_field(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_yaml(p)


def test_config_cli_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--rollout.Gx", "3"])
    assert "rollout.Gx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--steps", "many"])
    assert "steps" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="rollout.G"):
        parse_args(["--rollout.G", "0"])
    web = parse_args(["--env", "TreeWebAgent-v0", "--reward", "em", "--max-tool-calls", "4",
                      "--split", "dev", "--eval-split", "test"])
    assert (web.env, web.reward, web.max_tool_calls) == ("TreeWebAgent-v0", "em", 4)
    assert (web.split, web.eval_split) == ("dev", "test")
    with pytest.raises(SystemExit):
        parse_args(["--env", "TreeChess-v0"])
