"""Look inside attention-level fusion, one question at a time: the segments of the fused prompt with
their token ranges, the tensor shapes, the attention mask (drawn in the terminal and saved as PNG),
the isolation check (each paraphrase's cached K/V against prefix + that paraphrase run alone) and
greedy decoding step by step with the top-k candidates.

    python debug_flexattention.py --dataset webqa_sample --max-samples 2 --num-paraphrases 3

The generators' common flags are accepted too; samples run one at a time (--batch-size is ignored).
Exit code 1 when a paraphrase's K/V differ from its run alone beyond the tolerance.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from constants import InputError
from decoding import (FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT, Row, StopRule, answer_text, check_context, decode,
                      eos_ids, fused_row, greedy, pad_left)
from flex_attention_generate import SegmentMask, enable_flex
from runner import common_parser, load_job, main_guard, output_dir

PARAPHRASE_CHARS = "123456789abcdefghijklmnopqrstuvwxyz"
MAX_COLUMNS = 80  # the terminal grid is downsampled to at most this many columns (and rows)


# ---------------------------------------------------------------- segments of a row

@dataclass
class Segment:
    name: str
    segment_id: int
    start: int  # token range [start, end) in the row
    end: int


def segment_name(segment_id: int) -> str:
    if segment_id == PAD_SEGMENT:
        return "pad"
    if segment_id == PREFIX_SEGMENT:
        return "prefix"
    if segment_id == FUSED_SEGMENT:
        return "suffix"
    return f"paraphrase {segment_id}"


def segment_char(segment_id: int) -> str:
    """One character per segment kind: P prefix, 1..9 a..z paraphrases, S suffix/generated, _ pad."""
    if segment_id == PAD_SEGMENT:
        return "_"
    if segment_id == PREFIX_SEGMENT:
        return "P"
    if segment_id == FUSED_SEGMENT:
        return "S"
    return PARAPHRASE_CHARS[segment_id - 1] if segment_id <= len(PARAPHRASE_CHARS) else "+"


def segments_of(segment_ids: list[int]) -> list[Segment]:
    """The runs of equal segment ids, in order."""
    out: list[Segment] = []
    for i, s in enumerate(segment_ids):
        if out and out[-1].segment_id == s:
            out[-1].end = i + 1
        else:
            out.append(Segment(segment_name(s), s, i, i + 1))
    return out


# ---------------------------------------------------------------- the mask, drawn

def allowed_matrix(segment_ids: list[int]) -> torch.Tensor:
    """[L, L] bool, True where query (row) may attend to key (column): the project's SegmentMask,
    rendered dense, so the picture is exactly what the model gets."""
    seg = torch.tensor([segment_ids])
    dense = SegmentMask(seg, 0, "sdpa").prefill()["attention_mask"]
    return dense[0, 0] == 0


def draw_mask(allowed: torch.Tensor, segment_ids: list[int], max_columns: int = MAX_COLUMNS) -> str:
    """The mask as characters: a cell shows the segment of the key it may attend to, '.' none.
    Longer rows are downsampled: one cell covers step x step tokens and shows its first visible key."""
    length = len(segment_ids)
    step = max(1, math.ceil(length / max_columns))
    cells = math.ceil(length / step)
    grid = np.zeros((cells * step, cells * step), dtype=bool)
    grid[:length, :length] = allowed.cpu().numpy()
    blocks = grid.reshape(cells, step, cells, step).any(axis=1)  # [row cell, column cell, key in cell]
    first_key = blocks.argmax(axis=2)
    key_chars = [segment_char(s) for s in segment_ids] + [" "] * (cells * step - length)
    col_chars = "".join(key_chars[c * step] for c in range(cells))
    lines = [f"  {col_chars}"]
    for r in range(cells):
        row = "".join(key_chars[c * step + first_key[r, c]] if blocks[r, c].any() else "." for c in range(cells))
        lines.append(f"{key_chars[r * step]} {row}")
    return "\n".join(lines)


def mask_legend(segment_ids: list[int], step: int) -> str:
    kinds = sorted(set(segment_ids), key=lambda s: (s != PAD_SEGMENT, s))
    names = ", ".join(f"{segment_char(s)} {segment_name(s)}" for s in kinds)
    scale = "one cell per token" if step == 1 else f"one cell = {step}x{step} tokens, showing its first visible key"
    return (f"legend: row = query, column = key; a cell shows the key's segment where attention is allowed, "
            f"'.' masked. {names} (S also stands for the generated tokens). {scale}")


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
    handles = [Patch(color=colors[code[s]], label=segment_name(s)) for s in kinds] + [Patch(facecolor="white", edgecolor="black", label="masked")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- isolation check

def take(row: Row, index: list[int]) -> Row:
    return Row([row.input_ids[i] for i in index], [row.segment_ids[i] for i in index],
               [row.position_ids[i] for i in index])


@torch.inference_mode()
def fused_prefill(model, row: Row, backend: str) -> DynamicCache:
    """The fused layout run once through the model with the project's mask; the filled KV cache."""
    ids, pos, seg = pad_left([row], 0, model.device)
    cache = DynamicCache(config=model.config)
    mask = SegmentMask(seg, 0, backend, dtype=model.dtype)
    model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1, **mask.prefill())
    return cache


@torch.inference_mode()
def plain_prefill(model, row: Row) -> DynamicCache:
    """The row through plain causal SDPA, no custom mask: an independent reference for the mask."""
    impl = model.config._attn_implementation
    if impl != "sdpa":
        model.set_attn_implementation("sdpa")
    try:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([row.input_ids], device=model.device),
              position_ids=torch.tensor([row.position_ids], device=model.device), cache=cache, use_cache=True,
              logits_to_keep=1)
    finally:
        if impl != "sdpa":
            model.set_attn_implementation(impl)
    return cache


@dataclass
class LayerDiff:
    dk: float   # max |K_fused - K_alone| over the segment's tokens and heads
    dv: float
    rel: float  # the larger of dk / max |K_alone| and dv / max |V_alone|: comparable across layers and models


def isolation_diffs(model, row: Row, backend: str) -> dict[str, list[LayerDiff]]:
    """Per segment (prefix and each paraphrase), per layer: the difference between the fused prefill's
    cache and prefix + that segment run alone at the same positions. The prefix is the same causal
    computation in both runs: its diff is the noise floor of two sequence lengths."""
    fused = fused_prefill(model, row, backend)
    prefix = [i for i, s in enumerate(row.segment_ids) if s == PREFIX_SEGMENT]
    out: dict[str, list[LayerDiff]] = {}
    for seg in segments_of(row.segment_ids):
        if seg.segment_id in (PREFIX_SEGMENT, FUSED_SEGMENT, PAD_SEGMENT):
            continue
        alone = plain_prefill(model, take(row, prefix + list(range(seg.start, seg.end))))
        if "prefix" not in out:
            out["prefix"] = [layer_diff(f, a, slice(0, len(prefix)), slice(0, len(prefix)))
                             for f, a in zip(fused.layers, alone.layers)]
        out[seg.name] = [layer_diff(f, a, slice(seg.start, seg.end), slice(len(prefix), None))
                         for f, a in zip(fused.layers, alone.layers)]
    return out


def layer_diff(fused_layer, alone_layer, fused_span: slice, alone_span: slice) -> LayerDiff:
    k, v = alone_layer.keys[0, :, alone_span].float(), alone_layer.values[0, :, alone_span].float()
    dk = (fused_layer.keys[0, :, fused_span].float() - k).abs().max().item()
    dv = (fused_layer.values[0, :, fused_span].float() - v).abs().max().item()
    return LayerDiff(dk, dv, max(dk / max(k.abs().max().item(), 1e-30), dv / max(v.abs().max().item(), 1e-30)))


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance. fp32: a few dozen ulps, what two sequence lengths cost through 30 layers of
    SmolLM2 (measured: 1.7e-5 absolute on keys of magnitude ~20, 1.4e-6 relative); a leak between
    paraphrases moves K/V by percents. Half precision rounds every activation."""
    return 1e-5 if dtype == torch.float32 else 3e-2


def print_isolation(diffs: dict[str, list[LayerDiff]], tol: float, verbose: bool) -> bool:
    """Print the per-segment maxima and a per-layer summary; True when every relative diff is within tol."""
    for name, layers in diffs.items():
        worst = max(range(len(layers)), key=lambda i: layers[i].rel)
        print(f"  {name:<14} max |dK| {max(d.dk for d in layers):.2e}  max |dV| {max(d.dv for d in layers):.2e}  "
              f"relative {layers[worst].rel:.1e} (worst layer {worst})")
    num_layers = len(next(iter(diffs.values()))) if diffs else 0
    per_layer = [max(diffs[n][i].rel for n in diffs) for i in range(num_layers)]
    if per_layer:
        summary = per_layer if verbose or num_layers <= 8 else per_layer[:4] + per_layer[-4:]
        shown = " ".join(f"{d:.1e}" for d in summary)
        gap = "" if len(summary) == num_layers else " (first 4 ... last 4; --verbose for all)"
        print(f"  relative diff per layer, max over segments: {shown}{gap}")
    worst = max(per_layer, default=0.0)
    ok = worst <= tol
    print(f"  isolation {'OK' if ok else 'BROKEN'}: max relative diff {worst:.1e} {'<=' if ok else '>'} {tol:.0e}")
    return ok


# ---------------------------------------------------------------- greedy decoding with top-k

class TopK:
    """A decode() chooser: greedy, remembering the top-k candidates and probabilities of each step."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[list[tuple[int, float]]] = []

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits[0, 0].float(), dim=-1)
        p, ids = probs.topk(min(self.k, probs.numel()))
        self.steps.append(list(zip(ids.tolist(), p.tolist())))
        return greedy(logits, live)


def generate_with_topk(model, tokenizer, row: Row, backend: str, stop: StopRule, k: int) -> tuple[list[int], TopK]:
    """The project's decode loop (prefill with the fused mask, KV cache), recording each step's top-k."""
    chooser = TopK(k)
    outputs, _ = decode(model, tokenizer, [row], 1, chooser, stop, SegmentMask,
                        dict(backend=backend, dtype=model.dtype))
    return outputs[0], chooser


def print_steps(tokenizer, tokens: list[int], chooser: TopK) -> None:
    for step, (token, candidates) in enumerate(zip(tokens, chooser.steps), 1):
        shown = ", ".join(f"{tokenizer.decode([t])!r} {p:.3f}" for t, p in candidates)
        print(f"  step {step:>2}: {tokenizer.decode([token])!r} (id {token})  | top-{len(candidates)}: {shown}")


# ---------------------------------------------------------------- one sample

def short(text: str, width: int, verbose: bool) -> str:
    if verbose or len(text) <= width:
        return repr(text)
    half = (width - 5) // 2
    return repr(text[:half]) + " ... " + repr(text[-half:])


def print_layout(tokenizer, row: Row, verbose: bool) -> None:
    print("segments (token range in the row, position ids, text):")
    for seg in segments_of(row.segment_ids):
        pos = row.position_ids[seg.start:seg.end]
        text = tokenizer.decode(row.input_ids[seg.start:seg.end])
        print(f"  {seg.name:<14} tokens [{seg.start:>4}, {seg.end:>4})  positions [{min(pos):>4}, {max(pos) + 1:>4})"
              f"  {short(text, 70, verbose)}")


def print_shapes(model, row: Row, backend: str) -> None:
    ids, pos, seg = pad_left([row], 0, model.device)
    mask = SegmentMask(seg, 0, backend, dtype=model.dtype).prefill()["attention_mask"]
    if backend == "flex":  # a BlockMask: its shape and how many of its tiles are computed at all
        q_blocks, kv_blocks = (math.ceil(n / b) for n, b in zip(mask.shape[-2:], mask.BLOCK_SIZE))
        computed = mask.kv_num_blocks.sum().item() + (
            mask.full_kv_num_blocks.sum().item() if mask.full_kv_num_blocks is not None else 0)
        mask_desc = (f"BlockMask {tuple(mask.shape)}, {mask.BLOCK_SIZE[0]}x{mask.BLOCK_SIZE[1]} tiles: "
                     f"{computed} of {q_blocks * kv_blocks} computed")
    else:
        mask_desc = f"{tuple(mask.shape)} {mask.dtype} (additive: 0 or -inf)"
    print(f"shapes: input_ids {tuple(ids.shape)} {ids.dtype}, position_ids {tuple(pos.shape)}, "
          f"segment_ids {tuple(seg.shape)}, attention_mask {mask_desc}")


def debug_sample(model, tokenizer, dataset, record, args, backend: str, out_dir: Path, index: int, stop: StopRule) -> bool:
    parts = dataset.prompt_parts(record, args.num_paraphrases)
    row = fused_row(tokenizer, parts, args.positions)
    check_context(model, [row], args.max_new_tokens, record.uuid)
    print(f"=== sample {index}: {record.uuid}  gold answers: {record.answers}")
    print(f"layout: {args.num_paraphrases} paraphrases, positions {args.positions}, attention {backend}, "
          f"{len(row.input_ids)} tokens")
    print_layout(tokenizer, row, args.verbose)
    print_shapes(model, row, backend)
    allowed = allowed_matrix(row.segment_ids)
    step = max(1, math.ceil(len(row.input_ids) / MAX_COLUMNS))
    print("mask:")
    print(draw_mask(allowed, row.segment_ids))
    print(mask_legend(row.segment_ids, step))
    png = out_dir / f"mask-{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', record.uuid)}.png"
    save_mask_png(allowed, row.segment_ids, png, f"{record.uuid}: {args.num_paraphrases} paraphrases, {args.positions}")
    print(f"mask image: {png}")
    print("isolation: each segment's cached K/V after the fused prefill vs prefix + that segment alone "
          "(plain causal SDPA, same positions):")
    ok = print_isolation(isolation_diffs(model, row, backend), tolerance(model.dtype), args.verbose)
    tokens, chooser = generate_with_topk(model, tokenizer, row, backend, stop, args.top_k)
    print(f"generation (greedy, top-{args.top_k} candidates with probabilities):")
    print_steps(tokenizer, tokens, chooser)
    prediction, generation = answer_text(tokenizer, tokens)
    print(f"prediction: {prediction!r}  (generation {generation!r})\n")
    return ok


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--max-samples", "--max_samples", dest="limit", type=int, metavar="K",
                   help="questions to inspect (default 2; same as --limit)")
    p.add_argument("--num-paraphrases", "--num_paraphrases", type=int, default=5, help="paraphrases per question (N)")
    p.add_argument("--positions", choices=["aligned", "continuous"], default="aligned")
    p.add_argument("--attn", choices=["sdpa", "flex"], default="sdpa",
                   help="sdpa: dense mask; flex: FlexAttention BlockMask (compiled on CUDA only)")
    p.add_argument("--top-k", "--top_k", type=int, default=5, help="candidates shown per generated token")
    p.add_argument("--verbose", action="store_true", help="full segment texts and every layer's isolation diff")
    p.set_defaults(limit=2)
    args = p.parse_args(argv)
    if args.limit < 1 or args.top_k < 1:
        raise InputError("--max-samples and --top-k must be at least 1")
    dataset, model, tokenizer = load_job(args, args.num_paraphrases)
    if args.attn == "flex":
        print(f"attention: {enable_flex(model, compile=model.device.type == 'cuda')}")
    out_dir = Path(args.output_dir) if args.output_dir else output_dir(args) / "debug_flexattention"
    stop = StopRule(eos_ids(model, tokenizer), args.max_new_tokens)
    print(f"model {args.model} ({model.config.model_type}, {model.config.num_hidden_layers} layers, {model.dtype}, "
          f"{model.device}); dataset {dataset.name}: {len(dataset.records)} question(s)\n")
    ok = [debug_sample(model, tokenizer, dataset, r, args, args.attn, out_dir, i, stop)
          for i, r in enumerate(dataset.records, 1)]
    print(f"isolation: {sum(ok)} of {len(ok)} sample(s) within tolerance")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
