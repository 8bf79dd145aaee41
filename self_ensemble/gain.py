"""Where an ensemble's gain comes from, against its own single prompts: per row its singles' scores, their
consistency and the attention share; per group new / kept / lost and the accuracy by consistency bin."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from self_ensemble.groups import Analysis, Group, run_count, sample_std
from self_ensemble.labels import is_missing
from self_ensemble.stats import BINS, bin_labels, bin_of, jaccard, pair_share


def row_stats(rows: pd.DataFrame, lines: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per row with single prompts: uuid, sample_index, `right` (its score), its singles' mean / any / all score,
    `consistency` (share of equal pairs of their keys), `jaccard`, and from `attention_share` (when recorded)
    `share_entropy` and `follows_top` (see `attention_stats`)."""
    by_row = lines.groupby("row")
    stats = by_row[metric].agg(single_mean="mean", single_any="max", single_all="min").astype(float)
    keys = by_row["key"].agg(list)
    stats = stats.assign(consistency=keys.map(pair_share), jaccard=keys.map(jaccard))
    base = pd.DataFrame({"uuid": rows["uuid"].to_numpy(), "right": rows[metric].astype(float).to_numpy(),
                         "sample_index": rows["sample_index"].to_numpy() if "sample_index" in rows.columns else 0})
    stats = base.join(stats, how="inner")
    if "attention_share" in rows.columns:
        stats = stats.join(attention_stats(rows, lines), how="left")
    return stats


def attention_stats(rows: pd.DataFrame, lines: pd.DataFrame) -> pd.DataFrame:
    """Per row with an `attention_share` (per generated token: prefix, paraphrase 1..N, suffix): the normalised
    entropy of the mean paraphrase share (0 = one paraphrase, 1 = even), and whether the fused answer equals
    (normalised) the single answer of the paraphrase with the largest mean share."""
    from scoring import normalize
    out = {}
    keys = lines.set_index(["row", "pos"])["key"]
    for r, share, pred in zip(range(len(rows)), rows["attention_share"], rows["prediction"]):
        if is_missing(share) or len(share) == 0:
            continue
        mean = np.stack([np.asarray(s, dtype=float) for s in share]).mean(axis=0)[1:-1]
        p = mean / mean.sum() if mean.sum() > 0 else np.full(len(mean), 1 / len(mean))
        entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum() / math.log(len(p))) if len(p) > 1 else 0.0
        top = keys.get((r, int(mean.argmax())))
        follows = float("nan") if top is None else float(normalize(pred if isinstance(pred, str) else "") == top)
        out[r] = {"share_entropy": entropy, "follows_top": follows}
    return pd.DataFrame.from_dict(out, orient="index", columns=["share_entropy", "follows_top"])


def as_count(value: float) -> int | float:
    """A count as an int when it is whole (a sampled run's mean over samples need not be)."""
    return int(value) if float(value).is_integer() else float(value)


def binned_scores(stats: pd.DataFrame, by: str, value: str, span: tuple[float, float] = (0.0, 1.0)) -> pd.DataFrame:
    """Per bin of `by` (over `span`): the mean of `value` and `n`, the questions in it (rows over samples)."""
    samples = run_count(stats) / stats["uuid"].nunique()
    binned = stats.groupby(bin_of(stats[by], *span))[value].agg(value="mean", n="size")
    return binned.assign(n=binned["n"] / samples)


def gain_row(group: Group) -> dict:
    """Where a group's answers come from, against its own single prompts: new / kept / lost counts (means over
    a sampled run's samples, summed over questions), consistency, Jaccard, AND/OR match, accuracy by bin."""
    s = group.stats
    right, any_right = s["right"] > 0.5, s["single_any"] > 0.5
    flags = pd.DataFrame({"uuid": s["uuid"], "new": right & ~any_right, "kept": right & any_right,
                          "lost": ~right & (s["single_mean"] > 0.5)}).groupby("uuid").mean()
    per_q = s.groupby("uuid")[["right", "single_mean", "single_all", "single_any", "consistency", "jaccard"]].mean()
    row = {"method": group.label, "N": group.n, "questions": len(per_q), "samples": as_count(run_count(s) / len(per_q)),
           "accuracy": per_q["right"].mean(), "sample std": sample_std(s, "right"),
           "single mean": per_q["single_mean"].mean(), "AND": per_q["single_all"].mean(),
           "OR": per_q["single_any"].mean(), **{k: as_count(v) for k, v in flags.sum().items()},
           "consistency": per_q["consistency"].mean(), "jaccard": per_q["jaccard"].mean()}
    if "follows_top" in s.columns:
        row["follows top share"] = s["follows_top"].mean()
    binned = binned_scores(s, "consistency", "right").reindex(range(BINS))
    for i, name in enumerate(bin_labels()):
        row[f"acc {name}"], row[f"n {name}"] = binned["value"].iloc[i], as_count(binned["n"].fillna(0).iloc[i])
    return row


def gain_table(analysis: Analysis) -> pd.DataFrame:
    """One row per ensemble label and N that has single prompts to compare with (`gain_row`)."""
    return pd.DataFrame([gain_row(g) for g in analysis.ensembles if g.stats is not None and not g.stats.empty])
