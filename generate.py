"""Logit-level self-ensemble: the N paraphrases of each question decoded together, one batched
forward per step with a KV cache, their next-token distributions fused into one token that is
appended to all N rows.

    python generate.py --method avg --dataset webqa --model llama3.2_3b_it --num_ensemble 6
"""
from __future__ import annotations

from constants import DEFAULT_CONFIDENCE_SAMPLES, LOGIT_METHODS
from confidence import confidences
from dataset import Record
from decoding import StopRule, eos_ids, single_rows
from methods import answer_ensemble, answer_per_prompt
from runner import check_prompts, common_parser, load_job, main_guard, output_dir, run_job


def output_name(method: str, n: int) -> str:
    return f"{method}.feather" if method in ("per_prompt", "origin") else f"ensemble_{method}-{n}.feather"


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--method", default="avg", choices=LOGIT_METHODS)
    p.add_argument("--num-ensemble", "--num_ensemble", type=int, default=5, help="paraphrases per question (N)")
    p.add_argument("--confidence-samples", type=int, default=DEFAULT_CONFIDENCE_SAMPLES,
                   help="K sampled answers per paraphrase for weighted methods (upstream: 100)")
    args = p.parse_args(argv)
    n = 1 if args.method == "origin" else args.num_ensemble
    dataset, model, tokenizer = load_job(args, n)
    stop = StopRule(eos_ids(model, tokenizer), args.max_new_tokens)
    check_prompts(model, dataset, lambda r: single_rows(tokenizer, dataset.prompt_parts(r, n), list(range(n))),
                  args.max_new_tokens)
    out_dir = output_dir(args)
    weighted = args.method.startswith("weighted")

    def answer_batch(batch: list[Record]) -> list[dict]:
        if args.method in ("per_prompt", "origin"):
            return answer_per_prompt(model, tokenizer, dataset, batch, n, stop, args.method)[0]
        conf = confidences(model, tokenizer, dataset, batch, n, args.confidence_samples, stop,
                           out_dir / "confidence.feather", args.seed) if weighted else None
        return answer_ensemble(model, tokenizer, dataset, batch, n, stop, args.method, conf)[0]

    run_job(args, dataset, out_dir / output_name(args.method, n), answer_batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
