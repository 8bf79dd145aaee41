"""The paired tests, against hand-computed cases."""
from __future__ import annotations

import pytest

from significance import FEW_DISCORDANT, discordant, holm, mcnemar_exact, verdict


def test_discordant_counts_the_questions_only_one_method_gets_right():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    assert discordant(a, b) == (2, 1)
    with pytest.raises(ValueError, match="same questions"):
        discordant(a, b[:4])


@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),                  # nothing discordant: no evidence at all
    (0, 5, 2 / 32),               # all five one way: 2 * (1/2)^5
    (1, 9, 2 * (1 + 10) / 1024),  # P[X <= 1] = (C(10,0) + C(10,1)) / 2^10
    (9, 1, 2 * (1 + 10) / 1024),  # symmetric
    (3, 3, 1.0),                  # 2 * P[X <= 3] of Binomial(6, 1/2) = 2 * 42/64 > 1: capped
    (2, 4, 2 * (1 + 6 + 15) / 64)])
def test_mcnemar_exact_is_the_two_sided_binomial_tail(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_holm_multiplies_step_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_verdict_names_the_direction_only_when_separated():
    assert verdict(0.01, 12, 3) == "better" and verdict(0.01, 3, 12) == "worse"
    assert verdict(0.05, 12, 3) == "not separated" and FEW_DISCORDANT == 10
