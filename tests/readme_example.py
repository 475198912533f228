"""The python example of a README section, so a test can execute exactly what the README shows."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example(heading: str, lang: str = "python") -> str:
    """The first ```{lang} block under `## {heading}` (before the next `## ` heading)."""
    text = README.read_text(encoding="utf-8")
    assert f"## {heading}\n" in text, f"README has no section {heading!r}"
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"README section {heading!r} has no {lang} block"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 20, f"the {heading!r} example grew past ~20 lines"
    return code


def run_readme_example(heading: str) -> dict:
    namespace: dict = {}
    exec(compile(readme_example(heading), str(README), "exec"), namespace)
    return namespace
