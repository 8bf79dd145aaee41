"""The report's numbers: every result table of a folder read into groups, the votes and the single prompts behind
the ensembles, and per row its interval, paired differences, oracle gap closed and calibration."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from self_ensemble.calibration import CALIBRATION, calibration
from self_ensemble.gain import row_stats
from self_ensemble.groups import Analysis, Group, in_report_order, summary_row, table_groups
from self_ensemble.labels import with_tags
from self_ensemble.reading import read_result_table, result_files, warn_mixed_questions, without_duplicates
from self_ensemble.stats import bootstrap, paired
from self_ensemble.votes import compared_rows, singles, vote_groups, with_vote_keys

REPORT_COLUMNS = (
    "method", "N", "questions", "exact", "partial", "95% CI", "sample std", "vs avg", "vs vote",
    "vs per-prompt mean", "oracle gap closed", "seconds/question", "tokens/question", "model tokens/question",
    *CALIBRATION, "mean", "best", "oracle", "file",
)
INTERVALS = {"95% CI": "ci", "vs avg": "vs_avg", "vs vote": "vs_vote", "vs per-prompt mean": "vs_mean", **CALIBRATION}


def _interval_text(value: tuple[float, float, float] | None, signed: bool | None = True) -> str:
    """A difference `+m [+lo, +hi]` (signed), an interval alone `[lo, hi]` (False: its value is a column of its own),
    or a value with its interval `m [lo, hi]` (None)."""
    if value is None:
        return ""
    mean, lo, hi = value
    if signed is None:
        return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if signed else f"[{lo:.3f}, {hi:.3f}]"


def interval_columns(name: str, values: list[tuple[float, float, float] | None], signed: bool | None = True) -> dict:
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
        avg = with_tags("avg", g.design)
        vs_avg.append(paired(q, scores.get((avg, g.n))) if g.ensemble and g.label != avg else None)
        vs_vote.append(paired(q, scores.get((g.vote, g.n))) if g.vote else None)
        ref = _reference(g) if g.ensemble else None
        vs_mean.append(paired(q, ref[0]) if ref is not None else None)
        closed.append(_gap(q, ref))
        calibrated.append(calibration(g.rows, analysis.metric))
    calibration_columns = {k: v for name in CALIBRATION for k, v in
                           interval_columns(name, [c[name] for c in calibrated], signed=None).items()}
    return analysis.report.assign(**interval_columns("95% CI", cis, signed=False), **calibration_columns,
                                  **interval_columns("vs avg", vs_avg), **interval_columns("vs vote", vs_vote),
                                  **interval_columns("vs per-prompt mean", vs_mean), **{"oracle gap closed": closed})


def analyse(results_dir: str | Path, metric: str = "partial") -> Analysis:
    """Read every result table of `results_dir`, add the votes and the single prompts behind every ensemble
    row, and build the report; raises InputError on a bad results dir."""
    taken: set = set()
    tables = [(path, without_duplicates(path, read_result_table(path))) for path in result_files(Path(results_dir))]
    warn_mixed_questions(tables)
    groups = [g for path, df in tables for g in table_groups(path, df, taken)]
    pp = next((g for g in groups if g.method == "per_prompt"), None)
    per_prompt = None if pp is None else with_vote_keys(pp.rows).assign(file=pp.file)
    ensembles = [g for g in groups if g.ensemble]
    if per_prompt is not None and ensembles:
        groups += vote_groups(ensembles, per_prompt)
    groups = in_report_order(groups)
    for g in groups:
        if per_prompt is not None and g.ensemble:
            g.singles = singles(compared_rows(g), per_prompt, g.n)
            g.stats = row_stats(g.rows, g.singles, metric)
    rows = [{"method": g.label, "N": g.n, **summary_row(g.rows, metric), "file": g.file} for g in groups]
    columns = [c for c in REPORT_COLUMNS if c not in INTERVALS and c != "oracle gap closed"]
    analysis = Analysis(pd.DataFrame(rows, columns=columns), groups, None if pp is None else pp.rows, metric)
    analysis.report = compare(analysis).reset_index(drop=True)
    return analysis


def build_report(results_dir: str | Path, metric: str = "partial") -> tuple[pd.DataFrame, dict, pd.DataFrame | None]:
    """One row per (file, method label, N) with the readable and the numeric columns, and per (label, N) the
    per-question scores on `metric`, and the per_prompt table if there is one; raises InputError on a bad dir."""
    analysis = analyse(results_dir, metric)
    return analysis.report, analysis.scores, analysis.per_prompt
