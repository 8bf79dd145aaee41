"""How well the rows' confidence tells their correctness: equal-mass bins, ECE, AUROC and Brier with their
intervals over questions, and the reliability diagram's points."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from constants import CALIBRATION_BINS
from self_ensemble.stats import cluster_draws

CALIBRATION = {"ECE": "ece", "AUROC": "auroc", "Brier": "brier"}  # of the rows' `confidence`, for correctness


def calibration_bins(confidence: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Each row's bin among `bins` equal-mass ones: its rank in confidence order times bins / rows, where rows of
    equal confidence share the rank of the first of them (one bin), so ties never split across bins."""
    ordered = np.sort(confidence)
    first = np.searchsorted(ordered, confidence, side="left")
    return first * bins // len(confidence)


def ece(confidence: np.ndarray, right: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: over equal-mass bins, the row-weighted mean |accuracy - mean confidence|."""
    gap = np.bincount(calibration_bins(confidence, bins), right - confidence, minlength=bins)  # per bin: the sum
    return float(np.abs(gap).sum() / len(confidence))


def auroc(confidence: np.ndarray, right: np.ndarray) -> float:
    """The probability that a right row has a higher confidence than a wrong one (ties count half): the
    Mann-Whitney statistic from average ranks; NaN when all rows are right or all wrong."""
    positive = right > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(confidence, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based ranks, ties averaged
    return float((average_rank[inverse][positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier(confidence: np.ndarray, right: np.ndarray) -> float:
    """The Brier score: the mean squared difference between confidence and correctness (0 or 1)."""
    return float(np.mean((confidence - right) ** 2))


def calibration(rows: pd.DataFrame, metric: str) -> dict[str, tuple[float, float, float] | None]:
    """ECE, AUROC and Brier of the rows' `confidence` for their correctness on `metric`, each (value, low, high)
    with its 95% interval by resampling questions (`cluster_draws`); None where no row has a confidence."""
    if "confidence" not in rows.columns or rows["confidence"].isna().all():
        return dict.fromkeys(CALIBRATION)
    known = rows.dropna(subset=["confidence"])
    conf, right = known["confidence"].to_numpy(dtype=float), known[metric].to_numpy(dtype=float)
    scores = {"ECE": ece, "AUROC": auroc, "Brier": brier}
    draws = np.array([[score(conf[d], right[d]) for score in scores.values()]
                      for d in cluster_draws(known["uuid"].to_numpy())])
    with warnings.catch_warnings():  # AUROC is NaN in a draw (or all) with only right or only wrong rows
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(draws, 2.5, axis=0), np.nanpercentile(draws, 97.5, axis=0)
    values = {name: score(conf, right) for name, score in scores.items()}
    return {name: None if math.isnan(v) else (v, float(lo), float(hi))
            for (name, v), lo, hi in zip(values.items(), low, high)}


def reliability_points(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per equal-mass bin of the rows' confidence (`calibration_bins`): its mean confidence and its accuracy."""
    known = rows.dropna(subset=["confidence"])
    conf = known["confidence"].to_numpy(dtype=float)
    frame = pd.DataFrame({"bin": calibration_bins(conf), "confidence": conf,
                          "accuracy": known[metric].to_numpy(dtype=float)})
    return frame.groupby("bin").mean()
