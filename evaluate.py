"""Summarise the result tables of a run: accuracy, cost and a plot per method and ensemble size.

python evaluate.py --results-dir DIR [--output-dir DIR2]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from constants import EXIT_BAD_INPUT, LOGIT_METHODS, InputError
from results import OneLineParser, atomic_write, check_writable_dir, read_settings

REQUIRED_COLUMNS = (
    "uuid", "answers", "prediction", "seconds", "new_tokens", "method", "num_ensemble", "paraphrase_index",
)
# flex_attention settings, part of the label
EXTRA_COLUMNS = ("positions", "attn_backend", "fusion_bias", "fusion_temperature", "fewshot_format")
BOOTSTRAP_SAMPLES = 2000
METHOD_ORDER = (*LOGIT_METHODS, "flex_attention")
REPORT_COLUMNS = (
    "method", "N", "questions", "exact", "partial", "95% CI", "vs avg", "vs per-prompt mean", "oracle gap closed",
    "seconds/question", "tokens/question", "mean", "best", "oracle", "file",
)
HEADER = (
    "Accuracy is the share of rows judged correct. mean/best/oracle are per_prompt only: mean over paraphrases, "
    "best single paraphrase index, oracle = any paraphrase correct. On the report's metric ({metric}): 95% CI of "
    "the accuracy by bootstrap over questions; vs avg / vs per-prompt mean: the paired difference with logit avg "
    "at the same N and with the mean of the first N single prompts, each question counted once, with its 95% "
    "bootstrap interval; oracle gap closed: (accuracy - per-prompt mean) / (oracle - per-prompt mean) over the "
    "first N paraphrases."
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


def _summarise(group: pd.DataFrame, metric: str) -> dict:
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
        per_index = group.groupby("paraphrase_index")[metric].mean()
        row.update(mean=per_index.mean(), best=per_index.max(), oracle=group.groupby("uuid")[metric].any().mean())
    return row


def bootstrap(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` (one per question), resampling questions."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired(scores: pd.Series, reference: pd.Series | None) -> str:
    """"+d [lo, hi]": the mean per-question difference over the questions both have, with its interval."""
    if reference is None:
        return ""
    both = scores.index.intersection(reference.index)
    if len(both) == 0:
        return ""
    diff = (scores[both] - reference[both]).to_numpy(dtype=float)
    lo, hi = bootstrap(diff)
    return f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"


def per_prompt_reference(per_prompt: pd.DataFrame | None, n: int, metric: str) -> tuple[pd.Series, pd.Series] | None:
    """Per question: the mean and the any() of the first n single prompts' scores."""
    if per_prompt is None:
        return None
    first = per_prompt[per_prompt["paraphrase_index"] < n].groupby("uuid")[metric]
    return first.mean(), first.max().astype(float)


def compare(report: pd.DataFrame, scores: dict, per_prompt: pd.DataFrame | None, metric: str) -> pd.DataFrame:
    """The interval, the paired differences and the share of the oracle gap closed, for every row."""
    cis, vs_avg, vs_mean, closed = [], [], [], []
    for row in report.itertuples(index=False):
        q = scores[(row.method, row.N)]
        lo, hi = bootstrap(q.to_numpy(dtype=float))
        cis.append(f"[{lo:.3f}, {hi:.3f}]")
        ref = per_prompt_reference(per_prompt, row.N, metric)
        own = row.method == "per_prompt"
        vs_avg.append("" if own or row.method == "avg" else paired(q, scores.get(("avg", row.N))))
        vs_mean.append("" if own or ref is None else paired(q, ref[0]))
        gap = None
        if ref is not None and not own:
            both = q.index.intersection(ref[0].index)
            mean, oracle = ref[0][both].mean(), ref[1][both].mean()
            gap = (q[both].mean() - mean) / (oracle - mean) if oracle > mean else None
        closed.append(gap)
    return report.assign(**{"95% CI": cis, "vs avg": vs_avg, "vs per-prompt mean": vs_mean,
                            "oracle gap closed": closed})


def build_report(results_dir: str | Path, metric: str = "partial") -> tuple[pd.DataFrame, dict, pd.DataFrame | None]:
    """One row per (file, method label, N), and per (label, N) the per-question scores on `metric`, and the
    per_prompt table if there is one; raises InputError on a bad results dir."""
    tables = [(path, _read_table(path)) for path in _result_files(Path(results_dir))]
    rows, scores, per_prompt = [], {}, None
    for path, df in tables:
        scored = {"exact", "partial"} <= set(df.columns) and df[["exact", "partial"]].notna().all().all()
        if not scored:
            from scoring import score_frame  # spaCy loads only when a table lacks scores

            df = score_frame(df)
        df = df.assign(label=_labels(df), exact=df["exact"].astype(bool), partial=df["partial"].astype(bool))
        if (df["method"] == "per_prompt").all():  # every paraphrase of each question: one group, N the most
            per_prompt = df = df.assign(num_ensemble=int(df.groupby("uuid").size().max()))
        for (label, n), group in df.groupby(["label", "num_ensemble"], sort=False):
            rows.append({"method": label, "N": int(n), **_summarise(group, metric), "file": path.name})
            scores[(label, int(n))] = group.groupby("uuid")[metric].mean()
    report = pd.DataFrame(rows, columns=[c for c in REPORT_COLUMNS if c not in ("95% CI", "vs avg",
                                                                                 "vs per-prompt mean",
                                                                                 "oracle gap closed")])
    report = compare(report, scores, per_prompt, metric)[list(REPORT_COLUMNS)]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    key = report["method"].str.split("[", regex=False).str[0].map(order).fillna(len(order))
    report = report.assign(_key=key).sort_values(["_key", "N", "method"]).drop(columns="_key").reset_index(drop=True)
    return report, scores, per_prompt


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


def agreement(per_prompt: pd.DataFrame, n: int) -> pd.Series:
    """Per question: the share of pairs among its first n single-prompt answers that are the same answer."""
    from scoring import normalize
    first = per_prompt[per_prompt["paraphrase_index"] < n]
    def pairs(predictions: pd.Series) -> float:
        answers = [normalize(p or "") for p in predictions]
        total = len(answers) * (len(answers) - 1) / 2
        same = sum(a == b for i, a in enumerate(answers) for b in answers[i + 1:])
        return same / total if total else 1.0
    return first.groupby("uuid")["prediction"].agg(pairs)


def plot_report(report: pd.DataFrame, scores: dict, per_prompt: pd.DataFrame | None, metric: str,
                path: Path) -> None:
    """report.png: accuracy against N per method with 95% bands; against seconds per question; and the
    diversity plot: does disagreement among the single prompts predict the ensemble's gain over their mean?"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(18, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    by_n, by_cost, by_agreement = fig.subplots(1, 3)
    for label, group in report[report["method"] != "per_prompt"].groupby("method", sort=False):
        group = group.sort_values("N")
        bands = np.array([bootstrap(scores[(label, n)].to_numpy(dtype=float)) for n in group["N"]])
        line, = by_n.plot(group["N"], group[metric], marker="o", label=label)
        by_n.fill_between(group["N"], bands[:, 0], bands[:, 1], color=line.get_color(), alpha=0.12)
    if per_prompt is not None:
        ns = sorted(set(report.loc[report["method"] != "per_prompt", "N"]))
        means = [per_prompt_reference(per_prompt, n, metric)[0].mean() for n in ns]
        by_n.plot(ns, means, linestyle="--", color="gray", label="per-prompt mean (first N)")
    by_n.set(xlabel="N (paraphrases ensembled)", ylabel=f"{metric} accuracy", title="Accuracy against N (95% bands)")
    by_n.xaxis.set_major_locator(MaxNLocator(integer=True))
    if by_n.get_legend_handles_labels()[0]:
        by_n.legend(fontsize="x-small")
    by_cost.scatter(report["seconds/question"], report[metric])
    for _, row in report.iterrows():
        by_cost.annotate(f"{row['method']}-{row['N']}", (row["seconds/question"], row[metric]), fontsize="x-small")
    by_cost.set(xlabel="seconds per question", ylabel=f"{metric} accuracy", title="Accuracy against cost")
    plot_diversity(by_agreement, report, scores, per_prompt, metric)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_diversity(ax, report: pd.DataFrame, scores: dict, per_prompt: pd.DataFrame | None, metric: str) -> None:
    """Mean gain over the per-prompt mean, per level of agreement among the N single answers (largest N)."""
    ensembles = report[report["method"] != "per_prompt"]
    if per_prompt is None or ensembles.empty:
        ax.set_title("Diversity: needs per_prompt and an ensemble")
        return
    n = int(ensembles["N"].max())
    agree, (mean, _) = agreement(per_prompt, n), per_prompt_reference(per_prompt, n, metric)
    for label in ensembles.loc[ensembles["N"] == n, "method"]:
        q = scores[(label, n)]
        both = q.index.intersection(mean.index)
        gain = (q[both] - mean[both]).groupby(agree[both].round(2)).mean()
        ax.plot(gain.index, gain.to_numpy(), marker="o", label=label)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set(xlabel=f"agreement among the {n} single answers (share of equal pairs)",
           ylabel="mean gain over the per-prompt mean", title=f"Diversity and gain (N={n})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")


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


def write_report(report: pd.DataFrame, scores: dict, per_prompt: pd.DataFrame | None, metric: str,
                 output_dir: Path, results_dir: Path | None = None) -> None:
    """report.md, report.csv and report.png in output_dir, each written atomically; report.md ends with the
    tables' provenance when `results_dir` is given."""
    markdown = f"# Results\n\n{HEADER.format(metric=metric)}\n\n{format_markdown(report)}\n"
    if results_dir is not None:
        files = list(dict.fromkeys(report["file"]))
        markdown += (f"\n## Provenance\n\nThe code, libraries, model and device each table was made with (from its "
                     f"`.settings.json`).\n\n{format_markdown(provenance_table(results_dir, files))}\n")
    atomic_write(output_dir / "report.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    atomic_write(output_dir / "report.csv", lambda tmp: report.to_csv(tmp, index=False))
    plot_report(report, scores, per_prompt, metric, output_dir / "report.png")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", required=True, type=Path, help="folder with the *.feather result tables")
    parser.add_argument("--output-dir", type=Path, help="where to write report.md/.csv/.png (default: results dir)")
    parser.add_argument("--metric", choices=["partial", "exact"], default="partial",
                        help="the metric of the intervals, paired differences and plots (default partial, upstream's)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or args.results_dir
    try:
        report, scores, per_prompt = build_report(args.results_dir, args.metric)
        check_writable_dir(output_dir)
    except InputError as exc:
        print(f"evaluate.py: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(HEADER.format(metric=args.metric))
    print(format_markdown(report))
    write_report(report, scores, per_prompt, args.metric, output_dir, results_dir=args.results_dir)
    print(f"wrote report.md, report.csv, report.png to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
