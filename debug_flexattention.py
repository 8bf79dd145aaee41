"""Look inside attention-level fusion, one question at a time, decoding exactly what
flex_attention_generate.py decodes for the same flags: the settings, the segments of the fused prompt with
their token ranges, the tensor shapes, the attention mask (drawn in the terminal with the prefix folded,
and saved as PNG), the isolation check (each paraphrase's cached K/V against prefix + that paraphrase run
alone) and greedy decoding step by step with the top-k candidates and the token ids.

    python debug_flexattention.py --dataset webqa_sample --max-samples 2 --num-paraphrases 3
    python debug_flexattention.py --dataset webqa --max-samples 1 --max-tokens 5 --verbose   (upstream's spelling)
    python debug_flexattention.py --dataset webqa_sample --indexs 0,1,2 --max-samples 1      (chosen paraphrases)

Pictures go to --output-dir (default: a folder under the system's temp dir, printed at start). Exit code 1
when a paraphrase's K/V differ from its run alone beyond the tolerance.
"""
from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import add_fusion_flags, add_n_flag, common_parser, fusion_settings, main_guard, parse, run_config
from confidence import confidences, normalised_weights
from constants import safe_name
from decoding import Row, StopRule, answer_text, check_context, eos_ids, fused_row, pad_left
from fusion import FusionSettings
from inspect_fusion import TopK, isolation_diffs, print_isolation, print_layout, print_steps, segments_of, tolerance
from methods import decode_fused
from runner import load_job
from segment_mask import (FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT, SegmentMask, allowed_matrix, draw_mask,
                          mask_legend, segment_name)

MAX_COLUMNS = 80  # the terminal grid is downsampled to at most this many columns (and rows)
UNUSED_FLAGS = ("--batch-size", "--device-map", "--no-prefix-cache", "--lemmaize")  # one question at a time, no table


# ---------------------------------------------------------------- the mask as an image

def save_mask_png(allowed: torch.Tensor, segment_ids: list[int], path: Path, title: str) -> None:
    """The mask as an image, each allowed cell colored by the kind of its key's segment."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    kinds = sorted(set(segment_ids), key=lambda s: (s != PAD_SEGMENT, s))
    code = {s: i + 1 for i, s in enumerate(kinds)}  # 0 = masked
    tab10 = plt.get_cmap("tab10")
    palette = [tab10(i) for i in (2, 4, 5, 6, 8, 9, 1, 7)]  # tab10 without the prefix's blue and the suffix's red
    colors = ["white"] + [("lightgrey" if s == PAD_SEGMENT else "tab:blue" if s == PREFIX_SEGMENT else
                           "tab:red" if s == FUSED_SEGMENT else palette[(s - 1) % len(palette)]) for s in kinds]
    key_code = np.array([code[s] for s in segment_ids])
    image = np.where(allowed.cpu().numpy(), key_code[None, :], 0)
    size = min(12.0, 4.0 + len(segment_ids) / 60)
    fig, ax = plt.subplots(figsize=(size + 2.5, size))
    ax.imshow(image, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1, interpolation="nearest")
    for seg in segments_of(segment_ids)[1:]:  # segment boundaries
        ax.axhline(seg.start - 0.5, color="black", linewidth=0.3)
        ax.axvline(seg.start - 0.5, color="black", linewidth=0.3)
    ax.set_xlabel("key position in the row")
    ax.set_ylabel("query position in the row")
    ax.set_title(title)
    handles = [Patch(color=colors[code[s]], label=segment_name(s)) for s in kinds] + [
        Patch(facecolor="white", edgecolor="black", label="masked")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- one sample

def print_shapes(model, row: Row, settings: FusionSettings) -> None:
    ids, pos, seg = pad_left([row], 0, model.device)
    mask = SegmentMask(seg, 0, settings, dtype=model.dtype).prefill()["attention_mask"]
    if settings.backend == "flex":  # a BlockMask: its shape and how many of its tiles are computed at all
        q_blocks, kv_blocks = (math.ceil(n / b) for n, b in zip(mask.shape[-2:], mask.BLOCK_SIZE))
        computed = mask.kv_num_blocks.sum().item() + (
            mask.full_kv_num_blocks.sum().item() if mask.full_kv_num_blocks is not None else 0)
        mask_desc = (f"BlockMask {tuple(mask.shape)}, {mask.BLOCK_SIZE[0]}x{mask.BLOCK_SIZE[1]} tiles: "
                     f"{computed} of {q_blocks * kv_blocks} computed")
    else:
        mask_desc = f"{tuple(mask.shape)} {mask.dtype} (additive: 0 or -inf)"
    print(f"shapes: input_ids {tuple(ids.shape)} {ids.dtype}, position_ids {tuple(pos.shape)}, "
          f"segment_ids {tuple(seg.shape)}, attention_mask {mask_desc}")


def show_mask(row: Row, out_dir: Path, index: int, uuid: str, title: str) -> None:
    print("mask:")
    print(draw_mask(row.segment_ids, MAX_COLUMNS, fold_prefix=True))
    print(mask_legend(row.segment_ids, MAX_COLUMNS))
    png = out_dir / f"mask-{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', uuid)}.png"
    save_mask_png(allowed_matrix(row.segment_ids), row.segment_ids, png, title)
    print(f"mask image: {png}")


def debug_sample(lm, dataset, record, args, settings: FusionSettings, weights, out_dir: Path, index: int,
                 stop: StopRule) -> bool:
    n = args.num
    chooser = TopK(args.top_k)
    rows, outputs, _ = decode_fused(lm, dataset, [record], n, stop, settings, weights, chooser)
    row, tokens = rows[0], outputs[0]
    print(f"=== sample {index}: {record.uuid}  gold answers: {record.answers}")
    chosen = f" (--indexs {args.indexs})" if args.indexs else ""
    print(f"layout: {n} paraphrases{chosen}, {len(row.input_ids)} tokens")
    if weights:
        print(f"confidence weights: {[round(w, 3) for w in weights[record.uuid][0]]}")
    print_layout(lm.tokenizer, row, args.verbose)
    print_shapes(lm.model, row, settings)
    show_mask(row, out_dir, index, record.uuid, f"{record.uuid}: {n} paraphrases, {settings.positions}")
    print("isolation: each segment's cached K/V after the fused prefill vs prefix + that segment alone "
          "(plain causal SDPA, same positions):")
    ok = print_isolation(isolation_diffs(lm.model, row, settings), tolerance(lm.model.dtype), args.verbose)
    print(f"generation (greedy, top-{args.top_k} candidates with probabilities):")
    print_steps(lm.tokenizer, tokens, chooser)
    prediction, generation = answer_text(lm.tokenizer, tokens)
    print(f"prediction: {prediction!r}  (generation {generation!r})")
    print(f"token ids: {tokens}\n")
    return ok


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0], omit=UNUSED_FLAGS)
    p.add_argument("--max-tokens", "--max_tokens", dest="max_new_tokens", type=int,
                   default=argparse.SUPPRESS,
                   help="the same as --max-new-tokens (upstream's name)")
    add_n_flag(p, "paraphrases per question (N); default 5")
    add_fusion_flags(p, compile_flag=False)
    p.add_argument("--top-k", "--top_k", type=int, default=5, help="candidates shown per generated token")
    p.add_argument("--verbose", "-v", action="store_true", help="full segment texts and every layer's isolation diff")
    p.set_defaults(limit=2)  # --limit / --max-samples: questions to inspect
    args = parse(p, argv)
    config = run_config(args)
    out_dir = Path(args.output_dir) if args.output_dir else (
        Path(tempfile.gettempdir()) / "self-ensemble-debug" / f"{args.dataset}-{safe_name(Path(args.model).name)}")
    config, dataset, lm = load_job(config, args.num)
    settings, backend = fusion_settings(args, lm.device)  # eager flex: the debugger steps through it
    print(f"decoding as flex_attention_generate.py does: {settings.describe()}; attention backend {backend}")
    print(f"model {args.model} ({lm.model.config.model_type}, {lm.model.config.num_hidden_layers} layers, "
          f"{lm.model.dtype}, {lm.device}); dataset {dataset.name}: {len(dataset.records)} question(s); "
          f"pictures in {out_dir}\n")
    stop = StopRule(eos_ids(lm.model, lm.tokenizer), config.max_new_tokens)
    for record in dataset.records:  # every question checked before the first picture is written
        row = fused_row(lm.tokenizer, dataset.prompt_parts(record, args.num, settings.fewshot), settings.positions)
        check_context(lm.model, [row], config.max_new_tokens, record.uuid)
    weights = None
    if settings.bias == "confidence":  # as the command computes them (the same cache key, so the same values)
        conf = confidences(lm, dataset, dataset.records, args.num, args.confidence_samples, stop, out_dir,
                           config.seed, model_name=config.model)
        weights = {u: normalised_weights(c) for u, c in conf.values.items()}
    ok = [debug_sample(lm, dataset, r, args, settings, weights, out_dir, i, stop)
          for i, r in enumerate(tqdm(dataset.records, desc="debug", unit="q", disable=not config.progress), 1)]
    print(f"isolation: {sum(ok)} of {len(ok)} sample(s) within tolerance")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
