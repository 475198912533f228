"""The one-way data flow (data -> envs -> agents -> tree -> train), checked on the source.

Every `import` statement of every package module is read from its AST — function-local imports
included, since a deferred import is still a dependency — and resolved to a module name. A
backwards import fails here with the file and line, before it can become a cycle or drag torch
into the env layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repo root is the package `treegym`
SKIP = {"tests", "benchmarks", "examples", "docs", "build", ".venv", ".git"}

# (importing package, forbidden module prefixes, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    ("treegym.envs", ("torch", "transformers", "treegym.agents", "treegym.tree", "treegym.train"),
     "envs sit below agents/tree/train and never need torch"),
    ("treegym.envs.data", ("treegym.envs.core", "treegym.envs.site", "treegym.envs.search_qa",
                           "treegym.envs.web_agent", "treegym.envs.tool_env",
                           "treegym.envs.wrappers", "treegym.envs.resources"),
     "the data layer never imports the env or site modules built on it"),
    ("treegym.retrieval_index", ("treegym.envs", "treegym.agents", "treegym.tree", "treegym.train"),
     "retrieval_index sits below envs, its CLI included"),
    ("treegym.agents", ("treegym.tree", "treegym.train"), "agents sit below tree and train"),
    ("treegym.tree", ("treegym.train",), "tree sits below train"),
    ("treegym.paths", ("treegym.",), "paths.py is a leaf every layer may import"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["treegym", *parts])


def _package_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py")
                  if not SKIP & set(p.relative_to(ROOT).parts[:1]) and p.name != "setup.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from treegym import tree` imports the submodule treegym.tree
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if a.name != "*"]
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def _violations() -> list[str]:
    bad = []
    for path in _package_files():
        module = _module_name(path)
        for line, name in _imports(path):
            if _within(name, "treegym.integrations") and not _within(module, "treegym.integrations"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name} (nothing imports integrations)")
            for owner, forbidden, why in RULES:
                if _within(module, owner) and any(_within(name, f) for f in forbidden):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name} ({why})")
    return bad


def test_no_backwards_imports() -> None:
    assert _package_files(), "found no package modules"
    assert _violations() == []


@pytest.mark.parametrize("source, module, expect", [
    ("import torch\n", "envs/x.py", "imports torch"),
    ("def f():\n    from treegym.tree import node\n", "agents/x.py", "imports treegym.tree"),
    ("from ..site import Site\n", "envs/data/x.py", "imports treegym.envs.site"),
    ("from treegym.envs import data\n", "retrieval_index/x.py", "imports treegym.envs"),
    ("from treegym import integrations\n", "train/x.py", "nothing imports integrations"),
])
def test_the_check_catches_backwards_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             source: str, module: str, expect: str) -> None:
    """The checker itself flags each kind of violation (a check that cannot fail proves nothing)."""
    fake = tmp_path / module
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _violations()
    assert found and all(module in f for f in found) and any(expect in f for f in found)
