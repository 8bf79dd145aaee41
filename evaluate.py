"""Summarise the result tables of a run: accuracy, cost, the post-hoc vote, where the gain comes from, figures.

python evaluate.py --results-dir DIR [--output-dir DIR2] [--metric partial|exact]
python evaluate.py --choose DIR1 DIR2 [...] --output-dir DIR3 [--metric ...]   # the protocol's pick (pick.json)
python evaluate.py --study DIR1 DIR2 [...] --output-dir DIR3 [--pick PICK] [--metric ...]   # dev sets side by side

Writes report.md/.csv/.png/.pdf, gain.md/.csv and questions.csv; docs/report.md describes every column.
"""
from __future__ import annotations

import cli  # noqa: F401 - first: Ctrl-C while the modules load is one line (exit 130)
import sys
from pathlib import Path

from cli import OneLineParser
from constants import EXIT_BAD_INPUT, InputError
from files import check_writable_dir
from self_ensemble.analysis import REPORT_COLUMNS, analyse
from self_ensemble.report import write_report
from self_ensemble.study import held_on_all, write_pick, write_study
from self_ensemble.tables import GAIN_BRIEF, HEADER, format_markdown

# the names the tests and notebooks import from evaluate
from constants import CALIBRATION_BINS  # noqa: F401
from self_ensemble.analysis import build_report  # noqa: F401
from self_ensemble.calibration import CALIBRATION, auroc, brier, calibration, calibration_bins, ece  # noqa: F401
from self_ensemble.figures import reliability_figure, report_figure  # noqa: F401
from self_ensemble.gain import gain_table  # noqa: F401
from self_ensemble.labels import row_labels as _labels  # noqa: F401
from self_ensemble.stats import BINS, agreement, bootstrap, cluster_draws  # noqa: F401
from self_ensemble.study import pick_default, study_figure, study_rows  # noqa: F401
from self_ensemble.tables import CSV_COLUMNS  # noqa: F401
from self_ensemble.votes import singles, vote_position, vote_table  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """The report of --results-dir, the pick of --choose or the study of --study; the exit status (EXIT_BAD_INPUT
    after a one-line error)."""
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
