"""Text analysis that mimics Lucene's English analyzer (pyserini's default BM25 analyzer).

Lucene's ``EnglishAnalyzer`` = StandardTokenizer → EnglishPossessiveFilter → LowerCaseFilter →
StopFilter (Lucene's 33 English stop words) → PorterStemFilter. We approximate the tokenizer with
a Unicode word regex that keeps inner apostrophes, then apply the same possessive, stop-word and
Porter steps (PyStemmer's ``porter`` is the original Porter algorithm, as in Lucene), so the
embedded BM25 ranks like the field's reference BM25 without a JVM.

Accents: Lucene's English analyzer does not fold them, so `Torun` does not match `Toruń`. That
default is kept (rankings stay Lucene's); ``Analyzer(ascii_fold=True)`` folds with Lucene's own
``ASCIIFoldingFilter`` table (``ń`` → ``n``, ``ß`` → ``ss``, ``Ł`` → ``L``; other scripts untouched),
recorded in the index manifest as ``ascii_fold``.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import Stemmer

__all__ = ["Analyzer", "LUCENE_ENGLISH_STOPWORDS", "ascii_fold"]

# org.apache.lucene.analysis.en.EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
LUCENE_ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with".split()
)

# UAX #29 word boundaries, as Lucene's StandardTokenizer applies them, for the common cases: runs of
# letters/digits/underscore; letters joined across MidLetter/MidNumLet (. : ' ’ ·: "U.S.", "don't",
# "John's"); digits joined across MidNum/MidNumLet (, . ; ' ’: "1,346,000", "3.14").
_LETTER = r"[^\W\d_]"
_TOKEN_RE = re.compile(
    rf"\w+(?:(?:(?<={_LETTER})[.:'\u2019\u00b7](?={_LETTER})|(?<=\d)[,.;'\u2019](?=\d))\w+)*"
)


def ascii_fold(text: str) -> str:
    """Fold accents and other non-ASCII forms exactly as Lucene's ``ASCIIFoldingFilter`` does
    (``ń`` → ``n``, ``ß`` → ``ss``, ``ﬁ`` → ``fi``, ``“`` → ``"``); characters it leaves alone
    (other scripts) stay. The table is Lucene's own, generated from its jar (`_ascii_folding`)."""
    if text.isascii():
        return text
    from treegym.retrieval_index._ascii_folding import FOLD

    return text.translate(FOLD)


class Analyzer:
    """Callable text → list of index terms. Picklable, stateless apart from the stemmer's cache."""

    def __init__(self, *, stemmer: str | None = "porter", stopwords: Iterable[str] = LUCENE_ENGLISH_STOPWORDS,
                 ascii_fold: bool = False):
        self.stemmer_name = stemmer
        self.stopwords = frozenset(stopwords)
        self.ascii_fold = bool(ascii_fold)
        self._stemmer = Stemmer.Stemmer(stemmer, 100_000) if stemmer else None

    def __getstate__(self) -> dict:
        return {"stemmer_name": self.stemmer_name, "stopwords": self.stopwords, "ascii_fold": self.ascii_fold}

    def __setstate__(self, state: dict) -> None:
        self.__init__(stemmer=state["stemmer_name"], stopwords=state["stopwords"],
                      ascii_fold=state.get("ascii_fold", False))

    def params(self) -> dict:
        return {"stemmer": self.stemmer_name, "stopwords": "lucene-english" if self.stopwords ==
                LUCENE_ENGLISH_STOPWORDS else sorted(self.stopwords), "ascii_fold": self.ascii_fold}

    def words(self, text: str) -> list[str]:
        """Lower-cased, possessive-stripped, stop-word-filtered words (before stemming)."""
        stop = self.stopwords
        out = []
        text = text.lower()
        if self.ascii_fold:
            text = ascii_fold(text)
        for tok in _TOKEN_RE.findall(text):
            if tok.endswith(("'s", "\u2019s")):
                tok = tok[:-2]
            if tok and tok not in stop:
                out.append(tok)
        return out

    def stem(self, words: Sequence[str]) -> list[str]:
        return self._stemmer.stemWords(words) if self._stemmer is not None else list(words)

    def __call__(self, text: str) -> list[str]:
        return self.stem(self.words(text))
