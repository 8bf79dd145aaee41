"""Attention-level self-ensemble: the N paraphrases of a question in ONE sequence,

    [shared prefix][paraphrase 1]...[paraphrase N][shared suffix][generated tokens]

each paraphrase isolated from the others while it is encoded, the suffix and every generated token
attending to all of them: one row per question, one token per decode step, with a KV cache.
The mask is one `mask_mod` over per-token segment ids, rendered as a FlexAttention BlockMask or as a
dense mask for SDPA (`--attn sdpa`, the reference backend).

    python flex_attention_generate.py --dataset webqa --model llama3.2_3b_it --num_paraphrases 5
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from constants import DEFAULT_CONFIDENCE_SAMPLES, InputError

try:
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # torch without FlexAttention: --attn sdpa still works, --attn flex says why not
    BlockMask = None
from dataset import Dataset, Record
from decoding import (FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT, StopRule, decode,
                      eos_ids, fused_row, greedy)
from results import result_row
from runner import check_prompts, common_parser, load_job, main_guard, output_dir, run_job

FLEX_ATTENTION = "self_ensemble_flex"  # our name in transformers' AttentionInterface


# ---------------------------------------------------------------- the mask: one definition

def segment_mask_mod(segment_ids: torch.Tensor, q_offset: torch.Tensor):
    """Who may attend to whom, from segment ids [B, T] (T covers prompt and generated tokens):
    causal; the prefix is seen by all; a paraphrase sees the prefix and itself; the fused suffix and
    generated tokens see everything; padding sees only itself. Query i of a call is token i + q_offset."""
    row_len = segment_ids.shape[1]
    flat = segment_ids.flatten()  # compiled flex handles 1D lookups (2D captured tensors crashed on CPU)

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_offset
        q_seg, kv_seg = flat[b * row_len + q], flat[b * row_len + kv_idx]
        visible = (kv_seg == PREFIX_SEGMENT) | (kv_seg == q_seg) | (q_seg == FUSED_SEGMENT)
        return ((kv_idx <= q) & visible & (kv_seg != PAD_SEGMENT)) | (kv_idx == q)
    return mask_mod


def fused_key_bias(q_seg: torch.Tensor, kv_bias: torch.Tensor) -> torch.Tensor:
    """The score bias: a fused query (suffix or generated token) gets its key's paraphrase bias."""
    return torch.where(q_seg == FUSED_SEGMENT, kv_bias, 0.0)


def fusion_score_mod(segment_ids: torch.Tensor, key_bias: torch.Tensor, q_offset: torch.Tensor):
    """`fused_key_bias` as a FlexAttention score_mod; key_bias [B, T] holds each key's paraphrase bias."""
    row_len = segment_ids.shape[1]
    flat_seg, flat_bias = segment_ids.flatten(), key_bias.flatten()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + fused_key_bias(flat_seg[b * row_len + q_idx + q_offset], flat_bias[b * row_len + kv_idx])
    return score_mod


def build_block_mask(mask_mod, batch: int, q_len: int, kv_len: int, device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)


def build_dense_mask(mask_mod, batch: int, q_len: int, kv_len: int, device, dtype,
                     segment_ids: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                     q_offset: int = 0) -> torch.Tensor:
    """The same mask as an additive float mask [B, 1, q, kv] for SDPA, plus the fusion bias if given."""
    from torch.nn.attention.flex_attention import create_mask
    allowed = create_mask(mask_mod, batch, 1, q_len, kv_len, device=device)
    bias = torch.zeros((), device=device)
    if key_bias is not None:
        q_seg = segment_ids[:, None, q_offset:q_offset + q_len, None]
        bias = fused_key_bias(q_seg, key_bias[:, None, None, :kv_len])
    return torch.where(allowed, bias, float("-inf")).to(dtype)


def segment_biases(n: int, mode: str, weights: list[float] | None = None) -> list[float]:
    """Score bias per paraphrase segment: none 0; uniform -log N; confidence log(normalised confidence)."""
    if mode == "none":
        return [0.0] * n
    if mode == "uniform":
        return [-math.log(n)] * n
    return [math.log(max(w, 1e-6)) for w in weights]


class SegmentMask:
    """The MaskRenderer of attention-level fusion: prefill and each decode step, flex or sdpa."""

    def __init__(self, segment_ids: torch.Tensor, max_new_tokens: int, backend: str = "sdpa",
                 biases: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        rows, self.length = segment_ids.shape
        generated = segment_ids.new_full((rows, max_new_tokens), FUSED_SEGMENT)
        self.segment_ids = torch.cat([segment_ids, generated], dim=1)  # built once for the whole decode
        self.key_bias = self.token_bias(biases) if biases is not None else None
        self.backend, self.dtype = backend, dtype

    def token_bias(self, biases: torch.Tensor) -> torch.Tensor:
        """Each paraphrase token gets its segment's bias; other tokens 0."""
        seg = self.segment_ids
        paraphrase = (seg >= 1) & (seg <= biases.shape[1])
        return torch.where(paraphrase, biases.gather(1, (seg - 1).clamp(0, biases.shape[1] - 1)), 0.0)

    def render(self, q_offset: int, q_len: int, kv_len: int) -> dict:
        seg = self.segment_ids
        offset = torch.tensor(q_offset, device=seg.device)  # a tensor, so compiled flex does not recompile
        mask_mod = segment_mask_mod(seg, offset)
        if self.backend == "sdpa":
            return {"attention_mask": build_dense_mask(mask_mod, len(seg), q_len, kv_len, seg.device, self.dtype,
                                                       seg, self.key_bias, q_offset)}
        score_mod = fusion_score_mod(seg, self.key_bias, offset) if self.key_bias is not None else None
        return {"attention_mask": build_block_mask(mask_mod, len(seg), q_len, kv_len, seg.device),
                "fusion_score_mod": score_mod}

    def prefill(self) -> dict:
        return self.render(0, self.length, self.length)

    def step(self) -> dict:
        self.length += 1
        return self.render(self.length - 1, 1, self.length)

    def select(self, rows: torch.Tensor) -> None:
        self.segment_ids = self.segment_ids[rows]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[rows]


# ---------------------------------------------------------------- FlexAttention inside transformers

_flex_fn = None


def fused_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         fusion_score_mod=None, **kwargs):
    """An AttentionInterface function: flex_attention with our BlockMask and optional score_mod."""
    if not isinstance(attention_mask, BlockMask):  # never attend without the mask the caller meant
        raise RuntimeError(f"{FLEX_ATTENTION} needs a BlockMask as attention_mask, got {type(attention_mask).__name__}")
    out = _flex_fn(query, key, value, score_mod=fusion_score_mod, block_mask=attention_mask, scale=scaling,
                   enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def attention_implementation(model, name: str):
    """Run a block under another attention implementation (e.g. sdpa for plain prompts), then switch back."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def enable_flex(model, compile: bool) -> str:
    """Switch `model` to FlexAttention through transformers' AttentionInterface (no patching)."""
    global _flex_fn
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as err:
        raise InputError(f"--attn flex: this torch ({torch.__version__}) has no FlexAttention ({err}); "
                         f"upgrade torch to 2.5+ or choose --attn sdpa") from None
    from transformers import AttentionInterface
    if compile and model.device.type != "cuda":
        raise InputError("--compile on: compiled FlexAttention fails on CPU with growing decode shapes (an inductor "
                         "C++ error in torch 2.13); use --compile off (eager flex) or --attn sdpa")
    _flex_fn = torch.compile(flex_attention) if compile else flex_attention
    AttentionInterface.register(FLEX_ATTENTION, fused_flex_attention)
    model.set_attn_implementation(FLEX_ATTENTION)
    return f"flex ({'compiled' if compile else 'eager'})"


def resolve_backend(attn: str, device: torch.device) -> str:
    """auto: flex on CUDA; on CPU sdpa, which the benchmark found faster there."""
    if attn != "auto":
        return attn
    return "flex" if device.type == "cuda" else "sdpa"


# ---------------------------------------------------------------- answering a batch

def answer_fused(model, tokenizer, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                 positions: str = "aligned", backend: str = "sdpa", fusion_bias: str = "none",
                 weights: dict[str, tuple[list[float], bool]] | None = None) -> list[dict]:
    """One fused row per question; `weights` (uuid -> normalised confidences, fallback flag) for
    --fusion-bias confidence."""
    parts = [dataset.prompt_parts(r, n) for r in batch]
    rows = [fused_row(tokenizer, p, positions) for p in parts]
    biases = None
    if fusion_bias != "none":
        biases = torch.tensor([segment_biases(n, fusion_bias, weights and weights[r.uuid][0]) for r in batch],
                              device=model.device)
    start = time.perf_counter()
    outputs, _ = decode(model, tokenizer, rows, 1, greedy, stop, SegmentMask,
                        dict(backend=backend, biases=biases, dtype=model.dtype))
    seconds = (time.perf_counter() - start) / len(batch)
    return [result_row(record, tokenizer, tokens, paraphrases=record.paraphrases[:n],
                       prompts=[tokenizer.decode(row.input_ids)], seconds=seconds, method="flex_attention",
                       num_ensemble=n, positions=positions, attn_backend=backend, fusion_bias=fusion_bias,
                       **(dict(zip(("weights", "weights_fallback"), weights[record.uuid])) if weights else {}))
            for record, row, tokens in zip(batch, rows, outputs)]


def output_name(n: int, positions: str, fusion_bias: str) -> str:
    """flex_attention-<N>.feather for the defaults; other variants named, so they sit side by side."""
    variant = "".join(f"-{v}" for v, default in ((positions, "aligned"), (fusion_bias, "none")) if v != default)
    return f"flex_attention-{n}{variant}.feather"


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--num-paraphrases", "--num_paraphrases", type=int, default=5, help="paraphrases per question (N)")
    p.add_argument("--positions", choices=["aligned", "continuous"], default="aligned")
    p.add_argument("--attn", choices=["auto", "flex", "sdpa"], default="auto",
                   help="flex: FlexAttention BlockMask; sdpa: the same mask dense (reference backend)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile flex_attention (auto: on CUDA only)")
    p.add_argument("--fusion-bias", choices=["none", "uniform", "confidence"], default="none")
    p.add_argument("--confidence-samples", type=int, default=DEFAULT_CONFIDENCE_SAMPLES)
    args = p.parse_args(argv)
    n = args.num_paraphrases
    dataset, model, tokenizer = load_job(args, n)
    backend = resolve_backend(args.attn, model.device)
    label = "sdpa (dense mask)"
    if backend == "flex":
        label = enable_flex(model, args.compile == "on" or (args.compile == "auto" and model.device.type == "cuda"))
    print(f"attention backend: {label}{' (auto)' if args.attn == 'auto' else ''}; positions: {args.positions}; "
          f"fusion bias: {args.fusion_bias}")
    stop = StopRule(eos_ids(model, tokenizer), args.max_new_tokens)
    check_prompts(model, dataset, lambda r: [fused_row(tokenizer, dataset.prompt_parts(r, n), args.positions)],
                  args.max_new_tokens)
    out_dir = output_dir(args)

    def answer_batch(batch: list[Record]) -> list[dict]:
        weights = None
        if args.fusion_bias == "confidence":
            from confidence import confidences, normalised_weights
            with attention_implementation(model, "sdpa"):  # plain prompts, plain causal attention
                conf = confidences(model, tokenizer, dataset, batch, n, args.confidence_samples, stop,
                                   out_dir / "confidence.feather", args.seed)
            weights = {u: normalised_weights(c) for u, c in conf.items()}
        return answer_fused(model, tokenizer, dataset, batch, n, stop, args.positions, backend, args.fusion_bias, weights)

    run_job(args, dataset, out_dir / output_name(n, args.positions, args.fusion_bias), answer_batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
