"""Shared fixtures: tiny random models (no download) and a small hand-made dataset."""
from __future__ import annotations

import functools

import pytest

from dataset import Dataset, Record
from models import tiny_model

QUESTIONS = [
    Record("q1", ["what is the capital of france?", "which city is france's capital?", "france's capital is?"], ["Paris"]),
    Record("q2", ["who wrote hamlet?", "hamlet was written by whom?", "the author of hamlet is?"], ["Shakespeare"]),
    Record("q3", ["where is the eiffel tower?", "the eiffel tower stands in which city?", "eiffel tower location?"], ["Paris"]),
]
FEW_SHOT = [("what color is the sky?", "blue"), ("how many legs does a cat have?", "four")]


@functools.lru_cache(maxsize=None)
def cached_tiny(family: str):
    return tiny_model(family)


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def tiny(request):
    """(model, tokenizer) of each family: Llama and Gemma 3 add a BOS, Qwen2 does not; all use GQA; Gemma 3
    interleaves sliding-window layers (a 16-token window: every prompt here runs past it) with full ones."""
    return cached_tiny(request.param)


@pytest.fixture
def llama():
    return cached_tiny("llama")


@pytest.fixture
def small_dataset() -> Dataset:
    return Dataset("test", "qa", [Record(r.uuid, list(r.paraphrases), list(r.answers)) for r in QUESTIONS], FEW_SHOT)


def generate_reference(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one prompt, stopping only at max_new_tokens."""
    import torch
    ids = torch.tensor([input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()
