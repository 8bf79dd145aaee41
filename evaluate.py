"""Summarise the result tables of a run: accuracy, cost, the post-hoc vote, where the gain comes from, figures.

python evaluate.py --results-dir DIR [--output-dir DIR2] [--metric partial|exact]
python evaluate.py --choose DIR1 DIR2 [...] --output-dir DIR3 [--metric ...]   # the protocol's pick (pick.json)
python evaluate.py --study DIR1 DIR2 [...] --output-dir DIR3 [--pick PICK] [--metric ...]   # dev sets side by side

Writes report.md/.csv/.png/.pdf, gain.md/.csv and questions.csv; docs/report.md describes every column.
"""
from __future__ import annotations

import cli  # noqa: F401 - first: Ctrl-C while the modules load is one line (exit 130)
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from constants import (CALIBRATION_BINS, DEFAULT_FEWSHOT_FORMAT, DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE,
                       DEFAULT_POSITIONS, DEFAULT_SC_PROMPTS, DEFAULT_SC_TEMPERATURE, DEFAULT_SC_TOP_P, EXIT_BAD_INPUT,
                       LOGIT_METHODS, InputError)
from cli import OneLineParser
from files import atomic_write, check_writable_dir
from results import read_settings
from significance import FEW_DISCORDANT

REQUIRED_COLUMNS = (
    "uuid", "answers", "prediction", "seconds", "new_tokens", "method", "num_ensemble", "paraphrase_index",
)
# flex_attention settings: those that differ from the defaults are part of the label (attn_backend only in the map)
VARIANT_DEFAULTS = {"positions": DEFAULT_POSITIONS, "fusion_bias": DEFAULT_FUSION_BIAS,
                    "fusion_temperature": DEFAULT_FUSION_TEMPERATURE, "fewshot_format": DEFAULT_FEWSHOT_FORMAT,
                    "isolation": "full", "beside": "none", "beside_weight": None,  # the last: only with a beside
                    "sc_prompts": DEFAULT_SC_PROMPTS, "sc_temperature": DEFAULT_SC_TEMPERATURE,
                    "sc_top_p": DEFAULT_SC_TOP_P}  # self-consistency's sampling
NUMERIC_TAGS = {"fusion_temperature": "t", "sc_temperature": "t", "sc_top_p": "p"}  # a number in a label: t0.7
EXTRA_COLUMNS = (*VARIANT_DEFAULTS, "attn_backend")
REQUIRED_SETTINGS = ("positions", "fusion_bias", "fusion_temperature", "fewshot_format")  # always in the label map
POSITION_ALIASES = {"aligned": "left"}  # flex_attention_generate.py runs --positions aligned as left
SHORT_NAMES = {"flex_attention": "flex", "self_consistency": "sc"}  # the method's name in a label with settings
SELF_CONSISTENCY = "self_consistency"
SINGLE_METHODS = ("per_prompt", "origin")  # one prompt per answer: no vote, no gain analysis
BOOTSTRAP_SAMPLES = 2000
BINS = 5  # consistency and entropy bins over [0, 1]
METHOD_ORDER = (*LOGIT_METHODS, "vote", "flex_attention")
CALIBRATION = {"ECE": "ece", "AUROC": "auroc", "Brier": "brier"}  # of the rows' `confidence`, for correctness
REPORT_COLUMNS = (
    "method", "N", "questions", "exact", "partial", "95% CI", "sample std", "vs avg", "vs vote",
    "vs per-prompt mean", "oracle gap closed", "seconds/question", "tokens/question", "model tokens/question",
    *CALIBRATION, "mean", "best", "oracle", "file",
)
INTERVALS = {"95% CI": "ci", "vs avg": "vs_avg", "vs vote": "vs_vote", "vs per-prompt mean": "vs_mean", **CALIBRATION}
CSV_COLUMNS = (
    "method", "N", "questions", "exact", "partial", "ci_low", "ci_high", "sample std",
    *(f"{name}{end}" for name in list(INTERVALS.values())[1:] for end in ("", "_low", "_high")),
    *(c for c in REPORT_COLUMNS[REPORT_COLUMNS.index("oracle gap closed"):] if c not in CALIBRATION),
)
HEADER = (
    "Accuracy is the share of rows judged correct. mean/best/oracle are per_prompt only: mean over paraphrases, "
    "best single paraphrase index, oracle = any paraphrase correct. vote: the majority of the N single answers "
    "(per_prompt, same paraphrases as the rows it is compared with), no decoding. On the report's metric "
    "({metric}): 95% CI of the accuracy by bootstrap over questions; sample std: spread of the accuracy across "
    "the samples of a sampled run; vs avg / vs vote / vs per-prompt mean: the paired difference with logit avg "
    "and with the vote at the same N and paraphrase selection, and with the mean of the same single prompts, each "
    "question counted once, with its 95% bootstrap interval; oracle gap closed: (accuracy - per-prompt mean) / "
    "(oracle - per-prompt mean) over the same paraphrases. model tokens/question: tokens run through the model "
    f"(prompt + decode) per question and sample. ECE ({CALIBRATION_BINS} equal-mass bins), AUROC and Brier: how well "
    "each row's confidence (its answer's probability under the distribution that chose it; for the vote and "
    "self_consistency the vote's share) tells its {metric} correctness, with 95% bootstrap intervals over questions."
)
SINGLE_COLUMNS = ("prediction", "key", "exact", "partial", "seconds", "new_tokens", "prompt_tokens", "decode_tokens",
                  "answer_logprob")
COST_COLUMNS = ("seconds", "new_tokens", "prompt_tokens", "decode_tokens")


LEGACY_CACHE_NAMES = ("confidence.feather",)  # where earlier versions kept the confidence cache


def is_result_table(path: Path) -> bool:
    """A result table is a `*.feather` file directly in the results folder; not a hidden or temporary file,
    a partial one, or an earlier version's confidence cache (today's lives in confidence-cache/)."""
    return (path.suffix == ".feather" and path.is_file() and not path.name.startswith(".")
            and ".partial" not in path.name and path.name not in LEGACY_CACHE_NAMES)


def _result_files(results_dir: Path) -> list[Path]:
    if not results_dir.exists():
        raise InputError(f"results dir not found: {results_dir}")
    if not results_dir.is_dir():
        raise InputError(f"--results-dir {results_dir}: is a file, not a folder")
    files = sorted(p for p in results_dir.glob("*.feather") if is_result_table(p))
    if not files:
        raise InputError(f"no result tables (*.feather) in {results_dir}")
    return files


def _read_table(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_feather(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input, reported in one line
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}".replace("\n", " ")) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {', '.join(missing)}")
    if df.empty:
        raise InputError(f"{path}: no rows (an empty table); delete it or run its command again")
    return df


# ---------------------------------------------------------------------------------------------- labels

def _missing(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(np.ndim(value) == 0 and pd.isna(value)))


def _setting(column: str, value) -> str | None:
    """One flex_attention setting as it appears in a label (as in the file name), None for the default."""
    if _missing(value):
        return None
    if column in NUMERIC_TAGS:
        return None if float(value) == VARIANT_DEFAULTS[column] else f"{NUMERIC_TAGS[column]}{float(value):g}"
    value = POSITION_ALIASES.get(value, value) if column == "positions" else value
    if value == VARIANT_DEFAULTS[column]:
        return None
    if column == "beside_weight":
        return f"w{float(value):g}"
    return {"fusion_bias": f"bias_{value}", "fewshot_format": f"fewshot_{value}", "isolation": f"isolation_{value}",
            "beside": f"beside_{value}"}.get(column, str(value))


def _indices(value, n: int) -> list[int]:
    """A row's paraphrase indices: its `paraphrase_indices` when recorded, else the first n."""
    return list(range(n)) if _missing(value) else [int(i) for i in value]


def selections(rows: pd.DataFrame, n: int) -> list[list[int]]:
    """The paraphrase indices each row used: column `paraphrase_indices` when the table has it, else 0..n-1."""
    if "paraphrase_indices" not in rows.columns:
        return [list(range(n)) for _ in range(len(rows))]
    return [_indices(v, n) for v in rows["paraphrase_indices"]]


def _design(df: pd.DataFrame) -> tuple[str, ...]:
    """How a table chose its paraphrases, part of its label: S<k> for k samples per question (`sample_index`),
    repeat when every row repeats one paraphrase; nothing for the first N."""
    if df["method"].isin(SINGLE_METHODS).all():
        return ()
    tags = [f"S{df['sample_index'].nunique()}"] if "sample_index" in df.columns else []
    if "paraphrase_indices" in df.columns:
        picked = [_indices(v, n) for v, n in zip(df["paraphrase_indices"], df["num_ensemble"])]
        if all(len(i) > 1 and len(set(i)) == 1 for i in picked):
            tags.append("repeat")
    return tuple(tags)


def _with_tags(method: str, tags: Sequence[str]) -> str:
    """`method` when nothing differs from the defaults, else its short name with the tags: flex[right,t0.7]."""
    return f"{SHORT_NAMES.get(method, method)}[{','.join(tags)}]" if tags else method


def _labels(df: pd.DataFrame) -> list[str]:
    """Per row its method label: the non-default flex_attention or self-consistency settings (K samples named where
    K is not N) and the table's paraphrase design."""
    design = _design(df)
    settings = [(c, df[c].tolist()) for c in VARIANT_DEFAULTS if c in df.columns]
    samples = df["sc_samples"].tolist() if "sc_samples" in df.columns else [None] * len(df)
    return [_with_tags(str(method), [s for c, values in settings if (s := _setting(c, values[i])) is not None]
                       + _samples_tag(samples[i], n) + list(design))
            for i, (method, n) in enumerate(zip(df["method"], df["num_ensemble"]))]


def _samples_tag(samples, n: int) -> list[str]:
    """k<K> when self-consistency sampled K answers for another N than K (K = N is its default)."""
    return [] if _missing(samples) or int(samples) == int(n) else [f"k{int(samples)}"]


def _warn(line: str) -> None:
    from files import printable
    print(printable(f"evaluate.py: warning: {line}"), file=sys.stderr)


def _row_keys(df: pd.DataFrame) -> list[str]:
    """What makes a row one of its question's rows (results.row_key): uuid, paraphrase and sample."""
    return ["uuid", "paraphrase_index", *(["sample_index"] if "sample_index" in df.columns else [])]


def _without_duplicates(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    """A table whose rows repeat (the same question, paraphrase and sample twice: files concatenated by hand) is
    counted once per row, with a warning line; copies that disagree on the answer cannot be counted: InputError."""
    keys = _row_keys(df)
    copies = df.astype({"uuid": str}).duplicated(keys, keep=False)
    if not copies.any():
        return df
    answers = df[copies].astype({"uuid": str}).groupby(keys, dropna=False)["prediction"].nunique(dropna=False)
    if (answers > 1).any():
        raise InputError(f"{path}: {int((answers > 1).sum())} rows appear twice with different answers (same "
                         f"{', '.join(keys)}); keep one copy of each, or rerun its command into a new folder")
    extra = int(df.astype({"uuid": str}).duplicated(keys).sum())
    _warn(f"{path.name}: {extra} duplicated rows (same {', '.join(keys)}) counted once")
    return df[~df.astype({"uuid": str}).duplicated(keys)].reset_index(drop=True)


def _warn_mixed_questions(tables: list[tuple[Path, pd.DataFrame]]) -> None:
    """One warning line when the report's tables do not cover the same questions of the same data: their rows
    are put side by side, but their accuracies are not comparable."""
    questions = {path.name: frozenset(df["uuid"].astype(str)) for path, df in tables}
    data = {path.name: tuple((read_settings(path) or {}).get(k) for k in ("dataset", "data")) for path, _ in tables}
    data = {name: source for name, source in data.items() if source != (None, None)}  # tables without settings
    kinds = [what for what, values in (("question sets", questions), ("datasets", data))
             if len(set(values.values())) > 1]
    if kinds:
        sizes = ", ".join(f"{name}: {len(q)}" for name, q in list(questions.items())[:4])
        _warn(f"the tables cover different {' and '.join(kinds)} (questions per table: {sizes}"
              f"{', ...' if len(questions) > 4 else ''}); their accuracies are not comparable")


# ---------------------------------------------------------------------------------------------- groups

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
    return rows.groupby("uuid", sort=False)[column].mean().astype(float)


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    if not ({"exact", "partial"} <= set(df.columns) and df[["exact", "partial"]].notna().all().all()):
        from scoring import score_frame  # spaCy loads only when a table lacks scores

        df = score_frame(df)
    return df.assign(exact=df["exact"].astype(bool), partial=df["partial"].astype(bool))


def _table_groups(path: Path, df: pd.DataFrame, taken: set) -> list[Group]:
    """A table's rows by label and N; a (label, N) another table already has is told apart by the file name."""
    df = _scored(df)
    df = df.assign(label=_labels(df))
    if (df["method"] == "per_prompt").all():  # every paraphrase of each question: one group, N the most
        df = df.assign(num_ensemble=int(df.groupby("uuid").size().max()))
    groups, design = [], _design(df)
    for (label, n), rows in df.groupby(["label", "num_ensemble"], sort=False):
        label = label if (label, int(n)) not in taken else f"{label} ({path.stem})"
        taken.add((label, int(n)))
        groups.append(Group(label, int(n), rows.reset_index(drop=True), path.name, design))
    return groups


def _order(groups: list[Group]) -> list[Group]:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(groups, key=lambda g: (rank.get(g.method, len(rank)), g.n, g.label != g.method, g.label))


def cost_tokens(df: pd.DataFrame) -> pd.Series:
    """Per row the tokens run through the model: prompt_tokens + decode_tokens when recorded, else new_tokens."""
    if {"prompt_tokens", "decode_tokens"} <= set(df.columns):
        return df["prompt_tokens"].fillna(0) + df["decode_tokens"].fillna(0)
    return df["new_tokens"]


def _runs(group: pd.DataFrame) -> int:
    """Questions times samples: what one run of the method answers."""
    return len(group[["uuid", *(["sample_index"] if "sample_index" in group.columns else [])]].drop_duplicates())


def sample_std(frame: pd.DataFrame, column: str) -> float:
    """The spread of the accuracy across the samples of a sampled run (std of the per-sample mean), else NaN."""
    if "sample_index" not in frame.columns or frame["sample_index"].nunique() < 2:
        return float("nan")
    return float(frame.groupby("sample_index")[column].mean().std(ddof=1))


def _summarise(group: pd.DataFrame, metric: str) -> dict:
    questions, runs = group["uuid"].nunique(), _runs(group)
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


# ---------------------------------------------------------------------------------------------- statistics

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


def cluster_draws(uuids: np.ndarray, seed: int = 0):
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
    edges = np.linspace(lo, hi, BINS + 1).round(3)
    return [f"{a:g}–{b:g}" for a, b in zip(edges[:-1], edges[1:])]


# ---------------------------------------------------------------------------------------------- vote and gain

def _with_keys(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """per_prompt with `key`: each prediction normalised as the metric normalises it (the vote's key)."""
    from scoring import normalize
    preds = [p if isinstance(p, str) else "" for p in per_prompt["prediction"]]
    norm = {p: normalize(p) for p in set(preds)}
    return per_prompt.assign(key=[norm[p] for p in preds])


def singles(rows: pd.DataFrame, per_prompt: pd.DataFrame, n: int) -> pd.DataFrame:
    """The single prompts behind each row, one line per (row, paraphrase) in the order of the row's indices:
    `row` (its position in `rows`), `pos` (in its indices), uuid, paraphrase_index, and the per_prompt line's
    prediction, key, scores and costs. A row whose paraphrases the per_prompt table does not all hold gets no
    lines: a vote of 7 from 5 single answers would be a vote of 5 under another name."""
    picks = pd.DataFrame({"row": range(len(rows)), "uuid": rows["uuid"].to_numpy(),
                          "paraphrase_index": selections(rows, n)}).explode("paraphrase_index").dropna()
    picks = picks.assign(pos=picks.groupby("row").cumcount(), paraphrase_index=picks["paraphrase_index"].astype(int))
    keep = ["uuid", "paraphrase_index", *(c for c in SINGLE_COLUMNS if c in per_prompt.columns)]
    table = per_prompt[keep].drop_duplicates(["uuid", "paraphrase_index"])
    lines = picks.merge(table, on=["uuid", "paraphrase_index"])
    found, wanted = lines.groupby("row").size(), picks.groupby("row").size()
    complete = found.index[found == wanted[found.index]]
    return lines[lines["row"].isin(complete)].sort_values(["row", "pos"]).reset_index(drop=True)


def vote_position(keys: Sequence[str]) -> int:
    """Which of the N single answers the vote picks (`scoring.vote`: the most frequent non-empty key, ties to the
    earliest)."""
    from scoring import vote
    return vote(list(keys))[0]


def vote_table(rows: pd.DataFrame, lines: pd.DataFrame, n: int) -> pd.DataFrame:
    """The vote for each of `rows` (uuid, answers, paraphrase_indices[, sample_index]) from its single prompts
    `lines` (`singles`): the picked single answer, scored against the row's gold answers, as confidence the share of
    the N answers that voted for it (with its own answer_logprob when recorded), and as cost the sum of the N single
    prompts'."""
    from scoring import score_frame, vote

    costs = [c for c in COST_COLUMNS if c in lines.columns]
    out = []
    for r, single in lines.groupby("row", sort=True):
        src = rows.iloc[r]
        pick, share = vote(single["key"].tolist())
        logprob = {"answer_logprob": single["answer_logprob"].iloc[pick]} if "answer_logprob" in single.columns else {}
        out.append({"uuid": src["uuid"], "answers": src["answers"], "prediction": single["prediction"].iloc[pick],
                    "confidence": share, **logprob, "method": "vote", "num_ensemble": n, "paraphrase_index": -1,
                    "paraphrase_indices": single["paraphrase_index"].tolist(),
                    **({"sample_index": src["sample_index"]} if "sample_index" in rows.columns else {}),
                    **single[costs].sum().to_dict()})
    return score_frame(pd.DataFrame(out))


@dataclass
class VoteSelection:
    """What one vote label votes over: (uuid, sample) -> (paraphrase indices, gold answers)."""
    design: tuple[str, ...]
    sampled: bool
    chosen: dict


def compared_rows(group: Group) -> pd.DataFrame:
    """The group's rows with the paraphrase selections it is compared at: its own, but self-consistency's are the
    first N (as the vote's and avg's at that N) unless it read N paraphrases itself (--sc-prompts each, K >= N)."""
    if group.method != SELF_CONSISTENCY or all(len(i) == group.n for i in selections(group.rows, group.n)):
        return group.rows
    return group.rows.assign(paraphrase_indices=[list(range(group.n))] * len(group.rows))


def _vote_selections(ensembles: list[Group]) -> dict[tuple[str, int], VoteSelection]:
    """Per vote (label, N): the selections of the groups it is compared with (each group's `vote` is set); a
    group whose selections clash with another's of the same design gets its own vote, named by its file."""
    votes: dict[tuple[str, int], VoteSelection] = {}
    for g in ensembles:
        sampled = "sample_index" in g.rows.columns
        samples = g.rows["sample_index"] if sampled else [0] * len(g.rows)
        mine = {(u, s): (tuple(i), a) for u, s, i, a in zip(g.rows["uuid"], samples, selections(compared_rows(g), g.n),
                                                             g.rows["answers"])}
        label = _with_tags("vote", g.design)
        have = votes.get((label, g.n))
        if have is not None and any(have.chosen.get(k, v)[0] != v[0] for k, v in mine.items()):
            label = f"{label} ({Path(g.file).stem})"
        votes.setdefault((label, g.n), VoteSelection(g.design, sampled, {})).chosen.update(mine)
        g.vote = label
    return votes


def vote_groups(ensembles: list[Group], per_prompt: pd.DataFrame) -> list[Group]:
    """The vote over the same selections as each ensemble group, one group per vote label and N."""
    votes = []
    for (label, n), vote in _vote_selections(ensembles).items():
        rows = pd.DataFrame({"uuid": [u for u, _ in vote.chosen], "sample_index": [s for _, s in vote.chosen],
                             "paraphrase_indices": [list(i) for i, _ in vote.chosen.values()],
                             "answers": [a for _, a in vote.chosen.values()]})
        rows = rows if vote.sampled else rows.drop(columns="sample_index")
        lines = singles(rows, per_prompt, n)
        if not lines.empty:
            votes.append(Group(label, n, vote_table(rows, lines, n), str(per_prompt["file"].iloc[0]), vote.design))
    return votes


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
        if _missing(share) or len(share) == 0:
            continue
        mean = np.stack([np.asarray(s, dtype=float) for s in share]).mean(axis=0)[1:-1]
        p = mean / mean.sum() if mean.sum() > 0 else np.full(len(mean), 1 / len(mean))
        entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum() / math.log(len(p))) if len(p) > 1 else 0.0
        top = keys.get((r, int(mean.argmax())))
        follows = float("nan") if top is None else float(normalize(pred if isinstance(pred, str) else "") == top)
        out[r] = {"share_entropy": entropy, "follows_top": follows}
    return pd.DataFrame.from_dict(out, orient="index", columns=["share_entropy", "follows_top"])


def _count(value: float) -> int | float:
    """A count as an int when it is whole (a sampled run's mean over samples need not be)."""
    return int(value) if float(value).is_integer() else float(value)


def binned_scores(stats: pd.DataFrame, by: str, value: str, span: tuple[float, float] = (0.0, 1.0)) -> pd.DataFrame:
    """Per bin of `by` (over `span`): the mean of `value` and `n`, the questions in it (rows over samples)."""
    samples = _runs(stats) / stats["uuid"].nunique()
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
    row = {"method": group.label, "N": group.n, "questions": len(per_q), "samples": _count(_runs(s) / len(per_q)),
           "accuracy": per_q["right"].mean(), "sample std": sample_std(s, "right"),
           "single mean": per_q["single_mean"].mean(), "AND": per_q["single_all"].mean(),
           "OR": per_q["single_any"].mean(), **{k: _count(v) for k, v in flags.sum().items()},
           "consistency": per_q["consistency"].mean(), "jaccard": per_q["jaccard"].mean()}
    if "follows_top" in s.columns:
        row["follows top share"] = s["follows_top"].mean()
    binned = binned_scores(s, "consistency", "right").reindex(range(BINS))
    for i, name in enumerate(bin_labels()):
        row[f"acc {name}"], row[f"n {name}"] = binned["value"].iloc[i], _count(binned["n"].fillna(0).iloc[i])
    return row


def gain_table(analysis: Analysis) -> pd.DataFrame:
    """One row per ensemble label and N that has single prompts to compare with (`gain_row`)."""
    return pd.DataFrame([gain_row(g) for g in analysis.ensembles if g.stats is not None and not g.stats.empty])


# ---------------------------------------------------------------------------------------------- report

def _interval_text(value: tuple[float, float, float] | None, signed: bool | None = True) -> str:
    """A difference `+m [+lo, +hi]` (signed), an interval alone `[lo, hi]` (False: its value is a column of its own),
    or a value with its interval `m [lo, hi]` (None)."""
    if value is None:
        return ""
    mean, lo, hi = value
    if signed is None:
        return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if signed else f"[{lo:.3f}, {hi:.3f}]"


def _interval_columns(name: str, values: list[tuple[float, float, float] | None], signed: bool | None = True) -> dict:
    """The readable column `name` and its numeric ones (<short>, <short>_low, <short>_high)."""
    short = INTERVALS.get(name, name.replace(" ", "_"))
    parts = [v if v is not None else (float("nan"),) * 3 for v in values]
    return {name: [_interval_text(v, signed) for v in values], short: [p[0] for p in parts],
            f"{short}_low": [p[1] for p in parts], f"{short}_high": [p[2] for p in parts]}


def _reference(group: Group) -> tuple[pd.Series, pd.Series] | None:
    """Per question: the mean and the any() of the group's own single prompts' scores."""
    if group.stats is None or group.stats.empty:
        return None
    per_q = group.stats.groupby("uuid")[["single_mean", "single_any"]].mean()
    return per_q["single_mean"], per_q["single_any"]


def _gap(q: pd.Series, ref: tuple[pd.Series, pd.Series] | None) -> float | None:
    if ref is None:
        return None
    both = q.index.intersection(ref[0].index)
    mean, oracle = ref[0][both].mean(), ref[1][both].mean()
    return (q[both].mean() - mean) / (oracle - mean) if oracle > mean else None


def compare(analysis: Analysis) -> pd.DataFrame:
    """The report with, per row, the interval, the paired differences and the share of the oracle gap closed."""
    scores, groups = analysis.scores, {g.key: g for g in analysis.groups}
    cis, vs_avg, vs_vote, vs_mean, closed, calibrated = [], [], [], [], [], []
    for row in analysis.report.itertuples(index=False):
        g, q = groups[(row.method, row.N)], scores[(row.method, row.N)]
        lo, hi = bootstrap(q.to_numpy(dtype=float))
        cis.append((float(q.mean()), lo, hi))
        avg = _with_tags("avg", g.design)
        vs_avg.append(paired(q, scores.get((avg, g.n))) if g.ensemble and g.label != avg else None)
        vs_vote.append(paired(q, scores.get((g.vote, g.n))) if g.vote else None)
        ref = _reference(g) if g.ensemble else None
        vs_mean.append(paired(q, ref[0]) if ref is not None else None)
        closed.append(_gap(q, ref))
        calibrated.append(calibration(g.rows, analysis.metric))
    calibration_columns = {k: v for name in CALIBRATION for k, v in
                           _interval_columns(name, [c[name] for c in calibrated], signed=None).items()}
    return analysis.report.assign(**_interval_columns("95% CI", cis, signed=False), **calibration_columns,
                                  **_interval_columns("vs avg", vs_avg), **_interval_columns("vs vote", vs_vote),
                                  **_interval_columns("vs per-prompt mean", vs_mean), **{"oracle gap closed": closed})


def analyse(results_dir: str | Path, metric: str = "partial") -> Analysis:
    """Read every result table of `results_dir`, add the votes and the single prompts behind every ensemble
    row, and build the report; raises InputError on a bad results dir."""
    taken: set = set()
    tables = [(path, _without_duplicates(path, _read_table(path))) for path in _result_files(Path(results_dir))]
    _warn_mixed_questions(tables)
    groups = [g for path, df in tables for g in _table_groups(path, df, taken)]
    pp = next((g for g in groups if g.method == "per_prompt"), None)
    per_prompt = None if pp is None else _with_keys(pp.rows).assign(file=pp.file)
    ensembles = [g for g in groups if g.ensemble]
    if per_prompt is not None and ensembles:
        groups += vote_groups(ensembles, per_prompt)
    groups = _order(groups)
    for g in groups:
        if per_prompt is not None and g.ensemble:
            g.singles = singles(compared_rows(g), per_prompt, g.n)
            g.stats = row_stats(g.rows, g.singles, metric)
    rows = [{"method": g.label, "N": g.n, **_summarise(g.rows, metric), "file": g.file} for g in groups]
    columns = [c for c in REPORT_COLUMNS if c not in INTERVALS and c != "oracle gap closed"]
    analysis = Analysis(pd.DataFrame(rows, columns=columns), groups, None if pp is None else pp.rows, metric)
    analysis.report = compare(analysis).reset_index(drop=True)
    return analysis


def build_report(results_dir: str | Path, metric: str = "partial") -> tuple[pd.DataFrame, dict, pd.DataFrame | None]:
    """One row per (file, method label, N) with the readable and the numeric columns, and per (label, N) the
    per-question scores on `metric`, and the per_prompt table if there is one; raises InputError on a bad dir."""
    analysis = analyse(results_dir, metric)
    return analysis.report, analysis.scores, analysis.per_prompt


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of `df` (floats to 3 decimals, missing values blank)."""
    header = [str(c) for c in df.columns]
    body = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _selection_text(group: Group) -> str:
    parts = {"repeat": "one paraphrase repeated N times"}
    shown = [parts.get(t, f"{t[1:]} sampled selections of N per question") for t in group.design]
    return "; ".join(shown) or "first N"


def label_map(analysis: Analysis) -> pd.DataFrame:
    """Per method label: its method, the flex_attention settings it was run with, how it chose its paraphrases
    and its files (the legend of the short labels)."""
    rows = {}
    for g in analysis.groups:
        if g.method == "per_prompt":
            continue
        first = g.rows.iloc[0]
        entry = rows.setdefault(g.label, {
            "label": g.label, "method": g.method,
            **{c.replace("_", " "): ("" if c not in g.rows.columns or _missing(first[c]) else str(first[c]))
               for c in EXTRA_COLUMNS},
            "paraphrases": _selection_text(g), "N": [], "files": []})
        entry["N"].append(str(g.n))
        entry["files"].append(g.file)
    table = pd.DataFrame(list(rows.values()))
    if table.empty:
        return table
    unused = [c.replace("_", " ") for c in VARIANT_DEFAULTS if c not in REQUIRED_SETTINGS
              and (table[c.replace("_", " ")] == "").all()]  # a setting no label was run with
    return table.drop(columns=unused).assign(N=table["N"].map(", ".join), files=table["files"].map(lambda f: ", ".join(dict.fromkeys(f))))


def questions_table(analysis: Analysis) -> pd.DataFrame:
    """One line per question: uuid, first paraphrase, gold answers, the single answers; then per method label
    and N its prediction (the first sample's) and its correctness (mean over samples); `methods disagreeing`
    counts the methods on the minority side of right/wrong. Questions where methods disagree come first."""
    source = analysis.per_prompt if analysis.per_prompt is not None else analysis.groups[0].rows
    first = source.sort_values("paraphrase_index", kind="stable").drop_duplicates("uuid")
    order = list(dict.fromkeys([*first["uuid"], *(u for g in analysis.groups for u in g.rows["uuid"])]))
    table = pd.DataFrame({"uuid": order}).set_index("uuid", drop=False)
    paraphrase = first.set_index("uuid")["paraphrases"].map(lambda p: "" if _missing(p) or len(p) == 0 else p[0]) \
        if "paraphrases" in first.columns else pd.Series(dtype=str)
    answers = pd.concat([g.rows[["uuid", "answers"]] for g in analysis.groups]).drop_duplicates("uuid")
    table["paraphrase"] = paraphrase.reindex(table.index).fillna("")
    table["answers"] = answers.set_index("uuid")["answers"].map(lambda a: " | ".join(map(str, a))).reindex(table.index)
    if analysis.per_prompt is not None:
        pp = analysis.per_prompt.sort_values("paraphrase_index", kind="stable").groupby("uuid", sort=False)
        table["single answers"] = pp["prediction"].agg(lambda p: " | ".join(map(str, p))).reindex(table.index)
        table["singles right"] = pp[analysis.metric].sum().reindex(table.index)
    columns = []
    for g in analysis.groups:
        if g.method == "per_prompt":
            continue
        name = f"{g.label} N={g.n}"
        table[name] = g.rows.drop_duplicates("uuid").set_index("uuid")["prediction"].reindex(table.index)
        table[f"{name} right"] = question_scores(g.rows, analysis.metric).reindex(table.index)
        columns.append(f"{name} right")
    right = table[columns] >= 0.5
    answered = table[columns].notna()
    table["methods disagreeing"] = np.minimum((right & answered).sum(axis=1), (~right & answered).sum(axis=1))
    return table.sort_values("methods disagreeing", ascending=False, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- figures

GREY = "0.35"  # the single prompts; the methods' colours leave out the palettes' greys


def _colors(analysis: Analysis) -> dict[str, tuple]:
    """One colour per ensemble label, the same in every panel."""
    from matplotlib import colormaps
    labels = list(dict.fromkeys(g.label for g in analysis.ensembles))
    small = len(labels) <= 9
    palette = [c for i, c in enumerate(colormaps["tab10" if small else "tab20"].colors)
               if i not in ((7,) if small else (14, 15))]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _empty(ax, text: str) -> None:
    """A panel with nothing to draw: its reason in the middle, no axes."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=GREY)


def _legend_outside(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _tick_labels(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor")


def _origin_line(ax, analysis: Analysis) -> None:
    """The original question's accuracy (origin table) as a horizontal line, when there is one."""
    for g in analysis.groups:
        if g.method == "origin":
            value = g.rows[analysis.metric].mean()
            ax.axhline(value, color="0.6", linestyle=(0, (1, 3)), label=f"{g.label} ({value:.2f})")


def _references(ax, analysis: Analysis, n: int) -> None:
    """The first n single prompts' mean, best paraphrase and oracle as horizontal lines."""
    _origin_line(ax, analysis)
    pp = analysis.per_prompt
    if pp is None:
        return
    first = pp[pp["paraphrase_index"] < n]
    per_index = first.groupby("paraphrase_index")[analysis.metric].mean()
    oracle = first.groupby("uuid")[analysis.metric].any().mean()
    lines = ((per_index.mean(), "--", "mean"), (per_index.max(), "-.", "best"), (oracle, ":", "oracle"))
    for value, style, name in lines:
        ax.axhline(value, color=GREY, linestyle=style, linewidth=1.2, label=f"single prompts: {name} ({value:.2f})")


def _yerr(rows: pd.DataFrame, metric: str) -> np.ndarray:
    return np.vstack([rows[metric] - rows["ci_low"], rows["ci_high"] - rows[metric]]).clip(0)


def plot_accuracy(ax, analysis: Analysis, colors: dict) -> None:
    """One N: a bar with its 95% interval per method and the single prompts as reference lines; several N:
    a line with its 95% band per method over integer ticks, the single prompts' mean and oracle dashed."""
    report = analysis.report[analysis.report["method"].isin(colors)]
    ns = sorted(set(report["N"]))
    metric = analysis.metric
    if not ns:
        _empty(ax, "Accuracy: no ensemble tables")
        return
    if len(ns) == 1:
        bars = ax.bar(range(len(report)), report[metric], yerr=_yerr(report, metric), capsize=4,
                      color=[colors[m] for m in report["method"]])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in report[metric]], label_type="center", color="white",
                     fontsize="small", fontweight="bold")
        _tick_labels(ax, list(report["method"]))
        _references(ax, analysis, ns[0])
        ax.set_ylim(bottom=0)
        ax.set(title=f"Accuracy at N={ns[0]} (95% intervals)", ylabel=f"{metric} accuracy")
    else:
        for label, group in report.groupby("method", sort=False):
            line, = ax.plot(group["N"], group[metric], marker="o", color=colors[label], label=label)
            ax.fill_between(group["N"], group["ci_low"], group["ci_high"], color=line.get_color(), alpha=0.08)
            if len(group) == 1:
                ax.errorbar(group["N"], group[metric], yerr=_yerr(group, metric), color=colors[label], capsize=4)
        if analysis.per_prompt is not None:
            refs = [per_prompt_reference(analysis.per_prompt, n, metric) for n in ns]
            ax.plot(ns, [r[0].mean() for r in refs], "--", color=GREY, label="single prompts: mean (first N)")
            ax.plot(ns, [r[1].mean() for r in refs], ":", color=GREY, label="single prompts: oracle (first N)")
        _origin_line(ax, analysis)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set(title="Accuracy against N (95% bands)", xlabel="N (paraphrases ensembled)", ylabel=f"{metric} accuracy")
    _legend_outside(ax)


def _at_largest_n(groups: list[Group]) -> list[Group]:
    """Per label its group with the largest N (those with single prompts to compare with), in report order."""
    largest = {}
    for g in groups:
        if g.stats is not None and not g.stats.empty and g.n >= largest.get(g.label, g).n:
            largest[g.label] = g
    return list(largest.values())


def _n_title(groups: list[Group]) -> str:
    ns = {g.n for g in groups}
    return f"N={ns.pop()}" if len(ns) == 1 else "each method's largest N"


def _cost_points(analysis: Analysis, colors: dict) -> pd.DataFrame:
    """The points of the cost plot: every row, one single prompt (per_prompt's cost / N); a label's text on its
    largest N only (its points are joined by a line, the marker grows with N)."""
    report, points = analysis.report, []
    last = report.groupby("method")["N"].max()
    for _, row in report.iterrows():
        label, n = row["method"], row["N"]
        if label == "per_prompt":
            points.append(("single prompt", row["model tokens/question"] / n, row["mean"], GREY, 1))
        else:
            text = label if n == last[label] else ""
            points.append((text, row["model tokens/question"], row[analysis.metric], colors.get(label, GREY), n))
    return pd.DataFrame(points, columns=["text", "cost", "accuracy", "color", "N"])


OFFSETS = [(dx * r, dy * r) for r in (6, 14, 24, 36) for dx, dy in
           ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1.4), (0, -1.4), (1.4, 0), (-1.4, 0))]


def _clashes(box, taken: list, inside) -> int:
    outside = not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1))
    return sum(box.overlaps(b) for b in taken) + 10 * outside


def _box(x: float, y: float, r: float):
    from matplotlib.transforms import Bbox
    return Bbox([[x - r, y - r], [x + r, y + r]])


def place_labels(ax, points: pd.DataFrame, renderer) -> list:
    """Annotate each point that has a text at the first offset where it overlaps no other label or point and
    stays inside the axes (the least crowded offset when none is free); returns the annotations."""
    to_px = ax.transData.transform
    taken = [_box(*to_px((x, y)), 5) for x, y in zip(points["cost"], points["accuracy"])]
    inside, annotations = ax.get_window_extent(renderer), []
    for x, y, text in zip(points["cost"], points["accuracy"], points["text"]):
        if not text:
            continue
        best = None
        for dx, dy in OFFSETS:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize="small",
                              ha=("right", "center", "left")[int(np.sign(dx)) + 1],
                              va=("top", "center", "bottom")[int(np.sign(dy)) + 1])
            box = ann.get_window_extent(renderer)
            clash = _clashes(box, taken, inside)
            if best is not None and clash >= best[0]:
                ann.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (clash, ann, box)
            if clash == 0:
                break
        taken.append(best[2])
        annotations.append(best[1])
    return annotations


def plot_cost(ax, analysis: Analysis, colors: dict) -> pd.DataFrame:
    """Accuracy against the tokens run through the model per question; each method's Ns joined by a line."""
    points = _cost_points(analysis, colors)
    ax.scatter(points["cost"], points["accuracy"], c=list(points["color"]), s=14 + 8 * points["N"], zorder=3)
    report = analysis.report[analysis.report["method"].isin(colors)]
    several = report["N"].nunique() > 1
    for label, group in report.groupby("method", sort=False):
        group = group.sort_values("N")
        ax.plot(group["model tokens/question"], group[analysis.metric], color=colors[label], alpha=0.6, linewidth=1)
    ax.margins(0.12, 0.12)
    ax.set(title="Accuracy against cost" + (" (marker size: N; label at the largest N)" if several else ""),
           xlabel="tokens run through the model per question", ylabel=f"{analysis.metric} accuracy")
    return points


def bin_edges(values: pd.Series) -> tuple[float, float]:
    """The range the bins of `values` span: their observed range, widened to multiples of 0.05."""
    lo = math.floor(values.min() * 20) / 20
    return lo, max(math.ceil(values.max() * 20) / 20, lo + 0.05)


def grouped_bars(ax, series: dict[str, pd.DataFrame], colors: dict, span: tuple[float, float] = (0.0, 1.0)) -> None:
    """Per bin one bar per label (`value`); under each bin its range and its count (`n`; a range of counts
    when the labels' counts differ)."""
    width = 0.8 / max(len(series), 1)
    counts = []
    for i, (label, frame) in enumerate(series.items()):
        frame = frame.reindex(range(BINS))
        counts.append(frame["n"].fillna(0).round().astype(int))
        x = np.arange(BINS) + (i - (len(series) - 1) / 2) * width
        ax.bar(x, frame["value"].fillna(0), width, color=colors[label], label=label)
    counts = pd.concat(counts, axis=1) if counts else pd.DataFrame(0, index=range(BINS), columns=[0])
    ticks = [f"{name}\nn={lo}" if lo == hi else f"{name}\nn={lo}–{hi}"
             for name, lo, hi in zip(bin_labels(*span), counts.min(axis=1), counts.max(axis=1))]
    ax.set_xticks(range(BINS), ticks)
    ax.margins(y=0.08)


def plot_diversity(ax, analysis: Analysis, colors: dict) -> None:
    """Mean gain over the single prompts' mean per consistency bin of the N single answers (each method at its
    largest N), the number of questions under each bin."""
    groups = _at_largest_n(analysis.ensembles)
    if not groups:
        _empty(ax, "Diversity: needs per_prompt and an ensemble")
        return
    series = {}
    for g in groups:
        series[g.label] = binned_scores(g.stats.assign(gain=g.stats["right"] - g.stats["single_mean"]),
                                        "consistency", "gain")
    grouped_bars(ax, series, colors)
    ax.axhline(0, color=GREY, linewidth=0.8)
    ax.set(xlabel="consistency of the N single answers (share of equal pairs); n: questions",
           ylabel="gain over the single prompts' mean", title=f"Diversity and gain ({_n_title(groups)})")
    _legend_outside(ax)


def plot_split(ax, analysis: Analysis, gain: pd.DataFrame) -> None:
    """Per method at its largest N: kept and new (right answers) stacked above zero, lost below, as shares of
    questions."""
    groups = _at_largest_n(analysis.ensembles)
    if gain.empty or not groups:
        _empty(ax, "New / kept / lost: needs per_prompt and an ensemble")
        return
    rows = gain.set_index(["method", "N"]).loc[[g.key for g in groups]]
    x, share = np.arange(len(rows)), {k: rows[k] / rows["questions"] for k in ("kept", "new", "lost")}
    ax.bar(x, share["kept"], color="#9ecae1", label="kept (right, some single prompt right)")
    ax.bar(x, share["new"], bottom=share["kept"], color="#31a354", label="new (right, every single prompt wrong)")
    ax.bar(x, -share["lost"], color="#de2d26", label="lost (wrong, most single prompts right)")
    ax.axhline(0, color=GREY, linewidth=0.8)
    ax.use_sticky_edges = False  # the stacked bars' bottoms would hold the top margin at the tallest bar
    ax.margins(y=0.08)
    same_n = len({g.n for g in groups}) == 1
    _tick_labels(ax, [g.label if same_n else f"{g.label} N={g.n}" for g in groups])
    ax.set(title=f"Where the right answers come from ({_n_title(groups)})", ylabel="share of questions")
    _legend_outside(ax)


def plot_attention(ax, analysis: Analysis, colors: dict) -> None:
    """Accuracy per bin of the normalised entropy of the mean paraphrase share (attention-level rows with
    `attention_share`, each at its largest N)."""
    stats = {g.label: g.stats.dropna(subset=["share_entropy"]) for g in _at_largest_n(analysis.ensembles)
             if "share_entropy" in g.stats.columns and g.stats["share_entropy"].notna().any()}
    span = bin_edges(pd.concat([s["share_entropy"] for s in stats.values()]))
    series = {label: binned_scores(s, "share_entropy", "right", span) for label, s in stats.items()}
    grouped_bars(ax, series, colors, span)
    ax.set(title="Accuracy against how evenly the answer attends to the paraphrases",
           xlabel="entropy of the mean paraphrase attention share (0: one paraphrase, 1: even); n: questions",
           ylabel=f"{analysis.metric} accuracy")
    _legend_outside(ax)


def has_attention(analysis: Analysis) -> bool:
    return any(g.stats is not None and "share_entropy" in g.stats.columns and g.stats["share_entropy"].notna().any()
               for g in analysis.ensembles)


def report_figure(analysis: Analysis, gain: pd.DataFrame | None = None):
    """The report's figure, laid out and frozen: axes labelled accuracy, cost, diversity, split [, attention]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gain = gain_table(analysis) if gain is None else gain
    colors = _colors(analysis)
    panels = ["accuracy", "cost", "diversity", "split"] + (["attention"] if has_attention(analysis) else [])
    rows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(17, 5.8 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = dict(zip(panels, fig.subplots(rows, 2, squeeze=False).ravel()))
    for name, ax in axes.items():
        ax.set_label(name)
        ax.grid(axis="y", alpha=0.3)
    for ax in fig.axes[len(panels):]:
        ax.remove()
    plot_accuracy(axes["accuracy"], analysis, colors)
    points = plot_cost(axes["cost"], analysis, colors)
    plot_diversity(axes["diversity"], analysis, colors)
    plot_split(axes["split"], analysis, gain)
    if "attention" in axes:
        plot_attention(axes["attention"], analysis, colors)
    fig.canvas.draw()  # lay out first: the labels are placed in the final pixel coordinates
    fig.set_layout_engine("none")
    place_labels(axes["cost"], points, fig.canvas.get_renderer())
    return fig


def plot_report(analysis: Analysis, gain: pd.DataFrame, output_dir: Path) -> None:
    """report.png and report.pdf (see `report_figure`)."""
    fig = report_figure(analysis, gain)
    for fmt in ("png", "pdf"):
        atomic_write(output_dir / f"report.{fmt}", lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=fig.dpi))


def calibrated_groups(analysis: Analysis) -> list[Group]:
    """Per label its group at the largest N among those whose rows have a confidence, in report order."""
    largest: dict[str, Group] = {}
    for g in analysis.groups:
        if "confidence" in g.rows.columns and g.rows["confidence"].notna().any() and g.n >= largest.get(g.label, g).n:
            largest[g.label] = g
    return list(largest.values())


def reliability_points(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per equal-mass bin of the rows' confidence (`calibration_bins`): its mean confidence and its accuracy."""
    known = rows.dropna(subset=["confidence"])
    conf = known["confidence"].to_numpy(dtype=float)
    frame = pd.DataFrame({"bin": calibration_bins(conf), "confidence": conf,
                          "accuracy": known[metric].to_numpy(dtype=float)})
    return frame.groupby("bin").mean()


def reliability_figure(analysis: Analysis):
    """The reliability diagram: per method label (at its largest N) its accuracy against its mean confidence in each
    of CALIBRATION_BINS equal-mass bins, the diagonal being perfect calibration; the legend (outside) gives ECE."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups, colors = calibrated_groups(analysis), _colors(analysis)
    fig = Figure(figsize=(8.6, 5.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if not groups:
        _empty(ax, "Reliability: no table has a confidence column (tables written without one)")
        return fig
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfect calibration")
    ece_of = {(m, n): e for m, n, e in zip(analysis.report["method"], analysis.report["N"], analysis.report["ece"])}
    several_n = len({g.n for g in groups}) > 1
    for g in groups:
        points = reliability_points(g.rows, analysis.metric)
        single = not g.ensemble  # the single prompts: grey squares, dotted
        ax.plot(points["confidence"], points["accuracy"], marker="s" if single else "o", markersize=5,
                linestyle=":" if single else "-", color=colors.get(g.label, GREY),
                label=f"{g.label}{f' (N={g.n})' if several_n else ''}: ECE {ece_of.get(g.key, float('nan')):.3f}")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", xlabel="confidence (mean in the bin)",
           ylabel=f"{analysis.metric} accuracy in the bin",
           title=f"Reliability: {CALIBRATION_BINS} equal-mass confidence bins per method ({_n_title(groups)})")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_reliability(analysis: Analysis, output_dir: Path) -> None:
    """reliability.png and reliability.pdf (see `reliability_figure`)."""
    fig = reliability_figure(analysis)
    for fmt in ("png", "pdf"):
        atomic_write(output_dir / f"reliability.{fmt}",
                     lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=fig.dpi))


# ---------------------------------------------------------------------------------------------- files

PROVENANCE_COLUMNS = ("file", "git commit", "torch", "transformers", "model", "model revision", "device", "dtype",
                      "resumed with")


def _commit(prov: dict) -> str:
    commit = prov.get("git_commit") or "unknown"
    return commit if commit == "unknown" else f"{commit[:12]}{' (dirty)' if prov.get('git_dirty') else ''}"


def provenance_table(results_dir: Path, files: list[str]) -> pd.DataFrame:
    """Per table, what made it, from the provenance in its settings file (runner.provenance): git commit and
    dirty flag, torch and transformers versions, model and its revision, device and dtype; "unknown" where a
    table has none (made before provenance was kept, or by hand). "resumed with": the commits of later runs
    that added rows to it."""
    rows = []
    for name in files:
        settings = read_settings(Path(results_dir) / name) or {}
        prov = settings.get("provenance") or {}
        model = prov.get("model_id") or prov.get("model") or settings.get("model") or "unknown"
        rows.append({"file": name, "git commit": _commit(prov), "torch": prov.get("torch") or "unknown",
                     "transformers": prov.get("transformers") or "unknown", "model": model,
                     "model revision": prov.get("model_revision") or settings.get("model_revision") or "unknown",
                     "device": prov.get("device") or settings.get("device") or "unknown",
                     "dtype": prov.get("dtype") or settings.get("dtype") or "unknown",
                     "resumed with": ", ".join(_commit(p) for p in settings.get("resumed_with", []))})
    return pd.DataFrame(rows, columns=list(PROVENANCE_COLUMNS))


GAIN_BRIEF = ("method", "N", "questions", "accuracy", "sample std", "single mean", "AND", "OR", "new", "kept", "lost",
              "consistency", "jaccard", "follows top share")
GAIN_HEADER = (
    "Per method and N against the same questions' single prompts (the per_prompt answers of the paraphrases the "
    "rows used), on the {metric} metric. new: right where every single prompt is wrong; kept: right where some "
    "is right; lost: wrong where most are right (counts of questions; a sampled run's mean over its samples). "
    "AND / OR: share of questions where all / any single prompt is right. consistency: share of equal pairs of "
    "the normalised single answers; jaccard: their mean pairwise token-set overlap. follows top share "
    "(attention-level rows with attention_share): how often the answer equals the single answer of the "
    "paraphrase with the largest mean attention share."
)


def gain_markdown(gain: pd.DataFrame, metric: str) -> str:
    """gain.md: the summary table, then accuracy (count) by consistency bin."""
    brief = gain[[c for c in GAIN_BRIEF if c in gain.columns]]
    brief = brief.assign(**{c: brief[c].map(lambda v: _cell(_count(v))) for c in ("new", "kept", "lost")})
    bins = gain[["method", "N"]].assign(**{
        name: [f"{a:.3f} ({int(n)})" if n else "" for a, n in zip(gain[f"acc {name}"], gain[f"n {name}"])]
        for name in bin_labels()})
    return (f"# Where the gain comes from\n\n{GAIN_HEADER.format(metric=metric)}\n\n{format_markdown(brief)}\n\n"
            f"## Accuracy (questions) by consistency of the single answers\n\n{format_markdown(bins)}\n")


def report_markdown(analysis: Analysis, results_dir: Path | None) -> str:
    markdown = (f"# Results\n\n{HEADER.format(metric=analysis.metric)}\n\n"
                f"{format_markdown(analysis.report[list(REPORT_COLUMNS)])}\n")
    labels = label_map(analysis)
    if not labels.empty:
        markdown += (f"\n## Labels\n\nA label names a method with the settings that differ from the defaults "
                     f"(positions {DEFAULT_POSITIONS}, fusion bias {DEFAULT_FUSION_BIAS}, temperature "
                     f"{DEFAULT_FUSION_TEMPERATURE:g}, few-shot format {DEFAULT_FEWSHOT_FORMAT}; flex = "
                     f"flex_attention) and how it chose its paraphrases (S<k>: k sampled selections per question, "
                     f"repeat: one paraphrase N times).\n\n{format_markdown(labels)}\n")
    markdown += ("\nAlso written: gain.md / gain.csv (where the gain comes from), questions.csv (every method's "
                 "answer per question, disagreements first), report.png / report.pdf (the figures), "
                 "reliability.png / reliability.pdf (calibration).\n")
    if results_dir is not None:
        files = list(dict.fromkeys(analysis.report["file"]))
        markdown += (f"\n## Provenance\n\nThe code, libraries, model and device each table was made with (from its "
                     f"`.settings.json`).\n\n{format_markdown(provenance_table(results_dir, files))}\n")
    return markdown


# ---------------------------------------------------------------------------------------------- the study
# The protocol (docs/study.md): the grid runs on the choose half of every dev set, `pick_default` picks one variant
# there by PICK_RULE (pick.json), and only the pick, the default and the baselines with their controls run on the
# confirm half, whose numbers `write_study` reports with exact paired tests.

DEFAULT_FUSION = "flex_attention"  # the label of the attention-level rows at the default settings
PICK_RULE = ("the attention-level variant (at the study's N, first-N paraphrases) with the highest accuracy "
             "averaged over the dev sets' choose halves, each set weighing the same; it is the pick only if that "
             "average is above the default's, else the default stays")
FUSION_FIELDS = {"positions": "positions", "fusion_bias": "bias", "fusion_temperature": "temperature",
                 "fewshot_format": "fewshot", "isolation": "isolation", "beside": "beside", "beside_weight": "beside_weight"}
HALF_NAMES = ("choose", "confirm")  # a results dir named after its half is named by its dev set (its parent)
REPEAT_TAGS = ("S1", "repeat")  # the repeat control's design: one paraphrase, drawn per question, N times
STUDY_COLUMNS = ("method", "N", "questions", "accuracy", "95% CI", "vs default", "b, c", "p (Holm)", "verdict",
                 "vs vote", "b, c vote", "p vote", "diversity gain", "b, c control", "p control",
                 "model tokens/question")
STUDY_HEADER = (
    "Per dev set ({half} half), every method at the study's N on the {metric} metric: accuracy with its 95% "
    "bootstrap interval over questions. vs default / vs vote: the paired difference with attention-level fusion "
    "at its defaults and with the vote of the same single answers, its 95% paired bootstrap interval, the "
    "discordant counts b (only this method right) and c (only the other right) and the exact two-sided McNemar "
    "p; p (Holm): corrected over every comparison with the default in this study; verdict: better / worse where "
    "the corrected p < 0.05, else not separated. diversity gain: the method minus its repeat control (one "
    "paraphrase, drawn per question, N times, at the same settings), with its interval, b, c and p. An interval "
    "resting on fewer than {few} discordant questions is flagged (few). model tokens/question: prompt and decode "
    "tokens run through the model per question."
)


def fusion_groups(analysis: Analysis) -> dict[str, Group]:
    """The attention-level groups at the first N paraphrases (no sampled or repeated design), by label."""
    return {g.label: g for g in analysis.groups if g.method == DEFAULT_FUSION and not g.design}


def fusion_settings_of(group: Group) -> dict:
    """The FusionSettings fields a group's rows were decoded with (what sweep.py --confirm runs again)."""
    first = group.rows.iloc[0]
    return {field: (first[column].item() if hasattr(first[column], "item") else first[column])
            for column, field in FUSION_FIELDS.items() if column in group.rows.columns and not _missing(first[column])}


def pick_default(results_dirs: Sequence[Path], metric: str) -> dict:
    """PICK_RULE over the choose halves: the pick, its settings, why, and every candidate's accuracy per set."""
    sets = {Path(d).parent.name if Path(d).name in HALF_NAMES else Path(d).name: fusion_groups(analyse(d, metric))
            for d in results_dirs}
    labels = [label for label in next(iter(sets.values())) if all(label in groups for groups in sets.values())]
    if DEFAULT_FUSION not in labels:
        raise InputError(f"--choose: the default fusion ({DEFAULT_FUSION}) is not in every results dir")
    accuracy = {label: {name: float(groups[label].rows[metric].mean()) for name, groups in sets.items()}
                for label in labels}
    mean = {label: float(np.mean(list(acc.values()))) for label, acc in accuracy.items()}
    variants = [label for label in labels if label != DEFAULT_FUSION]
    best = max(variants, key=lambda label: mean[label]) if variants else DEFAULT_FUSION
    pick = best if mean[best] > mean[DEFAULT_FUSION] else DEFAULT_FUSION
    reason = (f"the default averages {mean[DEFAULT_FUSION]:.4f} over {', '.join(sets)}, the best variant ({best}) "
              f"{mean[best]:.4f}: " + ("it is the pick" if pick == best else "no variant beat the default, it stays"))
    first_set = next(iter(sets.values()))
    return {"rule": PICK_RULE, "metric": metric, "half": "choose", "sets": list(sets), "pick": pick,
            "settings": fusion_settings_of(first_set[pick]), "default": DEFAULT_FUSION, "reason": reason,
            "candidates": {label: {"mean": mean[label], **accuracy[label]}
                           for label in sorted(labels, key=lambda label: -mean[label])}}


def write_pick(results_dirs: Sequence[Path], output: Path, metric: str) -> dict:
    import json
    pick = pick_default(results_dirs, metric)
    check_writable_dir(output.parent)
    _write_text(output, json.dumps(pick, indent=1) + "\n")
    return pick


@dataclass
class Comparison:
    """A paired comparison of two methods on the questions both answered: the difference with its interval, the
    discordant counts and the exact McNemar p (NaN where a score is not 0/1, e.g. a mean over samples)."""
    difference: tuple[float, float, float]
    b: int
    c: int
    p: float

    @property
    def few(self) -> bool:
        return self.b + self.c < FEW_DISCORDANT


def compared(scores: pd.Series, other: pd.Series | None) -> Comparison | None:
    from significance import discordant, mcnemar_exact
    difference = paired(scores, other)
    if difference is None:
        return None
    both = scores.index.intersection(other.index)
    a, b = scores[both].to_numpy(dtype=float), other[both].to_numpy(dtype=float)
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        return Comparison(difference, -1, -1, float("nan"))
    only_a, only_b = discordant(a == 1.0, b == 1.0)
    return Comparison(difference, only_a, only_b, mcnemar_exact(only_a, only_b))


def repeat_control(label: str, method: str) -> str:
    """The label of a method's repeat control: its tags and the repeat design (flex_attention -> flex[S1,repeat])."""
    short = SHORT_NAMES.get(method, method)
    if label.endswith("]"):
        return f"{label[:-1]},{','.join(REPEAT_TAGS)}]"
    return f"{short}[{','.join(REPEAT_TAGS)}]"


def study_comparisons(analysis: Analysis) -> list[dict]:
    """Per report row (per_prompt and the controls themselves aside): its comparisons with the default, the vote
    and its repeat control."""
    scores, groups = analysis.scores, {g.key: g for g in analysis.groups}
    out = []
    for row in analysis.report.itertuples(index=False):
        g = groups[(row.method, row.N)]
        if g.method == "per_prompt" or g.design:
            continue
        default = scores.get((DEFAULT_FUSION, g.n)) if g.label != DEFAULT_FUSION else None
        out.append({"key": g.key, "default": compared(scores[g.key], default),
                    "vote": compared(scores[g.key], scores.get((g.vote, g.n))) if g.vote else None,
                    "control": compared(scores[g.key], scores.get((repeat_control(g.label, g.method), g.n)))})
    return out


def _comparison_columns(suffix: str, comparisons: list[Comparison | None]) -> dict:
    def counts(c: Comparison | None) -> str:
        return "" if c is None or c.b < 0 else f"{c.b}, {c.c}" + (" (few)" if c.few else "")
    return {f"b, c{suffix}": [counts(c) for c in comparisons],
            f"p{suffix}": ["" if c is None or math.isnan(c.p) else f"{c.p:.3g}" for c in comparisons]}


def study_rows(analysis: Analysis, holm_p: dict[tuple, float] | None = None) -> pd.DataFrame:
    """One dev set's report in the study's columns: vs the default, the vote and the repeat control, each with
    its interval, discordant counts and McNemar p; `holm_p` (key -> corrected p) gives p (Holm) and the verdict."""
    from significance import verdict as separated
    comparisons = study_comparisons(analysis)
    keys = [c["key"] for c in comparisons]
    report = analysis.report.set_index(["method", "N"]).loc[keys].reset_index()
    report = report.assign(accuracy=report[analysis.metric])
    holm_p = holm_p or {}
    corrected = [holm_p.get(k) for k in keys]
    default = [c["default"] for c in comparisons]
    verdicts = ["the default" if k[0] == DEFAULT_FUSION else "" if d is None or p is None else
                separated(p, d.b, d.c) for k, d, p in zip(keys, default, corrected)]
    return report.assign(
        **_interval_columns("vs default", [c and c.difference for c in default]),
        **_comparison_columns("", default),
        **{"p (Holm)": ["" if p is None else f"{p:.3g}" for p in corrected], "verdict": verdicts},
        **_interval_columns("vs vote", [c["vote"] and c["vote"].difference for c in comparisons]),
        **_comparison_columns(" vote", [c["vote"] for c in comparisons]),
        **_interval_columns("diversity gain", [c["control"] and c["control"].difference for c in comparisons]),
        **_comparison_columns(" control", [c["control"] for c in comparisons]))


def holm_over_study(analyses: dict[str, Analysis]) -> dict[str, dict[tuple, float]]:
    """Holm's correction over every comparison with the default in the study (all dev sets): per set, key -> p."""
    from significance import holm
    tests = [(name, c["key"], c["default"].p) for name, a in analyses.items() for c in study_comparisons(a)
             if c["default"] is not None and not math.isnan(c["default"].p)]
    adjusted = holm([p for _, _, p in tests])
    out: dict[str, dict[tuple, float]] = {name: {} for name in analyses}
    for (name, key, _), p in zip(tests, adjusted):
        out[name][key] = p
    return out


def held_on_all(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (method, N) present in every dev set's study rows: its verdict against the default on each set."""
    keyed = {name: t.set_index(["method", "N"]) for name, t in tables.items()}
    common = [k for k in next(iter(keyed.values())).index if all(k in t.index for t in keyed.values())]
    rows = []
    for key in common:
        verdicts = [t.loc[key, "verdict"] for t in keyed.values()]
        summary = ("the default" if key[0] == DEFAULT_FUSION else
                   f"{verdicts[0]} on all" if len(set(verdicts)) == 1 else
                   "; ".join(f"{v} on {name}" for name, v in zip(keyed, verdicts)))
        rows.append({"method": key[0], "N": key[1],
                     **{f"vs default, {name}": t.loc[key, "vs default"] for name, t in keyed.items()},
                     "held": summary})
    return pd.DataFrame(rows)


def pick_verdict(pick: dict, tables: dict[str, pd.DataFrame]) -> str:
    """Whether the choose half's pick held on the confirm halves (corrected p < 0.05 for it on every set)."""
    if pick["pick"] == DEFAULT_FUSION:
        return f"The choose halves kept the default ({pick['reason']}); the confirm halves test the default as it is."
    verdicts = {name: t.loc[t["method"] == pick["pick"], "verdict"] for name, t in tables.items()}
    found = {name: v.iloc[0] for name, v in verdicts.items() if len(v)}
    held = len(found) == len(tables) and all(v == "better" for v in found.values())
    return (f"The choose halves picked {pick['pick']} ({pick['reason']}). On the confirm halves against the default: "
            + ", ".join(f"{v} on {name}" for name, v in found.items())
            + (". It held: the default may change to it." if held else ". It did not hold: the default stays."))


def study_title(results_dirs: Sequence[Path], metric: str, half: str) -> str:
    """Which model, N and half the study tables hold, read from a table's settings."""
    models, ns = set(), set()
    for d in results_dirs:
        for path in sorted(Path(d).glob("flex_attention-*.feather"))[:1]:
            settings = read_settings(path) or {}
            models.add(str(settings.get("model", "?")))
            ns.add(str(settings.get("num_paraphrases", "?")))
    return f"{', '.join(sorted(models))}, N={', '.join(sorted(ns))}, {metric} match, {half} halves"


def dropped_index(path: Path) -> int:
    """Which paraphrase a leave-one-out table (flex_attention-0,1,3,4.feather) leaves out."""
    kept = {int(i) for i in path.stem.split("-")[1].split(",")}
    return min(set(range(len(kept) + 1)) - kept)


def leave_one_out(results_dir: Path, analysis: Analysis) -> pd.DataFrame:
    """The default with each paraphrase dropped in turn (the diversity/ tables of sweep.py --confirm): accuracy and
    the paired comparison with the default at N, per paraphrase left out."""
    scores = analysis.scores
    rows = []
    for path in sorted((Path(results_dir) / "diversity").glob("flex_attention-*.feather"), key=dropped_index):
        kept = [int(i) for i in path.stem.split("-")[1].split(",")]
        n = len(kept) + 1
        default = scores.get((DEFAULT_FUSION, n))
        q = question_scores(_scored(_read_table(path)), analysis.metric)
        c = compared(q, default)
        columns = {**_interval_columns("vs default", [c and c.difference]), **_comparison_columns("", [c])}
        rows.append({"left out": f"paraphrase {dropped_index(path)}", "N": len(kept),
                     "accuracy": float(q.mean()), **{k: v[0] for k, v in columns.items()}})
    return pd.DataFrame(rows)


def study_markdown(tables: dict[str, pd.DataFrame], metric: str, title: str, half: str, pick: dict | None,
                   dropped: dict[str, pd.DataFrame]) -> str:
    """study.md: the pick, one table per dev set (and its leave-one-out), then what held on all of them."""
    parts = [f"# The study: {title}\n\n{STUDY_HEADER.format(metric=metric, half=half, few=FEW_DISCORDANT)}\n"]
    if pick is not None:
        parts.append(f"\n{pick_verdict(pick, tables)}\n")
    for name, t in tables.items():
        parts.append(f"\n## {name}\n\n{format_markdown(t[list(STUDY_COLUMNS)])}\n")
        if not dropped[name].empty:
            columns = ["left out", "N", "accuracy", "vs default", "b, c", "p"]
            parts.append(f"\nLeave-one-out (uncorrected p):\n\n{format_markdown(dropped[name][columns])}\n")
    parts.append(f"\n## What held on all\n\n{format_markdown(held_on_all(tables))}\n")
    return "".join(parts)


def study_figure(tables: dict[str, pd.DataFrame], title: str):
    """study.png / .pdf: per method, its paired difference with the default fusion (left) and with its repeat
    control (right), in points, one marker per dev set with its 95% interval and its discordant counts b:c; an
    interval resting on fewer than FEW_DISCORDANT discordant questions is drawn hollow, without its bar."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keyed = {name: t.set_index(["method", "N"]) for name, t in tables.items()}
    keys = list(dict.fromkeys(k for t in keyed.values() for k in t.index))
    mean_gain = {k: float(np.nanmean([t.loc[k, "vs_default"] if k in t.index else np.nan for t in keyed.values()]
                                     or [0.0])) if k[0] != DEFAULT_FUSION else 0.0 for k in keys}
    order = sorted(keys, key=lambda k: np.nan_to_num(mean_gain[k], nan=-1.0))
    fig = Figure(figsize=(13, 2.0 + 0.34 * len(order)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    offsets = np.linspace(-0.2, 0.2, len(keyed)) if len(keyed) > 1 else np.zeros(1)
    palette = colormaps["tab10"].colors
    panels = (("vs_default", "b, c", "vs the default fusion"),
              ("diversity_gain", "b, c control", "diversity gain: vs its repeat control"))
    for ax, (short, counts, panel) in zip(axes, panels):
        for (name, t), offset, color in zip(keyed.items(), offsets, palette):
            for i, k in enumerate(order):
                if k not in t.index or _missing(t.loc[k, short]):
                    continue
                row, y = t.loc[k], i + offset
                x, lo, hi = (100 * row[c] for c in (short, f"{short}_low", f"{short}_high"))
                few = "(few)" in str(row[counts])
                if few:
                    ax.plot([x], [y], "o", markerfacecolor="none", color=color, markersize=5)
                else:
                    ax.errorbar([x], [y], xerr=[[max(x - lo, 0)], [max(hi - x, 0)]], fmt="o", color=color,
                                markersize=4, capsize=2, linewidth=1)
                ax.annotate(str(row[counts]).replace(", ", ":").replace(" (few)", " few"), (x, y),
                            xytext=(5, 3), textcoords="offset points", fontsize=7, color=color)
        ax.axvline(0, color=GREY, linewidth=1)
        ax.margins(x=0.15)  # room for the b:c labels right of the markers
        ax.set_title(panel)
        ax.set_xlabel("paired difference (points, 95% interval)")
        ax.grid(axis="x", alpha=0.3)
    several_n = len({n for _, n in order}) > 1
    names = [f"{m} (the default)" if m == DEFAULT_FUSION else m for m, _ in order]
    axes[0].set_yticks(range(len(order)), [f"{m} (N={n})" if several_n else m for m, (_, n) in zip(names, order)])
    axes[0].set_ylim(-0.6, len(order) - 0.4)
    handles = [axes[0].plot([], [], "o", color=c)[0] for c in palette[:len(keyed)]]
    fig.legend(handles, list(keyed), loc="outside lower center", ncols=len(keyed), frameon=False)
    fig.suptitle(f"{title}\nb:c = discordant questions (only this method right : only the other right); hollow = "
                 f"fewer than {FEW_DISCORDANT} discordant, no interval drawn", fontsize=10)
    return fig


def write_study(results_dirs: Sequence[Path], output_dir: Path, metric: str, pick_file: Path | None = None
                ) -> dict[str, pd.DataFrame]:
    """study.md / study.csv / study.png / study.pdf in output_dir from one results dir per dev set (named by its
    folder, or by its parent when the folder is named after its half), with the pick file's verdict if given."""
    import json
    names = [Path(d).parent.name if Path(d).name in HALF_NAMES else Path(d).name for d in results_dirs]
    if len(set(names)) < len(names):
        raise InputError(f"--study: the results dirs need distinct folder names, got {', '.join(names)}")
    halves = {Path(d).name for d in results_dirs if Path(d).name in HALF_NAMES}
    half = halves.pop() if len(halves) == 1 else "whole"
    analyses = {name: analyse(d, metric) for name, d in zip(names, results_dirs)}
    holm_p = holm_over_study(analyses)
    tables = {name: study_rows(a, holm_p[name]) for name, a in analyses.items()}
    pick = None
    if pick_file is not None:
        try:
            pick = json.loads(Path(pick_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"--pick {pick_file}: cannot read it ({type(err).__name__})") from None
    check_writable_dir(output_dir)
    title = study_title(results_dirs, metric, half)
    numeric = pd.concat([t.assign(dataset=name) for name, t in tables.items()], ignore_index=True)
    keep = ["dataset", "method", "N", "questions", "accuracy", "ci_low", "ci_high",
            *(f"{s}{end}" for s in ("vs_vote", "vs_default", "diversity_gain") for end in ("", "_low", "_high")),
            "b, c", "p", "p (Holm)", "verdict", "b, c control", "p control", "model tokens/question"]
    dropped = {name: leave_one_out(d, analyses[name]) for name, d in zip(names, results_dirs)}
    _write_text(output_dir / "study.md", study_markdown(tables, metric, title, half, pick, dropped))
    _write_csv(output_dir / "study.csv", numeric[keep])
    fig = study_figure(tables, title)
    for kind in ("png", "pdf"):
        atomic_write(output_dir / f"study.{kind}", lambda tmp, kind=kind: fig.savefig(tmp, format=kind, dpi=fig.dpi))
    return tables


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def write_report(analysis: Analysis, output_dir: Path, results_dir: Path | None = None) -> pd.DataFrame:
    """report.md/.csv/.png/.pdf, gain.md/.csv, questions.csv and reliability.png/.pdf in output_dir, each written
    atomically;
    report.md ends with the tables' provenance when `results_dir` is given. Returns the gain table."""
    gain = gain_table(analysis)
    _write_text(output_dir / "report.md", report_markdown(analysis, results_dir))
    _write_csv(output_dir / "report.csv", analysis.report[list(CSV_COLUMNS)])
    _write_text(output_dir / "gain.md", gain_markdown(gain, analysis.metric) if not gain.empty else
                "# Where the gain comes from\n\nNeeds a per_prompt table and an ensemble table.\n")
    _write_csv(output_dir / "gain.csv", gain)
    _write_csv(output_dir / "questions.csv", questions_table(analysis))
    plot_report(analysis, gain, output_dir)
    plot_reliability(analysis, output_dir)
    return gain


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--results-dir", type=Path, help="folder with the *.feather result tables")
    where.add_argument("--study", type=Path, nargs="+", metavar="DIR", help="one results folder per dev set: "
                       "study.md / .csv / .png / .pdf side by side in --output-dir (what held on all of them)")
    where.add_argument("--choose", type=Path, nargs="+", metavar="DIR", help="the choose halves' results folders: "
                       "the protocol's pick (PICK_RULE) written to --output-dir/pick.json")
    parser.add_argument("--pick", type=Path, help="with --study: the pick file, whose verdict study.md states")
    parser.add_argument("--output-dir", type=Path, help="where to write the report files (default: results dir)")
    parser.add_argument("--metric", choices=["partial", "exact"], default="partial",
                        help="the metric of the intervals, paired differences and plots (default partial, upstream's)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or args.results_dir
    try:
        if args.study or args.choose:
            if output_dir is None:
                raise InputError(f"--{'study' if args.study else 'choose'} needs --output-dir (where its files go)")
        if args.choose:
            pick = write_pick(args.choose, output_dir / "pick.json", args.metric)
            print(f"pick: {pick['pick']} ({pick['reason']}) -> {output_dir / 'pick.json'}")
            return 0
        if args.study:
            print(format_markdown(held_on_all(write_study(args.study, output_dir, args.metric, args.pick))))
            print(f"wrote study.md / study.csv / study.png / study.pdf to {output_dir}")
            return 0
        analysis = analyse(args.results_dir, args.metric)
        check_writable_dir(output_dir)
    except InputError as exc:
        print(f"evaluate.py: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(HEADER.format(metric=args.metric))
    print(format_markdown(analysis.report[list(REPORT_COLUMNS)]))
    gain = write_report(analysis, output_dir, results_dir=args.results_dir)
    if not gain.empty:
        print(f"\nWhere the gain comes from ({args.metric}; gain.md has the definitions and the consistency bins):")
        print(format_markdown(gain[[c for c in GAIN_BRIEF if c in gain.columns]]))
    print(f"wrote report.md/.csv/.png/.pdf, gain.md/.csv, questions.csv, reliability.png/.pdf to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
