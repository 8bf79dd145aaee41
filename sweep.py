"""Sweep N and compare methods in one command, the model loaded once: per_prompt once (the first max-N
paraphrases), then logit avg, avg_prob, max and attention-level fusion for N = min..max, then evaluate.py's
report (accuracy against N with confidence bands, paired differences, the vote, the gain analysis). With
--study, the default and the attention-level variants of STUDY_GRID at the largest N instead: the choose half of the
study's protocol; with --confirm PICK, its confirm half: the pick (evaluate.py --choose), the default, the baselines
(the vote's single prompts, avg, self-consistency), the repeat control of each and the default's leave-one-out.

    python sweep.py --max-n 5                                               # the bundled sample
    python sweep.py --study --half choose --dataset jsonl --data-file data/webqa_dev.jsonl --min-n 5 --max-n 5
    python sweep.py --confirm results/study/pick.json --half confirm --dataset jsonl --data-file ... --max-n 5

It takes the commands' flags (data, model, decoding, fusion variant); every N is checked against the data
before anything is written. Attention-level variants next to each other in the plan share the prefill of the
paraphrases (runner.fusion_jobs); each table is still its own file, equal to the one its command writes alone,
and resumable: running the sweep again skips what is finished.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from cli import add_fusion_flags, common_parser, fusion_settings, main_guard, parse, run_config
from constants import REPO_DIR, InputError, safe_name
from fusion import FusionSettings
from models import resolve_device
from runner import bind_model, fusion_flags, fusion_jobs, load_lm, logit_flags, logit_job, open_job, self_consistency
from selection import Selection

LOGIT_SWEEP = ("avg", "avg_prob", "max")
# the attention-level variants of the study (backend and compile as the run resolves them): biases from the single
# answers' votes and from the attention shares, the fused row beside the N plain prompts, contrasted with the
# question-free prompt; then positions, few-shot format, temperature and bias, and the ablations
STUDY_GRID = ([FusionSettings(bias="agreement"), FusionSettings(bias="shares"), FusionSettings(beside="singles"),
               FusionSettings(beside="prior", beside_weight=0.5), FusionSettings(beside="prior", beside_weight=1.0)]
              + [FusionSettings(positions=p, fewshot="fused") for p in ("left", "right")]
              + [FusionSettings(positions=p, temperature=t) for p in ("left", "right") for t in (0.7, 1.4)]
              + [FusionSettings(positions=p, bias=b) for p in ("left", "right", "continuous") for b in ("none", "uniform")]
              + [FusionSettings(isolation="none"), FusionSettings(bias="-0.8"), FusionSettings(bias="-2.3")])
# the grid's core, for a study on a CPU budget (--grid core): the bias's strength either way, the other positions,
# the fused few-shot format and APE's temperature
STUDY_CORE = [FusionSettings(bias="uniform"), FusionSettings(bias="none"), FusionSettings(bias="-2.3"),
              FusionSettings(positions="right"), FusionSettings(fewshot="fused"), FusionSettings(temperature=0.7)]
GRIDS = {"full": STUDY_GRID, "core": STUDY_CORE}


REPEAT = Selection(1, repeat=True)  # the repeat control: one paraphrase per question, drawn, N times


def plan(args, settings: FusionSettings) -> list[tuple[str, object, int, Selection | str | None]]:
    """Every job of the sweep, in order: (kind, method or fusion settings, N, paraphrase selection or --indexs)."""
    if args.confirm:
        return confirm_plan(args.max_n, settings, read_pick(args.confirm, settings))
    if args.study:
        return choose_plan(args.max_n, settings, GRIDS[args.grid])
    jobs: list[tuple[str, object, int, Selection | str | None]] = [("logit", "per_prompt", args.max_n, None)]
    for n in range(args.min_n, args.max_n + 1):
        jobs += [("logit", method, n, None) for method in LOGIT_SWEEP] + [("fusion", settings, n, None)]
        if args.samples:  # which paraphrases, not only how many: S selections, and the repeat control
            for chosen in (Selection(args.samples), Selection(args.samples, repeat=True)):
                jobs += [("logit", "avg", n, chosen), ("fusion", settings, n, chosen)]
    return jobs


def choose_plan(n: int, default: FusionSettings, grid: list[FusionSettings]) -> list[tuple[str, object, int, None]]:
    """The choose half searches the attention-level variants only: the default and the grid at N (every comparison
    with the baselines is made on the confirm half)."""
    backend = dict(backend=default.backend, compile=default.compile)
    variants = [default] + [replace(v, **backend) for v in grid if replace(v, **backend) != default]
    return [("fusion", settings, n, None) for settings in variants]


def confirm_plan(n: int, default: FusionSettings, pick: FusionSettings) -> list[tuple[str, object, int, object]]:
    """The confirm half, the comparisons that decide first (a run cut short keeps them): the default and the pick,
    the single prompts (the vote), avg, the fused rows' repeat controls, then self-consistency, avg's repeat
    control and the default's leave-one-out (each paraphrase dropped in turn)."""
    fused = [default] + ([pick] if pick != default else [])
    jobs = [("fusion", settings, n, None) for settings in fused]
    jobs += [("logit", "per_prompt", n, None), ("logit", "avg", n, None)]
    jobs += [("fusion", settings, n, REPEAT) for settings in fused]
    jobs += [("logit", "self_consistency", n, None), ("logit", "avg", n, REPEAT)]
    everyone = range(n)  # --indexs: upstream's diversity/ tables
    return jobs + [("fusion", default, n - 1, ",".join(str(j) for j in everyone if j != i)) for i in everyone
                   ] if n > 1 else jobs


def read_pick(path: str, default: FusionSettings) -> FusionSettings:
    """The pick of evaluate.py --choose (pick.json) as FusionSettings on the run's backend."""
    import json
    try:
        pick = json.loads(Path(path).read_text(encoding="utf-8"))
        return replace(default, **{**FusionSettings().__dict__, **pick["settings"],
                                   "backend": default.backend, "compile": default.compile})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"--confirm {path}: not a pick file of evaluate.py --choose ({type(err).__name__}: "
                         f"{str(err)[:100]})") from None


def shared_groups(jobs: list[tuple[str, object, int, Selection | str | None]]) -> list[list[int]]:
    """The jobs run together (their indices, in order): each run of attention-level jobs next to each other over
    the same N and paraphrases writes its tables in one pass (runner.fusion_jobs); a logit-level job alone."""
    groups: list[list[int]] = []
    for i, (kind, _, n, chosen) in enumerate(jobs):
        last = jobs[groups[-1][0]] if groups else None
        if kind == "fusion" and last is not None and last[0] == "fusion" and (last[2], last[3]) == (n, chosen):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def describe(job: tuple[str, object, int, Selection | str | None]) -> str:
    kind, what, n, chosen = job
    sampled = (f", paraphrases {chosen}" if isinstance(chosen, str) else
               f", {chosen.samples} {'repeated' if chosen.repeat else 'sampled'} selections" if chosen else "")
    return f"{what}, N={n}{sampled}" if kind == "logit" else f"flex_attention, N={n}{sampled}: {what.describe()}"


def parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n\n")[0], omit=("--indexs", "--lemmaize"))
    add_fusion_flags(p)
    p.add_argument("--min-n", type=int, default=2)
    p.add_argument("--max-n", type=int, default=5, help="largest N (upstream's ensemble.sh: 6)")
    p.add_argument("--study", action="store_true", help="the default and the attention-level variants at --max-n "
                   "(the protocol's choose half)")
    p.add_argument("--grid", choices=list(GRIDS), default="full", help="with --study: every variant (full) or "
                   "the core of the grid (core: six variants, for a CPU budget)")
    p.add_argument("--confirm", metavar="PICK", help="the protocol's confirm half at --max-n: the pick file's variant "
                   "(evaluate.py --choose), the default, the baselines, their repeat controls, leave-one-out")
    p.add_argument("--samples", type=int, metavar="S", help="also S sampled selections of N paraphrases per question "
                   "(avg and fusion), and the repeat control, for every N (upstream's synced samples)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs, run nothing")
    return p


def open_plan(args: argparse.Namespace) -> tuple[list, list]:
    """The sweep's jobs and each one opened (runner.open_job: its data and output checked) before the model
    loads or anything is written."""
    if not 1 <= args.min_n <= args.max_n:
        raise InputError(f"--min-n {args.min_n} / --max-n {args.max_n}: need 1 <= min <= max")
    if args.confirm and (args.study or args.samples):
        raise InputError("--confirm runs the confirm half alone: drop --study and --samples")
    args.output_dir = args.output_dir or str(REPO_DIR / "results" / "sweep" / args.dataset /
                                             safe_name(Path(args.model).name))
    settings, _ = fusion_settings(args, resolve_device(args.device))
    jobs = plan(args, settings)
    opened = []
    for kind, what, n, chosen in jobs:
        sc = self_consistency({}, args.seed) if what == "self_consistency" else None
        flags = (logit_flags(what, n, args.confidence_samples, sc) if kind == "logit"
                 else fusion_flags(what, n, args.confidence_samples))
        config = run_config(args, **flags)
        config = replace(config, indexs=chosen) if isinstance(chosen, str) else replace(config, selection=chosen)
        opened.append(open_job(config, n))
    return jobs, opened


def run_plan(jobs: list, opened: list, lm, shared: bool = True) -> None:
    """Every job's table, the model loaded once; `shared`: attention-level variants next to each other share
    their prefill (`shared_groups`), else each runs alone (what benchmarks/shared_sweep.py compares with)."""
    for group in shared_groups(jobs) if shared else [[i] for i in range(len(jobs))]:
        (kind, what, n, _), (config, dataset) = jobs[group[0]], opened[group[0]]
        bind_model(config, dataset, lm, n)
        if kind == "logit":
            logit_job(config, dataset, lm, what, n)
        else:
            fusion_jobs([opened[i][0] for i in group], dataset, lm, [jobs[i][1] for i in group], n)


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse(parser(), argv)
    jobs, opened = open_plan(args)
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {describe(job)}", flush=True)
    if args.dry_run:
        return 0
    run_plan(jobs, opened, load_lm(opened[0][0]))
    return subprocess.call([sys.executable, str(REPO_DIR / "evaluate.py"), "--results-dir", args.output_dir])


if __name__ == "__main__":
    raise SystemExit(main())
