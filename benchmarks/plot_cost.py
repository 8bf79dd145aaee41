"""The cost of self-ensembling against N, drawn from bench_ensemble.py's JSON: seconds per question, tokens
run through the model per question (prefill and decode) and peak memory growth per question's run, for logit
avg and attention-level fusion, one line per batch size found.

    python benchmarks/plot_cost.py benchmarks/results/bench_ensemble.json [more.json ...] --output cost_vs_n.png
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {"logit_avg": ("logit avg (N rows)", "tab:orange"), "attn_sdpa": ("attention fusion (1 row)", "tab:blue")}
PANELS = (("s_per_q", "seconds per question (median)"), ("tok_per_q", "tokens run per question"),
          ("rss_delta_mb", "peak RSS growth of a batch (MB)"))


def read_rows(path: Path) -> list[dict]:
    """A run's rows, each with the run's new tokens per question (`tokens`, read from its header)."""
    run = json.loads(path.read_text())
    found = re.search(r"max_new_tokens=(\d+)", " ".join(run["header"]))
    return [{**row, "tokens": int(found.group(1)) if found else None} for row in run["rows"]]


def curves(rows: list[dict]) -> dict[tuple[str, int, int], list[dict]]:
    """(method, batch, new tokens) -> its rows sorted by N, for the methods drawn (the prefix reused)."""
    out: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        if row["method"] in METHODS and row.get("status") == "ok" and row["group"] != "no-prefix-cache":
            out.setdefault((row["method"], row["batch"], row["tokens"]), []).append(row)
    return {key: sorted(rs, key=lambda r: r["N"]) for key, rs in sorted(out.items(), key=str)}


def plot(rows: list[dict], title: str, output: Path) -> None:
    lines = curves(rows)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 4), constrained_layout=True)
    for ax, (column, label) in zip(axes, PANELS):
        for (method, batch, tokens), rs in lines.items():
            name, color = METHODS[method]
            points = [(r["N"], r[column]) for r in rs if r.get(column) is not None]
            ax.plot(*zip(*points), marker="o", color=color, linestyle="-" if batch == 1 else "--",
                    label=f"{name}, batch {batch}, {tokens} new tokens")
        for single in (r for r in rows if r["method"] == "single_generate" and r.get(column) is not None):
            ax.axhline(single[column], color="gray", linestyle=":" if single["tokens"] == min(
                r["tokens"] for r in rows) else "-.", linewidth=1,
                       label=f"one prompt (generate), {single['tokens']} new tokens")
        ax.set_xlabel("N (paraphrases per question)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["N"] for rs in lines.values() for r in rs}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    fig.suptitle(title)
    fig.savefig(output, dpi=150)
    print(f"written: {output}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="bench_ensemble.json files (their rows are drawn together)")
    p.add_argument("--output", default="cost_vs_n.png")
    p.add_argument("--title", default="What N paraphrases cost per question (bench_ensemble.py)")
    args = p.parse_args(argv)
    rows = [row for path in args.json for row in read_rows(Path(path))]
    plot(rows, args.title, Path(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
