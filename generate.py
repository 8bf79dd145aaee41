"""Logit-level self-ensemble: the N paraphrases of each question decoded together, one batched
forward per step with a KV cache, their next-token distributions fused into one token that is
appended to all N rows.

    python generate.py --method avg --dataset webqa --model llama3.2_3b_it --num_ensemble 6

--method all runs the two baselines, origin then per_prompt (upstream's generate_baseline.py --method all);
--method self_consistency samples K answers (--sc-samples, default N) and takes their vote (Wang et al. 2022);
--indexs 0,2,4 fuses exactly those paraphrases into diversity/ensemble_<method>-0,2,4.feather (upstream's
diversity runs); --lemmaize adds upstream's lemma columns to the table the same command wrote.
"""
from __future__ import annotations

from cli import (Done, add_n_flag, add_sc_flags, add_selection_flags, common_parser, lemmaize_command, main_guard,
                 parse, printable, run_config, self_consistency_settings)
from constants import DEFAULT_CONFIDENCE_SAMPLES, LOGIT_METHODS, InputError
from runner import bind_model, load_lm, logit_count, logit_flags, logit_job, logit_table_name, open_job


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--method", default="avg", choices=[*LOGIT_METHODS, "all"],
                   help="all: origin, then per_prompt (upstream's baselines)")
    add_n_flag(p, "paraphrases per question (N); default 5, and for per_prompt every paraphrase")
    p.add_argument("--confidence-samples", type=int, default=DEFAULT_CONFIDENCE_SAMPLES,
                   help="K sampled answers per paraphrase for weighted methods (upstream: 100)")
    add_selection_flags(p)
    add_sc_flags(p)
    args = parse(p, argv, default_n=None)
    sc = self_consistency_settings(args)
    for flag in ("indexs", "num_samples"):
        if getattr(args, flag) is not None and args.method in ("per_prompt", "origin", "all"):
            raise InputError(f"--{flag} chooses the paraphrases an ensemble fuses; --method {args.method} is no "
                             f"ensemble (per_prompt answers every paraphrase already)")
    lm = None
    for method in (("origin", "per_prompt") if args.method == "all" else (args.method,)):
        config = run_config(args, **logit_flags(method, args.num, args.confidence_samples, sc))
        n = logit_count(method, args.num)
        table = config.table(logit_table_name(method, n or 1, config.method_flags), n or 1)
        try:
            if args.lemmaize:
                lemmaize_command(config, table)
        except Done as done:  # --lemmaize finished this table: on to the next one
            print(printable(str(done)))
            continue
        config, dataset = open_job(config, n or 1, table)
        lm = lm or load_lm(config)  # --method all: one model for both tables
        bind_model(config, dataset, lm, n or 1)
        logit_job(config, dataset, lm, method, args.num)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
