"""The study grid with its prefills shared against one run per variant (issue 38): `sweep.py --study` on the
same questions both ways, each way in a fresh process with the model loaded once (its load not timed), then
every table of the one compared with the other's: tokens equal, log-probabilities within 1e-5.

    python benchmarks/shared_sweep.py                         # the full grid, 100 WebQuestions (choose half), N=5
    python benchmarks/shared_sweep.py --limit 10 --grid core  # a quick look
    python benchmarks/shared_sweep.py --model tiny-llama --limit 4 --max-new-tokens 2   # the smoke test

It prints, per way: wall seconds of the jobs, tokens run through the model (prompt and decode, padding
included), forward calls and peak RSS; then the ratio shared/separate and the tables' agreement. Run it on a
quiet machine: the two ways run one after the other, and load from other processes falls on either."""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAYS = ("separate", "shared")


def child(way: str, out: Path, sweep_argv: list[str]) -> dict:
    """One way in this process: the sweep's jobs (sweep.open_plan, sweep.run_plan), timed, tokens counted."""
    import sweep
    from runner import load_lm
    args = sweep.parse(sweep.parser(), sweep_argv + ["--output-dir", str(out)])
    jobs, opened = sweep.open_plan(args)
    lm = load_lm(opened[0][0])
    counts = {"tokens": 0, "forwards": 0}

    def count(module, _, kwargs):
        counts["tokens"] += kwargs["input_ids"].numel()
        counts["forwards"] += 1
    lm.model.register_forward_pre_hook(count, with_kwargs=True)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    sweep.run_plan(jobs, opened, lm, shared=way == "shared")
    return dict(way=way, seconds=time.perf_counter() - start, variants=len(jobs), **counts,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, loaded_rss_mb=loaded_rss)


def compare(shared: Path, separate: Path) -> dict:
    """Tables of the two ways: how many, how many rows with the same tokens, the largest log-probability gap."""
    import pandas as pd
    names = sorted(p.name for p in separate.glob("*.feather"))
    if names != sorted(p.name for p in shared.glob("*.feather")):
        raise SystemExit("the two ways wrote different tables")
    rows = same = 0
    gaps = {}
    for name in names:
        a, b = pd.read_feather(shared / name), pd.read_feather(separate / name)
        rows += len(a)
        same += sum(list(x) == list(y) for x, y in zip(a["token_ids"], b["token_ids"]))
        gaps[name] = max(abs(u - v) for x, y in zip(a["token_logprobs"], b["token_logprobs"]) for u, v in zip(x, y))
    worst = max(gaps, key=gaps.get)
    return dict(tables=len(names), rows=rows, same_tokens=same, max_logprob_gap=gaps[worst], worst_table=worst)


def sweep_flags(args: argparse.Namespace) -> list[str]:
    return ["--study", "--grid", args.grid, "--dataset", "jsonl", "--data-file", args.data_file, "--half", args.half,
            "--limit", str(args.limit), "--model", args.model, "--min-n", str(args.n), "--max-n", str(args.n),
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--no-progress",
            "--attn", args.attn]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2_135m_it")
    p.add_argument("--data-file", default="data/webqa_dev.jsonl")
    p.add_argument("--half", default="choose")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--grid", default="full")
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.out), sweep_flags(args))))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        measured = {}
        for way in WAYS:
            done = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--child", way, "--out",
                                   str(Path(scratch) / way)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{way}: exit {done.returncode}\n{done.stderr[-3000:]}")
            measured[way] = json.loads(done.stdout.strip().splitlines()[-1])
        agreement = compare(Path(scratch) / "shared", Path(scratch) / "separate")
    report(args, measured, agreement)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(measured=measured, agreement=agreement), indent=1) + "\n")
    return 0


def report(args: argparse.Namespace, measured: dict, agreement: dict) -> None:
    print(f"{args.model}, {args.limit} questions ({args.data_file}, {args.half} half), grid {args.grid} "
          f"({measured['shared']['variants']} variants), N={args.n}, {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, {args.attn}")
    print("| way | wall s | tokens through the model | forward calls | peak RSS MB (model loaded) |")
    print("|---|---:|---:|---:|---:|")
    for way in WAYS:
        m = measured[way]
        print(f"| {way} | {m['seconds']:.1f} | {m['tokens']:,} | {m['forwards']:,} | {m['peak_rss_mb']:.0f} "
              f"({m['loaded_rss_mb']:.0f}) |")
    s, r = measured["shared"], measured["separate"]
    print(f"shared / separate: wall {s['seconds'] / r['seconds']:.2f}x, tokens {s['tokens'] / r['tokens']:.2f}x, "
          f"forward calls {s['forwards'] / r['forwards']:.2f}x")
    gap = agreement["max_logprob_gap"]
    print(f"tables: {agreement['tables']}, rows with equal tokens {agreement['same_tokens']}/{agreement['rows']}, "
          f"largest log-probability gap {gap:.2e} ({'within' if math.isfinite(gap) and gap <= 1e-5 else 'PAST'} 1e-5, "
          f"{agreement['worst_table']})")


if __name__ == "__main__":
    raise SystemExit(main())
