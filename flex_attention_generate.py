"""Attention-level self-ensemble: the N paraphrases of a question in ONE sequence,

    [shared prefix][paraphrase 1]...[paraphrase N][shared suffix][generated tokens]

each paraphrase isolated from the others while it is encoded, the suffix and every generated token
attending to all of them: one row per question, one token per decode step, with a KV cache. The mask
lives in segment_mask.py, the settings in fusion.py; this is the command.

    python flex_attention_generate.py --dataset webqa --model llama3.2_3b_it --num_paraphrases 5
"""
from __future__ import annotations

from cli import (add_fusion_flags, add_n_flag, add_selection_flags, common_parser, fusion_settings, lemmaize_command,
                 main_guard, parse, run_config)
from models import resolve_device
from runner import fusion_flags, fusion_job, load_job


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    add_n_flag(p, "paraphrases per question (N); default 5")
    add_fusion_flags(p)
    add_selection_flags(p)
    args = parse(p, argv)
    settings, backend = fusion_settings(args, resolve_device(args.device))  # before anything is read or loaded
    config = run_config(args, **fusion_flags(settings, args.num, args.confidence_samples))
    table = config.table(settings.table_name(args.num), args.num)
    if args.lemmaize:
        lemmaize_command(config, table)
    config, dataset, lm = load_job(config, args.num, table)
    print(f"attention-level fusion: {settings.describe()}; attention backend {backend}")
    fusion_job(config, dataset, lm, settings, args.num)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
