"""The report's files, each written atomically: report.md/.csv/.png/.pdf, gain.md/.csv, questions.csv and
reliability.png/.pdf."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from self_ensemble.figures import plot_reliability, plot_report
from self_ensemble.gain import gain_table
from self_ensemble.groups import Analysis
from self_ensemble.tables import CSV_COLUMNS, gain_markdown, questions_table, report_markdown, write_csv, write_text


def write_report(analysis: Analysis, output_dir: Path, results_dir: Path | None = None) -> pd.DataFrame:
    """report.md/.csv/.png/.pdf, gain.md/.csv, questions.csv and reliability.png/.pdf in output_dir, each written
    atomically; report.md ends with the tables' provenance when `results_dir` is given. Returns the gain table."""
    gain = gain_table(analysis)
    write_text(output_dir / "report.md", report_markdown(analysis, results_dir))
    write_csv(output_dir / "report.csv", analysis.report[list(CSV_COLUMNS)])
    write_text(output_dir / "gain.md", gain_markdown(gain, analysis.metric) if not gain.empty else
               "# Where the gain comes from\n\nNeeds a per_prompt table and an ensemble table.\n")
    write_csv(output_dir / "gain.csv", gain)
    write_csv(output_dir / "questions.csv", questions_table(analysis))
    plot_report(analysis, gain, output_dir)
    plot_reliability(analysis, output_dir)
    return gain
