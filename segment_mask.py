"""Attention-level fusion as a library: who may attend to whom in one fused sequence

    [shared prefix][paraphrase 1]...[paraphrase N][shared suffix][generated tokens]

Every token carries a segment id. The rule is one `mask_mod`, composed the attention-gym way from
small named mask_mods, and rendered either as a FlexAttention `BlockMask` or as a dense additive
mask for SDPA (the reference backend). `SegmentMask` is the renderer the decode loop uses; it also
scopes the model's attention implementation to its own decode. Few-shot examples can be blocks of
paraphrases too (`--fewshot-format fused`, see the segment ids below).

The picture for one pad, a 2-token prefix, paraphrases of 2, 3 and 2 tokens and a 2-token suffix
(row = query, column = key, a cell shows the key's segment where attention is allowed)::

      _PP1122233SS
    _ _...........
    P .P..........
    P .PP.........
    1 .PP1........
    1 .PP11.......
    2 .PP..2......
    2 .PP..22.....
    2 .PP..222....
    3 .PP.....3...
    3 .PP.....33..
    S .PP1122233S.
    S .PP1122233SS

The ablation `--isolation none` (upstream's -n) adds one rule, `paraphrases_see_each_other`: the paraphrases
read as one plain causal sequence, positions still as --positions says; the bias and 1/T still apply only
where the answer (or a later block) reads them::

      _PP1122233SS
    _ _...........
    P .P..........
    P .PP.........
    1 .PP1........
    1 .PP11.......
    2 .PP112......
    2 .PP1122.....
    2 .PP11222....
    3 .PP112223...
    3 .PP1122233..
    S .PP1122233S.
    S .PP1122233SS

On a model with sliding-window layers (Gemma 3: 512 tokens) every layer type gets its own mask: a full layer
the rule above, a sliding one the rule and transformers' window (a key less than W positions before the query),
measured in position ids, so that each paraphrase reads the prefix as it would alone. The first picture's row
at left positions (prefix 0-1, paraphrases from 2, suffix 5-6) on a layer with W = 3::

      _PP1122233SS
    _ _...........
    P .P..........
    P .PP.........
    1 .PP1........
    1 ..P11.......
    2 .PP..2......
    2 ..P..22.....
    2 .....222....
    3 .PP.....3...
    3 ..P.....33..
    S ....1.22.3S.
    S .......2..SS

With --record-attention the decode also keeps, per generated token, its attention share on the prefix, each
paraphrase and the suffix (`AttentionShares`), recomputed from each layer's queries and keys.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from fusion import FusionSettings

PAD_SEGMENT = -1         # padding: attends to itself only, seen by nobody
PREFIX_SEGMENT = 0       # instruction and few-shot examples: seen by every token after it
FUSED_SEGMENT = 1 << 20  # answer cue and generated tokens: see everything before them
# the question's paraphrase segments are numbered 1..N: each sees the prefix and itself. With few-shot
# examples shown as paraphrases too (--fewshot-format fused), example j's paraphrase i is j*SHOT_STRIDE + i
# and its answer j*SHOT_STRIDE + SHOT_ANSWER: the answer sees its paraphrases, later tokens the whole example.
SHOT_STRIDE = 1024
SHOT_ANSWER = SHOT_STRIDE - 1

FLEX_ATTENTION = "self_ensemble_flex"    # our names in transformers' AttentionInterface
DENSE_ATTENTION = "self_ensemble_dense"
PARAPHRASE_CHARS = "123456789abcdefghijklmnopqrstuvwxyz"
BLOCK_SIZE = 128  # FlexAttention's default tile
BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                      "q_indices", "full_q_num_blocks", "full_q_indices")

MaskMod = Callable[..., torch.Tensor]  # (b, h, q_idx, kv_idx) -> bool tensor


# ---------------------------------------------------------------- the rule, in small named mask_mods

def paraphrase_tokens(seg: torch.Tensor) -> torch.Tensor:
    """Tokens of a paraphrase segment, the question's or a few-shot example's (not an example's answer)."""
    return (seg >= 1) & (seg < FUSED_SEGMENT) & (seg % SHOT_STRIDE != SHOT_ANSWER)


def segment_block(seg: torch.Tensor) -> torch.Tensor:
    """The block a segment id belongs to: 0 for the question's paraphrases, j for few-shot example j."""
    return torch.where(seg == FUSED_SEGMENT, 0, seg // SHOT_STRIDE)


def lookup(table: torch.Tensor, index: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """table[index] for a 1D table captured by a mask_mod or score_mod, written so that compiled flex's C++
    names no symbolic size. Inductor's CPU flex template renames its two block-size symbols by plain text
    replacement (torch 2.13: "ks4" -> "cur_kvSplitSize" also turns "ks42" into the undeclared
    "cur_kvSplitSize2"), so any size symbol in a subgraph (a plain table[index] writes the table's length for
    the negative-index wrap; a captured Python int becomes one too) may break the build (docs/compile.md).
    No wrap, no bounds check: indices must be in range (the tables are padded a block past the end);
    negative ones read `fill`."""
    return torch.ops.aten._unsafe_masked_index(table, index >= 0, [index], fill)


def segment_mask_mod(segment_ids: torch.Tensor, q_offset: torch.Tensor, isolation: str = "full") -> MaskMod:
    """Who may attend to whom, from segment ids [B, T] (T covers prompt and generated tokens).
    Query i of a call is token i + q_offset of the row (decode steps start past the prompt). isolation
    "none" adds `paraphrases_see_each_other` (the ablation); "full" is the method."""
    from torch.nn.attention.flex_attention import and_masks, or_masks
    row_len = torch.tensor(segment_ids.shape[1], device=segment_ids.device)  # a tensor: see `lookup`
    flat = segment_ids.flatten()

    def q_segment(b, q_idx):
        return lookup(flat, b * row_len + q_idx + q_offset, PAD_SEGMENT)

    def kv_segment(b, kv_idx):
        return lookup(flat, b * row_len + kv_idx, PAD_SEGMENT)

    def causal(b, h, q_idx, kv_idx):
        """A token never sees the future."""
        return kv_idx <= q_idx + q_offset

    def key_not_padding(b, h, q_idx, kv_idx):
        """Padding is seen by nobody."""
        return kv_segment(b, kv_idx) != PAD_SEGMENT

    def key_in_prefix(b, h, q_idx, kv_idx):
        """The shared prefix is seen by every token."""
        return kv_segment(b, kv_idx) == PREFIX_SEGMENT

    def same_segment(b, h, q_idx, kv_idx):
        """A paraphrase sees itself (and so, isolated, never another paraphrase)."""
        return kv_segment(b, kv_idx) == q_segment(b, q_idx)

    def fused_query(b, h, q_idx, kv_idx):
        """The suffix and every generated token see all paraphrases."""
        return q_segment(b, q_idx) == FUSED_SEGMENT

    def earlier_block(b, h, q_idx, kv_idx):
        """A few-shot example shown as N paraphrases is, once answered, plain context for all after it."""
        return segment_block(kv_segment(b, kv_idx)) != segment_block(q_segment(b, q_idx))

    def example_answer(b, h, q_idx, kv_idx):
        """A few-shot example's answer sees all of its own paraphrases (the example's fused part)."""
        q = q_segment(b, q_idx)
        return (q % SHOT_STRIDE == SHOT_ANSWER) & (segment_block(kv_segment(b, kv_idx)) == segment_block(q))

    def self_token(b, h, q_idx, kv_idx):
        """Every token sees itself, padding included (a row of -inf would give NaN)."""
        return kv_idx == q_idx + q_offset

    def paraphrases_see_each_other(b, h, q_idx, kv_idx):
        """--isolation none: a paraphrase token sees the earlier paraphrase tokens of its own block, as in one
        plain causal sequence (upstream's -n); the causal rule it is combined with keeps the future out."""
        q, kv = q_segment(b, q_idx), kv_segment(b, kv_idx)
        return paraphrase_tokens(q) & paraphrase_tokens(kv) & (segment_block(q) == segment_block(kv))

    rules = [key_in_prefix, same_segment, fused_query, earlier_block, example_answer]
    visible = or_masks(*rules, *([paraphrases_see_each_other] if isolation == "none" else []))
    return or_masks(and_masks(causal, key_not_padding, visible), self_token)


def window_mask_mod(positions: torch.Tensor, q_offset: torch.Tensor, window: int) -> MaskMod:
    """A sliding-window layer's rule, from position ids [B, T] (T as segment_mask_mod's): transformers'
    `sliding_window_overlay` (a key less than `window` back) measured in positions, not in slots of the row, so
    that each paraphrase reads the prefix as it would alone and padding in between moves nothing."""
    row_len = torch.tensor(positions.shape[1], device=positions.device)  # tensors: see `lookup`
    flat, width = positions.flatten(), torch.tensor(window, device=positions.device)

    def within_window(b, h, q_idx, kv_idx):
        """A query sees only the keys less than `window` positions before it."""
        return lookup(flat, b * row_len + q_idx + q_offset) - lookup(flat, b * row_len + kv_idx) < width
    return within_window


def layer_mask_mod(segment_ids: torch.Tensor, positions: torch.Tensor | None, q_offset: torch.Tensor, isolation: str,
                   window: int | None) -> MaskMod:
    """One layer's rule: the segment rule, and on a sliding-window layer (`window`) the window's too."""
    rule = segment_mask_mod(segment_ids, q_offset, isolation)
    if window is None:
        return rule
    from torch.nn.attention.flex_attention import and_masks
    return and_masks(rule, window_mask_mod(positions, q_offset, window))


def fused_key_score(score: torch.Tensor, q_seg: torch.Tensor, kv_seg: torch.Tensor, kv_scale: torch.Tensor,
                    kv_bias: torch.Tensor) -> torch.Tensor:
    """A query's score on a paraphrase key of another segment (the answer reading the paraphrases): scaled
    by 1/T (APE's temperature) and shifted by the paraphrase's bias (-log N, or log confidence). kv_scale
    and kv_bias are 1 and 0 for other keys, so their scores stay as they are."""
    return torch.where(q_seg != kv_seg, score * kv_scale + kv_bias, score)


def fusion_score_mod(segment_ids: torch.Tensor, key_scale: torch.Tensor, key_bias: torch.Tensor,
                     q_offset: torch.Tensor):
    """`fused_key_score` as a FlexAttention score_mod; key_scale/key_bias [B, T] hold each key's 1/T and bias."""
    row_len = torch.tensor(segment_ids.shape[1], device=segment_ids.device)  # a tensor: see `lookup`
    flat_seg, flat_scale, flat_bias = segment_ids.flatten(), key_scale.flatten(), key_bias.flatten()

    def score_mod(score, b, h, q_idx, kv_idx):
        kv = b * row_len + kv_idx
        return fused_key_score(score, lookup(flat_seg, b * row_len + q_idx + q_offset), lookup(flat_seg, kv),
                               lookup(flat_scale, kv), lookup(flat_bias, kv))
    return score_mod


def score_segments(segment_ids: torch.Tensor, isolation: str) -> torch.Tensor:
    """The segment ids the score changes compare (`fused_key_score`'s q_seg != kv_seg): the ids themselves, or
    with isolation none every paraphrase of a block under its block's first id, so that paraphrases reading one
    another keep their plain scores (one causal sequence) and only a block's readers (the answer, a later
    block) get the bias and 1/T, as with full isolation."""
    if isolation == "full":
        return segment_ids
    return torch.where(paraphrase_tokens(segment_ids), segment_ids - segment_ids % SHOT_STRIDE + 1, segment_ids)


def segment_biases(n: int, mode: str, weights: list[float] | None = None) -> list[float]:
    """Score bias per paraphrase segment: none 0; uniform -log N (N copies of one prompt weigh as that prompt);
    sqrt -1/2 log N (weights 1/sqrt N: between none and uniform, 0 at N=1); confidence / agreement / shares
    log(weight); a number B: B on every paraphrase (log of APE's scale S; uniform is B = -log N)."""
    if mode == "none":
        return [0.0] * n
    if mode == "uniform":
        return [-math.log(n)] * n
    if mode == "sqrt":
        return [-0.5 * math.log(n)] * n
    if mode in ("confidence", "agreement", "shares"):
        return [math.log(max(w, 1e-6)) for w in weights]
    return [float(mode)] * n


# ---------------------------------------------------------------- renderings of the one rule

def build_block_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)


def build_dense_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device, dtype,
                     segment_ids: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                     q_offset: int = 0) -> torch.Tensor:
    """The same mask as an additive float mask [B, 1, q, kv] for SDPA, plus the fusion bias if given."""
    from torch.nn.attention.flex_attention import create_mask
    allowed = create_mask(mask_mod, batch, 1, q_len, kv_len, device=device)
    bias = torch.zeros((), device=device)
    if key_bias is not None:
        q_seg, kv_seg = segment_ids[:, None, q_offset:q_offset + q_len, None], segment_ids[:, None, None, :kv_len]
        bias = fused_key_score(bias, q_seg, kv_seg, 1.0, key_bias[:, None, None, :kv_len])
    return torch.where(allowed, bias, float("-inf")).to(dtype)


def dense_score_scale(segment_ids: torch.Tensor, key_scale: torch.Tensor, q_offset: int, q_len: int,
                      kv_len: int) -> torch.Tensor:
    """[B, 1, q, kv] factors on the raw scores for the dense backend: 1/T where a query meets a paraphrase
    key of another segment, 1 elsewhere (SDPA cannot scale some scores, so the dense path computes them)."""
    q_seg, kv_seg = segment_ids[:, None, q_offset:q_offset + q_len, None], segment_ids[:, None, None, :kv_len]
    return fused_key_score(torch.ones((), device=segment_ids.device), q_seg, kv_seg, key_scale[:, None, None, :kv_len],
                           0.0)


def allowed_matrix(segment_ids: list[int], isolation: str = "full", positions: list[int] | None = None,
                   window: int | None = None) -> torch.Tensor:
    """[L, L] bool, True where query (row) may attend to key (column): the dense rendering itself; with a
    `window`, a sliding-window layer's (`positions` the tokens' position ids)."""
    seg, pos = torch.tensor([segment_ids]), None if positions is None else torch.tensor([positions])
    mask_mod = layer_mask_mod(seg, pos, torch.tensor(0), isolation, window)
    return build_dense_mask(mask_mod, 1, len(segment_ids), len(segment_ids), "cpu", torch.float32)[0, 0] == 0


# ---------------------------------------------------------------- FlexAttention inside transformers

def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=4)
def flex_function(compile: bool, backend="inductor"):
    """flex_attention, eager or wrapped once in torch.compile with dynamic shapes (one wrapper per process
    and backend: batch size and lengths are symbolic, so a run compiles a handful of graphs, not one per
    shape). `backend` other than inductor is for tests that count compiles on CPU."""
    from torch.nn.attention.flex_attention import flex_attention
    if not compile:
        return flex_attention
    # past the recompile limit dynamo would run flex unfused without a word (correct, very slow): stop instead
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=True, backend=backend)


def mark_dynamic_shapes(tensor: torch.Tensor, dims) -> torch.Tensor:
    """Batch and length dimensions symbolic for torch.compile (a hint: size-1 dims may still specialise).
    Contiguous q/k/v keep prefill and decode strides alike, another recompile trigger otherwise."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def fused_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         fusion_score_mod=None, flex_fn=None, **kwargs):
    """An AttentionInterface function: flex_attention with our BlockMask and optional score_mod."""
    from torch.nn.attention.flex_attention import BlockMask
    if not isinstance(attention_mask, BlockMask) or flex_fn is None:  # never attend without the intended mask
        raise RuntimeError(f"{FLEX_ATTENTION} needs a BlockMask and a flex function from SegmentMask, "
                           f"got {type(attention_mask).__name__}")
    query, key, value = (mark_dynamic_shapes(t.contiguous(), (0, 2)) for t in (query, key, value))
    for name in BLOCK_MASK_TENSORS:
        tensor = getattr(attention_mask, name)
        if tensor is not None:
            mark_dynamic_shapes(tensor, (0, *range(2, tensor.dim())))
    out = flex_fn(query, key, value, score_mod=fusion_score_mod, block_mask=attention_mask, scale=scaling,
                  enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def dense_fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          fusion_scale=None, **kwargs):
    """An AttentionInterface function for the dense backend with --fusion-temperature: the scores written
    out (scaled per key), then the additive mask, softmax in float32. Without a temperature we use SDPA."""
    if fusion_scale is None:
        raise RuntimeError(f"{DENSE_ATTENTION} needs the score scale from SegmentMask")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    probs = torch.softmax(scores * fusion_scale + attention_mask.float(), dim=-1)
    return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


def layer_type(module) -> str | None:
    """The layer type (full_attention, sliding_attention) of an attention module, where its config names them."""
    types = getattr(module.config, "layer_types", None)
    return types[module.layer_idx] if types else None


def each_mask(value, fn: Callable):
    """fn on a rendered mask, or on each layer type's mask of a {layer type: mask} dict."""
    return {kind: fn(mask) for kind, mask in value.items()} if isinstance(value, dict) else fn(value)


ATTENTION_FUNCTIONS = {FLEX_ATTENTION: fused_flex_attention, DENSE_ATTENTION: dense_fused_attention}
RECORDING = "_recording"  # appended to an implementation's name: the same attention, recording attention shares


def recording(attend: Callable) -> Callable:
    """An AttentionInterface function computing exactly what `attend` computes (the same call, so no token can
    change) that also hands each layer's queries and keys to the forward's `attention_shares`."""
    def recorded(module, query, key, value, attention_mask, attention_shares=None, **kwargs):
        if attention_shares is None:  # never leave a token unrecorded without a word
            raise RuntimeError("a recording attention implementation needs `attention_shares` from SegmentMask")
        attention_shares.add(query, key, kwargs.get("scaling"), layer_type(module))
        return attend(module, query, key, value, attention_mask, **kwargs)
    return recorded


@lru_cache(maxsize=None)
def attention_function(name: str) -> Callable | None:
    """The function we register as implementation `name`: one of ATTENTION_FUNCTIONS, or one of those or sdpa
    with RECORDING appended; None for transformers' own (sdpa)."""
    if not name.endswith(RECORDING):
        return ATTENTION_FUNCTIONS.get(name)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return recording(attention_function(name.removesuffix(RECORDING)) or sdpa_attention_forward)


@contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Run a block under attention implementation `name` (sdpa, or one of ours), then switch back."""
    previous = model.config._attn_implementation
    function = attention_function(name)
    if function is not None:
        from transformers import AttentionInterface
        AttentionInterface.register(name, function)  # a registry entry, idempotent
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


# ---------------------------------------------------------------- attention shares (--record-attention)

def share_columns(segment_ids: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, N+2] one-hot: each key's column of the share. 0 the prefix (instruction and few-shot examples,
    fused ones included), 1..N the question's paraphrases, N+1 the suffix and generated tokens; padding none."""
    column = torch.where((segment_ids >= 1) & (segment_ids <= n), segment_ids, 0)
    column = torch.where(segment_ids == FUSED_SEGMENT, n + 1, column).long()
    return torch.nn.functional.one_hot(column, n + 2).float() * (segment_ids != PAD_SEGMENT)[..., None]


def question_paraphrases(segment_ids: torch.Tensor) -> int:
    """N: the largest segment id of a question's paraphrase in the rows."""
    return int(torch.where(segment_ids < SHOT_STRIDE, segment_ids, 0).max().clamp(min=0))


class AttentionShares:
    """Each generated token's attention share: the attention mass of the query that chose it (the prompt's last
    token, then each decode step's token) on the prefix, on each of the question's N paraphrases and on the
    suffix plus generated tokens: N+2 numbers summing to 1, per layer, averaged over heads. Recomputed from each
    layer's queries and keys under the dense rendering of the decode's own rule (mask, bias, 1/T), the same
    probabilities SDPA and FlexAttention compute. Kept per row of the batch, rows that finish early included."""

    def __init__(self, segment_ids: torch.Tensor, n: int):
        self.columns = share_columns(segment_ids, n)
        self.rows = torch.arange(len(segment_ids))  # the batch row each live row is
        self.rule: dict = {}  # the current query row's dense rule: attention_mask [B, 1, 1, kv], fusion_scale?
        self.layers: list[torch.Tensor] = []  # the current forward's [B, N+2], one per layer
        self.history: list[list[torch.Tensor]] = [[] for _ in range(len(segment_ids))]  # per row: [layers, N+2]
        self.stride = 1  # batch rows per question: the fused row, then the plain rows decoded beside it

    def next_query(self, rule: dict) -> None:
        """The next forward records the query row whose dense rule this is."""
        self.flush()
        self.rule = rule

    def add(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None, kind: str | None = None) -> None:
        """One layer (of layer type `kind`): the last query's probabilities over the keys [B, H, Q, D] x
        [B, H_kv, K, D], summed per column and averaged over heads."""
        q = query[:, :, -1:].float()
        k = key.float().repeat_interleave(q.shape[1] // key.shape[1], dim=1)
        rule = {name: (t[kind] if isinstance(t, dict) else t).to(q.device)  # layers may sit on several devices
                for name, t in self.rule.items()}
        scores = (q @ k.transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5)
        probs = torch.softmax(scores * rule.get("fusion_scale", 1.0) + rule["attention_mask"], dim=-1)
        share = torch.einsum("bk,bkc->bc", probs.mean(1)[:, 0], self.columns[:, :k.shape[2]].to(q.device))
        self.layers.append(share.to(self.columns.device))

    def flush(self) -> None:
        """The last forward's layers into each live row's history (not a retired row's)."""
        if self.layers:
            per_layer = torch.stack(self.layers, dim=1).cpu()
            for live, row in enumerate(self.rows.tolist()):
                if row >= 0:
                    self.history[row].append(per_layer[live])
            self.layers = []

    def retire(self, rows: torch.Tensor) -> None:
        """These live rows (bool [live]) only fill the batch from now on: from the next forward on, nothing of
        theirs is kept."""
        self.flush()
        self.rows = torch.where(rows.to(self.rows.device), -1, self.rows)

    def select(self, rows: torch.Tensor) -> None:
        self.flush()
        self.rows, self.columns = self.rows[rows], self.columns[rows]

    def every(self, stride: int) -> "AttentionShares":
        """Read by question from now on: question q's shares are those of batch row q * stride."""
        self.stride = stride
        return self

    def per_layer(self, row: int) -> torch.Tensor:
        """[generated tokens, layers, N+2] of question `row` (batch row row * stride)."""
        self.flush()
        return torch.stack(self.history[row * self.stride])

    def shares(self, row: int) -> list[list[float]]:
        """Question `row`'s share per generated token, averaged over layers: the `attention_share` column."""
        return self.per_layer(row).mean(dim=1).tolist()


# ---------------------------------------------------------------- the renderer the decode loop uses

class SegmentMask:
    """The MaskRenderer of attention-level fusion, for `settings.backend` flex or sdpa (dense). The whole
    decode's mask (prompt plus max_new_tokens) is rendered once per batch; each decode step takes its query
    row from it. biases [B, N]: each paraphrase's score bias for the queries that read it (the answer), or
    None (no bias); few-shot examples' paraphrases get -1/2 log N under the sqrt bias and -log N under any other
    (an example has no votes or confidence of its own); scores on paraphrase
    keys are divided by settings.temperature; settings.isolation none lets the paraphrases see each other;
    settings.record_attention keeps each generated token's `AttentionShares` over `paraphrases` (N; default:
    the largest question paraphrase segment id). `compile_backend` other than inductor is for tests that
    count compiles. temperatures [B]: each row's own T (rows of several variants decoded together), in place of
    settings.temperature. positions [B, L]: the rows' position ids, which a model with sliding-window layers needs
    (`attention(model)` reads its layer types: each type gets its own mask, the window measured in positions)."""
    keeps_all_keys = True  # the windows are in the masks: a key out of one layer's window is in another's

    def __init__(self, segment_ids: torch.Tensor, max_new_tokens: int, settings: "FusionSettings",
                 biases: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 compile_backend: str | Callable = "inductor", paraphrases: int | None = None,
                 positions: torch.Tensor | None = None, temperatures: list[float] | None = None):
        rows, self.length = segment_ids.shape
        self.total = self.length + max_new_tokens
        # generated tokens are fused; then padding up to a whole block past the end, because
        # create_block_mask evaluates mask_mod beyond the lengths it is given (pytorch#137801)
        width = -(-(self.total + BLOCK_SIZE) // BLOCK_SIZE) * BLOCK_SIZE
        self.segment_ids = torch.cat([segment_ids, segment_ids.new_full((rows, max_new_tokens), FUSED_SEGMENT),
                                      segment_ids.new_full((rows, width - self.total), PAD_SEGMENT)], dim=1)
        self.positions = None if positions is None else torch.cat(  # generated tokens follow the last position
            [positions, positions[:, -1:] + torch.arange(1, width - self.length + 1, device=positions.device)], dim=1)
        self.windows: dict[str, int | None] = {"full_attention": None}  # layer type -> window, from attention()
        example_bias = segment_biases(biases.shape[1], "sqrt" if settings.bias == "sqrt" else "uniform")[0] \
            if biases is not None else 0.0
        self.key_bias = self.token_bias(biases, example_bias) if biases is not None else None
        self.key_scale = None
        if temperatures is not None or settings.temperature != 1.0:
            inverse = (1.0 / settings.temperature if temperatures is None else
                       torch.tensor([1.0 / t for t in temperatures], device=segment_ids.device)[:, None])
            self.key_scale = torch.where(paraphrase_tokens(self.segment_ids), inverse, 1.0)
            self.key_bias = self.key_bias if self.key_bias is not None else torch.zeros_like(self.key_scale)
        self.backend, self.dtype, self.isolation = settings.backend, dtype, settings.isolation
        self.score_ids = score_segments(self.segment_ids, self.isolation)
        self.shares = None
        if settings.record_attention:
            self.shares = AttentionShares(self.segment_ids, paraphrases or question_paraphrases(segment_ids))
        self.flex_fn = flex_function(settings.compile, compile_backend) if self.backend == "flex" else None
        self.full: dict | None = None  # the whole decode's mask, rendered at the first step

    def token_bias(self, biases: torch.Tensor, example_bias: float) -> torch.Tensor:
        """Each of the question's paraphrase tokens gets its segment's bias (biases [B, N]); the few-shot
        examples' paraphrase tokens `example_bias`; other tokens 0."""
        seg = self.segment_ids
        question = (seg >= 1) & (seg <= biases.shape[1])
        own = biases.float().gather(1, (seg - 1).clamp(0, biases.shape[1] - 1))
        return torch.where(question, own, torch.where(paraphrase_tokens(seg), example_bias, 0.0))

    def attention(self, model):
        """The attention implementation this mask is rendered for, for the length of one decode; the model's
        layer types decide the masks rendered (one per type)."""
        from models import attention_windows
        windows = attention_windows(model.config)
        if any(windows.values()) and self.positions is None:  # never a sliding layer read as a full one
            raise RuntimeError("a model with sliding-window layers needs the rows' positions in SegmentMask")
        if windows != self.windows:
            self.windows, self.full = windows, None
        name = {"flex": FLEX_ATTENTION, "sdpa": DENSE_ATTENTION if self.key_scale is not None else "sdpa"}
        return attention_implementation(model, name[self.backend] + (RECORDING if self.shares is not None else ""))

    def mask_mod(self, offset: torch.Tensor, window: int | None = None) -> MaskMod:
        return layer_mask_mod(self.segment_ids, self.positions, offset, self.isolation, window)

    def per_layer_type(self, render_one: Callable):
        """render_one(layer type, window) for each layer type of the model: the one mask when all layers are alike (what
        every model takes), else {layer type: mask} (what models with mixed layers, Gemma 3's, take)."""
        masks = {kind: render_one(kind, window) for kind, window in self.windows.items()}
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def render(self, q_offset: int, q_len: int, kv_len: int) -> dict:
        """The forward kwargs for queries [q_offset, q_offset + q_len) over keys [0, kv_len)."""
        if self.backend == "sdpa":
            return self.render_dense(q_offset, q_len, kv_len, self.dtype)
        seg = self.segment_ids
        offset = torch.tensor(q_offset, device=seg.device)  # a tensor, so compiled flex does not recompile
        masks = self.per_layer_type(lambda _, window: build_block_mask(self.mask_mod(offset, window), len(seg), q_len,
                                                                    kv_len, seg.device))
        return {"attention_mask": masks, "fusion_score_mod": self.score_mod(offset), "flex_fn": self.flex_fn}

    def render_dense(self, q_offset: int, q_len: int, kv_len: int, dtype: torch.dtype) -> dict:
        """The dense rendering: the additive mask with the bias, and the 1/T factors when there is a temperature."""
        seg = self.segment_ids
        offset = torch.tensor(q_offset, device=seg.device)
        out = {"attention_mask": self.per_layer_type(lambda _, window: build_dense_mask(
            self.mask_mod(offset, window), len(seg), q_len, kv_len, seg.device, dtype, self.score_ids, self.key_bias,
            q_offset))}
        if self.key_scale is not None:
            out["fusion_scale"] = dense_score_scale(self.score_ids, self.key_scale, q_offset, q_len, kv_len)
        return out

    def score_mod(self, offset: torch.Tensor):
        if self.key_bias is None:
            return None
        scale = self.key_scale if self.key_scale is not None else torch.ones_like(self.key_bias)
        return fusion_score_mod(self.score_ids, scale, self.key_bias, offset)

    def recorded(self, kwargs: dict, q: int) -> dict:
        """The forward kwargs, and when recording the shares of query q (the one that chooses the next token)."""
        if self.shares is None:
            return kwargs
        self.shares.next_query(self.render_dense(q, 1, q + 1, torch.float32))
        return {**kwargs, "attention_shares": self.shares}

    def prefill(self, cached: int = 0, upto: int | None = None) -> dict:
        """The prompt's queries after the `cached` tokens already in the KV cache (up to column `upto`, default
        the whole prompt) over the keys before them."""
        upto = self.length if upto is None else upto
        return self.recorded(self.render(cached, upto - cached, upto), upto - 1)

    def first_row(self) -> "SegmentMask":
        """This mask for its first row only, recording nothing: what encodes a shared prefix that holds fused
        few-shot examples once for every row (decoding.PrefixCache)."""
        first = copy.copy(self)
        first.shares, first.full = None, None
        first.select(torch.tensor([0], device=self.segment_ids.device))
        return first

    def prefix(self, length: int) -> dict:
        """The first `length` tokens over themselves (a shared prefix, encoded before the rest of the prompt)."""
        return self.render(0, length, length)

    def prefix_key(self, length: int) -> tuple:
        """What the KV of `prefix(length)` depends on beyond the tokens and positions: segments, score changes
        (the examples' bias, 1/T), isolation and backend."""
        def first(values: torch.Tensor | None) -> tuple | None:
            return None if values is None else tuple(values[0, :length].tolist())
        return (first(self.segment_ids), first(self.key_bias), first(self.key_scale), self.isolation, self.backend,
                tuple(self.windows.items()))

    def step(self) -> dict:
        """The next generated token's query row, sliced from the whole decode's mask."""
        self.length += 1
        if self.full is None:
            self.full = self.render(0, self.total, self.total)
        q = self.length - 1
        if self.backend == "sdpa":
            return self.recorded({name: each_mask(full, lambda m: m[:, :, q:q + 1, :self.length])
                                  for name, full in self.full.items()}, q)
        offset = torch.tensor(q, device=self.segment_ids.device)
        full = self.full["attention_mask"]
        blocks = self.per_layer_type(lambda kind, window: self.query_block(
            full[kind] if isinstance(full, dict) else full, q, offset, window))
        return self.recorded({**self.full, "attention_mask": blocks, "fusion_score_mod": self.score_mod(offset)}, q)

    def query_block(self, full, q: int, offset: torch.Tensor, window: int | None):
        """Query q's block row of the whole decode's BlockMask, its partial blocks read through q's own rule."""
        block = full[:, :, q // BLOCK_SIZE:q // BLOCK_SIZE + 1]
        for name in BLOCK_MASK_TENSORS:  # views of the full mask: copied, so compiled flex sees the same strides
            if getattr(block, name) is not None:
                setattr(block, name, getattr(block, name).contiguous())
        block.mask_mod = self.mask_mod(offset, window)  # partial blocks: this query's row
        block.seq_lengths = (1, self.length)
        return block

    def retire(self, rows: torch.Tensor) -> None:
        """Rows that only fill the batch from now on (ballast, decoding.MIN_ROWS): their shares are not kept."""
        if self.shares is not None:
            self.shares.retire(rows)

    def select(self, rows: torch.Tensor) -> None:
        self.segment_ids = self.segment_ids[rows]
        if self.positions is not None:
            self.positions = self.positions[rows]
        self.score_ids = score_segments(self.segment_ids, self.isolation)  # the same tensor with full isolation
        if self.shares is not None:
            self.shares.select(rows)
        if self.key_bias is not None:
            self.key_bias = self.key_bias[rows]
        if self.key_scale is not None:
            self.key_scale = self.key_scale[rows]
        if self.full is not None:
            self.full = {name: each_mask(value, lambda m: m[rows]) if hasattr(value, "__getitem__") else value
                         for name, value in self.full.items()}


# ---------------------------------------------------------------- the picture

SPECIAL_SEGMENTS = {PAD_SEGMENT: ("pad", "_"), PREFIX_SEGMENT: ("prefix", "P"), FUSED_SEGMENT: ("suffix", "S")}


def segment_name(segment_id: int) -> str:
    if segment_id in SPECIAL_SEGMENTS:
        return SPECIAL_SEGMENTS[segment_id][0]
    example, local = divmod(segment_id, SHOT_STRIDE)
    if example == 0:
        return f"paraphrase {local}"
    return f"example {example} answer" if local == SHOT_ANSWER else f"example {example} paraphrase {local}"


def segment_char(segment_id: int) -> str:
    """One character per segment kind: P prefix, 1..9 a..z the question's paraphrases, S suffix/generated,
    _ pad; a few-shot example's paraphrases as their number, its answer as A (--fewshot-format fused)."""
    if segment_id in SPECIAL_SEGMENTS:
        return SPECIAL_SEGMENTS[segment_id][1]
    local = segment_id % SHOT_STRIDE
    if local == SHOT_ANSWER:
        return "A"
    return PARAPHRASE_CHARS[local - 1] if local <= len(PARAPHRASE_CHARS) else "+"


def draw_mask(segment_ids: list[int], max_columns: int = 80, fold_prefix: bool = False, isolation: str = "full",
              positions: list[int] | None = None, window: int | None = None) -> str:
    """The mask as characters: a cell shows the segment of the key it may attend to, '.' none; with a
    `window`, a sliding-window layer's (`positions` the tokens' position ids).
    Longer rows are downsampled: one cell covers step x step tokens and shows its first visible key.
    fold_prefix: the prefix's keys drawn as one column and its own (plain causal) rows left out, so a long
    instruction and few-shot prefix does not push the paraphrases off the screen."""
    allowed = allowed_matrix(segment_ids, isolation, positions, window).numpy()
    chars = [segment_char(s) for s in segment_ids]
    prefix = [i for i, s in enumerate(segment_ids) if s == PREFIX_SEGMENT]
    if fold_prefix and len(prefix) > 1:
        rest = [i for i, s in enumerate(segment_ids) if s != PREFIX_SEGMENT]
        columns = np.concatenate([allowed[:, prefix].any(axis=1, keepdims=True), allowed[:, rest]], axis=1)
        allowed, chars = columns[rest], [chars[prefix[0]]] + [chars[i] for i in rest]
        row_chars = [chars[i + 1] for i in range(len(rest))]
        header = f"  (prefix: {len(prefix)} tokens folded into the first column; its rows, plain causal, left out)"
        return header + "\n" + draw_grid(allowed, row_chars, chars, max_columns)
    return draw_grid(allowed, chars, chars, max_columns)


def draw_grid(allowed: np.ndarray, row_chars: list[str], key_chars: list[str], max_columns: int) -> str:
    """allowed [rows, keys] as characters, downsampled to at most max_columns cells a side."""
    rows, keys = allowed.shape
    step = max(1, math.ceil(max(rows, keys) / max_columns))
    row_cells, key_cells = math.ceil(rows / step), math.ceil(keys / step)
    grid = np.zeros((row_cells * step, key_cells * step), dtype=bool)
    grid[:rows, :keys] = allowed
    blocks = grid.reshape(row_cells, step, key_cells, step).any(axis=1)  # [row cell, column cell, key in cell]
    first_key = blocks.argmax(axis=2)
    keys_padded = key_chars + [" "] * (key_cells * step - keys)
    rows_padded = row_chars + [" "] * (row_cells * step - rows)
    lines = ["  " + "".join(keys_padded[c * step] for c in range(key_cells))]
    for r in range(row_cells):
        row = "".join(keys_padded[c * step + first_key[r, c]] if blocks[r, c].any() else "." for c in range(key_cells))
        lines.append(f"{rows_padded[r * step]} {row}")
    return "\n".join(lines)


def mask_legend(segment_ids: list[int], max_columns: int = 80) -> str:
    step = max(1, math.ceil(len(segment_ids) / max_columns))
    kinds = sorted(set(segment_ids), key=lambda s: (s != PAD_SEGMENT, s))
    names = ", ".join(f"{segment_char(s)} {segment_name(s)}" for s in kinds)
    scale = "one cell per token" if step == 1 else f"one cell = {step}x{step} tokens, showing its first visible key"
    return (f"legend: row = query, column = key; a cell shows the key's segment where attention is allowed, "
            f"'.' masked. {names} (S also stands for the generated tokens). {scale}")
