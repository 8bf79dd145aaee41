"""The report's figures, matplotlib loaded only to draw them: accuracy, cost, diversity, the new / kept / lost
split and the attention share (report.png/.pdf), and the reliability diagram (reliability.png/.pdf)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from constants import CALIBRATION_BINS
from files import atomic_write
from self_ensemble.calibration import reliability_points
from self_ensemble.gain import binned_scores, gain_table
from self_ensemble.groups import Analysis, Group
from self_ensemble.stats import BINS, bin_labels, per_prompt_reference

if TYPE_CHECKING:  # the annotations' types only: matplotlib loads when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure

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


def plot_accuracy(ax: Axes, analysis: Analysis, colors: dict) -> None:
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


def place_labels(ax: Axes, points: pd.DataFrame, renderer: RendererBase) -> list:
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


def plot_cost(ax: Axes, analysis: Analysis, colors: dict) -> pd.DataFrame:
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


def grouped_bars(ax: Axes, series: dict[str, pd.DataFrame], colors: dict,
                 span: tuple[float, float] = (0.0, 1.0)) -> None:
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


def plot_diversity(ax: Axes, analysis: Analysis, colors: dict) -> None:
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


def plot_split(ax: Axes, analysis: Analysis, gain: pd.DataFrame) -> None:
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


def plot_attention(ax: Axes, analysis: Analysis, colors: dict) -> None:
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
    """Whether an ensemble row recorded its attention share (the figure then has an attention panel)."""
    return any(g.stats is not None and "share_entropy" in g.stats.columns and g.stats["share_entropy"].notna().any()
               for g in analysis.ensembles)


def report_figure(analysis: Analysis, gain: pd.DataFrame | None = None) -> Figure:
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


def reliability_figure(analysis: Analysis) -> Figure:
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
