import numpy as np
import pandas as pd
import pytest

import scoring
from scoring import answers_agree, exact_match, lemmas, normalize, partial_match, score_frame, upstream_matched


def test_lemmatizer_is_named_and_lemmatises_inflections():
    assert scoring.lemmatizer_name()
    assert lemmas("Running cities was") == ["run", "city", "be"]


def test_lemmas_drop_punctuation_and_ignore_case():
    assert lemmas("  Paris! ") == ["paris"]
    assert lemmas("CITIES.") == ["city"]


def test_normalize():
    assert normalize("  The   Beatles! ") == "beatles"
    assert normalize("An Apple, a day.") == "apple a day"
    assert normalize("Don't") == "dont"
    assert normalize("Theatre") == "theatre"  # only a whole leading article goes


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Paris", ["paris"], True),
        ("Paris.", ["Paris"], True),
        ("PARIS!", ["paris"], True),
        ("The Beatles", ["beatles"], True),
        ("beatles", ["The Beatles"], True),
        ("Paris, France", ["Paris"], False),
        ("cities", ["city"], False),  # exact match does not lemmatise
        ("", ["Paris"], False),
        ("", [""], False),
        ("London", ["Paris", "London"], True),
    ],
)
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) is expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Paris", ["paris"], True),
        ("Paris!", ["Paris."], True),
        ("cities", ["city"], True),
        ("city", ["cities"], True),
        ("They speak Jamaican English mostly", ["jamaican english"], True),
        ("Jamaican Creole English", ["jamaican english"], False),  # not a contiguous span
        ("English Jamaican", ["jamaican english"], False),  # order matters
        ("Parisian", ["Paris"], False),  # whole tokens, not substrings
        ("", ["Paris"], False),
        ("Paris", [""], False),  # empty answers are ignored
        ("Paris", ["", "paris"], True),
        ("Lyon", ["Paris", "Lyon"], True),
        ("Lyon", [], False),
    ],
)
def test_partial_match(prediction, answers, expected):
    assert partial_match(prediction, answers) is expected


def test_answers_agree_as_upstream_confidence_counts():
    # either answer's lemmas contain the other's (upstream's is_matched_str, bidirectional)
    assert answers_agree("Paris", ["Paris, France", "paris", "France, Paris", "London", "Parisian"]) == [
        True, True, True, False, False]
    assert answers_agree("Paris, France", ["Paris", "France", "Lyon, France"]) == [True, True, False]
    assert answers_agree("Cities", ["city.", "the city"]) == [True, True]
    # an empty greedy answer agrees with every non-empty sample, and an empty sample with any greedy answer;
    # two empty answers do not agree
    assert answers_agree("", ["Paris", "", "!"]) == [True, False, False]
    assert answers_agree("Paris", [""]) == [True]


def test_upstream_matched_is_upstreams_is_matched_str():
    def is_matched_str(pred_tokens, gold_tokens, birdirectional=True):  # upstream utils.py, verbatim
        if any(" ".join(gold_tokens) == " ".join(pred_tokens[i:i+len(gold_tokens)]) for i in range(len(pred_tokens))):
            return True
        elif birdirectional and any(" ".join(pred_tokens) == " ".join(gold_tokens[i:i+len(pred_tokens)]) for i in range(len(gold_tokens))):
            return True
        return False
    seqs = [[], ["a"], ["b"], ["a", "b"], ["b", "a"], ["a", "b", "c"], ["c", "a", "b"], ["a b"], ["a", "c"]]
    for pred in seqs:
        for gold in seqs:
            assert upstream_matched(pred, gold) == is_matched_str(pred, gold), (pred, gold)


def test_score_frame_adds_columns_and_leaves_input_alone():
    df = pd.DataFrame(
        {
            "prediction": ["Paris.", "It is Paris", "cities", "", "London"],
            # feather gives numpy arrays for list columns
            "answers": [np.array(["Paris"]), ["paris"], ["city"], ["Paris"], ["Paris"]],
            "other": [1, 2, 3, 4, 5],
        }
    )
    out = score_frame(df)
    assert out["exact"].tolist() == [True, False, False, False, False]
    assert out["partial"].tolist() == [True, True, True, False, False]
    assert out["exact"].dtype == bool and out["partial"].dtype == bool
    assert out["other"].tolist() == [1, 2, 3, 4, 5]
    assert "exact" not in df.columns


def test_score_frame_agrees_with_row_functions():
    df = pd.DataFrame(
        {
            "prediction": ["They speak Jamaican English mostly", "The Beatles", "Jamaican Creole English"],
            "answers": [["jamaican english"], ["beatles"], ["jamaican english"]],
        }
    )
    out = score_frame(df)
    assert out["exact"].tolist() == [exact_match(p, a) for p, a in zip(df["prediction"], df["answers"])]
    assert out["partial"].tolist() == [partial_match(p, a) for p, a in zip(df["prediction"], df["answers"])]


def test_missing_lookup_tables_say_what_to_install(monkeypatch):
    monkeypatch.setattr(scoring.spacy.util, "is_package", lambda name: False)
    monkeypatch.setattr(scoring.importlib.util, "find_spec", lambda name: None)
    scoring._load.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install spacy-lookups-data"):
            scoring.get_lemmatizer()
    finally:
        monkeypatch.undo()
        scoring._load.cache_clear()
    assert lemmas("cities") == ["city"]
