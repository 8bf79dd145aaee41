"""Paired tests for comparing two methods on the same questions: the exact McNemar test on the discordant
questions, Holm's correction over a family of comparisons, and the flag for differences that rest on too few
discordant questions to draw as an interval."""
from __future__ import annotations

from math import comb
from typing import Sequence

FEW_DISCORDANT = 10  # below this many discordant questions an interval is flagged, not drawn


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(b, c) of McNemar's table: the questions only method A gets right, and those only method B gets right."""
    if len(a) != len(b):
        raise ValueError(f"paired results need the same questions: {len(a)} against {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: under no difference each of the b + c discordant questions is A's or B's with
    probability 1/2, so p = min(1, 2 P[X <= min(b, c)]) for X ~ Binomial(b + c, 1/2); 1 with none."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest of m is multiplied by m - k + 1,
    made monotone, and capped at 1. A comparison is separated at level a when its adjusted p is below a."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(adjusted_p: float, b: int, c: int, level: float = 0.05) -> str:
    """How a corrected comparison reads: separated (and which way), or not separated."""
    if adjusted_p >= level:
        return "not separated"
    return "better" if b > c else "worse"
