"""A self-contained tour of attention-level fusion, no dataset and no download: three attention masks
drawn from the project's one mask definition (segment_mask_mod), then one hand-made question with 3
paraphrases answered by a tiny random model in one fused sequence, with the isolation check.

    python example_flexattention.py [--model tiny-llama] [--attn sdpa|flex] [--max-new-tokens 8]
"""
from __future__ import annotations

from cli import OneLineParser, main_guard  # first: Ctrl-C while the modules load is one line (exit 130)

import torch

from constants import InputError
from dataset import Dataset, Record
from decoding import LanguageModel, Row, StopRule, build_row
from fusion import FusionSettings
from inspect_fusion import TopK, isolation_diffs, print_isolation, print_layout, print_steps, tolerance
from methods import answer_fused, decode_fused
from models import load_model
from segment_mask import FUSED_SEGMENT, PREFIX_SEGMENT, allowed_matrix, draw_mask, mask_legend, segment_biases

MAX_NEW_TOKENS = 512  # a tour: each step recomputes the whole sequence for the reference (full_recompute)

# A hand-made layout: token ids do not matter for the mask, only the segments do.
PREFIX = [11, 12, 13]            # instruction and few-shot examples, shared
PARAPHRASES = [[21, 22], [31, 32, 33], [41, 42]]  # encoded apart from each other
SUFFIX = [51, 52]                # the answer cue "A:", sees every paraphrase

QUESTION = Record("example", ["what is the capital of france?", "which city is the capital of france?",
                              "france's capital city is called what?"], ["Paris"])
FEW_SHOT = [("what color is the sky?", "blue"), ("how many legs does a cat have?", "four")]


def example_layouts() -> list[tuple[str, Row]]:
    """(title, row) of the three masks; a single-segment layout is plain causal attention."""
    everything = PREFIX + [t for p in PARAPHRASES for t in p] + SUFFIX
    return [
        ("causal: one segment, every token sees all tokens before it", build_row(everything, [], [])),
        ("isolated segments: each paraphrase sees the prefix and itself only", build_row(PREFIX, PARAPHRASES, [])),
        ("isolated, then fused: the suffix (and every generated token) sees all", build_row(PREFIX, PARAPHRASES, SUFFIX)),
    ]


def show_masks() -> None:
    for title, row in example_layouts():
        print(f"--- {title}")
        print(draw_mask(row.segment_ids))
        print(f"  position ids (left): {row.position_ids}\n")
    print(mask_legend(example_layouts()[-1][1].segment_ids) + "\n")


def run_ensemble(model_name: str, attn: str, max_new_tokens: int) -> bool:
    lm = LanguageModel(*load_model(model_name, device="cpu"))
    dataset = Dataset("example", "qa", [QUESTION], FEW_SHOT)
    settings = FusionSettings(backend=attn)  # what flex_attention_generate.py decodes by default
    stop = StopRule(set(), max_new_tokens, first_line_only=False)  # a random model: show every step
    chooser = TopK(3)
    rows, outputs, _ = decode_fused(lm, dataset, [QUESTION], 3, stop, settings, choose=chooser)
    row, tokens = rows[0], outputs[0]
    print(f"=== attention-level ensemble on {model_name}: 1 question, 3 paraphrases, one row of "
          f"{len(row.input_ids)} tokens; {settings.describe()}")
    print_layout(lm.tokenizer, row, verbose=False)
    print("isolation: K/V of each segment after the fused prefill vs prefix + that segment run alone:")
    ok = print_isolation(isolation_diffs(lm.model, row, settings), tolerance(lm.model.dtype), verbose=True)
    print("generated tokens (greedy; top-3 candidates):")
    print_steps(lm.tokenizer, tokens, chooser)
    # An independent reference: no KV cache, the whole sequence re-run every step under the dense mask
    # drawn above (allowed_matrix) with the default bias (sqrt: -1/2 log N) written out, through plain SDPA; the
    # command's own entry point must agree with it.
    reference = full_recompute(lm.model, row, max_new_tokens, bias=segment_biases(3, settings.bias)[0])
    fused = answer_fused(lm, dataset, [QUESTION], 3, stop, settings)[0][0]
    same = tokens == reference and fused["token_ids"] == reference
    print(f"the cached decode and answer_fused give the tokens of a no-cache full recompute: {same}")
    return ok and same


@torch.inference_mode()
def full_recompute(model, row: Row, max_new_tokens: int, bias: float = 0.0) -> list[int]:
    """Greedy tokens, each from the whole sequence (prompt + tokens so far) and its full mask, no cache;
    `bias` is added to the scores of every fused query (suffix, generated) on the paraphrases' keys."""
    generated: list[int] = []
    next_pos = max(row.position_ids) + 1
    for _ in range(max_new_tokens):
        seg = torch.tensor(row.segment_ids + [FUSED_SEGMENT] * len(generated))
        reads_paraphrase = (seg[:, None] == FUSED_SEGMENT) & (seg[None, :] != FUSED_SEGMENT) & (seg[None, :] != PREFIX_SEGMENT)
        mask = torch.where(allowed_matrix(seg.tolist()), torch.where(reads_paraphrase, bias, 0.0), float("-inf"))
        ids = torch.tensor([row.input_ids + generated])
        pos = torch.tensor([row.position_ids + list(range(next_pos, next_pos + len(generated)))])
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask[None, None], use_cache=False).logits[0, -1]
        generated.append(int(logits.argmax()))
    return generated


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="tiny-llama, tiny-qwen2, tiny-qwen3 or any models.load_model name")
    p.add_argument("--attn", choices=["sdpa", "flex"], default="sdpa", help="flex: FlexAttention, eager (no compile)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=8)
    args = p.parse_args(argv)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:  # 0 would compare two empty answers and call it a failure
        raise InputError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    torch.manual_seed(0)
    show_masks()
    return 0 if run_ensemble(args.model, args.attn, args.max_new_tokens) else 1


if __name__ == "__main__":
    raise SystemExit(main())
