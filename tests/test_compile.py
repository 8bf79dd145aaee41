"""Compiled FlexAttention compiles once per shape family, not once per shape: counted on CPU with a
dynamo backend that needs no C++ toolchain, over batches of different sizes and lengths with early
stops. Past torch's recompile limit (8) flex would silently run unfused, so the count is the contract."""
from __future__ import annotations

from functools import partial

import torch
from torch._dynamo.testing import CompileCounter

from conftest import FEW_SHOT, cached_tiny
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, decode, fused_row, greedy
from fusion import FusionSettings
from segment_mask import SegmentMask


def questions(start: int, count: int) -> list[Record]:
    """Questions of varied lengths (so every batch has other prompt lengths and padding)."""
    return [Record(f"q{i}", [f"question {i} " + "x" * (i * 7 % 23) + "?", f"what of {i}" + "y" * (i * 5 % 17) + "?",
                             f"and {i}?"], ["a"]) for i in range(start, start + count)]


def run(model, tokenizer, records: list[Record], sizes: list[int], backend: str, counter=None) -> list[list[int]]:
    ds = Dataset("t", "qa", records, FEW_SHOT)
    stop = StopRule(set(range(60, 75)), 6, first_line_only=False)  # some rows stop early, others run to 6
    outputs = []
    for size in sizes:
        batch, records = records[:size], records[size:]
        rows = [fused_row(tokenizer, ds.prompt_parts(r, 3)) for r in batch]
        settings = FusionSettings(backend=backend, compile=counter is not None)
        renderer = partial(SegmentMask, settings=settings, compile_backend=counter)
        outputs += decode(LanguageModel(model, tokenizer), rows, 1, greedy, stop, renderer)[0]
    return outputs


def test_compiled_flex_compiles_a_fixed_handful_of_graphs():
    torch._dynamo.reset()
    model, tokenizer = cached_tiny("llama")
    counter = CompileCounter()
    first = questions(0, 11)
    compiled = run(model, tokenizer, first, [4, 4, 2, 1], "flex", counter)
    # prefill and decode, each for batches > 1 and for the batch of 1 that dynamo specialises
    assert counter.frame_count <= 4
    warm = counter.frame_count
    later = questions(20, 9)
    compiled += run(model, tokenizer, later, [5, 3, 1], "flex", counter)
    assert counter.frame_count == warm  # no recompile after warm-up: new sizes and lengths reuse the graphs
    reference = run(model, tokenizer, first, [4, 4, 2, 1], "sdpa") + run(model, tokenizer, later, [5, 3, 1], "sdpa")
    assert compiled == reference
    assert any(len(t) < 6 for t in reference) and any(len(t) == 6 for t in reference)  # early stops happened
