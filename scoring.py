"""Answer metrics of the project (exact and lemma-based partial match) and its one lemmatiser."""
from __future__ import annotations

import importlib.util
import re
import string
import unicodedata
from collections import Counter
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


def lemmatizer_version() -> str:
    """The versions behind the partial metric's lemmas: spaCy's, and the pipeline's or the lookup tables'."""
    from importlib.metadata import PackageNotFoundError, version
    nlp, name = _load()
    try:
        tables = nlp.meta.get("version") if name != LOOKUP_NAME else version("spacy-lookups-data")
    except PackageNotFoundError:
        tables = "unknown"
    return f"spacy {spacy.__version__}; {'spacy-lookups-data' if name == LOOKUP_NAME else name} {tables}"


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


def _exact(prediction: str, answers: list[str]) -> bool:
    """exact_match on normalised texts."""
    return bool(prediction) and any(prediction == a for a in answers if a)


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _partial(prediction: tuple[str, ...], answers: list[tuple[str, ...]]) -> bool:
    """partial_match on lemma sequences."""
    return any(_contains(prediction, a) for a in answers)


def exact_match(prediction: str, answers: Iterable[str] | str) -> bool:
    """The normalised prediction equals some normalised answer."""
    return _exact(normalize(prediction or ""), [normalize(a) for a in _as_list(answers)])


def partial_match(prediction: str, answers: Iterable[str] | str) -> bool:
    """Some answer's lemma sequence is a contiguous span of the prediction's lemmas."""
    answers = _as_list(answers)
    table = _lemma_map([prediction or "", *answers])
    return _partial(table[prediction or ""], [table[a] for a in answers])


def upstream_matched(pred: list[str] | tuple[str, ...], gold: list[str] | tuple[str, ...]) -> bool:
    """Upstream's `utils.is_matched_str(pred, gold, birdirectional=True)`, token for token: gold's tokens
    joined equal a window of pred's, or pred's joined equal a window of gold's. So an empty sequence
    agrees with any non-empty one, and two empty ones do not agree."""
    if any(" ".join(gold) == " ".join(pred[i:i + len(gold)]) for i in range(len(pred))):
        return True
    return any(" ".join(pred) == " ".join(gold[i:i + len(pred)]) for i in range(len(gold)))


def answers_agree(greedy: str, samples: list[str]) -> list[bool]:
    """Whether each sampled answer agrees with the greedy one as upstream's confidence counts it: either
    answer's normalised lemmas contain the other's (`upstream_matched`). One batched lemmatiser call."""
    table = _lemma_map([greedy or "", *(s or "" for s in samples)])
    return [upstream_matched(table[greedy or ""], table[s or ""]) for s in samples]


def vote(keys: list[str]) -> tuple[int, float]:
    """The post-hoc majority vote over answers' keys (`normalize`d): (which answer it picks, the share of all the
    answers that have its key). The most frequent non-empty key wins (an empty answer votes only when all are
    empty); a tie goes to the earliest."""
    counts = Counter(k for k in keys if k) or Counter(keys)
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if counts.get(k, 0) == top), top / len(keys)


def score_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of `df` with boolean `exact` and `partial` from `prediction` and `answers`: exact_match and
    partial_match, with every distinct text normalised and lemmatised once (one nlp.pipe batch)."""
    out = df.copy()
    preds = [p if isinstance(p, str) else "" for p in out["prediction"]]
    answers = [_as_list(a) for a in out["answers"]]
    table = _lemma_map([*preds, *(a for row in answers for a in row)])
    norm = {t: normalize(t) for t in table}
    out["exact"] = [_exact(norm[p], [norm[a] for a in row]) for p, row in zip(preds, answers)]
    out["partial"] = [_partial(table[p], [table[a] for a in row]) for p, row in zip(preds, answers)]
    return out
