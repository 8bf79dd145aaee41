"""Logit-level self-ensemble: the N paraphrases of each question decoded together, one batched
forward per step with a KV cache, their next-token distributions fused into one token that is
appended to all N rows.

    python generate.py --method avg --dataset webqa --model llama3.2_3b_it --num_ensemble 6
"""
from __future__ import annotations

import time

import torch

from constants import DEFAULT_CONFIDENCE_SAMPLES, LOGIT_METHODS
from confidence import confidences, normalised_weights
from dataset import Dataset, Record
from decoding import StopRule, decode, eos_ids, greedy, single_rows
from results import result_row
from runner import check_prompts, common_parser, load_job, main_guard, output_dir, run_job


def fuse_logits(logits: torch.Tensor, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per question from logits [Q, N, V] of its N paraphrases; weights [Q, N] sum to 1."""
    if method == "avg":
        return torch.log_softmax(logits, -1).mean(1).argmax(-1)
    if method == "max":
        return torch.softmax(logits, -1).max(1).values.argmax(-1)
    if method == "weighted_avg":
        return (weights.unsqueeze(-1) * torch.log_softmax(logits, -1)).sum(1).argmax(-1)
    if method == "weighted_max":  # the most confident paraphrase decides alone
        best = weights.argmax(1)
        return logits[torch.arange(len(logits)), best].argmax(-1)
    raise ValueError(f"unknown fusion method {method!r}")


def answer_per_prompt(model, tokenizer, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                      method: str) -> list[dict]:
    """per_prompt (every paraphrase alone) and origin (paraphrase 0 alone): one row per prompt."""
    indices = [0] if method == "origin" else list(range(n))
    parts = [dataset.prompt_parts(r, n) for r in batch]
    rows = [row for p in parts for row in single_rows(tokenizer, p, indices)]
    start = time.perf_counter()
    outputs, _ = decode(model, tokenizer, rows, 1, greedy, stop)
    seconds = (time.perf_counter() - start) / len(rows)
    return [result_row(record, tokenizer, outputs[q * len(indices) + j], paraphrases=[record.paraphrases[i]],
                       prompts=[p.full(i)], seconds=seconds, method=method, num_ensemble=n, paraphrase_index=i)
            for q, (record, p) in enumerate(zip(batch, parts)) for j, i in enumerate(indices)]


def answer_ensemble(model, tokenizer, dataset: Dataset, batch: list[Record], n: int, stop: StopRule, method: str,
                    conf: dict[str, list[float]] | None = None) -> list[dict]:
    """avg / max / weighted_avg / weighted_max: N rows per question, one fused token per step."""
    parts = [dataset.prompt_parts(r, n) for r in batch]
    rows = [row for p in parts for row in single_rows(tokenizer, p, list(range(n)))]
    weights, fallback = [None] * len(batch), [False] * len(batch)
    if conf is not None:
        weights, fallback = zip(*(normalised_weights(conf[r.uuid]) for r in batch))
        all_weights = torch.tensor(weights, device=model.device)
    def choose(logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        return fuse_logits(logits, method, all_weights[live] if conf is not None else None)
    start = time.perf_counter()
    outputs, _ = decode(model, tokenizer, rows, n, choose, stop)
    seconds = (time.perf_counter() - start) / len(batch)
    return [result_row(record, tokenizer, tokens, paraphrases=record.paraphrases[:n],
                       prompts=[p.full(i) for i in range(n)], seconds=seconds, method=method, num_ensemble=n,
                       **(dict(weights=list(w), weights_fallback=fb) if conf is not None else {}))
            for record, p, tokens, w, fb in zip(batch, parts, outputs, weights, fallback)]


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
            return answer_per_prompt(model, tokenizer, dataset, batch, n, stop, args.method)
        conf = confidences(model, tokenizer, dataset, batch, n, args.confidence_samples, stop,
                           out_dir / "confidence.feather", args.seed) if weighted else None
        return answer_ensemble(model, tokenizer, dataset, batch, n, stop, args.method, conf)

    run_job(args, dataset, out_dir / output_name(args.method, n), answer_batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
