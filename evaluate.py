"""Summarise the result tables of a run: accuracy, cost and a plot per method and ensemble size.

python evaluate.py --results-dir DIR [--output-dir DIR2]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from constants import EXIT_BAD_INPUT, LOGIT_METHODS, InputError
from results import OneLineParser, atomic_write, check_writable_dir

REQUIRED_COLUMNS = (
    "uuid", "answers", "prediction", "seconds", "new_tokens", "method", "num_ensemble", "paraphrase_index",
)
EXTRA_COLUMNS = ("positions", "attn_backend", "fusion_bias")  # flex_attention settings, part of the label
METHOD_ORDER = (*LOGIT_METHODS, "flex_attention")
REPORT_COLUMNS = (
    "method", "N", "questions", "exact", "partial", "seconds/question", "tokens/question",
    "mean", "best", "oracle", "file",
)
HEADER = (
    "Accuracy is the share of rows judged correct. mean/best/oracle are per_prompt only and use partial match: "
    "mean over paraphrases, best single paraphrase index, oracle = any paraphrase correct."
)


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
    return df


def _labels(df: pd.DataFrame) -> list[str]:
    extras = [df[c] for c in EXTRA_COLUMNS if c in df.columns]
    labels = []
    for method, *values in zip(df["method"], *extras):
        shown = [str(v) for v in values if not pd.isna(v)]
        labels.append(f"{method}[{','.join(shown)}]" if shown else str(method))
    return labels


def _summarise(group: pd.DataFrame) -> dict:
    questions = group["uuid"].nunique()
    seconds = group["seconds"].sum()
    if "confidence_seconds" in group.columns:  # the weighted methods' confidences are part of their cost
        seconds += group.drop_duplicates("uuid")["confidence_seconds"].fillna(0).sum()
    row = {
        "questions": questions,
        "exact": group["exact"].mean(),
        "partial": group["partial"].mean(),
        "seconds/question": seconds / questions,
        "tokens/question": group["new_tokens"].sum() / questions,
    }
    if (group["method"] == "per_prompt").all():
        per_index = group.groupby("paraphrase_index")["partial"].mean()
        row.update(
            mean=per_index.mean(),
            best=per_index.max(),
            oracle=group.groupby("uuid")["partial"].any().mean(),
        )
    return row


def build_report(results_dir: str | Path) -> pd.DataFrame:
    """One row per (file, method label, N); raises InputError on a bad results dir."""
    tables = [(path, _read_table(path)) for path in _result_files(Path(results_dir))]
    rows = []
    for path, df in tables:
        scored = {"exact", "partial"} <= set(df.columns) and df[["exact", "partial"]].notna().all().all()
        if not scored:
            from scoring import score_frame  # spaCy loads only when a table lacks scores

            df = score_frame(df)
        df = df.assign(label=_labels(df), exact=df["exact"].astype(bool), partial=df["partial"].astype(bool))
        for (label, n), group in df.groupby(["label", "num_ensemble"], sort=False):
            rows.append({"method": label, "N": int(n), **_summarise(group), "file": path.name})
    report = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    key = report["method"].str.split("[", regex=False).str[0].map(order).fillna(len(order))
    return report.assign(_key=key).sort_values(["_key", "N", "method"]).drop(columns="_key").reset_index(drop=True)


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


def plot_report(report: pd.DataFrame, path: Path) -> None:
    """report.png: partial accuracy against N per method, and against seconds per question."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    by_n, by_cost = fig.subplots(1, 2)
    for label, group in report[report["method"] != "per_prompt"].groupby("method", sort=False):
        group = group.sort_values("N")
        by_n.plot(group["N"], group["partial"], marker="o", label=label)
    for _, row in report[report["method"] == "per_prompt"].iterrows():
        by_n.axhline(row["mean"], linestyle="--", color="gray", label=f"per_prompt mean (N={row['N']})")
    by_n.set(xlabel="N (paraphrases ensembled)", ylabel="partial accuracy", title="Accuracy against N")
    by_n.xaxis.set_major_locator(MaxNLocator(integer=True))
    if by_n.get_legend_handles_labels()[0]:
        by_n.legend(fontsize="small")
    by_cost.scatter(report["seconds/question"], report["partial"])
    for _, row in report.iterrows():
        by_cost.annotate(f"{row['method']}-{row['N']}", (row["seconds/question"], row["partial"]), fontsize="small")
    by_cost.set(xlabel="seconds per question", ylabel="partial accuracy", title="Accuracy against cost")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_report(report: pd.DataFrame, output_dir: Path) -> None:
    """report.md, report.csv and report.png in output_dir, each written atomically."""
    markdown = f"# Results\n\n{HEADER}\n\n{format_markdown(report)}\n"
    atomic_write(output_dir / "report.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    atomic_write(output_dir / "report.csv", lambda tmp: report.to_csv(tmp, index=False))
    plot_report(report, output_dir / "report.png")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", required=True, type=Path, help="folder with the *.feather result tables")
    parser.add_argument("--output-dir", type=Path, help="where to write report.md/.csv/.png (default: results dir)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or args.results_dir
    try:
        report = build_report(args.results_dir)
        check_writable_dir(output_dir)
    except InputError as exc:
        print(f"evaluate.py: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(HEADER)
    print(format_markdown(report))
    write_report(report, output_dir)
    print(f"wrote report.md, report.csv, report.png to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
