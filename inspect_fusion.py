"""Looking inside attention-level fusion, for the debug tool and the example: a fused row's segments
with their text, each paraphrase's K/V after the fused prefill against that paraphrase run alone,
greedy decoding step by step with the top-k candidates, and each generated token's attention share."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from decoding import PaddingMask, Row, greedy, new_cache, pad_left, prefill
from fusion import FusionSettings
from segment_mask import FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT, SegmentMask, allowed_matrix, segment_name


# ---------------------------------------------------------------- segments of a row

@dataclass
class Segment:
    name: str
    segment_id: int
    start: int  # token range [start, end) in the row
    end: int


def segments_of(segment_ids: list[int]) -> list[Segment]:
    """The runs of equal segment ids, in order."""
    out: list[Segment] = []
    for i, s in enumerate(segment_ids):
        if out and out[-1].segment_id == s:
            out[-1].end = i + 1
        else:
            out.append(Segment(segment_name(s), s, i, i + 1))
    return out



# ---------------------------------------------------------------- isolation check

def fused_prefill(model, row: Row, settings: FusionSettings):
    """The fused layout run once through the model with the project's mask; the filled KV cache."""
    ids, pos, seg = pad_left([row], 0, model.device)
    mask = SegmentMask(seg, 0, replace(settings, record_attention=False), dtype=model.dtype, positions=pos)
    with mask.attention(model):
        return prefill(model, ids, pos, mask.prefill(), cache=new_cache(model, keep_all_keys=True))[1]


def plain_prefill(model, row: Row):
    """The row through plain causal SDPA, no custom mask: an independent reference for the mask."""
    ids = torch.tensor([row.input_ids], device=model.device)
    pos = torch.tensor([row.position_ids], device=model.device)
    mask = PaddingMask(torch.zeros_like(ids), 0)
    with mask.attention(model):
        return prefill(model, ids, pos, mask.prefill(), cache=new_cache(model, keep_all_keys=True))[1]


def take(row: Row, index: list[int]) -> Row:
    return Row([row.input_ids[i] for i in index], [row.segment_ids[i] for i in index],
               [row.position_ids[i] for i in index])


@dataclass
class LayerDiff:
    dk: float   # max |K_fused - K_alone| over the segment's tokens and heads
    dv: float
    rel: float  # the larger of dk / max |K_alone| and dv / max |V_alone|: comparable across layers and models


def isolation_diffs(model, row: Row, settings: FusionSettings) -> dict[str, list[LayerDiff]]:
    """Per segment (prefix and each paraphrase, few-shot blocks' included), per layer: the difference between
    the fused prefill's cache and that segment run with only the tokens before it that it may see, at the same
    positions (`reference_prefill`). A leak moves it: whatever a segment must not see is not in its reference.
    The prefix is the same causal computation in both runs: its diff is the noise floor of two lengths."""
    fused = fused_prefill(model, row, settings)
    allowed = allowed_matrix(row.segment_ids, settings.isolation)
    prefix = [i for i, s in enumerate(row.segment_ids) if s == PREFIX_SEGMENT]
    out: dict[str, list[LayerDiff]] = {}
    for seg in segments_of(row.segment_ids):
        if seg.segment_id in (PREFIX_SEGMENT, FUSED_SEGMENT, PAD_SEGMENT):
            continue
        seen = allowed[seg.start:seg.end, :seg.start].any(0).nonzero().flatten().tolist()
        alone = reference_prefill(model, take(row, seen + list(range(seg.start, seg.end))), settings)
        if "prefix" not in out:
            out["prefix"] = [layer_diff(f, a, slice(0, len(prefix)), slice(0, len(prefix)))
                             for f, a in zip(fused.layers, alone.layers)]
        out[seg.name] = [layer_diff(f, a, slice(seg.start, seg.end), slice(len(seen), None))
                         for f, a in zip(fused.layers, alone.layers)]
    return out


def reference_prefill(model, row: Row, settings: FusionSettings):
    """A segment and what it sees: through plain causal SDPA when the shorter row's own mask is plain causal
    (prefix + one paraphrase; or the paraphrases before it, with --isolation none): a reference independent of
    the mask code; else (a later few-shot block, with --fewshot-format fused) through the mask itself."""
    length = len(row.input_ids)
    if allowed_matrix(row.segment_ids, settings.isolation).equal(torch.ones(length, length).tril().bool()):
        return plain_prefill(model, row)
    return fused_prefill(model, row, settings)


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


def print_steps(tokenizer, tokens: list[int], chooser: TopK) -> None:
    for step, (token, candidates) in enumerate(zip(tokens, chooser.steps), 1):
        shown = ", ".join(f"{tokenizer.decode([t])!r} {p:.3f}" for t, p in candidates)
        print(f"  step {step:>2}: {tokenizer.decode([token])!r} (id {token})  | top-{len(candidates)}: {shown}")



# ---------------------------------------------------------------- attention shares

BAR_WIDTH = 10  # characters for the paraphrases' whole share
EIGHTHS = " ▏▎▍▌▋▊▉"


def share_bar(share: float, width: int = BAR_WIDTH) -> str:
    """A share as a bar of block characters, in eighths of a character."""
    full, eighths = divmod(round(max(share, 0.0) * width * 8), 8)
    return "█" * full + (EIGHTHS[eighths] if eighths else "")


def share_labels(n: int) -> list[str]:
    """The share's columns: P the prefix, 1..N the paraphrases, S the suffix and generated tokens."""
    return ["P", *(str(i) for i in range(1, n + 1)), "S"]


def share_line(share: list[float], bars: bool = True) -> str:
    """`P 0.41 | 1 ███ 0.20 | 2 ██ 0.15 | S 0.10`: the shares as numbers; each paraphrase's bar is its part of
    the paraphrases' total (BAR_WIDTH characters: all of it), since the prefix usually takes most of the mass."""
    labels, total = share_labels(len(share) - 2), max(sum(share[1:-1]), 1e-30)
    cells = [f"{label} {share_bar(value / total) + ' ' if bars and 0 < i < len(share) - 1 else ''}{value:.2f}"
             for i, (label, value) in enumerate(zip(labels, share))]
    return " | ".join(cells)


def print_shares(tokenizer, tokens: list[int], per_layer: torch.Tensor, verbose: bool) -> None:
    """Each generated token's share (per_layer [tokens, layers, N+2]), averaged over layers; every layer's
    with verbose."""
    print("attention share of each generated token (P prefix, 1..N paraphrases, S suffix and generated tokens; "
          f"mean over heads and layers, of the query that chose the token; a bar of {BAR_WIDTH}: all of the "
          "paraphrases' share):")
    for step, (token, layers) in enumerate(zip(tokens, per_layer), 1):
        print(f"  step {step:>2}: {share_line(layers.mean(0).tolist())}  {tokenizer.decode([token])!r}")
        if verbose:
            for i, layer in enumerate(layers):
                print(f"      layer {i:>2}: {share_line(layer.tolist(), bars=False)}")


# ---------------------------------------------------------------- printing a row

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
