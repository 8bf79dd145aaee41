"""Inside attention-level fusion: the attention share each generated token puts on the prefix, on each
paraphrase and on the suffix (--record-attention), and the ablations it explains (--isolation none, a
numeric --fusion-bias). The shares sum to 1, are equal for identical copies, vanish for a paraphrase of
~zero confidence, agree between flex and sdpa, match transformers' own eager attention weights, and
recording them changes no token; off, nothing is recorded at all."""
from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import FEW_SHOT, QUESTIONS, cached_tiny
from dataset import Dataset, Record
from decoding import LanguageModel, PaddingMask, StopRule, fused_row, pad_left, prefill
from fusion import FusionSettings
from inspect_fusion import share_line
from methods import answer_fused, decode_fused_shares
from segment_mask import (FUSED_SEGMENT, PREFIX_SEGMENT, RECORDING, SHOT_ANSWER, SHOT_STRIDE,
                          SegmentMask, allowed_matrix, attention_implementation, share_columns)
from test_prefix_cache import Recorder  # greedy, keeping every step's logits

MAX_NEW = 5
SETTINGS = {  # name: the settings a test runs (every one recorded)
    "default": {}, "temperature": dict(temperature=0.7), "right, bias none": dict(positions="right", bias="none"),
    "continuous": dict(positions="continuous"), "isolation none": dict(isolation="none"),
    "numeric bias": dict(bias="-1.5", temperature=0.7), "fused few-shot": dict(fewshot="fused")}


def no_stop(max_new: int = MAX_NEW) -> StopRule:
    return StopRule(set(), max_new, first_line_only=False)


def dataset(records=QUESTIONS) -> Dataset:
    return Dataset("t", "qa", list(records), FEW_SHOT, [[q, q.upper()] for q, _ in FEW_SHOT])


def shares_of(family: str, backend: str, records=QUESTIONS, n: int = 3, weights=None, stop=None,
              **settings) -> list[dict]:
    model, tokenizer = cached_tiny(family)
    fusion = FusionSettings(backend=backend, record_attention=True, **settings)
    return answer_fused(LanguageModel(model, tokenizer), dataset(records), list(records), n, stop or no_stop(), fusion,
                        weights)[0]


@pytest.mark.parametrize("case", list(SETTINGS))
def test_shares_sum_to_one_for_every_generated_token(case):
    for row in shares_of("llama", "sdpa", **SETTINGS[case]):
        share = torch.tensor(row["attention_share"], dtype=torch.float64)
        assert share.shape == (len(row["token_ids"]), 3 + 2)
        assert (share >= 0).all() and (share.sum(-1) - 1).abs().max() <= 1e-5
        assert (share[:, 1:-1] > 0).all()  # the answer reads every paraphrase


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_shares_follow_the_rows_that_stop_early(backend):
    """A padded batch of three questions, the first stopping at step 2 (its row leaves the batch): every row
    keeps one share per generated token, the same as in the decode where nobody stops."""
    full = shares_of("llama", backend)
    stop = StopRule({full[0]["token_ids"][1]}, MAX_NEW, first_line_only=False)
    stopped = shares_of("llama", backend, stop=stop)
    assert len(stopped[0]["token_ids"]) == 2 < len(stopped[1]["token_ids"])
    for a, b in zip(full, stopped):
        assert len(b["attention_share"]) == len(b["token_ids"])
        assert torch.allclose(torch.tensor(a["attention_share"][:len(b["token_ids"])]),
                              torch.tensor(b["attention_share"]), atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("positions", ["left", "right"])
def test_identical_copies_get_the_same_share(family, backend, positions):
    copies = [Record("c", ["who painted the mona lisa?"] * 4, ["Leonardo"])]
    share = torch.tensor(shares_of(family, backend, copies, 4, positions=positions)[0]["attention_share"])
    paraphrases = share[:, 1:-1]
    assert (paraphrases - paraphrases[:, :1]).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_a_paraphrase_of_zero_confidence_gets_no_share(backend):
    weights = {r.uuid: ([1.0, 1e-6, 1e-6], False) for r in QUESTIONS}
    for row in shares_of("llama", backend, weights=weights, bias="confidence"):
        share = torch.tensor(row["attention_share"])
        assert share[:, 2:4].max() < 1e-3 and share[:, 1].min() > 1e-2


@pytest.mark.parametrize("case, family", [(case, "llama") for case in SETTINGS] + [("default", "qwen2"),
                                                                                  ("temperature", "qwen3")])
def test_flex_and_sdpa_shares_agree(case, family):
    sdpa, flex = (shares_of(family, backend, **SETTINGS[case]) for backend in ("sdpa", "flex"))
    assert [r["token_ids"] for r in sdpa] == [r["token_ids"] for r in flex]
    for a, b in zip(sdpa, flex):
        assert (torch.tensor(a["attention_share"]) - torch.tensor(b["attention_share"])).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("case", ["default", "temperature", "isolation none"])
def test_recording_changes_no_token_and_no_logit(backend, case):
    """The recording attention calls the very function the plain decode calls: the same logits, bit for bit."""
    model, tokenizer = cached_tiny("qwen2")
    lm, ds = LanguageModel(model, tokenizer), dataset()
    runs = []
    for record in (False, True):
        chooser = Recorder()
        settings = FusionSettings(backend=backend, record_attention=record, **SETTINGS[case])
        _, tokens, _, shares = decode_fused_shares(lm, ds, ds.records, 3, no_stop(), settings, choose=chooser)
        runs.append((tokens, chooser.logits, shares))
    (plain_tokens, plain_logits, unrecorded), (tokens, logits, shares) = runs
    assert unrecorded is None and shares is not None
    assert tokens == plain_tokens
    assert all(torch.equal(a, b) for a, b in zip(plain_logits, logits))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shares_equal_eager_attention_weights(family):
    """An independent reference: transformers' eager attention over the whole prompt under the dense mask (with
    the -log N bias), output_attentions=True; the last prompt token's weights summed per segment are the first
    generated token's recorded shares, layer by layer (Gemma 3's sliding layers under their own mask)."""
    model, tokenizer = cached_tiny(family)
    ds = dataset()
    record = ds.records[1]
    row = fused_row(tokenizer, ds.prompt_parts(record, 3))
    _, tokens, _, shares = decode_fused_shares(LanguageModel(model, tokenizer, prefix_cache=None), ds, [record], 3,
                                               no_stop(1), FusionSettings(bias="uniform", record_attention=True))
    ids, pos, seg = pad_left([row], 0, model.device)
    mask = SegmentMask(seg, 0, FusionSettings(bias="uniform"), torch.full((1, 3), -math.log(3)), positions=pos)
    with mask.attention(model):  # the model's layer types decide the masks rendered
        rule = mask.prefill()
    with torch.inference_mode(), attention_implementation(model, "eager"):
        out = model(input_ids=ids, position_ids=pos, output_attentions=True, **rule)
    columns = share_columns(seg, 3)[0]
    expected = torch.stack([layer[0, :, -1].mean(0) @ columns for layer in out.attentions])
    assert (shares.per_layer(0)[0] - expected).abs().max() <= 1e-5


def test_few_shot_examples_count_as_prefix():
    """--fewshot-format fused: an example's paraphrases and answer are prefix columns; the question's paraphrases
    1..N and the suffix their own."""
    example = [PREFIX_SEGMENT, SHOT_STRIDE + 1, SHOT_STRIDE + 2, SHOT_STRIDE + SHOT_ANSWER]
    seg = torch.tensor([[-1, *example, 1, 1, 2, 3, FUSED_SEGMENT]])
    columns = share_columns(seg, 3)[0]
    assert columns.argmax(-1).tolist()[1:] == [0, 0, 0, 0, 1, 1, 2, 3, 4]
    assert columns[0].sum() == 0  # padding: no column


def test_off_by_default_nothing_recorded():
    model, tokenizer = cached_tiny("llama")
    ds = dataset()
    row = answer_fused(LanguageModel(model, tokenizer), ds, ds.records[:1], 3, no_stop())[0][0]
    assert "attention_share" not in row
    seg = pad_left([fused_row(tokenizer, ds.prompt_parts(ds.records[0], 3))], 0, model.device)[2]
    for settings in (FusionSettings(), FusionSettings(backend="flex"), FusionSettings(temperature=0.5)):
        mask = SegmentMask(seg, MAX_NEW, settings, torch.full((1, 3), -math.log(3)))
        assert mask.shares is None and "attention_shares" not in mask.prefill()
        with mask.attention(model):
            assert not model.config._attn_implementation.endswith(RECORDING)
            assert "attention_shares" not in mask.step()


# ---------------------------------------------------------------- the ablations the shares explain

def test_isolation_none_is_one_plain_causal_sequence():
    """--isolation none --fusion-bias none --positions continuous: the fused row is read as one plain causal
    prompt, so its logits at every step are those of plain causal SDPA on the same tokens, for both backends."""
    model, tokenizer = cached_tiny("llama")
    ds = dataset()
    record = ds.records[0]
    row = fused_row(tokenizer, ds.prompt_parts(record, 3), "continuous")
    length = len(row.input_ids)
    assert allowed_matrix(row.segment_ids, "none").equal(torch.ones(length, length).tril().bool())
    ids = torch.tensor([row.input_ids])
    mask = PaddingMask(torch.zeros_like(ids), 0)
    with mask.attention(model):
        plain = prefill(model, ids, torch.arange(ids.shape[1])[None], mask.prefill())[0][0, -1]
    for backend in ("sdpa", "flex"):
        chooser = Recorder()
        settings = FusionSettings("continuous", "none", backend=backend, isolation="none")
        decode_fused_shares(LanguageModel(model, tokenizer), ds, [record], 3, no_stop(1), settings, choose=chooser)
        assert (chooser.logits[0][0, 0] - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_isolation_none_biases_only_the_answer(backend):
    """With a bias and a temperature, isolation none changes the paraphrases' own K/V only by what they see of
    each other: their cache equals that of the unbiased isolation-none prefill (the bias and 1/T apply where the
    answer reads them), while the answer's logits do move with the bias."""
    model, tokenizer = cached_tiny("llama")
    ds = dataset()
    rows = [fused_row(tokenizer, ds.prompt_parts(r, 3)) for r in ds.records]
    ids, pos, seg = pad_left(rows, 0, model.device)
    out = {}
    for bias, temperature in ((None, 1.0), (-math.log(3), 0.5)):
        settings = FusionSettings(backend=backend, isolation="none", temperature=temperature)
        mask = SegmentMask(seg, 0, settings, None if bias is None else torch.full((3, 3), bias))
        with mask.attention(model):
            out[bias] = prefill(model, ids, pos, mask.prefill())
    (plain_logits, plain_cache), (biased_logits, biased_cache) = out.values()
    before_answer = seg != FUSED_SEGMENT  # the suffix reads the paraphrases: its K/V move with the bias
    for a, b in zip(plain_cache.layers, biased_cache.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert (x - y).abs().amax(dim=(1, 3))[before_answer].max() <= 1e-5
    assert (plain_logits - biased_logits).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_numeric_bias_minus_log_n_is_uniform(backend):
    model, tokenizer = cached_tiny("llama")
    lm, ds = LanguageModel(model, tokenizer), dataset()
    steps = []
    for bias in ("uniform", f"{-math.log(3)!r}", "0"):
        chooser = Recorder()
        settings = FusionSettings(bias=bias, backend=backend)
        decode_fused_shares(lm, ds, ds.records, 3, no_stop(), settings, choose=chooser)
        steps.append(torch.stack([s[:, 0] for s in chooser.logits]))
    uniform, numeric, zero = steps
    assert (uniform - numeric).abs().max() <= 1e-5
    assert (uniform - zero).abs().max() > 1e-3



@pytest.mark.parametrize("fewshot, isolation", [("fused", "full"), ("single", "none"), ("fused", "none")])
def test_isolation_check_holds_for_few_shot_blocks_and_the_ablation(fewshot, isolation):
    """inspect_fusion.isolation_diffs runs every segment with only what it may see before it: earlier few-shot
    blocks (--fewshot-format fused) and, with --isolation none, the paraphrases before it."""
    from inspect_fusion import isolation_diffs, tolerance
    model, tokenizer = cached_tiny("llama")
    ds = dataset()
    row = fused_row(tokenizer, ds.prompt_parts(ds.records[0], 3, fewshot))
    diffs = isolation_diffs(model, row, FusionSettings(fewshot=fewshot, isolation=isolation))
    assert len(diffs) == 1 + 3 + (2 * (3 + 1) if fewshot == "fused" else 0)  # prefix, paraphrases, examples
    assert max(d.rel for layers in diffs.values() for d in layers) <= tolerance(model.dtype)


# ---------------------------------------------------------------- the debug tool shows them

def test_share_line_has_a_bar_per_paraphrase():
    line = "P 0.41 | 1 ████▌ 0.20 | 2 ███▍ 0.15 | 3 ██▎ 0.10 | S 0.14"
    assert share_line([0.41, 0.2, 0.15, 0.1, 0.14]) == line
    assert share_line([0.41, 0.2, 0.15, 0.1, 0.14], bars=False) == "P 0.41 | 1 0.20 | 2 0.15 | 3 0.10 | S 0.14"


def test_debug_tool_prints_and_draws_the_shares(tmp_path, capsys):
    """Always recorded there: a line per generated token, every layer's with --verbose, and the heatmap
    beside the mask's picture."""
    import json

    import debug_flexattention
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"uuid": "s1", "paraphrases": ["what color is the sky?"], "answers": ["blue"], "split": "train"},
        {"uuid": "q/1", "paraphrases": ["capital of france?", "france's capital?", "which city is france's capital?"],
         "answers": ["Paris"]}]), encoding="utf-8")
    code = debug_flexattention.main(["--dataset", "jsonl", "--data-file", str(data), "--model", "tiny-llama",
                                     "--num-paraphrases", "3", "--max-new-tokens", "3", "--isolation", "none",
                                     "--output-dir", str(tmp_path), "--verbose"])
    out = capsys.readouterr().out
    assert code == 0, out
    steps = re.findall(r"^  step\s+\d+: P (\S+) \| 1 \S+ (\S+) \| 2 \S+ (\S+) \| 3 \S+ (\S+) \| S (\S+)  ", out, re.M)
    assert len(steps) == 3 and all(abs(sum(map(float, s)) - 1) <= 0.03 for s in steps)  # printed to 2 decimals
    assert len(re.findall(r"^      layer\s+\d+: P ", out, re.M)) == 3 * 2  # the tiny model's 2 layers
    assert "isolation: 1 of 1 sample(s) within tolerance" in out  # each paraphrase sees what the mask says
    for picture in ("mask-01-q_1.png", "shares-01-q_1.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
