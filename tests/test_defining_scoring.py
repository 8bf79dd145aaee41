"""Defining behaviour of the answer metrics (scoring.py) beyond tests/test_scoring.py: what counts as punctuation
(ASCII punctuation and every Unicode punctuation character), and answers that are missing (None) rather than text."""
from __future__ import annotations

import pandas as pd

from scoring import exact_match, normalize, partial_match, score_frame


def test_unicode_punctuation_is_dropped_too():
    # « » — ¿ are punctuation (Unicode category P*) but not in string.punctuation
    assert normalize("«Paris» — ¿Lyon") == "paris lyon"
    assert exact_match("«Paris»", ["Paris"])


def test_ascii_punctuation_that_unicode_calls_a_symbol_is_dropped_too():
    # $ + < = > ^ ` | ~ are in string.punctuation but Unicode symbols (S*), not punctuation
    assert normalize("$5 + 3 = 8 | ~") == "5 3 8"
    assert exact_match("<Paris>", ["paris"])


def test_letters_digits_and_spaces_are_kept():
    assert normalize("Été 1999  à Paris") == "été 1999 à paris"


def test_a_missing_prediction_matches_nothing():
    assert not exact_match(None, ["Paris"]) and not partial_match(None, ["Paris"])
    out = score_frame(pd.DataFrame({"prediction": [None, "Paris"], "answers": [["Paris"], ["Paris"]]}))
    assert out["exact"].tolist() == [False, True] and out["partial"].tolist() == [False, True]
