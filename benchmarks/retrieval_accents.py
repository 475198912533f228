"""Accent folding: recall@3 with and without `ascii_fold` on a corpus with accented names.

Lucene's English analyzer (and so treegym's default bm25) does not fold accents: a query typed as
`Torun` does not match `Toruń`. This takes the synthetic world, gives every invented name one or
two accents (deterministically: `Vrushath` → `Vrůshath`), and measures recall@3 of each test
question's first supporting passage, with the questions as written (accented) and as typed on
an ASCII keyboard (the original names), for bm25 (and, with `--lucene`, Lucene) with folding off
and on. Everything is measured in one run, side by side.

    python benchmarks/retrieval_accents.py [--lucene] [--out benchmarks/results/retrieval_accents.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from treegym.envs.data.synthetic import make_world
from treegym.retrieval_index import build_index
from treegym.retrieval_index.analysis import ascii_fold

# Accented letters that Lucene's ASCIIFoldingFilter folds back to the plain one.
_ACCENTS = {"a": "áàäą", "e": "éèëę", "i": "íï", "o": "óöô", "u": "úüů", "n": "ńñ", "s": "śš", "z": "źżž",
            "l": "ł", "r": "ř", "d": "đ", "k": "ķ", "g": "ğ", "t": "ţ", "v": "ṽ", "b": "ḃ"}


def accent(word: str) -> str:
    """One accent per 5 letters (at least one), placed and chosen by a hash of the word."""
    h = hashlib.sha256(word.encode()).digest()
    spots = [i for i, c in enumerate(word) if c.lower() in _ACCENTS]
    if not spots:
        return word
    chars = list(word)
    for j in range(min(len(spots), max(1, len(word) // 5))):
        i = spots.pop(h[j] % len(spots))
        options = _ACCENTS[chars[i].lower()]
        new = options[h[j + 8] % len(options)]
        chars[i] = new.upper() if chars[i].isupper() else new
    out = "".join(chars)
    assert ascii_fold(out) == word, (word, out)
    return out


def accented_world(seed: int, out: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """The world's corpus with accented names, and (accented question, ASCII question, target doc)."""
    world = make_world(seed)
    words = sorted({w for name in world.entity_names() for w in name.split() if w.isalpha()}, key=len, reverse=True)
    table = {w: accent(w) for w in words}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")

    def sub(text: str) -> str:
        return pattern.sub(lambda m: table[m.group(1)], text)

    corpus = out / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for d in world.docs:
            fh.write(json.dumps({"id": d.doc_id, "contents": f'"{sub(d.title)}"\n{sub(d.text)}'}, ensure_ascii=False) + "\n")
    queries = [(sub(t.question), t.question, t.supporting_ids[0]) for t in world.tasks["test"] if t.supporting_ids]
    return corpus, queries


def recall_at_3(retriever, questions: Sequence[str], targets: Sequence[str]) -> float:
    results = retriever.search(list(questions), 3)
    return sum(t in [h.doc_id for h in hits] for hits, t in zip(results, targets)) / len(targets)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    p.add_argument("--lucene", action="store_true", help="also measure Lucene (pyserini; needs treegym[lucene])")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="treegym-accents-") as tmp:
        root = Path(tmp)
        corpus, queries = accented_world(args.seed, root)
        accented = [q for q, _, _ in queries]
        typed = [q for _, q, _ in queries]
        targets = [t for _, _, t in queries]
        rows = []
        for kind in ["bm25"] + (["lucene"] if args.lucene else []):
            for fold in (False, True):
                r = build_index(corpus, kind, root / f"{kind}-{fold}", ascii_fold=fold)
                rows.append((kind, fold, recall_at_3(r, accented, targets), recall_at_3(r, typed, targets)))
    lines = [f"# Accent folding: recall@3 on the synthetic world (seed {args.seed}) with accented names",
             "",
             f"Command: `python benchmarks/retrieval_accents.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
             f" (commit {_commit()}, {platform.machine()}, Python {platform.python_version()}, "
             f"{time.perf_counter() - t0:.0f} s)",
             "",
             f"{len(targets)} test questions; target: the question's first supporting passage. Every invented name "
             "carries one or two accents in the corpus (`Vrushath` → `Vrůshath`); *accented* queries spell names as the "
             "corpus does, *ASCII-typed* queries as an ASCII keyboard (or a model that drops accents) does.",
             "",
             "| index | ascii_fold | recall@3, accented queries | recall@3, ASCII-typed queries |",
             "|---|---|---|---|"]
    lines += [f"| {kind} | {'on' if fold else 'off'} | {a:.4f} | {b:.4f} |" for kind, fold, a, b in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
