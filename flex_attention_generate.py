"""Attention-level self-ensemble: the N paraphrases of a question in ONE sequence,

    [shared prefix][paraphrase 1]...[paraphrase N][shared suffix][generated tokens]

each paraphrase isolated from the others while it is encoded, the suffix and every generated token
attending to all of them: one row per question, one token per decode step, with a KV cache. The mask
lives in segment_mask.py; this is the command.

    python flex_attention_generate.py --dataset webqa --model llama3.2_3b_it --num_paraphrases 5
"""
from __future__ import annotations

from constants import (DEFAULT_CONFIDENCE_SAMPLES, DEFAULT_FEWSHOT_FORMAT, DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE,
                       DEFAULT_POSITIONS, InputError)
from confidence import confidences, normalised_weights
from dataset import Record
from decoding import StopRule, eos_ids, fused_row
from methods import answer_fused, resolve_backend
from models import resolve_device
from runner import add_fusion_flags, check_prompts, common_parser, load_job, main_guard, output_dir, run_job


def output_name(n: int, positions: str, fusion_bias: str, temperature: float, fewshot: str) -> str:
    """flex_attention-<N>.feather for the defaults; other variants named, so they sit side by side."""
    settings = ((positions, DEFAULT_POSITIONS), (f"bias_{fusion_bias}", f"bias_{DEFAULT_FUSION_BIAS}"),
                (f"t{temperature:g}", f"t{DEFAULT_FUSION_TEMPERATURE:g}"),
                (f"fewshot_{fewshot}", f"fewshot_{DEFAULT_FEWSHOT_FORMAT}"))
    variant = "".join(f"-{v}" for v, default in settings if v != default)
    return f"flex_attention-{n}{variant}.feather"


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    add_fusion_flags(p)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile flex_attention (auto: on CUDA only)")
    p.add_argument("--confidence-samples", type=int, default=DEFAULT_CONFIDENCE_SAMPLES)
    args = p.parse_args(argv)
    n = args.num_paraphrases
    args.positions = "left" if args.positions == "aligned" else args.positions
    if args.fusion_temperature <= 0:
        raise InputError("--fusion-temperature must be > 0")
    out_dir = output_dir(args)
    table = out_dir / output_name(n, args.positions, args.fusion_bias, args.fusion_temperature, args.fewshot_format)
    resolve_backend(args.attn, args.compile, resolve_device(args.device), args.device_map)  # before the model loads
    dataset, model, tokenizer = load_job(args, n, table)
    backend, compiled, label = resolve_backend(args.attn, args.compile, model.device, args.device_map)
    print(f"attention backend: {label}; positions: {args.positions}; "
          f"fusion bias: {args.fusion_bias}; fusion temperature: {args.fusion_temperature:g}; "
          f"few-shot format: {args.fewshot_format}")
    stop = StopRule(eos_ids(model, tokenizer), args.max_new_tokens)
    check_prompts(model, dataset,
                  lambda r: [fused_row(tokenizer, dataset.prompt_parts(r, n, args.fewshot_format), args.positions)],
                  args.max_new_tokens)

    def answer_batch(batch: list[Record]) -> list[dict]:
        weights, conf = None, None
        if args.fusion_bias == "confidence":  # plain prompts: decoded under sdpa by their own PaddingMask
            conf = confidences(model, tokenizer, dataset, batch, n, args.confidence_samples, stop, out_dir,
                               args.seed, model_name=args.model)
            weights = {u: normalised_weights(c) for u, c in conf.values.items()}
        rows = answer_fused(model, tokenizer, dataset, batch, n, stop, args.positions, backend, args.fusion_bias,
                            weights, compiled, args.fusion_temperature, args.fewshot_format)[0]
        return conf.annotate(rows) if conf else rows

    run_job(args, dataset, table, answer_batch, model=model, settings={"attn": backend, "compile": compiled})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
