"""The choose/confirm study (docs/study.md): the pick by PICK_RULE on the choose halves (pick.json), then on the
confirm halves every method against the default, the vote and its repeat control with exact paired tests
(study.md/.csv/.png/.pdf)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from constants import InputError
from files import atomic_write, check_writable_dir
from results import read_settings
from self_ensemble.analysis import analyse, interval_columns
from self_ensemble.figures import GREY
from self_ensemble.groups import Analysis, Group, question_scores
from self_ensemble.labels import SHORT_NAMES, is_missing
from self_ensemble.reading import read_result_table, scored
from self_ensemble.stats import paired
from self_ensemble.tables import format_markdown, write_csv, write_text
from significance import FEW_DISCORDANT

if TYPE_CHECKING:  # the annotation's type only: matplotlib loads when the figure is drawn
    from matplotlib.figure import Figure

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
            for column, field in FUSION_FIELDS.items()
            if column in group.rows.columns and not is_missing(first[column])}


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
    """`pick_default` over the choose halves written to `output` (pick.json); returns the pick."""
    import json
    pick = pick_default(results_dirs, metric)
    check_writable_dir(output.parent)
    write_text(output, json.dumps(pick, indent=1) + "\n")
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
    """`scores` against `other` on the questions both answered (`Comparison`); None without `other` or without
    a question in common."""
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
        **interval_columns("vs default", [c and c.difference for c in default]),
        **_comparison_columns("", default),
        **{"p (Holm)": ["" if p is None else f"{p:.3g}" for p in corrected], "verdict": verdicts},
        **interval_columns("vs vote", [c["vote"] and c["vote"].difference for c in comparisons]),
        **_comparison_columns(" vote", [c["vote"] for c in comparisons]),
        **interval_columns("diversity gain", [c["control"] and c["control"].difference for c in comparisons]),
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
        q = question_scores(scored(read_result_table(path)), analysis.metric)
        c = compared(q, default)
        columns = {**interval_columns("vs default", [c and c.difference]), **_comparison_columns("", [c])}
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


def study_figure(tables: dict[str, pd.DataFrame], title: str) -> Figure:
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
                if k not in t.index or is_missing(t.loc[k, short]):
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
    write_text(output_dir / "study.md", study_markdown(tables, metric, title, half, pick, dropped))
    write_csv(output_dir / "study.csv", numeric[keep])
    fig = study_figure(tables, title)
    for kind in ("png", "pdf"):
        atomic_write(output_dir / f"study.{kind}", lambda tmp, kind=kind: fig.savefig(tmp, format=kind, dpi=fig.dpi))
    return tables
