"""Sweep N and compare methods in one command: per_prompt once (every paraphrase), then logit avg, logit
max and attention-level fusion for N = 2..max, then evaluate.py's report (accuracy against N with
confidence bands, paired differences, the diversity plot). With --study, the attention-level variants
(positions x bias x temperature x few-shot format) at the largest N, as used to choose the defaults.

    python sweep.py --max-n 5                                               # the bundled sample
    python sweep.py --study --dataset jsonl --data-file data/webqa_dev.jsonl --max-n 5 --output-dir results/study

Each run is its own command, resumable: running the sweep again skips what is finished. Flags after
`--` go to every command (e.g. `-- --device cuda --batch-size 32`).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from constants import DATASETS, DEFAULT_DATASET, EMBEDDED_MODEL, REPO_DIR, InputError
from runner import main_guard

# (positions, fusion bias, temperature, few-shot format): the grid of the study, beside the default
STUDY_VARIANTS = ([(p, b, 1.0, "single") for p in ("left", "right", "continuous") for b in ("none", "uniform")]
                  + [(p, "uniform", t, "single") for p in ("left", "right") for t in (0.7, 1.4)]
                  + [(p, "uniform", 1.0, "fused") for p in ("left", "right")])


def commands(args, extra: list[str]) -> list[list[str]]:
    """Every command of the sweep, in order; each shares the data, model and output flags."""
    common = ["--dataset", args.dataset, "--model", args.model, "--output-dir", str(args.output_dir), *extra]
    if args.data_file:
        common += ["--data-file", args.data_file]
    if args.limit:
        common += ["--limit", str(args.limit)]
    py = [sys.executable]
    out = [py + ["generate.py", "--method", "per_prompt", *common]]
    for n in range(args.min_n, args.max_n + 1):
        for method in ("avg", "max"):
            out.append(py + ["generate.py", "--method", method, "--num_ensemble", str(n), *common])
        out.append(py + ["flex_attention_generate.py", "--num_paraphrases", str(n), *common])
    if args.study:
        for positions, bias, temperature, fewshot in STUDY_VARIANTS:
            out.append(py + ["flex_attention_generate.py", "--num_paraphrases", str(args.max_n), "--positions",
                             positions, "--fusion-bias", bias, "--fusion-temperature", str(temperature),
                             "--fewshot-format", fewshot, *common])
    return out


@main_guard
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=DATASETS)
    p.add_argument("--data-file", "--data_file")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--output-dir", "--output_dir", type=Path, help="default results/sweep/<dataset>/<model>")
    p.add_argument("--limit", type=int)
    p.add_argument("--min-n", type=int, default=2)
    p.add_argument("--max-n", type=int, default=5, help="largest N (upstream's ensemble.sh: 6)")
    p.add_argument("--study", action="store_true", help="also the attention-level variants at --max-n")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not 1 <= args.min_n <= args.max_n:
        raise InputError(f"--min-n {args.min_n} / --max-n {args.max_n}: need 1 <= min <= max")
    args.output_dir = args.output_dir or REPO_DIR / "results" / "sweep" / args.dataset / Path(args.model).name
    todo = commands(args, extra) + [[sys.executable, "evaluate.py", "--results-dir", str(args.output_dir)]]
    for i, cmd in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {' '.join(cmd[1:])}", flush=True)
        if not args.dry_run:
            code = subprocess.call(cmd, cwd=REPO_DIR)
            if code:
                print(f"error: step {i} ({cmd[1]}) exited with {code}; fix it and run the sweep again (it resumes)",
                      file=sys.stderr)
                return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
