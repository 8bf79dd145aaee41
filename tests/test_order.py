"""Order invariance: with aligned positions (--positions left or right) the fused answer cannot tell in
which order its paraphrases came. Each paraphrase is encoded from the prefix and itself at the same positions
wherever it sits, and the answer's attention is a sum over keys: permuting the question's paraphrases changes
no logit beyond 1e-4, at the prefill and at every decode step (greedy, so the tokens must be equal too), with
the uniform bias and with a temperature, through both backends. With --positions continuous a paraphrase's
positions depend on those before it, and a permutation does change the logits (docs/inside_fusion.md). The
tiny models' byte-level tokenizers cut every permuted prompt into the same tokens."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import FEW_SHOT, cached_tiny
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, fused_row
from fusion import FusionSettings
from methods import decode_fused
from test_prefix_cache import Recorder  # greedy, keeping every step's logits

PARAPHRASES = ["what is the capital of france?", "which city is france's capital?", "france's capital is?",
               "name the capital city of france."]
PERMUTATIONS = [(1, 0, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1), (0, 3, 1, 2)]
MAX_NEW = 6


def step_logits(family: str, order: tuple[int, ...], settings: FusionSettings) -> tuple[list[int], torch.Tensor]:
    """(greedy tokens, logits [steps, V]) of the question with its paraphrases in `order`."""
    model, tokenizer = cached_tiny(family)
    record = Record("q", [PARAPHRASES[i] for i in order], ["Paris"])
    chooser = Recorder()
    stop = StopRule(set(), MAX_NEW, first_line_only=False)
    _, outputs, _ = decode_fused(LanguageModel(model, tokenizer), Dataset("t", "qa", [record], FEW_SHOT), [record],
                                 len(order), stop, settings, choose=chooser)
    return outputs[0], torch.stack([logits[0, 0] for logits in chooser.logits])


def test_permuted_prompts_are_cut_into_the_same_tokens():
    """What the invariance rests on: the permuted row holds the same paraphrase tokens, permuted, at the same
    positions (left), and the same prefix and suffix."""
    _, tokenizer = cached_tiny("llama")
    rows = {order: fused_row(tokenizer, Dataset("t", "qa", [], FEW_SHOT).prompt_parts(
        Record("q", [PARAPHRASES[i] for i in order], ["Paris"]), 4)) for order in [(0, 1, 2, 3), *PERMUTATIONS]}
    identity = rows[(0, 1, 2, 3)]

    def paraphrase(row, i: int) -> list[tuple[int, int]]:
        return [(t, p) for t, s, p in zip(row.input_ids, row.segment_ids, row.position_ids) if s == i + 1]
    for order, row in rows.items():
        assert sorted(row.input_ids) == sorted(identity.input_ids)
        for slot, i in enumerate(order):
            assert paraphrase(row, slot) == paraphrase(identity, i)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("positions", ["left", "right"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_aligned_positions_make_the_order_irrelevant(backend, positions, temperature):
    families = ("llama", "qwen2") if backend == "sdpa" else ("llama",)
    for family in families:
        settings = FusionSettings(positions, "uniform", temperature, backend=backend)
        tokens, logits = step_logits(family, (0, 1, 2, 3), settings)
        for order in PERMUTATIONS:
            permuted_tokens, permuted = step_logits(family, order, settings)
            assert permuted_tokens == tokens
            assert (permuted - logits).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_continuous_positions_make_the_order_matter(backend):
    """The same permutations under --positions continuous: each paraphrase sits at other positions, and the
    answer's logits move by far more than the aligned layouts' rounding for at least one permutation."""
    settings = FusionSettings("continuous", "uniform", backend=backend)
    _, logits = step_logits("llama", (0, 1, 2, 3), settings)
    moved = [(step_logits("llama", order, settings)[1][0] - logits[0]).abs().max().item() for order in PERMUTATIONS]
    assert max(moved) > 1e-2


def test_every_order_of_three_is_the_same_answer():
    """All 6 orders of 3 paraphrases, left positions, sdpa: one set of prefill logits."""
    settings = FusionSettings()
    first = [step_logits("qwen2", order, settings)[1][0] for order in itertools.permutations(range(3))]
    assert max((f - first[0]).abs().max().item() for f in first) <= 1e-4
