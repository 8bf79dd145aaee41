"""The report's rows as groups: a `Group` per method label and N of a table, the `Analysis` they make up, and each
group's summary (accuracy, cost; mean, best and oracle for per_prompt)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from constants import LOGIT_METHODS
from self_ensemble.labels import SINGLE_METHODS, row_labels, table_design
from self_ensemble.reading import scored

METHOD_ORDER = (*LOGIT_METHODS, "vote", "flex_attention")


@dataclass
class Group:
    """The rows of one method label and N from one table, with what they are compared against."""
    label: str
    n: int
    rows: pd.DataFrame             # the table's rows, index 0..len-1
    file: str
    design: tuple[str, ...] = ()
    singles: pd.DataFrame | None = None  # the single prompts behind each row (`singles`)
    stats: pd.DataFrame | None = None    # per row: right, its singles' mean/any/all, consistency... (`row_stats`)
    vote: str | None = None              # the label of the vote over the same selections

    @property
    def method(self) -> str:
        return str(self.rows["method"].iloc[0])

    @property
    def key(self) -> tuple[str, int]:
        return self.label, self.n

    @property
    def ensemble(self) -> bool:
        return self.method not in SINGLE_METHODS


@dataclass
class Analysis:
    """Everything the report is made of: the report table, the groups behind its rows, the per_prompt table."""
    report: pd.DataFrame
    groups: list[Group]
    per_prompt: pd.DataFrame | None
    metric: str

    @property
    def scores(self) -> dict[tuple[str, int], pd.Series]:
        """Per (label, N): the per-question score on the metric (the mean over a sampled run's samples)."""
        return {g.key: question_scores(g.rows, self.metric) for g in self.groups}

    @property
    def ensembles(self) -> list[Group]:
        return [g for g in self.groups if g.ensemble]


def question_scores(rows: pd.DataFrame, column: str) -> pd.Series:
    """Per question (uuid): the mean of `column` over its rows (over a sampled run's samples)."""
    return rows.groupby("uuid", sort=False)[column].mean().astype(float)


def table_groups(path: Path, df: pd.DataFrame, taken: set) -> list[Group]:
    """A table's rows by label and N; a (label, N) another table already has is told apart by the file name."""
    df = scored(df)
    df = df.assign(label=row_labels(df))
    if (df["method"] == "per_prompt").all():  # every paraphrase of each question: one group, N the most
        df = df.assign(num_ensemble=int(df.groupby("uuid").size().max()))
    groups, design = [], table_design(df)
    for (label, n), rows in df.groupby(["label", "num_ensemble"], sort=False):
        label = label if (label, int(n)) not in taken else f"{label} ({path.stem})"
        taken.add((label, int(n)))
        groups.append(Group(label, int(n), rows.reset_index(drop=True), path.name, design))
    return groups


def in_report_order(groups: list[Group]) -> list[Group]:
    """The groups in the report's order: by method (METHOD_ORDER, any other last), N, the defaults before the
    variants, then label."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(groups, key=lambda g: (rank.get(g.method, len(rank)), g.n, g.label != g.method, g.label))


def cost_tokens(df: pd.DataFrame) -> pd.Series:
    """Per row the tokens run through the model: prompt_tokens + decode_tokens when recorded, else new_tokens."""
    if {"prompt_tokens", "decode_tokens"} <= set(df.columns):
        return df["prompt_tokens"].fillna(0) + df["decode_tokens"].fillna(0)
    return df["new_tokens"]


def run_count(group: pd.DataFrame) -> int:
    """Questions times samples: what one run of the method answers."""
    return len(group[["uuid", *(["sample_index"] if "sample_index" in group.columns else [])]].drop_duplicates())


def sample_std(frame: pd.DataFrame, column: str) -> float:
    """The spread of the accuracy across the samples of a sampled run (std of the per-sample mean), else NaN."""
    if "sample_index" not in frame.columns or frame["sample_index"].nunique() < 2:
        return float("nan")
    return float(frame.groupby("sample_index")[column].mean().std(ddof=1))


def summary_row(group: pd.DataFrame, metric: str) -> dict:
    """A group's report row before its intervals: questions, both accuracies, the sample std on `metric`, the
    cost per question, and for per_prompt the mean, best and oracle over its paraphrases."""
    questions, runs = group["uuid"].nunique(), run_count(group)
    seconds = group["seconds"].sum() / runs
    if "confidence_seconds" in group.columns:  # the weighted methods' confidences are part of their cost
        seconds += group.drop_duplicates("uuid")["confidence_seconds"].fillna(0).sum() / questions
    row = {
        "questions": questions,
        "exact": group["exact"].mean(),
        "partial": group["partial"].mean(),
        "sample std": sample_std(group, metric),
        "seconds/question": seconds,
        "tokens/question": group["new_tokens"].sum() / runs,
        "model tokens/question": cost_tokens(group).sum() / runs,
    }
    if (group["method"] == "per_prompt").all():
        per_index = group.groupby("paraphrase_index")[metric].mean()
        row.update(mean=per_index.mean(), best=per_index.max(), oracle=group.groupby("uuid")[metric].any().mean())
    return row
