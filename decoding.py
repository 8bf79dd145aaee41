"""The decoding core shared by every generator: prompt rows with segment ids and positions, left
padding, prefill into a KV cache, one token per live row per step, per-question stopping, finished
questions dropped from the batch. In gpt-fast's shape: `prefill`, `decode_one_token`, `decode_n_tokens`,
and `decode` around them. Generators differ only in how a step's logits become tokens (`choose`) and in
the attention mask (a `MaskRenderer`). The shared prefix's KV lives in the `LanguageModel` passed in."""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from constants import InputError
from fusion import POSITIONS
from segment_mask import (FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT, SHOT_ANSWER, SHOT_STRIDE, SegmentMask,
                          attention_implementation)


@dataclass
class Row:
    """One sequence of the batch: its tokens, their segment ids and their position ids."""
    input_ids: list[int]
    segment_ids: list[int]
    position_ids: list[int]


def layout_row(shared: list[list[int]], paraphrases: list[list[list[int]]], positions: str = "left") -> Row:
    """`[shared 0][paraphrases 1][shared 1]...[paraphrases K][shared K]` with segment and position ids
    (see PromptParts). Within a block, left (Parallel Context Windows): every paraphrase starts where the
    block starts, the shared text after it follows the longest; right (Structured Prompting): every
    paraphrase ends right before that shared text; continuous: 0..L-1 (upstream)."""
    if positions not in POSITIONS:
        raise ValueError(f"positions {positions!r}: not one of {POSITIONS}")
    ids, seg, pos = list(shared[0]), [PREFIX_SEGMENT] * len(shared[0]), list(range(len(shared[0])))
    for j, (block, after) in enumerate(zip(paraphrases, shared[1:]), 1):
        question = j == len(paraphrases)  # the last block is the question's; earlier ones few-shot examples
        start, longest = (pos[-1] + 1 if pos else 0), max((len(t) for t in block), default=0)
        for i, tokens in enumerate(block, 1):
            first = {"left": start, "right": start + longest - len(tokens)}.get(positions, len(ids))
            ids += tokens
            seg += [i if question else j * SHOT_STRIDE + i] * len(tokens)
            pos += range(first, first + len(tokens))
        following = len(ids) if positions == "continuous" else start + longest
        ids += after
        seg += [FUSED_SEGMENT if question else j * SHOT_STRIDE + SHOT_ANSWER] * len(after)
        pos += range(following, following + len(after))
    return Row(ids, seg, pos)


def build_row(prefix: list[int], segments: list[list[int]], suffix: list[int], positions: str = "left") -> Row:
    """`[prefix][segment 1]..[segment N][suffix]`: one block of paraphrases between two shared parts."""
    return layout_row([prefix, suffix], [segments], positions)


def encode_parts(tokenizer, parts) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids of a prompt's shared parts and paraphrase blocks (PromptParts), cut from the tokenisation
    of each whole plain prompt `parts.full(i)` (BOS included if the tokenizer adds one), so that joining
    the parts with paraphrase i of every block gives exactly `tokenizer(parts.full(i))`: the tokens the
    model reads for that text. A shared part keeps the longest run of its tokens that every prompt has; a
    token merged across a cut (e.g. "?\\n") goes to the paraphrase beside it."""
    n = len(parts.paraphrases[-1])
    encoded = tokenizer([parts.full(i) for i in range(n)], add_special_tokens=parts.special_tokens,
                        return_offsets_mapping=True)
    pieces = [split_at(offsets, piece_ends(parts, i), ids)
              for i, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"]))]
    shared = []
    for k in range(0, len(pieces[0]), 2):
        lists = [p[k] for p in pieces]
        run, where = common_run(lists, first=k == 0, last=k == len(pieces[0]) - 1)
        if not run and parts.shared[k // 2].strip():
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise InputError(f"tokenizer {name}: the shared text {parts.shared[k // 2]!r} is tokenised differently "
                             f"after each paraphrase; no shared tokens to fuse on")
        for p, x in zip(pieces, where):  # what a prompt has beyond the shared run goes to the paraphrases beside
            before, after = p[k][:x], p[k][x + len(run):]
            if k > 0:
                p[k - 1] = p[k - 1] + before
            if k + 1 < len(p):
                p[k + 1] = after + p[k + 1]
        shared.append(run)
    blocks = [[p[k] for p in pieces] for k in range(1, len(pieces[0]), 2)]
    return shared, blocks


def piece_ends(parts, i: int) -> list[int]:
    """Character offsets where each piece of plain prompt i ends: shared 0, paraphrase block 1, shared 1..."""
    texts = [parts.shared[0]] + [t for block, after in zip(parts.paraphrases, parts.shared[1:]) for t in (block[i], after)]
    return list(itertools.accumulate(len(t) for t in texts))


def split_at(offsets: list[tuple[int, int]], ends: list[int], ids: list[int]) -> list[list[int]]:
    """The tokens of one prompt per piece: a token belongs to the piece it starts in, or to the paraphrase
    piece (odd index) if it runs from a shared piece into one."""
    pieces: list[list[int]] = [[] for _ in ends]
    k = 0
    for token, (start, end) in zip(ids, offsets):
        while k < len(ends) - 1 and start >= ends[k]:
            k += 1
        owner = k + 1 if k % 2 == 0 and end > ends[k] and k + 1 < len(ends) else k
        pieces[owner].append(token)
    return pieces


def common_run(lists: list[list[int]], first: bool, last: bool) -> tuple[list[int], list[int]]:
    """The longest run of tokens every list contains (at its start if `first`, at its end if `last`), and
    where it starts in each list."""
    ref = lists[0]
    for length in range(len(ref), 0, -1):
        starts = [0] if first else [len(ref) - length] if last else range(len(ref) - length + 1)
        for a in starts:
            run = ref[a:a + length]
            where = [find_run(l, run, first, last) for l in lists]
            if all(w is not None for w in where):
                return run, where
    return [], [0 if first else len(l) for l in lists]


def find_run(tokens: list[int], run: list[int], first: bool, last: bool) -> int | None:
    starts = [0] if first else [len(tokens) - len(run)] if last else range(len(tokens) - len(run) + 1)
    return next((x for x in starts if x >= 0 and tokens[x:x + len(run)] == run), None)


def encode_prompt(tokenizer, prefix: str, segments: list[str], suffix: str) -> tuple[list[int], list[list[int]], list[int]]:
    """`encode_parts` for one block: (prefix ids, one id list per segment, suffix ids)."""
    from dataset import PromptParts
    shared, blocks = encode_parts(tokenizer, PromptParts([prefix, suffix], [segments or [""]]))
    if not segments:  # a plain prompt: what straddled the cut belongs to the suffix
        return shared[0], [], blocks[0][0] + shared[1]
    return shared[0], blocks[0], shared[1]


def pad_left(rows: list[Row], pad_id: int, device: torch.device, after: int = 0, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, segment_ids) as [R, L] tensors (L: `width`, default the longest row), padded
    on the left of each row's tokens after its first `after` (a shared prefix read from the cache:
    mid-padding keeps it in place)."""
    width = width or max(len(r.input_ids) for r in rows)
    def pad(values: list[int], fill: int) -> list[int]:
        return values[:after] + [fill] * (width - len(values)) + values[after:]
    ids = torch.tensor([pad(r.input_ids, pad_id) for r in rows], device=device)
    pos = torch.tensor([pad(r.position_ids, 0) for r in rows], device=device)
    seg = torch.tensor([pad(r.segment_ids, PAD_SEGMENT) for r in rows], device=device, dtype=torch.int32)
    return ids, pos, seg


class MaskRenderer(Protocol):
    """Gives the attention_mask argument (and extra forward kwargs) for the prefill and each step, and
    the attention implementation it is rendered for (a context manager around one decode). keeps_all_keys:
    its masks apply sliding windows themselves, so the KV cache must keep every key (a sliding layer of
    transformers' own cache keeps only its window, counted in slots of the row)."""
    keeps_all_keys: bool
    def __init__(self, segment_ids: torch.Tensor, max_new_tokens: int, positions: torch.Tensor | None = None,
                 **kwargs) -> None: ...
    def attention(self, model) -> ContextManager: ...
    def prefill(self, cached: int = 0) -> dict: ...
    def step(self) -> dict: ...
    def select(self, rows: torch.Tensor) -> None: ...
    def retire(self, rows: torch.Tensor) -> None: ...


class PaddingMask:
    """The plain causal mask with left padding, built by transformers from a 2D mask (its sliding windows
    counted in slots of the row: padding inside a row would move them, see `prefill_rows`)."""
    keeps_all_keys = False

    def __init__(self, segment_ids: torch.Tensor, max_new_tokens: int, positions: torch.Tensor | None = None):
        self.mask = (segment_ids != PAD_SEGMENT).long()

    def attention(self, model) -> ContextManager:
        return attention_implementation(model, "sdpa")

    def prefill(self, cached: int = 0) -> dict:
        return {"attention_mask": self.mask}  # transformers wants the 2D mask over cached and new tokens

    def prefix(self, length: int) -> dict:
        return {"attention_mask": self.mask[:1, :length]}

    def step(self) -> dict:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return {"attention_mask": self.mask}

    def select(self, rows: torch.Tensor) -> None:
        self.mask = self.mask[rows]

    def retire(self, rows: torch.Tensor) -> None:
        """Rows that only fill the batch from now on (ballast): nothing here records them."""


@dataclass
class StopRule:
    """A question stops at EOS, when its answer's first line is complete, or at max_new_tokens."""
    eos_ids: set[int]
    max_new_tokens: int
    first_line_only: bool = True

    def done(self, tokens: list[int], tokenizer) -> bool:
        if len(tokens) >= self.max_new_tokens or tokens[-1] in self.eos_ids:
            return True
        return self.first_line_only and "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@dataclass
class DecodeStats:
    prefill_tokens: int = 0   # tokens (padding included) run through the model at prefill
    decode_tokens: int = 0    # tokens run through the model after prefill
    steps: int = 0
    seconds: float = 0.0

    def add(self, other: "DecodeStats") -> "DecodeStats":
        """The sum of two decodes' statistics (e.g. over the batches of a run)."""
        return DecodeStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


# choose(logits [Q, n, V] of the live questions, their indices) -> next token per live question [Q]
Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def greedy(logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    return logits[:, 0].argmax(-1)


@dataclass
class Sampler:
    """Temperature / top-p sampling with its own generator (reproducible per seed)."""
    generator: torch.Generator
    temperature: float = 1.0
    top_p: float = 1.0

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits[:, 0].float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > self.top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)


def new_cache(model, keep_all_keys: bool, layers: list | None = None) -> DynamicCache:
    """A KV cache (holding `layers`' keys and values, if given): transformers' own for the model (a
    sliding-window layer keeps its window), or, keep_all_keys, one that keeps every key of every layer in
    `GrowingLayer`s."""
    if not keep_all_keys:
        return DynamicCache(ddp_cache_data=layers, config=model.config)
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in range(model.config.get_text_config(decoder=True).num_hidden_layers)]
    for layer, (keys, values) in zip(cache.layers, layers or []):
        layer.update(keys, values)
    return cache


class GrowingLayer(DynamicLayer):
    """A cache layer that writes each step's keys and values into room kept after them (grown by half when full),
    where transformers' DynamicLayer copies the whole cache into a new tensor at every step (torch.cat): a
    decode step of R rows over L keys then moves R x 1 tokens, not R x L."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.device, self.length, self.room = key_states.device, 0, None
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        if self.room is None or end > self.room[0].shape[-2]:
            size = end + max(32, end // 2)
            grown = [t.new_empty(*t.shape[:-2], size, t.shape[-1]) for t in (key_states, value_states)]
            for new, old in zip(grown, (self.room or ())):
                new[..., :self.length, :] = old[..., :self.length, :]
            self.room = grown
        self.room[0][..., self.length:end, :] = key_states
        self.room[1][..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self.room[0][..., :end, :], self.room[1][..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self.room is not None:
            self.room = [t[indices] for t in self.room]
            self.keys, self.values = self.room[0][..., :self.length, :], self.room[1][..., :self.length, :]


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, pos: torch.Tensor, mask: dict, logits_to_keep: int = 1,
            cache: DynamicCache | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """Run prompt rows [R, L] into a KV cache (empty - transformers' own for the model - or holding the
    tokens before them) under `mask` (a renderer's forward kwargs): (logits, cache)."""
    cache = cache if cache is not None else new_cache(model, keep_all_keys=False)
    before = cache.get_seq_length()
    logits = model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=logits_to_keep,
                   **mask).logits
    if cache.get_seq_length() != before + ids.shape[1]:  # a transformers that ignores `cache=` decodes garbage
        raise RuntimeError("the model did not fill the KV cache passed as `cache=`; use transformers>=5.24")
    return logits, cache


def shared_prefix_length(rows: list[Row]) -> int:
    """How many leading tokens every row shares as prefix: the same ids, positions and segments, each segment
    the plain prefix or a few-shot example's (--fewshot-format fused), never the question's; every row keeps
    at least one token of its own."""
    first = rows[0]
    limit = min(len(r.input_ids) for r in rows) - 1
    for i in range(limit):
        if not shared_segment(first.segment_ids[i]) or any(
                (r.input_ids[i], r.position_ids[i], r.segment_ids[i]) !=
                (first.input_ids[i], first.position_ids[i], first.segment_ids[i]) for r in rows):
            return i
    return max(limit, 0)


def shared_segment(segment_id: int) -> bool:
    """The plain prefix, or a few-shot example's paraphrase or answer: the same in every row of a run."""
    return segment_id == PREFIX_SEGMENT or SHOT_STRIDE <= segment_id < FUSED_SEGMENT


PREFIX_ENTRIES = 4  # prefixes kept: a shared sweep's batches alternate between the plain and fused few-shot prefixes


class PrefixCache:
    """The KV of the shared prefix (instruction and few-shot examples), computed once per run and prompt
    format and reused by every batch, as serving engines cache prefixes; the PREFIX_ENTRIES most recently used
    are kept. One per loaded model; keyed by the prefix's ids, positions, the mask it is encoded under, dtype,
    device and the weights' version (weights changed in place recompute it)."""

    def __init__(self) -> None:
        self.entries: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def batch(self, model, ids: torch.Tensor, pos: torch.Tensor, rows: int, mask: MaskRenderer,
              examples: bool = False) -> tuple[DynamicCache, int]:
        """A KV cache of the kind `mask` needs holding the prefix for `rows` rows, and how many tokens had to
        be computed (0 on reuse). A plain prefix is encoded causally; one with fused few-shot examples
        (`examples`) under `mask`, the rows' own. Every key is kept, whatever the cache it goes into."""
        rule = mask.prefix_key(len(ids)) if examples else ("causal",)
        key = (tuple(ids.tolist()), tuple(pos.tolist()), rule, model.dtype, str(ids.device), weights_version(model))
        computed = 0
        if key in self.entries:
            self.entries[key] = self.entries.pop(key)  # the most recently used last
        else:
            while len(self.entries) >= PREFIX_ENTRIES:  # the least recently used goes
                self.entries.pop(next(iter(self.entries)))
            encoder = mask.first_row() if examples else PaddingMask(torch.zeros_like(ids)[None], 0)
            with encoder.attention(model):  # the prefix sees only itself (an example: the prefix and its block)
                _, cache = prefill(model, ids[None], pos[None], encoder.prefix(len(ids)),
                                   cache=new_cache(model, keep_all_keys=True))
            self.entries[key] = [(layer.keys, layer.values) for layer in cache.layers]
            computed = len(ids)
        layers = [(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in self.entries[key]]
        return new_cache(model, mask.keeps_all_keys, layers), computed


def weights_version(model) -> int:
    """Changes whenever a weight is written in place (load_state_dict, an optimiser step): torch counts
    every in-place write of a tensor in its version counter."""
    return sum(p._version for p in model.parameters())


@dataclass
class LanguageModel:
    """A loaded model, its tokenizer and the KV of the shared prefix it has encoded (prefix_cache None:
    the prefix is encoded in every batch, the reference the tests compare with)."""
    model: object
    tokenizer: object
    prefix_cache: PrefixCache | None = field(default_factory=PrefixCache)

    @property
    def device(self) -> torch.device:
        return self.model.device


@dataclass
class LiveRows:
    """What a decode carries from step to step: the KV cache, the mask renderer, each row's next position
    and the questions still decoding (row r belongs to question questions[r // n])."""
    cache: DynamicCache
    mask: MaskRenderer
    positions: torch.Tensor
    questions: torch.Tensor

    def keep(self, keep: torch.Tensor, n: int) -> None:
        """Drop the rows of finished questions (keep [Q] bool) from the cache, the mask and the positions."""
        rows = keep.repeat_interleave(n).nonzero().squeeze(-1)
        self.cache.batch_select_indices(rows)
        self.mask.select(rows)
        self.positions, self.questions = self.positions[rows], self.questions[keep]


Renderer = Callable[[torch.Tensor, int], MaskRenderer]  # (segment ids [R, L], max new tokens) -> its renderer


@dataclass
class Encoded:
    """Prompt rows padded to one width and run through the model up to column `length`: the shared prefix
    (its first `shared` columns) and each row's text before the answer cue. What every attention-level
    variant that reads the paraphrases alike decodes from (methods.decode_fusions): ids, positions and
    segments [E, W], and the KV cache's (keys, values) per layer over the first `length` columns."""
    ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    shared: int

    def join(self, other: "Encoded") -> "Encoded":
        """These rows, then `other`'s (encoded to the same columns)."""
        if (other.length, other.shared, other.ids.shape[1]) != (self.length, self.shared, self.ids.shape[1]):
            raise RuntimeError("joined encodings must cover the same columns")
        return Encoded(*(torch.cat([a, b]) for a, b in ((self.ids, other.ids), (self.positions, other.positions),
                                                         (self.segments, other.segments))),
                       [(torch.cat([k, k2]), torch.cat([v, v2]))
                        for (k, v), (k2, v2) in zip(self.layers, other.layers)], self.length, self.shared)

    def widen(self, width: int, length: int, pad_id: int) -> "Encoded":
        """These rows as if padded to `width` and encoded to column `length`: the padding added right after the
        shared prefix, as `pad_left` adds it, with K/V of zeros (padding is seen by nobody, so no value of it is
        ever read)."""
        extra, shared = width - self.ids.shape[1], self.shared
        if extra < 0 or length < shared or length - extra > self.length:
            raise RuntimeError("an encoding widens only to a width and length that cover it")

        def padded(t: torch.Tensor, fill) -> torch.Tensor:
            return torch.cat([t[:, :shared], t.new_full((len(t), extra), fill), t[:, shared:]], 1)

        def kv(t: torch.Tensor) -> torch.Tensor:  # [rows, heads, tokens, dim]
            gap = t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])
            return torch.cat([t[:, :, :shared], gap, t[:, :, shared:]], 2)[:, :, :length]
        return Encoded(padded(self.ids, pad_id), padded(self.positions, 0), padded(self.segments, PAD_SEGMENT),
                       [(kv(k), kv(v)) for k, v in self.layers], length, shared)

    def take(self, rows: list[int]) -> "Encoded":
        """The rows at these indices, in this order (a row may be taken several times)."""
        index = torch.tensor(rows, device=self.ids.device)
        return Encoded(self.ids[index], self.positions[index], self.segments[index],
                       [(k[index], v[index]) for k, v in self.layers], self.length, self.shared)


def answer_cue_column(segments: torch.Tensor) -> int:
    """The first column where any row's answer cue (the suffix after the paraphrases) starts: what comes
    before it reads only the prefix and each row's own paraphrase."""
    cue = (segments == FUSED_SEGMENT).any(0).nonzero()
    return int(cue[0]) if len(cue) else segments.shape[1]


def cache_with_prefix(lm: LanguageModel, first: Row, rows: int, ids: torch.Tensor, pos: torch.Tensor,
                      mask: MaskRenderer, shared: int, stats: DecodeStats) -> DynamicCache:
    """A KV cache of the kind `mask` needs, holding the `rows` rows' first `shared` tokens (those of the `first`
    row, as every row's) from the prefix cache."""
    if not shared:
        return new_cache(lm.model, mask.keeps_all_keys)
    examples = any(s != PREFIX_SEGMENT for s in first.segment_ids[:shared])  # --fewshot-format fused
    cache, computed = lm.prefix_cache.batch(lm.model, ids[0, :shared], pos[0, :shared], rows, mask, examples)
    stats.prefill_tokens += computed
    return cache


@torch.inference_mode()
def encode_rows(lm: LanguageModel, rows: list[Row], encoder: Renderer, shared: int, width: int,
                stats: DecodeStats, upto: int | None = None) -> Encoded:
    """The rows (padded to `width`, their first `shared` tokens from the model's prefix cache) encoded under
    `encoder`'s mask up to column `upto` (default: their answer cue, `answer_cue_column`)."""
    ids, pos, seg = pad_left(rows, lm.tokenizer.pad_token_id, lm.device, after=shared, width=width)
    upto = answer_cue_column(seg) if upto is None else upto
    mask = encoder(seg, 0, positions=pos)
    cache = cache_with_prefix(lm, rows[0], len(rows), ids, pos, mask, shared, stats)
    if upto > shared:
        stats.prefill_tokens += ids[:, shared:upto].numel()
        with mask.attention(lm.model):
            _, cache = prefill(lm.model, ids[:, shared:upto], pos[:, shared:upto], mask.prefill(shared, upto),
                               cache=cache)
    return Encoded(ids, pos, seg, [(layer.keys, layer.values) for layer in cache.layers], upto, shared)


@torch.inference_mode()
def prefill_rows(lm: LanguageModel, rows: list[Row], n: int, renderer: Renderer, max_new_tokens: int,
                 stats: DecodeStats, encoded: Encoded | None = None) -> tuple[torch.Tensor, LiveRows]:
    """The prompt rows (n per question) into a KV cache, the shared prefix taken from the model's prefix
    cache, or continued from `encoded` (the same rows, encoded up to a column): the last prompt token's
    logits [R, V] and the live rows."""
    if encoded is not None:
        ids, pos, seg, done = encoded.ids, encoded.positions, encoded.segments, encoded.length
        if not torch.equal(pad_left(rows, lm.tokenizer.pad_token_id, lm.device, encoded.shared, ids.shape[1])[0], ids):
            raise RuntimeError("the encoded rows are not the rows decoded")
    else:
        done = shared_prefix_length(rows) if lm.prefix_cache is not None else 0
        plain = getattr(renderer, "keeps_all_keys", True) is False  # transformers' masks: windows count slots
        if done and plain and reaches_window(lm.model, rows, max_new_tokens):
            done = 0  # padding between the prefix and the question would move the window
        ids, pos, seg = pad_left(rows, lm.tokenizer.pad_token_id, lm.device, after=done)
    mask = renderer(seg, max_new_tokens, positions=pos)
    stats.prefill_tokens += ids[:, done:].numel()
    cache = (new_cache(lm.model, mask.keeps_all_keys, encoded.layers or None) if encoded is not None
             else cache_with_prefix(lm, rows[0], len(rows), ids, pos, mask, done, stats))
    with mask.attention(lm.model):
        logits, cache = prefill(lm.model, ids[:, done:], pos[:, done:], mask.prefill(done), cache=cache)
    return logits[:, -1], LiveRows(cache, mask, pos[:, -1] + 1, torch.arange(len(rows) // n, device=lm.device))


def reaches_window(model, rows: list[Row], max_new_tokens: int) -> bool:
    """Whether a row with its answer could be longer than the model's smallest sliding window."""
    from models import attention_windows
    windows = [w for w in attention_windows(model.config).values() if w]
    return bool(windows) and max(len(r.input_ids) for r in rows) + max_new_tokens > min(windows)


def decode_one_token(model, tokens: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                     mask: dict) -> torch.Tensor:
    """One token per row [R] at its position [R] through the model: the next logits [R, V]."""
    return model(input_ids=tokens[:, None], position_ids=positions[:, None], cache=cache, use_cache=True,
                 **mask).logits[:, -1]


MIN_ROWS = 4  # a CPU matmul of 1-3 rows takes another kernel, whose rounding differs from the batched one's: a batch
# that starts with 4 rows never runs fewer, so a row's logits do not depend on what else is in its batch
# (tests/test_shared_sweep.py); one that starts smaller (batch 1) keeps its size, at its own cost


def keep_ballast(keep: torch.Tensor, n: int) -> torch.Tensor:
    """`keep` (live questions [Q] bool) with finished questions kept, first ones first, until MIN_ROWS rows remain
    (or every row, when the batch has fewer)."""
    missing = -(-MIN_ROWS // n) - int(keep.sum())
    if missing <= 0:
        return keep
    kept = keep.clone()
    kept[(~keep).nonzero().squeeze(-1)[:missing]] = True
    return kept


@torch.inference_mode()
def decode_n_tokens(lm: LanguageModel, logits: torch.Tensor, live: LiveRows, n: int, choose: Chooser,
                    stop: StopRule, stats: DecodeStats) -> list[list[int]]:
    """From the prompt's last logits: each step `choose`s one token per live question (its n rows get it),
    finished questions leave the batch, until every question has stopped; while the batch would otherwise run
    fewer than MIN_ROWS rows, finished questions stay in it as ballast (never chosen for, not recorded; their
    rows are run, and counted in `stats`)."""
    outputs: list[list[int]] = [[] for _ in range(len(live.questions))]
    finished = [False] * len(outputs)
    with live.mask.attention(lm.model):
        while True:
            asked = torch.tensor([not finished[q] for q in live.questions.tolist()], device=lm.device)
            tokens = torch.zeros(len(asked), dtype=torch.long, device=lm.device)  # ballast reads any token
            tokens[asked] = choose(logits.float().view(len(asked), n, -1)[asked], live.questions[asked])
            for q, t in zip(live.questions[asked].tolist(), tokens[asked].tolist()):
                outputs[q].append(t)
                finished[q] = stop.done(outputs[q], lm.tokenizer)
            keep = torch.tensor([not finished[q] for q in live.questions.tolist()], device=lm.device)
            if not keep.any():
                return outputs
            live.mask.retire((~keep).repeat_interleave(n))
            keep = keep_ballast(keep, n)
            if not keep.all():
                tokens = tokens[keep]
                live.keep(keep, n)
            step_ids = tokens.repeat_interleave(n)
            logits = decode_one_token(lm.model, step_ids, live.positions, live.cache, live.mask.step())
            live.positions = live.positions + 1
            stats.steps += 1
            stats.decode_tokens += step_ids.numel()


def decode(lm: LanguageModel, rows: list[Row], n: int, choose: Chooser, stop: StopRule,
           renderer: Renderer | None = None, encoded: Encoded | None = None) -> tuple[list[list[int]], DecodeStats]:
    """Decode all questions of a batch together: rows [q*n, (q+1)*n) belong to question q and receive
    the same chosen token. `renderer` makes the attention mask (default: plain causal with padding);
    `encoded`: the rows already encoded up to a column (`encode_rows`), continued from there."""
    start = time.perf_counter()
    stats = DecodeStats()
    logits, live = prefill_rows(lm, rows, n, renderer or PaddingMask, stop.max_new_tokens, stats, encoded)
    outputs = decode_n_tokens(lm, logits, live, n, choose, stop, stats)
    stats.seconds = time.perf_counter() - start
    return outputs, stats


def answer_text(tokenizer, tokens: list[int]) -> tuple[str, str]:
    """(prediction, generation): the raw decoded text and its first non-empty line, stripped."""
    generation = tokenizer.decode(tokens, skip_special_tokens=True)
    lines = [line.strip() for line in generation.strip().splitlines()]
    return (lines[0] if lines else ""), generation


def single_rows(tokenizer, parts, indices: list[int]) -> list[Row]:
    """One row per paraphrase i: its plain prompt `parts.full(i)`, exactly as the tokenizer reads it."""
    shared, blocks = encode_parts(tokenizer, parts)
    return [layout_row(shared, [[block[i]] for block in blocks]) for i in indices]


def fused_row(tokenizer, parts, positions: str = "left") -> Row:
    """All paraphrases in one row: `[prefix][paraphrase 1]..[paraphrase N][suffix]` (per block)."""
    shared, blocks = encode_parts(tokenizer, parts)
    return layout_row(shared, blocks, positions)


def row_parts(row: Row) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The inverse of `layout_row`: a row's shared parts and paraphrase blocks, read from its segment ids."""
    shared: dict[int, list[int]] = {}
    blocks: dict[int, dict[int, list[int]]] = {}
    for token, seg in zip(row.input_ids, row.segment_ids):
        block, local = divmod(seg, SHOT_STRIDE)
        if seg == FUSED_SEGMENT or (block == 0 and local > 0):  # the question's block sorts after every example
            block = FUSED_SEGMENT
        if seg in (PREFIX_SEGMENT, FUSED_SEGMENT) or local == SHOT_ANSWER:
            shared.setdefault(block, []).append(token)
        elif seg != PAD_SEGMENT:
            blocks.setdefault(block, {}).setdefault(local, []).append(token)
    order = sorted(blocks)
    return ([shared.get(0, [])] + [shared.get(j, []) for j in order],
            [[blocks[j].get(i, []) for i in range(1, max(blocks[j]) + 1)] for j in order])


def positions_scheme(row: Row) -> str:
    """continuous when the row's positions are 0..L-1, else left (right needs as many positions as left)."""
    return "continuous" if row.position_ids == list(range(len(row.position_ids))) else "left"


def positions_needed(rows: list[Row], max_new_tokens: int) -> int:
    return max(max(r.position_ids) + 1 for r in rows) + max_new_tokens


def largest_fitting_n(rows: list[Row], max_new_tokens: int, limit: int) -> int:
    """The largest N whose prompt and answer fit `limit` positions: for one row per paraphrase (logit level),
    how many leading rows fit; for a fused row, its first N paraphrases of every block laid out again from this
    row's own tokens (the layout that `fused_row` gives for N, up to the tokens merged across a cut)."""
    if len(rows) > 1:
        return next((k for k, row in enumerate(rows) if positions_needed([row], max_new_tokens) > limit), len(rows))
    shared, blocks = row_parts(rows[0])
    scheme = positions_scheme(rows[0])
    fits = [positions_needed([layout_row(shared, [b[:k] for b in blocks], scheme)], max_new_tokens) <= limit
            for k in range(1, len(blocks[-1]) + 1 if blocks else 1)]
    return next((k for k, ok in enumerate(fits) if not ok), len(fits))


def growth(rows: list[Row], fitting: int) -> str:
    """How a question's positions grow with N, for the error message."""
    if fitting == 0:
        return "even one paraphrase is too long"
    if len(rows) > 1:
        return "one row per paraphrase: the positions are its longest prompt's, whatever N"
    if positions_scheme(rows[0]) == "continuous":
        return "with --positions continuous the positions grow with every paraphrase"
    return "with --positions left or right the positions grow with the longest paraphrase, not with N"


def check_context(model, rows: list[Row], max_new_tokens: int, where: str) -> None:
    """A prompt plus its answer must fit the model's context window; the error names the largest N that fits."""
    limit = getattr(model.config, "max_position_embeddings", None)
    needed = positions_needed(rows, max_new_tokens)
    if limit is not None and needed > limit:
        fitting = largest_fitting_n(rows, max_new_tokens, limit)
        raise InputError(f"question {where}: prompt and answer need {needed} positions, more than the model's "
                         f"context of {limit}; the largest N that fits is {fitting} ({growth(rows, fitting)}); "
                         f"or lower --max-new-tokens")
