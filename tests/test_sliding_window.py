"""Sliding-window layers (Gemma 3): every layer gets the mask the model itself would use, composed with the
segment rule. On the tiny Gemma-3-shaped model (4 layers, sliding and full interleaved, a 16-token window) every
prompt here runs far past the window; the invariants of test_flex.py and test_prefix_cache.py run on it too.
The real gemma3_270m (its 512-token window) is checked where it is installed (`make gemma`; CI installs it)."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import models
from conftest import QUESTIONS, cached_tiny, generate_reference
from constants import GEMMA_MODEL, InputError
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, decode, fused_row, greedy, new_cache, pad_left, prefill, single_rows
from fusion import FusionSettings
from methods import answer_fused, answer_per_prompt
from segment_mask import PREFIX_SEGMENT, SegmentMask, allowed_matrix

WINDOW = models.TINY_WINDOW
MAX_NEW = 6


def no_stop(max_new: int = MAX_NEW) -> StopRule:
    return StopRule(set(), max_new, first_line_only=False)


def long_dataset(words: int = 12) -> Dataset:
    """Questions of different lengths, all longer than the tiny window, with two few-shot examples."""
    records = [Record(r.uuid, [p + " " + " ".join(["please"] * (words + 3 * k)) for k, p in enumerate(r.paraphrases)],
                      list(r.answers)) for r in QUESTIONS]
    return Dataset("t", "qa", records, [("what color is the sky?", "blue"), ("2+2?", "4")])


def test_the_tiny_model_interleaves_both_layer_types():
    model, _ = cached_tiny("gemma3")
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert models.attention_windows(model.config) == {"sliding_attention": WINDOW, "full_attention": None}


def test_a_sliding_layer_sees_the_segment_rule_within_the_window_of_positions():
    """The dense rendering for each layer type, cell by cell: full layers the segment rule alone; sliding
    layers the rule and `query position - key position < window` (transformers' sliding_window_overlay), in
    positions - paraphrase 2 restarts at the prefix's end, so its reach into the prefix is its own."""
    seg = [PREFIX_SEGMENT] * 4 + [1] * 3 + [2] * 2 + [1 << 20] * 2
    pos = [0, 1, 2, 3, 4, 5, 6, 4, 5, 7, 8]
    window = 3
    mask = SegmentMask(torch.tensor([seg]), 0, FusionSettings(), positions=torch.tensor([pos]))
    mask.windows = {"full_attention": None, "sliding_attention": window}
    rendered = mask.prefill()["attention_mask"]
    assert set(rendered) == {"full_attention", "sliding_attention"}
    rule = allowed_matrix(seg)
    assert torch.equal(rendered["full_attention"][0, 0] == 0, rule)
    expected = torch.tensor([[bool(rule[q, k]) and pos[q] - pos[k] < window for k in range(len(seg))]
                             for q in range(len(seg))])
    assert torch.equal(rendered["sliding_attention"][0, 0] == 0, expected)
    assert expected[7, 2] and not expected[7, 1]  # paraphrase 2's first token (position 4) reaches back to 2
    assert expected[10, 6] and not expected[10, 5] and not expected[10, 8]  # the answer's last (8): 6 on, not 5


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_the_window_decides_the_logits(backend):
    """Rendering every layer as full would give other logits on these rows: the window is not a no-op here."""
    model, tokenizer = cached_tiny("gemma3")
    ds = long_dataset()
    rows = [fused_row(tokenizer, ds.prompt_parts(r, 3)) for r in ds.records]
    ids, pos, seg = pad_left(rows, 0, model.device)

    def logits(windows_of):
        mask = SegmentMask(seg, 0, FusionSettings(backend=backend), torch.full((3, 3), -math.log(3)), positions=pos)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(models, "attention_windows", windows_of)
            with mask.attention(model):
                return prefill(model, ids, pos, mask.prefill(), cache=new_cache(model, True))[0]
    windowed = logits(models.attention_windows)
    all_full = logits(lambda config: {"full_attention": None})
    assert (windowed - all_full).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_one_paraphrase_past_the_window_equals_generate(backend):
    """N=1 fused, with and without the prefix cache, equals transformers' generate (its own sliding masks and
    cache) on every question, each prompt 4-9 windows long."""
    model, tokenizer = cached_tiny("gemma3")
    ds = long_dataset()
    for cache in (True, False):
        lm = LanguageModel(model, tokenizer) if cache else LanguageModel(model, tokenizer, None)
        out = answer_fused(lm, ds, ds.records, 1, no_stop(), FusionSettings(backend=backend))[0]
        for record, row in zip(ds.records, out):
            ids = fused_row(tokenizer, ds.prompt_parts(record, 1)).input_ids
            assert len(ids) > 4 * WINDOW
            assert row["token_ids"] == generate_reference(model, tokenizer, ids, MAX_NEW)


def test_plain_rows_of_different_lengths_past_the_window_equal_generate():
    """per_prompt decodes prompts of different lengths together with the prefix cache: transformers counts a
    sliding window in slots of the row, so padding between the cached prefix and the question would move it;
    such rows are padded on the left instead, and every row equals its own generate."""
    model, tokenizer = cached_tiny("gemma3")
    ds = long_dataset()
    rows = answer_per_prompt(LanguageModel(model, tokenizer), ds, ds.records, 3, no_stop(), "per_prompt")[0]
    assert len({len(r["prompts"][0]) for r in rows}) > 3  # lengths differ: a batch of them is padded
    for record, row in zip([r for r in ds.records for _ in range(3)], rows):
        ids = single_rows(tokenizer, ds.prompt_parts(record, 3), [row["paraphrase_index"]])[0].input_ids
        assert row["token_ids"] == generate_reference(model, tokenizer, ids, MAX_NEW)


def test_fused_rows_past_the_window_equal_their_full_recompute_in_any_batch():
    """N=3, both backends: the cached decode of a batch equals each question decoded alone, and each question's
    tokens equal a full recompute of the whole sequence at every step under the same rule."""
    model, tokenizer = cached_tiny("gemma3")
    ds = long_dataset()
    settings = FusionSettings(bias="uniform")
    lm = LanguageModel(model, tokenizer)
    together = answer_fused(lm, ds, ds.records, 3, no_stop(), settings)[0]
    flex = answer_fused(lm, ds, ds.records, 3, no_stop(), FusionSettings(bias="uniform", backend="flex"))[0]
    for record, row, flex_row in zip(ds.records, together, flex):
        assert answer_fused(lm, ds, [record], 3, no_stop(), settings)[0][0]["token_ids"] == row["token_ids"]
        assert flex_row["token_ids"] == row["token_ids"]
        fused = fused_row(tokenizer, ds.prompt_parts(record, 3))
        assert recompute(model, fused, settings, torch.full((1, 3), -math.log(3))) == row["token_ids"]


def recompute(model, row, settings: FusionSettings, biases: torch.Tensor) -> list[int]:
    """Greedy tokens with no KV cache: the whole sequence run again at every step under the extended mask."""
    generated: list[int] = []
    start = max(row.position_ids) + 1
    for _ in range(MAX_NEW):
        ids = torch.tensor([row.input_ids + generated])
        pos = torch.tensor([row.position_ids + list(range(start, start + len(generated)))])
        seg = torch.tensor([row.segment_ids + [1 << 20] * len(generated)])
        mask = SegmentMask(seg, 0, settings, biases, positions=pos)
        with torch.inference_mode(), mask.attention(model):
            generated.append(model(input_ids=ids, position_ids=pos, **mask.prefill()).logits[0, -1].argmax().item())
    return generated


def test_a_sliding_model_without_positions_is_refused_not_masked_as_full():
    model, tokenizer = cached_tiny("gemma3")
    mask = SegmentMask(torch.zeros(1, 4, dtype=torch.int32), 0, FusionSettings())
    with pytest.raises(RuntimeError, match="sliding-window layers needs the rows' positions"):
        with mask.attention(model):
            pass


def test_unknown_layer_types_stop_at_load_in_one_line(tmp_path):
    """A model with chunked attention (Llama 4's) is refused when it loads, naming the layer type."""
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config.layer_types = ["chunked_attention", "full_attention"]
    config.attention_chunk_size = 8
    with pytest.raises(InputError, match="layer types chunked_attention are not supported") as err:
        models.attention_windows(config)
    assert "\n" not in str(err.value)
    _, tokenizer = cached_tiny("llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="chunked_attention"):
        models.load_model(str(tmp_path), device="cpu")


# ---------------------------------------------------------------- the real Gemma 3 270M, where it is installed

def gemma_installed() -> bool:
    try:
        models.check_model_name(GEMMA_MODEL)
    except InputError:
        return False
    return True


gemma = pytest.mark.skipif(not gemma_installed(), reason="gemma3_270m is not installed (make gemma)")


@pytest.fixture(scope="module")
def gemma_lm() -> LanguageModel:
    model, tokenizer = models.load_model(GEMMA_MODEL, device="cpu")
    return LanguageModel(model, tokenizer)


@gemma
@pytest.mark.embedded
def test_gemma_per_prompt_equals_generate_on_47_prompts(gemma_lm):
    """per_prompt (batches of several questions, the prefix cache, padding) equals generate on tokenizer(text) -
    BOS included - for 47 prompts: the 7 MyriadLAMA fixture facts x 5 manual templates and 2 WebQuestions
    sample questions x 6 paraphrases."""
    from constants import MYRIADLAMA_FIXTURE_FILE
    from dataset import load_dataset_by_name
    cloze = load_dataset_by_name("myriadlama", str(MYRIADLAMA_FIXTURE_FILE), None, 5, paraphrase_set="manual")
    qa = load_dataset_by_name("webqa_sample", None, None, 6, limit=2)
    rows = []
    for ds, n in ((cloze, 5), (qa, 6)):
        for start in range(0, len(ds.records), 3):
            rows += answer_per_prompt(gemma_lm, ds, ds.records[start:start + 3], n, no_stop(8), "per_prompt")[0]
    assert len(rows) == 47
    tokenizer = gemma_lm.tokenizer
    for row in rows:
        ids = tokenizer(row["prompts"][0]).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert row["token_ids"] == generate_reference(gemma_lm.model, tokenizer, ids, 8), row["prompts"][0][-80:]


@gemma
@pytest.mark.embedded
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_gemma_one_paraphrase_past_its_window_equals_generate(gemma_lm, backend):
    """A row of about 1,000 tokens (twice the 512-token window), N=1 fused, no few-shot: generate's tokens."""
    question = "Here is a long list of facts. " + " ".join(f"Fact {i}: the number {i} comes after {i - 1}."
                                                            for i in range(1, 80)) + " What comes after 79?"
    ds = Dataset("long", "qa", [Record("long", [question], ["80"])], [])
    row = fused_row(gemma_lm.tokenizer, ds.prompt_parts(ds.records[0], 1))
    assert len(row.input_ids) > 2 * 512
    out = answer_fused(gemma_lm, ds, ds.records, 1, no_stop(8), FusionSettings(backend=backend))[0][0]
    assert out["token_ids"] == generate_reference(gemma_lm.model, gemma_lm.tokenizer, row.input_ids, 8)


@gemma
def test_gemma_is_a_base_model_asked_in_plain_text_only():
    """No chat template: --prompt-format chat is one line, before the model loads."""
    from runner import RunConfig, open_job
    with pytest.raises(InputError, match="gemma3_270m has no chat template; use --prompt-format plain"):
        open_job(RunConfig(model=GEMMA_MODEL, prompt_format="chat"), 1)


@gemma
def test_gemma_gguf_with_another_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "GEMMA_SHA256", "0" * 64)
    with pytest.raises(InputError, match=r"the assembled GGUF has sha256 a5fd3b62230aa5ec\.\.\., expected 0{16}"):
        models.assemble_gemma(tmp_path / "g.gguf")
