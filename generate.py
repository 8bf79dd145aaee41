"""Logit-level self-ensemble: the N paraphrases of each question decoded together, one batched
forward per step with a KV cache, their next-token distributions fused into one token that is
appended to all N rows.

    python generate.py --method avg --dataset webqa --model llama3.2_3b_it --num_ensemble 6

--method all runs the two baselines, origin then per_prompt (upstream's generate_baseline.py --method all);
--indexs 0,2,4 fuses exactly those paraphrases into diversity/ensemble_<method>-0,2,4.feather (upstream's
diversity runs); --lemmaize adds upstream's lemma columns to the table the same command wrote.
"""
from __future__ import annotations

import argparse

from constants import DEFAULT_CONFIDENCE_SAMPLES, DEFAULT_NUM_PARAPHRASES, LOGIT_METHODS, InputError
from confidence import confidences
from dataset import Record
from decoding import StopRule, eos_ids, single_rows
from methods import answer_ensemble, answer_per_prompt
from runner import Done, check_prompts, common_parser, load_job, main_guard, output_dir, run_job


def output_name(method: str, n: int) -> str:
    return f"{method}.feather" if method in ("per_prompt", "origin") else f"ensemble_{method}-{n}.feather"


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--method", default="avg", choices=[*LOGIT_METHODS, "all"],
                   help="all: origin, then per_prompt (upstream's baselines)")
    p.add_argument("--num-ensemble", "--num_ensemble", type=int,
                   help="paraphrases per question (N); default 5, and for per_prompt every paraphrase")
    p.add_argument("--confidence-samples", type=int, default=DEFAULT_CONFIDENCE_SAMPLES,
                   help="K sampled answers per paraphrase for weighted methods (upstream: 100)")
    args = p.parse_args(argv)
    if args.indexs and args.method in ("per_prompt", "origin", "all"):
        raise InputError(f"--indexs chooses the paraphrases an ensemble fuses; --method {args.method} is no ensemble "
                         f"(per_prompt answers every paraphrase already)")
    for method in (("origin", "per_prompt") if args.method == "all" else (args.method,)):
        try:
            run(argparse.Namespace(**{**vars(args), "method": method}))
        except Done as done:  # --lemmaize finished this table: on to the next one
            print(done)
    return 0


def run(args: argparse.Namespace) -> None:
    """One method's table."""
    every = args.method == "per_prompt" and args.num_ensemble is None  # upstream: all paraphrases of a question
    n = 1 if args.method == "origin" else args.num_ensemble or DEFAULT_NUM_PARAPHRASES
    out_dir = output_dir(args)
    table = out_dir / output_name(args.method, n)
    dataset, model, tokenizer = load_job(args, 1 if every else n, table)
    stop = StopRule(eos_ids(model, tokenizer), args.max_new_tokens)
    def count(record: Record) -> int:
        return len(record.paraphrases) if every else n
    check_prompts(model, dataset, lambda r: single_rows(tokenizer, dataset.prompt_parts(r, count(r)),
                                                        list(range(count(r)))), args.max_new_tokens)

    def answer_batch(batch: list[Record]) -> list[dict]:
        if args.method in ("per_prompt", "origin"):
            return answer_per_prompt(model, tokenizer, dataset, batch, None if every else n, stop, args.method)[0]
        if not args.method.startswith("weighted"):
            return answer_ensemble(model, tokenizer, dataset, batch, n, stop, args.method)[0]
        conf = confidences(model, tokenizer, dataset, batch, n, args.confidence_samples, stop, out_dir, args.seed,
                           model_name=args.model)
        return conf.annotate(answer_ensemble(model, tokenizer, dataset, batch, n, stop, args.method, conf.values)[0])

    run_job(args, dataset, table, answer_batch, model=model)


if __name__ == "__main__":
    raise SystemExit(main())
