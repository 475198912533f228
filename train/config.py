"""The trainer's configuration: one dataclass tree, set from a YAML file and/or CLI flags (tyro).

Why a dataclass tree and tyro rather than an argparse mirror: the same object is the CLI, the
YAML schema, the thing saved next to every run, and what `Trainer` reads, so a field exists in
exactly one place. YAML is validated strictly (unknown or ill-typed field -> `ConfigError` naming
the dotted field), because a silently ignored typo in an RL config wastes a whole run.

Tiny-model defaults (ours; Tree-GRPO's 3B values are in the comments). A few-million-parameter
model trained from scratch tolerates and needs a far larger learning rate than a pre-trained 3B
model (1e-6 there); KL and entropy coefficients keep the paper's 0.001.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import tyro
import yaml

Algo = Literal["grpo", "tree_grpo", "treerl", "gigpo"]
EnvId = Literal["TreeSearchQA-v0", "TreeWebAgent-v0"]


class ConfigError(ValueError):
    """A config value is unknown or has the wrong type; the message names the dotted field."""


@dataclass
class RolloutConfig:
    """How experience is sampled for each training prompt."""

    G: int = 4                   # chains per prompt for `grpo` / `gigpo` (paper budget table: 2..16)
    M: int = 2                   # trees per prompt for `tree_grpo` / `treerl` (paper default 2)
    N: int = 2                   # nodes expanded per tree per iteration (paper 2)
    L: int = 1                   # expansion iterations (paper 1)
    K: int | None = None         # leaves kept per tree (None = all; paper's sample_leaf K=3)
    T: int = 2                   # continuations per fork point for `treerl` (EPTree's t)
    temperature: float = 1.0     # paper 1.0
    top_p: float = 1.0           # paper 0.95; 1.0 keeps the tiny model's log-probs exact
    max_new_tokens: int = 32     # per generation (paper 500); tiny-model actions are short
    granularity: Literal["step", "token"] = "step"


@dataclass
class OptimConfig:
    lr: float = 2e-4             # paper 1e-6 (3B); tiny models need much more
    weight_decay: float = 0.01   # paper 0.01
    grad_clip: float = 1.0       # paper 1.0
    warmup_steps: int = 2        # linear warm-up in optimizer steps (paper: ratio 0.285 of ~180)
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class LossConfig:
    clip: float = 0.2            # paper 0.2
    dual_clip: float = 3.0       # paper 3
    kl_coef: float = 0.001       # paper 0.001 (k3 / low_var_kl)
    entropy_coef: float = 0.001  # paper 0.001
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                 "seq-mean-token-sum-norm"] = "token-mean"


@dataclass
class SGLangConfig:
    """How the trainer talks to `TrainConfig.rollout_server` (`treegym.agents.sglang.SGLangPolicy`
    keywords; see that module for what each guards against on real servers)."""

    api_key: str = ""             # the server's --api-key; "env:NAME" reads $NAME (keeps it out of config.yaml)
    admin_api_key: str = ""       # the server's --admin-api-key (weight updates), same "env:" form
    timeout: float = 300.0        # seconds per request
    connect_timeout: float = 10.0
    retries: int = 3              # for connection errors, timeouts, HTTP 5xx, malformed JSON
    backoff: float = 0.5          # seconds before the first retry, doubling
    seeds: Literal["auto", "require", "off"] = "auto"  # require: refuse a server that ignores seeds
    version_check: Literal["error", "warn", "off"] = "error"  # for servers below the minimum version
    check_weight_version: bool = True  # every response must come from the last pushed weights
    max_batch_size: int = 256     # inputs per /generate request

    def client_kwargs(self) -> dict[str, Any]:
        """The `SGLangPolicy` keyword arguments, with "env:NAME" keys read from the environment."""
        import os

        def key(value: str, name: str) -> str | None:
            if not value.startswith("env:"):
                return value or None
            var = value[4:]
            if var not in os.environ:
                raise ConfigError(f"sglang.{name}: environment variable {var!r} is not set")
            return os.environ[var]

        kw = dataclasses.asdict(self)
        kw["api_key"] = key(self.api_key, "api_key")
        kw["admin_api_key"] = key(self.admin_api_key, "admin_api_key")
        return kw


@dataclass
class UpdateConfig:
    """How the policy update is computed. None of these changes the math: each switch only skips
    work whose result is known, and tests/test_train_update.py checks that flipping it changes
    no number beyond float rounding (1e-5)."""

    # each prompt group (its chains, or its trees) is one packed sequence: every shared prefix
    # goes through the transformer once, under a tree attention mask (needs attn_implementation
    # 'sdpa' or 'eager'); off = one padded row per leaf (the duplicated layout)
    packed: bool = True
    # the first minibatch of the first epoch runs on the rollout's weights, so its "old"
    # log-probs are its own training forward's (detached); the no-grad old pass covers only the
    # other minibatches (with one minibatch and one epoch it disappears)
    old_from_update: bool = True
    # while the policy still holds the reference's weights (step 0 of a fresh run) the reference
    # log-probs are the old ones: the reference pass is skipped
    ref_while_unchanged: bool = True


@dataclass
class TrainConfig:
    """RL training run (`treegym train`)."""

    model: str = ""                       # Hugging Face model directory (e.g. the SFT warm start)
    env: EnvId = "TreeSearchQA-v0"        # the environment RL runs in (the same samplers for both)
    data: str = "synthetic:multihop"      # anything `resolve_dataset` accepts
    site: str = "synthetic"               # TreeWebAgent-v0 only: "synthetic" or a folder of HTML files
    split: str = "train"                  # the split RL draws its prompts from
    eval_split: str = "dev"               # the split of the periodic evals
    out: str = "runs/train"               # run directory (config, metrics, trees, checkpoints)
    algo: Algo = "tree_grpo"
    advantage: str = ""                   # advantage estimator; "" = the algo's own
    steps: int = 20                       # RL steps (each: rollout + updates)
    prompts_per_step: int = 8             # paper 512
    minibatch_prompts: int = 8            # paper 64 (1 optimizer step per minibatch)
    epochs: int = 1                       # passes over each rollout batch (paper 1)
    seed: int = 0
    retriever: str = "bm25"
    topk: int = 3
    max_tool_calls: int | None = None     # None = the env's default (QA 3, Search-R1; web 5, Tree-GRPO)
    reward: Literal["em", "f1", "format_em"] | None = None  # None = the env's default (QA em, web f1)
    eval_every: int = 0                   # steps between dev evals (0 = only at the end)
    eval_tasks: int = 64                  # dev tasks per eval (0 = all)
    save_every: int = 10                  # steps between checkpoints (the last step always saves)
    keep_checkpoints: int = 2
    save_trees_every: int = 5             # steps between dumps of the sampled trees (0 = never)
    threads: int = 0                      # torch threads (0 = leave torch's default)
    device: str = "cpu"                   # "cuda" runs rollouts and updates there (bf16 autocast)
    resume: bool = False                  # continue from the newest good checkpoint in `out`
    strategy: Literal["fsdp", "ddp"] = "fsdp"  # under torchrun (WORLD_SIZE > 1): FSDP2 shards, DDP replicates
    micro_batch_rows: int | None = None   # under torchrun: rows per forward/backward (memory only; same step)
    progress: bool = True
    tensorboard: bool = True
    # URL of an SGLang server (`python -m sglang.launch_server`) that generates the rollouts instead
    # of the trainer's own model; before each step's rollout it gets the trainer's current weights
    # through /update_weights_from_disk (written to OUT/rollout_weights). "" = generate locally.
    rollout_server: str = ""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # client options for rollout_server
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)


# ----------------------------------------------------------------------------------------------
# strict dict -> dataclass


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, prefix=name + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {args}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {tp!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown fields and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]!s} (known: {sorted(known)})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain (YAML/JSON-safe) dict of a config; tuples become lists."""
    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v
    return fix(dataclasses.asdict(cfg))


def load_yaml(path: str | Path, cls: type = TrainConfig) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks that types alone cannot express; errors name the field."""
    checks = [
        ("steps", cfg.steps >= 0), ("prompts_per_step", cfg.prompts_per_step > 0),
        ("minibatch_prompts", cfg.minibatch_prompts > 0), ("epochs", cfg.epochs > 0),
        ("max_tool_calls", cfg.max_tool_calls is None or cfg.max_tool_calls >= 0),
        ("micro_batch_rows", cfg.micro_batch_rows is None or cfg.micro_batch_rows > 0),
        ("rollout.G", cfg.rollout.G > 0), ("rollout.M", cfg.rollout.M > 0),
        ("rollout.N", cfg.rollout.N >= 0), ("rollout.L", cfg.rollout.L >= 0),
        ("rollout.K", cfg.rollout.K is None or cfg.rollout.K > 0), ("rollout.T", cfg.rollout.T > 0),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens > 0),
        ("rollout.temperature", cfg.rollout.temperature >= 0),
        ("rollout.top_p", 0 < cfg.rollout.top_p <= 1),
        ("optim.lr", cfg.optim.lr > 0), ("optim.grad_clip", cfg.optim.grad_clip > 0),
        ("optim.warmup_steps", cfg.optim.warmup_steps >= 0),
        ("loss.clip", cfg.loss.clip > 0), ("loss.dual_clip", cfg.loss.dual_clip > 1),
        ("sglang.timeout", cfg.sglang.timeout > 0),
        ("sglang.connect_timeout", cfg.sglang.connect_timeout > 0),
        ("sglang.retries", cfg.sglang.retries >= 0), ("sglang.backoff", cfg.sglang.backoff >= 0),
        ("sglang.max_batch_size", cfg.sglang.max_batch_size > 0),
    ]
    for name, ok in checks:
        if not ok:
            value = cfg
            for part in name.split("."):
                value = getattr(value, part)
            raise ConfigError(f"{name}: invalid value {value!r}")
    return cfg


def parse_args(argv: Sequence[str], cls: type = TrainConfig, description: str | None = None) -> Any:
    """`--config FILE.yaml` (optional) gives the base; every other flag overrides it (tyro).

    tyro reports unknown flags and ill-typed values itself (exit code 2, naming the flag).
    """
    argv = list(argv)
    default = cls()
    for i, a in enumerate(argv):
        if a == "--config" or a.startswith("--config="):
            if a == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file path")
                path = argv[i + 1]
                del argv[i:i + 2]
            else:
                path = a.split("=", 1)[1]
                del argv[i]
            default = load_yaml(path, cls)
            break
    cfg = tyro.cli(cls, args=argv, default=default, description=description or cls.__doc__)
    return validate(cfg) if isinstance(cfg, TrainConfig) else cfg
