"""The report's statistics: bootstrap intervals over questions, paired differences, rows resampled by question,
how much answers agree, equal bins over [0, 1]."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

BOOTSTRAP_SAMPLES = 2000
BINS = 5  # consistency and entropy bins over [0, 1]


def bootstrap(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` (one per question), resampling questions."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired(scores: pd.Series, reference: pd.Series | None) -> tuple[float, float, float] | None:
    """The mean per-question difference over the questions both have, with its 95% interval; None without any."""
    if reference is None:
        return None
    both = scores.index.intersection(reference.index)
    if len(both) == 0:
        return None
    diff = (scores[both] - reference[both]).to_numpy(dtype=float)
    return (float(diff.mean()), *bootstrap(diff))


def cluster_draws(uuids: np.ndarray, seed: int = 0) -> Iterator[np.ndarray]:
    """BOOTSTRAP_SAMPLES resamples of rows by question: each draw picks questions with replacement and takes all of
    their rows (a per_prompt or sampled table has several rows per question). Yields row indices per draw."""
    codes = pd.factorize(uuids)[0]
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.cumsum(counts) - counts
    rng = np.random.default_rng(seed)
    for draw in rng.integers(0, len(counts), (BOOTSTRAP_SAMPLES, len(counts))):
        c = counts[draw]
        offsets = np.repeat(starts[draw] - (np.cumsum(c) - c), c)  # row j of the draw: its question's start + rank
        yield order[offsets + np.arange(c.sum())]


def per_prompt_reference(per_prompt: pd.DataFrame | None, n: int, metric: str) -> tuple[pd.Series, pd.Series] | None:
    """Per question: the mean and the any() of the first n single prompts' scores."""
    if per_prompt is None:
        return None
    first = per_prompt[per_prompt["paraphrase_index"] < n].groupby("uuid")[metric]
    return first.mean(), first.max().astype(float)


def mean_pairwise(items: Sequence, same: Callable[[object, object], float]) -> float:
    """The mean of same(a, b) over all pairs of items; 1.0 with fewer than two."""
    values = [same(a, b) for i, a in enumerate(items) for b in items[i + 1:]]
    return float(np.mean(values)) if values else 1.0


def pair_share(keys: Sequence[str]) -> float:
    """Consistency: the share of pairs of (normalised) answers that are equal."""
    return mean_pairwise(keys, lambda a, b: float(a == b))


def jaccard(keys: Sequence[str]) -> float:
    """The mean pairwise Jaccard overlap of the answers' token sets (two empty answers overlap fully)."""
    return mean_pairwise([set(k.split()) for k in keys], lambda a, b: len(a & b) / len(a | b) if a | b else 1.0)


def agreement(per_prompt: pd.DataFrame, n: int) -> pd.Series:
    """Per question: the share of pairs among its first n single-prompt answers that are the same answer."""
    from scoring import normalize
    first = per_prompt[per_prompt["paraphrase_index"] < n]
    return first.groupby("uuid")["prediction"].agg(lambda p: pair_share([normalize(x or "") for x in p]))


def bin_of(values: pd.Series, lo: float = 0.0, hi: float = 1.0) -> pd.Series:
    """The bin of each value among BINS equal ones over [lo, hi] (hi in the last)."""
    return np.clip(np.floor((values.astype(float) - lo) / (hi - lo) * BINS + 1e-9), 0, BINS - 1).astype(int)


def bin_labels(lo: float = 0.0, hi: float = 1.0) -> list[str]:
    """The names of the BINS equal bins over [lo, hi]: 0–0.2, 0.2–0.4, ..."""
    edges = np.linspace(lo, hi, BINS + 1).round(3)
    return [f"{a:g}–{b:g}" for a, b in zip(edges[:-1], edges[1:])]
