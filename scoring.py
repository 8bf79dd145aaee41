"""Answer metrics of the project (exact and lemma-based partial match) and its one lemmatiser."""
from __future__ import annotations

import importlib.util
import re
import string
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

import pandas as pd
import spacy
from spacy.language import Language

FULL_PIPELINES = ("en_core_web_lg", "en_core_web_sm")
LOOKUP_NAME = 'spacy.blank("en") + lookup lemmatizer (spacy-lookups-data)'
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")


@lru_cache(maxsize=1)
def _load() -> tuple[Language, str]:
    for name in FULL_PIPELINES:
        if spacy.util.is_package(name):
            # The rule lemmatiser needs the tagger's POS (via attribute_ruler), not the parser or NER.
            return spacy.load(name, exclude=["parser", "ner", "senter"]), name
    if importlib.util.find_spec("spacy_lookups_data") is None:
        raise RuntimeError("spaCy lemma tables missing: pip install spacy-lookups-data (or an en_core_web_* pipeline)")
    nlp = spacy.blank("en")
    nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
    nlp.initialize()
    return nlp, LOOKUP_NAME


def get_lemmatizer() -> Language:
    """The shared spaCy pipeline: a full English pipeline if installed, else the offline lookup one."""
    return _load()[0]


def lemmatizer_name() -> str:
    """Which lemmatiser `get_lemmatizer` uses, for logs and the validate tool."""
    return _load()[1]


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and a leading article, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    text = " ".join(text.split())
    return _ARTICLE.sub("", text)


def _lemma_map(texts: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Lemma sequence of each distinct text, in one nlp.pipe batch."""
    unique = list(dict.fromkeys(texts))
    docs = get_lemmatizer().pipe(t.lower() for t in unique)
    return {
        text: tuple(tok.lemma_ for tok in doc if not (tok.is_punct or tok.is_space))
        for text, doc in zip(unique, docs)
    }


def lemmas(text: str) -> list[str]:
    """Lemmas of the lower-cased text, punctuation and whitespace dropped."""
    return list(_lemma_map([text])[text])


def _as_list(answers: Iterable[str] | str | None) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    if isinstance(answers, Iterable):  # list, tuple, or the numpy array a feather column gives
        return [a for a in answers if isinstance(a, str)]
    return []


def exact_match(prediction: str, answers: Iterable[str] | str) -> bool:
    """The normalised prediction equals some normalised answer."""
    pred = normalize(prediction or "")
    return bool(pred) and any(pred == normalize(a) for a in _as_list(answers) if normalize(a))


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def partial_match(prediction: str, answers: Iterable[str] | str) -> bool:
    """Some answer's lemma sequence is a contiguous span of the prediction's lemmas."""
    answers = _as_list(answers)
    if not prediction or not answers:
        return False
    table = _lemma_map([prediction, *answers])
    return any(_contains(table[prediction], table[a]) for a in answers)


def same_answer(a: str, b: str) -> bool:
    """Two answers agree when their lemma sequences are equal."""
    table = _lemma_map([a or "", b or ""])
    return table[a or ""] == table[b or ""]


def score_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of `df` with boolean `exact` and `partial` from `prediction` and `answers`."""
    out = df.copy()
    preds = [p if isinstance(p, str) else "" for p in out["prediction"]]
    answers = [_as_list(a) for a in out["answers"]]
    table = _lemma_map([*preds, *(a for row in answers for a in row)])
    norm = {t: normalize(t) for t in table}
    out["exact"] = [
        bool(norm[p]) and any(norm[p] == norm[a] for a in row if norm[a]) for p, row in zip(preds, answers)
    ]
    out["partial"] = [bool(p) and any(_contains(table[p], table[a]) for a in row) for p, row in zip(preds, answers)]
    return out
