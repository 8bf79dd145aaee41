"""The report's text: markdown tables, the report's header, the label map, the questions table, the tables'
provenance, gain.md, and text and csv files written atomically."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from constants import (CALIBRATION_BINS, DEFAULT_FEWSHOT_FORMAT, DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE,
                       DEFAULT_POSITIONS)
from files import atomic_write
from results import read_settings
from self_ensemble.analysis import INTERVALS, REPORT_COLUMNS
from self_ensemble.calibration import CALIBRATION
from self_ensemble.gain import as_count
from self_ensemble.groups import Analysis, Group, question_scores
from self_ensemble.labels import EXTRA_COLUMNS, REQUIRED_SETTINGS, VARIANT_DEFAULTS, is_missing
from self_ensemble.stats import bin_labels

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
            **{c.replace("_", " "): ("" if c not in g.rows.columns or is_missing(first[c]) else str(first[c]))
               for c in EXTRA_COLUMNS},
            "paraphrases": _selection_text(g), "N": [], "files": []})
        entry["N"].append(str(g.n))
        entry["files"].append(g.file)
    table = pd.DataFrame(list(rows.values()))
    if table.empty:
        return table
    unused = [c.replace("_", " ") for c in VARIANT_DEFAULTS if c not in REQUIRED_SETTINGS
              and (table[c.replace("_", " ")] == "").all()]  # a setting no label was run with
    return table.drop(columns=unused).assign(N=table["N"].map(", ".join),
                                             files=table["files"].map(lambda f: ", ".join(dict.fromkeys(f))))


def questions_table(analysis: Analysis) -> pd.DataFrame:
    """One line per question: uuid, first paraphrase, gold answers, the single answers; then per method label
    and N its prediction (the first sample's) and its correctness (mean over samples); `methods disagreeing`
    counts the methods on the minority side of right/wrong. Questions where methods disagree come first."""
    source = analysis.per_prompt if analysis.per_prompt is not None else analysis.groups[0].rows
    first = source.sort_values("paraphrase_index", kind="stable").drop_duplicates("uuid")
    order = list(dict.fromkeys([*first["uuid"], *(u for g in analysis.groups for u in g.rows["uuid"])]))
    table = pd.DataFrame({"uuid": order}).set_index("uuid", drop=False)
    paraphrase = first.set_index("uuid")["paraphrases"].map(lambda p: "" if is_missing(p) or len(p) == 0 else p[0]) \
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
    brief = brief.assign(**{c: brief[c].map(lambda v: _cell(as_count(v))) for c in ("new", "kept", "lost")})
    bins = gain[["method", "N"]].assign(**{
        name: [f"{a:.3f} ({int(n)})" if n else "" for a, n in zip(gain[f"acc {name}"], gain[f"n {name}"])]
        for name in bin_labels()})
    return (f"# Where the gain comes from\n\n{GAIN_HEADER.format(metric=metric)}\n\n{format_markdown(brief)}\n\n"
            f"## Accuracy (questions) by consistency of the single answers\n\n{format_markdown(bins)}\n")


def report_markdown(analysis: Analysis, results_dir: Path | None) -> str:
    """report.md: the header, the report table, the label map (when a label has one), the other files' names,
    and the tables' provenance when `results_dir` is given."""
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


def write_text(path: Path, text: str) -> None:
    """`text` into `path` as UTF-8, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: Path, df: pd.DataFrame) -> None:
    """`df` into `path` as csv without its index, atomically."""
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
