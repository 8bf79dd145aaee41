"""Prompts are tokenised as the model reads them: every single prompt's ids are exactly
`tokenizer(prefix + paraphrase + suffix)`, and the fused row is cut from those same tokenisations, for
a byte-level BPE that merges "?\\n", a SentencePiece-style (Metaspace) tokenizer and the embedded
SmolLM2 tokenizer."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import FEW_SHOT, QUESTIONS
from constants import InputError
from dataset import Dataset, Record
from decoding import LanguageModel, encode_prompt, fused_row, single_rows
from segment_mask import FUSED_SEGMENT, PREFIX_SEGMENT

ODD = [Record("odd", ["what is it", "name it!", "it is what?", "tell me:  what", "what?"], ["x"])]


def byte_bpe_with_merges() -> PreTrainedTokenizerFast:
    """Byte-level BPE (Llama-3/Qwen2 style) whose merges join "?" with "\\n" and "\\n" with "\\n"."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("?", "Ċ"), ("Ċ", "Ċ"), ("Q", ":"), (":", "Ġ")]
    vocab = {tok: i for i, tok in enumerate(["<s>", *alphabet, *("".join(m) for m in merges)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<s>")


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece-style: spaces become "▁", a dummy "▁" before the text, merges across the "▁"."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzQA:?!'., \n▁"))
    merges = [("▁", "Q"), ("▁", "w"), ("▁w", "h"), ("?", "\n"), ("\n", "A")]
    vocab = {tok: i for i, tok in enumerate(["<s>", "<unk>", *chars, *("".join(m) for m in merges)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<s>", unk_token="<unk>")


def check_parts(tokenizer, dataset: Dataset, n: int) -> None:
    for record in dataset.records:
        parts = dataset.prompt_parts(record, n)
        prefix, segments, suffix = encode_prompt(tokenizer, parts.prefix, parts.segments, parts.suffix)
        assert suffix, "the answer cue must be a shared suffix to fuse on"
        for i, row in enumerate(single_rows(tokenizer, parts, list(range(n)))):
            assert row.input_ids == tokenizer(parts.full(i))["input_ids"], (record.uuid, i)
        fused = fused_row(tokenizer, parts)
        assert fused.input_ids == prefix + [t for s in segments for t in s] + suffix
        assert fused.segment_ids[:len(prefix)] == [PREFIX_SEGMENT] * len(prefix)
        assert fused.segment_ids[-len(suffix):] == [FUSED_SEGMENT] * len(suffix)


@pytest.mark.parametrize("make", [byte_bpe_with_merges, metaspace_bpe])
def test_single_prompts_are_the_tokenisation_of_their_text(make):
    tokenizer = make()
    check_parts(tokenizer, Dataset("t", "qa", [*QUESTIONS, *ODD], FEW_SHOT), 3)
    check_parts(tokenizer, Dataset("t", "qa", ODD, FEW_SHOT), 5)


def test_the_merged_question_mark_newline_goes_to_the_paraphrase():
    """"?\\n" is one token of the full text: it stays with the paraphrase, the suffix starts after it."""
    tokenizer = byte_bpe_with_merges()
    ds = Dataset("t", "qa", QUESTIONS[:1], FEW_SHOT)
    parts = ds.prompt_parts(QUESTIONS[0], 3)
    prefix, segments, suffix = encode_prompt(tokenizer, parts.prefix, parts.segments, parts.suffix)
    merged = tokenizer.convert_tokens_to_ids("?Ċ")
    assert all(s[-1] == merged for s in segments)
    assert tokenizer.convert_ids_to_tokens(suffix) == ["A", ":"]
    assert tokenizer.convert_ids_to_tokens(prefix)[-1] == "ĊĊ"  # the few-shot blocks' "\n\n", as in the full text


def test_piecewise_tokenisation_would_differ():
    """The reason for all this: tokenising the parts apart gives other ids than the full text."""
    tokenizer = byte_bpe_with_merges()
    parts = Dataset("t", "qa", QUESTIONS[:1], FEW_SHOT).prompt_parts(QUESTIONS[0], 1)
    piecewise = (tokenizer(parts.prefix)["input_ids"] + tokenizer(parts.segments[0], add_special_tokens=False)["input_ids"]
                 + tokenizer(parts.suffix, add_special_tokens=False)["input_ids"])
    assert piecewise != tokenizer(parts.full(0))["input_ids"]


def test_no_shared_suffix_is_refused_in_one_line():
    tokenizer = metaspace_bpe()
    with pytest.raises(InputError, match="no shared tokens to fuse on"):
        encode_prompt(tokenizer, "x", ["a?", "b"], "\nA")  # "?\n" then "\nA": no token of the cue in common


@pytest.mark.embedded
def test_embedded_model_reads_the_full_text_tokens():
    """SmolLM2: per-prompt rows equal tokenizer(full text) for 40 questions x 5 paraphrases, and our
    greedy answers equal transformers' generate on those ids."""
    import torch

    from conftest import generate_reference
    from dataset import load_dataset_by_name
    from decoding import StopRule, decode, greedy
    from models import load_model

    model, tokenizer = load_model("smollm2_135m_it", device="cpu")
    ds = load_dataset_by_name("webqa_sample", limit=40)
    ds.records = ds.records[:40]
    check_parts(tokenizer, ds, 5)
    rows = [single_rows(tokenizer, ds.prompt_parts(r, 1), [0])[0] for r in ds.records[:8]]
    ours, _ = decode(LanguageModel(model, tokenizer), rows, 1, greedy, StopRule(set(), 6, first_line_only=False))
    with torch.inference_mode():
        for row, tokens in zip(rows, ours):
            assert tokens == generate_reference(model, tokenizer, row.input_ids, 6)
