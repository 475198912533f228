"""`treegym` command line. Thin on purpose: each subcommand lives next to the code it drives and is
imported only when called, so `treegym --help` stays fast and optional extras stay optional."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Sequence

from treegym.version import __version__

# name -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("treegym.envs.site:world_cli_main", "generate the synthetic world (corpus, QA parquet, site)"),
    "index": ("treegym.cli:index_main", "build / search / evaluate a retrieval index"),
    "serve-retriever": ("treegym.retrieval_index.server:cli_main", "serve an index with Search-R1's /retrieve API"),
    "serve-env": ("treegym.integrations.openenv:cli_main", "serve an env through OpenEnv (HTTP + WebSocket) with fork/snapshot/restore"),
    "tiny-model": ("treegym.agents.tiny:cli_main", "build the tokenizer and tiny causal LM from a world"),
    "view": ("treegym.tree.view:cli_main", "render sampled trees (jsonl) as a self-contained HTML page"),
    "sft": ("treegym.train.sft:cli_main", "warm-start a model on oracle transcripts"),
    "train": ("treegym.train.trainer:cli_main", "RL training: GRPO / Tree-GRPO / TreeRL / GiGPO"),
    "eval": ("treegym.train.evaluate:cli_main", "evaluate a model on a split (EM/F1, tool calls, pass@k)"),
    "bench": ("treegym.train.bench:cli_main", "offline benchmark: chain GRPO vs Tree-GRPO at matched budgets"),
}


def dataset_tasks(spec: str, split: str | None) -> list[Any]:
    """The questions `treegym index eval --data SPEC [--split S]` scores a retriever on: the
    split if given, else the test split, else every split. Resolved here, at the top, because
    retrieval_index sits below the env/data layer and never imports it."""
    from treegym.envs.data import resolve_dataset

    ds = resolve_dataset(spec)
    if split is not None:
        if split not in ds.splits:
            raise ValueError(f"dataset {ds.name} has no split {split!r} (has {', '.join(ds.splits)})")
        return list(ds.tasks(split))
    if ds.splits.get("test"):
        return list(ds.tasks("test"))
    return [t for s in ds.splits for t in ds.tasks(s)]


def index_main(argv: Sequence[str]) -> int:
    from treegym.retrieval_index.cli import main as index_cli

    return index_cli(argv, load_tasks=dataset_tasks)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: treegym [--version] <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `treegym <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"treegym {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"treegym: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
