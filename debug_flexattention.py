"""Look inside attention-level fusion, one question at a time, decoding exactly what
flex_attention_generate.py decodes for the same flags: the settings, the segments of the fused prompt with
their token ranges, the tensor shapes, the attention mask (drawn in the terminal with the prefix folded,
and saved as PNG), the isolation check (each paraphrase's cached K/V against that paraphrase run with only
what it may see: the prefix, earlier few-shot blocks), greedy decoding step by step with the top-k
candidates and the token ids, and each generated token's attention share on the prefix, each paraphrase and
the suffix (a bar per paraphrase; per layer with --verbose; a heatmap PNG beside the mask's). The shares are
always recorded here.

    python debug_flexattention.py --dataset webqa_sample --max-samples 2 --num-paraphrases 3
    python debug_flexattention.py --dataset webqa --max-samples 1 --max-tokens 5 --verbose   (upstream's spelling)
    python debug_flexattention.py --dataset webqa_sample --indexs 0,1,2 --max-samples 1      (chosen paraphrases)

Pictures go to --output-dir (default: a folder under the system's temp dir, printed at start). Exit code 1
when a paraphrase's K/V differ from its run with only what it may see beyond the tolerance.
"""
from __future__ import annotations

import cli  # noqa: F401 - first: Ctrl-C while the modules load is one line (exit 130)
import argparse
import math
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import add_fusion_flags, add_n_flag, common_parser, fusion_settings, main_guard, parse, run_config
from confidence import bias_weights, normalised_weights
from constants import safe_name
from decoding import Row, StopRule, answer_text, check_context, eos_ids, fused_row, pad_left
from fusion import FusionSettings
from inspect_fusion import (TopK, isolation_diffs, print_isolation, print_layout, print_shares, print_steps,
                            segments_of, share_labels, tolerance)
from methods import decode_fused_shares, share_weights
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


def save_share_png(shares: np.ndarray, token_texts: list[str], path: Path, title: str) -> None:
    """The attention shares [tokens, N+2] as a heatmap: generated tokens down, prefix, paraphrases and suffix
    across; beside it the paraphrases' shares renormalised among themselves (which paraphrase the answer
    reads), since the prefix usually takes most of the mass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = share_labels(shares.shape[1] - 2)
    among = shares[:, 1:-1] / np.maximum(shares[:, 1:-1].sum(axis=1, keepdims=True), 1e-30)
    rows, columns = shares.shape
    numbers = columns <= 12  # the numbers in their cells, while they fit
    width = min(3.5 + (0.8 if numbers else 0.22) * columns, 20.0)
    fig, axes = plt.subplots(1, 2, sharey=True, layout="constrained", figsize=(width, 1.8 + 0.32 * rows),
                             gridspec_kw={"width_ratios": [columns, columns - 2]})
    panels = ((shares, labels, "share of the attention mass", "P prefix, 1..N paraphrases, S suffix + generated"),
              (among, labels[1:-1], "share among the paraphrases", "paraphrase"))
    for ax, (values, names, heading, xlabel) in zip(axes, panels):
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(values.max(), 1e-9), aspect="auto",
                          interpolation="nearest")
        shown = sorted({*range(0, len(names), max(1, len(names) // 20)), len(names) - 1})  # ~20 labels, the last too
        ax.set_xticks(shown, [names[i] for i in shown], fontsize=8)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(heading, fontsize=9)
        if numbers:
            for (r, c), v in np.ndenumerate(values):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 * values.max() else "white")
        fig.colorbar(image, ax=ax, shrink=0.9).set_label(heading, fontsize=8)
    axes[0].set_yticks(range(rows), token_texts, fontsize=8)
    axes[0].set_ylabel("generated token (step, text)")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def picture_path(out_dir: Path, kind: str, index: int, uuid: str) -> Path:
    return out_dir / f"{kind}-{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', uuid)}.png"


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


def show_mask(row: Row, out_dir: Path, index: int, uuid: str, title: str, isolation: str) -> None:
    print("mask:")
    print(draw_mask(row.segment_ids, MAX_COLUMNS, fold_prefix=True, isolation=isolation))
    print(mask_legend(row.segment_ids, MAX_COLUMNS))
    png = picture_path(out_dir, "mask", index, uuid)
    save_mask_png(allowed_matrix(row.segment_ids, isolation), row.segment_ids, png, title)
    print(f"mask image: {png}")


def show_shares(tokenizer, tokens: list[int], per_layer: torch.Tensor, out_dir: Path, index: int, uuid: str,
                verbose: bool) -> None:
    print_shares(tokenizer, tokens, per_layer, verbose)
    png = picture_path(out_dir, "shares", index, uuid)
    texts = [f"{step} {tokenizer.decode([t])!r}" for step, t in enumerate(tokens, 1)]
    save_share_png(per_layer.mean(1).numpy(), texts, png, f"{uuid}: attention share per generated token")
    print(f"attention share image: {png}")


def debug_sample(lm, dataset, record, args, settings: FusionSettings, weights, out_dir: Path, index: int,
                 stop: StopRule) -> bool:
    n = args.num
    chooser = TopK(args.top_k)
    rows, outputs, _, shares = decode_fused_shares(lm, dataset, [record], n, stop, settings, weights, chooser)
    row, tokens = rows[0][0], outputs[0]
    print(f"=== sample {index}: {record.uuid}  gold answers: {record.answers}")
    chosen = f" (--indexs {args.indexs})" if args.indexs else ""
    print(f"layout: {n} paraphrases{chosen}, {len(row.input_ids)} tokens")
    if weights:
        print(f"{settings.bias} weights: {[round(w, 3) for w in weights[record.uuid][0]]}")
    print_layout(lm.tokenizer, row, args.verbose)
    print_shapes(lm.model, row, settings)
    title = f"{record.uuid}: {n} paraphrases, {settings.positions}, isolation {settings.isolation}"
    show_mask(row, out_dir, index, record.uuid, title, settings.isolation)
    print("isolation: each segment's cached K/V after the fused prefill vs that segment run with only what it may "
          "see before it (plain causal SDPA where that is plain causal, same positions):")
    ok = print_isolation(isolation_diffs(lm.model, row, settings), tolerance(lm.model.dtype), args.verbose)
    if settings.isolation == "none":
        print("  (--isolation none: a paraphrase sees the ones before it, so they are part of what it is run with)")
    print(f"generation (greedy, top-{args.top_k} candidates with probabilities):")
    print_steps(lm.tokenizer, tokens, chooser)
    show_shares(lm.tokenizer, tokens, shares.per_layer(0), out_dir, index, record.uuid, args.verbose)
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
    settings = replace(settings, record_attention=True)  # the tool is for looking inside
    print(f"decoding as flex_attention_generate.py does: {settings.describe()}; attention backend {backend}")
    print(f"model {args.model} ({lm.model.config.model_type}, {lm.model.config.num_hidden_layers} layers, "
          f"{lm.model.dtype}, {lm.device}); dataset {dataset.name}: {len(dataset.records)} question(s); "
          f"pictures in {out_dir}\n")
    stop = StopRule(eos_ids(lm.model, lm.tokenizer), config.max_new_tokens)
    for record in dataset.records:  # every question checked before the first picture is written
        row = fused_row(lm.tokenizer, dataset.prompt_parts(record, args.num, settings.fewshot), settings.positions)
        check_context(lm.model, [row], config.max_new_tokens, record.uuid)
    # as the command computes them (confidence: the same cache key, so the same values)
    conf = bias_weights(lm, dataset, dataset.records, args.num, settings.bias, stop, args.confidence_samples, out_dir,
                        config.seed, config.model)
    weights = conf and {u: normalised_weights(c) for u, c in conf.values.items()}
    if settings.bias == "shares":  # per question, whatever its batch
        weights = share_weights(lm, dataset, dataset.records, args.num, stop, settings)
    ok = [debug_sample(lm, dataset, r, args, settings, weights, out_dir, i, stop)
          for i, r in enumerate(tqdm(dataset.records, desc="debug", unit="q", disable=not config.progress), 1)]
    print(f"isolation: {sum(ok)} of {len(ok)} sample(s) within tolerance")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
