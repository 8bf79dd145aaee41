"""Defining behaviour of the methods end to end (methods.py, through decoding.decode and segment_mask.SegmentMask)
on a tiny random model, against reference decoders written here: per_prompt/origin are greedy decoding of each
prompt alone; avg/max/weighted_* fuse the N prompts' next-token distributions by the rule's definition at every
step; attention-level fusion is the fused row read under the rule written out token by token (a 4D additive mask:
prefix for all, a paraphrase itself, the suffix and answer everything, the bias on the paraphrase keys the answer
reads) and run again in full at every step. Plus the result rows' fields."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from confidence import normalised_weights
from conftest import cached_tiny
from dataset import Dataset, Record
from decoding import LanguageModel, PrefixCache, StopRule, fused_row, single_rows
from fusion import FusionSettings
from methods import answer_ensemble, answer_fused, answer_per_prompt, decode_fused
from segment_mask import FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT

STEPS = 4
DATA = Dataset("t", "qa", [
    Record("q1", ["who wrote hamlet?", "hamlet is by whom?", "the author of hamlet?"], ["Shakespeare"]),
    Record("q2", ["where is rome?", "rome lies in which country, if you know?", "rome?"], ["Italy"]),
], [("2+2?", "4")])


@pytest.fixture(scope="module")
def llama():
    return cached_tiny("llama")


def stop() -> StopRule:
    return StopRule(set(), STEPS, first_line_only=False)


@torch.inference_mode()
def greedy_alone(model, ids: list[int]) -> list[int]:
    out: list[int] = []
    for _ in range(STEPS):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@torch.inference_mode()
def fused_by_rule(model, prompts: list[list[int]], rule: str, weights=None) -> list[int]:
    """Each step: every prompt's next-token distribution, fused by the rule's definition."""
    out: list[int] = []
    w = None if weights is None else torch.tensor(weights)
    for _ in range(STEPS):
        logits = torch.stack([model(torch.tensor([p + out])).logits[0, -1] for p in prompts])
        logp = logits.log_softmax(-1)
        score = {"avg": lambda: logp.mean(0), "avg_prob": lambda: logp.exp().mean(0),
                 "max": lambda: logp.exp().max(0).values, "weighted_avg": lambda: (w[:, None] * logp).sum(0),
                 "weighted_max": lambda: logits[int(w.argmax())]}[rule]()
        out.append(int(score.argmax()))
    return out


def allowed(seg: list[int], q: int, k: int) -> bool:
    if k == q:
        return True
    if k > q or seg[k] == PAD_SEGMENT:
        return False
    return seg[k] == PREFIX_SEGMENT or seg[k] == seg[q] or seg[q] == FUSED_SEGMENT


@torch.inference_mode()
def fused_logits_by_rule(model, row, biases: list[float] | None, out: list[int]) -> torch.Tensor:
    """The next-token logits of the fused row followed by `out`, read under the rule written out token by token."""
    ids, seg = list(row.input_ids) + out, list(row.segment_ids) + [FUSED_SEGMENT] * len(out)
    pos = list(row.position_ids) + list(range(row.position_ids[-1] + 1, row.position_ids[-1] + 1 + len(out)))
    L = len(ids)
    mask = torch.full((L, L), float("-inf"))
    for q in range(L):
        for k in range(L):
            if allowed(seg, q, k):
                bias = biases[seg[k] - 1] if biases and seg[q] != seg[k] and 1 <= seg[k] <= len(biases) else 0.0
                mask[q, k] = bias
    return model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]),
                 attention_mask=mask[None, None]).logits[0, -1]


def fused_attention_by_rule(model, row, biases: list[float] | None) -> list[int]:
    out: list[int] = []
    for _ in range(STEPS):
        out.append(int(fused_logits_by_rule(model, row, biases, out).argmax()))
    return out


def prompts_of(tokenizer, record, n):
    return [row.input_ids for row in single_rows(tokenizer, DATA.prompt_parts(record, n), list(range(n)))]


# ---------------------------------------------------------------- per_prompt and origin

def test_per_prompt_is_each_prompt_alone(llama):
    model, tokenizer = llama
    rows, stats = answer_per_prompt(LanguageModel(model, tokenizer), DATA, DATA.records, 2, stop(), "per_prompt")
    assert [(r["uuid"], r["paraphrase_index"]) for r in rows] == [("q1", 0), ("q1", 1), ("q2", 0), ("q2", 1)]
    for r in rows:
        record = DATA.records[0 if r["uuid"] == "q1" else 1]
        i = r["paraphrase_index"]
        parts = DATA.prompt_parts(record, 2)
        assert r["token_ids"] == greedy_alone(model, tokenizer(parts.full(i))["input_ids"])
        assert r["paraphrases"] == [record.paraphrases[i]] and r["prompts"] == [parts.full(i)]
        assert r["method"] == "per_prompt" and r["num_ensemble"] == 2 and r["paraphrase_indices"] == [i]
        assert r["generation"] == tokenizer.decode(r["token_ids"], skip_special_tokens=True)
        assert r["new_tokens"] == STEPS and r["decode_tokens"] == STEPS - 1
        own = single_rows(tokenizer, parts, [i])[0]
        assert r["prompt_tokens"] == sum(s != PREFIX_SEGMENT for s in own.segment_ids)
        assert r["seconds"] == pytest.approx(stats.seconds / 4)
    assert stats.steps == STEPS - 1


def test_per_prompt_without_n_is_every_paraphrase_and_origin_the_first(llama):
    model, tokenizer = llama
    lm = LanguageModel(model, tokenizer)
    every, _ = answer_per_prompt(lm, DATA, DATA.records[:1], None, stop(), "per_prompt")
    assert [r["paraphrase_index"] for r in every] == [0, 1, 2] and {r["num_ensemble"] for r in every} == {3}
    origin, _ = answer_per_prompt(lm, DATA, DATA.records, 3, stop(), "origin")
    assert [(r["uuid"], r["paraphrase_index"], r["num_ensemble"]) for r in origin] == [("q1", 0, 1), ("q2", 0, 1)]
    assert origin[1]["token_ids"] == greedy_alone(model, tokenizer(DATA.prompt_parts(DATA.records[1], 1).full(0))[
        "input_ids"])
    assert origin[0]["method"] == "origin"


# ---------------------------------------------------------------- the logit-level ensembles

@pytest.mark.parametrize("rule", ["avg", "avg_prob", "max"])
def test_each_logit_level_rule_decodes_as_its_definition(llama, rule):
    model, tokenizer = llama
    rows, stats = answer_ensemble(LanguageModel(model, tokenizer), DATA, DATA.records, 3, stop(), rule)
    for r, record in zip(rows, DATA.records):
        assert r["token_ids"] == fused_by_rule(model, prompts_of(tokenizer, record, 3), rule), rule
        assert r["method"] == rule and r["num_ensemble"] == 3 and r["paraphrase_index"] == -1
        assert r["paraphrases"] == record.paraphrases[:3]
        assert r["prompts"] == [DATA.prompt_parts(record, 3).full(i) for i in range(3)]
        assert r["decode_tokens"] == (STEPS - 1) * 3 and r["paraphrase_indices"] == [0, 1, 2]
        assert "weights" not in r
    assert rows[0]["seconds"] == pytest.approx(stats.seconds / 2)


@pytest.mark.parametrize("rule", ["weighted_avg", "weighted_max"])
def test_weighted_rules_use_each_questions_normalised_confidence(llama, rule):
    model, tokenizer = llama
    conf = {"q1": [0.2, 0.5, 0.3], "q2": [0.0, 0.0, 0.0]}
    rows, _ = answer_ensemble(LanguageModel(model, tokenizer), DATA, DATA.records, 3, stop(), rule, conf)
    q1, q2 = rows
    assert q1["weights"] == pytest.approx([0.2, 0.5, 0.3]) and q1["weights_fallback"] is False
    assert q2["weights"] == pytest.approx([1 / 3] * 3) and q2["weights_fallback"] is True
    for r, record in zip(rows, DATA.records):
        weights = normalised_weights(conf[record.uuid])[0]
        assert r["token_ids"] == fused_by_rule(model, prompts_of(tokenizer, record, 3), rule, weights)


# ---------------------------------------------------------------- attention-level fusion

@pytest.mark.parametrize("positions", ["left", "right", "continuous"])
@pytest.mark.parametrize("bias", ["none", "uniform", "sqrt"])
def test_attention_level_fusion_decodes_the_fused_row_under_the_rule(llama, positions, bias):
    model, tokenizer = llama
    settings = FusionSettings(positions=positions, bias=bias)
    rows, stats = answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 3, stop(), settings)
    biases = {"none": None, "uniform": [-math.log(3)] * 3, "sqrt": [-0.5 * math.log(3)] * 3}[bias]
    for r, record in zip(rows, DATA.records):
        row = fused_row(tokenizer, DATA.prompt_parts(record, 3), positions)
        assert r["token_ids"] == fused_attention_by_rule(model, row, biases), (positions, bias)
        assert r["method"] == "flex_attention" and r["num_ensemble"] == 3 and r["paraphrase_index"] == -1
        assert r["prompts"] == [tokenizer.decode(row.input_ids)]
        assert (r["positions"], r["fusion_bias"], r["attn_backend"]) == (positions, bias, "sdpa")
        assert r["prompt_tokens"] == sum(s != PREFIX_SEGMENT for s in row.segment_ids)
        assert r["decode_tokens"] == STEPS - 1 and "weights" not in r and "attention_share" not in r
    assert stats.steps == STEPS - 1


@pytest.mark.parametrize("bias", ["confidence", "agreement"])
def test_weight_biases_read_each_paraphrase_by_its_weight(llama, bias):
    """bias confidence / agreement: each paraphrase's normalised weight enters as log w (a zero one as log 1e-6)."""
    model, tokenizer = llama
    weights = {"q1": ([0.7, 0.3, 0.0], False), "q2": ([1 / 3] * 3, True)}
    rows, _ = answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 3, stop(),
                           FusionSettings(bias=bias), weights)
    for r, record in zip(rows, DATA.records):
        row = fused_row(tokenizer, DATA.prompt_parts(record, 3))
        w = weights[record.uuid][0]
        assert r["token_ids"] == fused_attention_by_rule(model, row, [math.log(max(x, 1e-6)) for x in w])
        assert r["weights"] == w and r["weights_fallback"] is weights[record.uuid][1]
        assert r["fusion_bias"] == bias
    with pytest.raises(ValueError, match=f"{bias} needs"):
        answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 3, stop(), FusionSettings(bias=bias))


def test_flex_decodes_what_sdpa_decodes_and_records_attention_shares(llama):
    model, tokenizer = llama
    settings = FusionSettings(bias="uniform", temperature=0.5)
    sdpa, _ = answer_fused(LanguageModel(model, tokenizer, None), DATA, DATA.records, 2, stop(), settings)
    flex, _ = answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 2, stop(),
                           replace(settings, backend="flex"))
    assert [r["token_ids"] for r in flex] == [r["token_ids"] for r in sdpa]
    recorded, _ = answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 2, stop(),
                               FusionSettings(bias="uniform", temperature=0.5, record_attention=True))
    assert [r["token_ids"] for r in recorded] == [r["token_ids"] for r in sdpa]
    for r in recorded:
        shares = r["attention_share"]
        assert len(shares) == STEPS and all(len(s) == 2 + 2 and sum(s) == pytest.approx(1.0) for s in shares)
        assert all(x >= 0 for s in shares for x in s)


def test_decode_fused_returns_the_rows_it_decoded(llama):
    model, tokenizer = llama
    rows, outputs, stats = decode_fused(LanguageModel(model, tokenizer, PrefixCache()), DATA, DATA.records[:1], 2,
                                        stop(), FusionSettings(positions="right"))
    assert rows == [fused_row(tokenizer, DATA.prompt_parts(DATA.records[0], 2), "right")]
    # the default bias is sqrt: -1/2 log N on every paraphrase the answer reads
    assert outputs == [fused_attention_by_rule(model, rows[0], [-0.5 * math.log(2)] * 2)] and stats.steps == STEPS - 1


# ---------------------------------------------------------------- the candidates of the fusion study (issue 25)

@torch.inference_mode()
def beside_by_rule(model, row, prompts: list[list[int]], beside: str, w: float, biases) -> list[int]:
    """Each step: the fused row's log-probabilities (by the rule above) combined with those of the plain prompts
    decoded beside it, by the definition: singles (1-w) fused + w mean(singles); prior (1+w) fused - w prior on
    the tokens whose fused probability is at least 0.1 x the top one."""
    out: list[int] = []
    for _ in range(STEPS):
        fused = fused_logits_by_rule(model, row, biases, out).log_softmax(-1)
        plain = torch.stack([model(torch.tensor([p + out])).logits[0, -1] for p in prompts]).log_softmax(-1)
        if beside == "singles":
            score = (1 - w) * fused + w * plain.mean(0)
        else:
            plausible = fused.exp() >= 0.1 * fused.exp().max()
            score = torch.where(plausible, (1 + w) * fused - w * plain[0], float("-inf"))
        out.append(int(score.argmax()))
    return out


def prior_prompt(tokenizer, record) -> list[int]:
    """The prompt with an empty question, as the tokenizer reads its text: the instruction, the examples, "Q: \nA:"."""
    parts = DATA.prompt_parts(record, 3)
    text = parts.full(0).replace(record.paraphrases[0], "")
    assert text.endswith("\n\nQ: \nA:") and "2+2?" in text
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("beside,w", [("singles", 0.5), ("singles", 0.2), ("prior", 0.5), ("prior", 1.0)])
def test_rows_beside_the_fused_row_are_combined_by_their_definition(llama, beside, w):
    model, tokenizer = llama
    settings = FusionSettings(beside=beside, beside_weight=w)
    rows, stats = answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 3, stop(), settings)
    for r, record in zip(rows, DATA.records):
        row = fused_row(tokenizer, DATA.prompt_parts(record, 3))
        prompts = prompts_of(tokenizer, record, 3) if beside == "singles" else [prior_prompt(tokenizer, record)]
        assert r["token_ids"] == beside_by_rule(model, row, prompts, beside, w, [-0.5 * math.log(3)] * 3), (beside, w)
        assert (r["beside"], r["beside_weight"]) == (beside, w)
        parts = DATA.prompt_parts(record, 3)
        plain = (single_rows(tokenizer, parts, [0, 1, 2]) if beside == "singles" else
                 single_rows(tokenizer, DATA.prompt_parts(Record(record.uuid, [""], []), 1), [0]))
        assert [p.input_ids for p in plain] == prompts
        assert r["prompt_tokens"] == sum(s != PREFIX_SEGMENT for x in [row, *plain] for s in x.segment_ids)
        assert r["decode_tokens"] == (STEPS - 1) * (1 + len(prompts))


def test_beside_singles_at_its_ends_is_the_fused_row_alone_and_logit_avg(llama):
    model, tokenizer = llama
    lm = LanguageModel(model, tokenizer)
    fused, _ = answer_fused(lm, DATA, DATA.records, 3, stop(), FusionSettings())
    avg, _ = answer_ensemble(lm, DATA, DATA.records, 3, stop(), "avg")
    alone, _ = answer_fused(lm, DATA, DATA.records, 3, stop(), FusionSettings(beside="singles", beside_weight=0))
    as_avg, _ = answer_fused(lm, DATA, DATA.records, 3, stop(), FusionSettings(beside="singles", beside_weight=1))
    assert [r["token_ids"] for r in alone] == [r["token_ids"] for r in fused]
    assert [r["token_ids"] for r in as_avg] == [r["token_ids"] for r in avg]
    assert [r["token_ids"] for r in fused] != [r["token_ids"] for r in avg]  # the two ends differ here


BACKENDS = pytest.mark.parametrize("backend", ["sdpa", "flex"], ids=["sdpa_backend", "flex_backend"])  # (setup.cfg)


@BACKENDS
@pytest.mark.parametrize("beside", ["singles", "prior"])
def test_the_rows_beside_leave_the_fused_row_as_it_is(llama, backend, beside):
    """Batch composition: the fused row's log-probabilities with rows beside it (weight 0) equal those of the
    fused row decoded alone, step by step (teacher-forced by the same greedy choices)."""
    model, tokenizer = llama
    seen: dict[str, list[torch.Tensor]] = {"alone": [], "beside": []}

    def recorder(name):
        def choose(logits, live):
            seen[name].append(torch.log_softmax(logits[:, 0].float(), -1))
            return logits[:, 0].argmax(-1)
        return choose
    lm = LanguageModel(model, tokenizer)
    settings = FusionSettings(backend=backend)
    decode_fused(lm, DATA, DATA.records, 3, stop(), settings, choose=recorder("alone"))
    decode_fused(lm, DATA, DATA.records, 3, stop(), replace(settings, beside=beside, beside_weight=0.0),
                 choose=recorder("beside"))
    assert len(seen["alone"]) == len(seen["beside"]) == STEPS
    for a, b in zip(seen["alone"], seen["beside"]):
        cut = b == torch.finfo(b.dtype).min  # prior: the implausible tokens, never chosen
        assert not cut.any() if beside == "singles" else (cut == (a.exp() < 0.1 * a.exp().max(-1, True).values)).all()
        kept = a - torch.logsumexp(torch.where(cut, float("-inf"), a), -1, keepdim=True)  # renormalised over the rest
        torch.testing.assert_close(torch.where(cut, a, b), torch.where(cut, a, kept), atol=1e-4, rtol=0)


@BACKENDS
def test_one_paraphrase_beside_its_own_prompt_is_plain_greedy_decoding(llama, backend):
    model, tokenizer = llama
    rows, _ = answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 1, stop(),
                           FusionSettings(backend=backend, beside="singles", beside_weight=0.5))
    for r, record in zip(rows, DATA.records):
        assert r["token_ids"] == greedy_alone(model, prompts_of(tokenizer, record, 1)[0])


def test_shares_bias_weighs_each_paraphrase_by_the_inverse_of_its_first_share(llama):
    """bias shares: w_i ~ 1 / (paraphrase i's attention share at the first token under the uniform bias), read
    as log w; afterwards the first token's shares are more even than under the uniform bias."""
    model, tokenizer = llama
    lm = LanguageModel(model, tokenizer)
    uniform, _ = answer_fused(lm, DATA, DATA.records, 3, stop(), FusionSettings(bias="uniform", record_attention=True))
    rows, _ = answer_fused(lm, DATA, DATA.records, 3, stop(), FusionSettings(bias="shares", record_attention=True))
    for u, r, record in zip(uniform, rows, DATA.records):
        first = u["attention_share"][0][1:4]
        w = [1 / s / sum(1 / x for x in first) for s in first]
        assert r["weights"] == pytest.approx(w, rel=1e-6) and r["weights_fallback"] is False
        row = fused_row(tokenizer, DATA.prompt_parts(record, 3))
        assert r["token_ids"] == fused_attention_by_rule(model, row, [math.log(x) for x in r["weights"]])
        after = r["attention_share"][0][1:4]
        assert max(after) / min(after) < max(first) / min(first)
        assert r["prompt_tokens"] == 2 * u["prompt_tokens"]  # the first pass's prefill is part of its cost


def test_shares_and_agreement_biases_keep_identical_copies_equal_to_the_uniform_bias(llama, monkeypatch):
    """N identical copies get equal shares and equal votes: both biases are then -log N, the uniform bias."""
    import confidence
    model, tokenizer = llama
    lm = LanguageModel(model, tokenizer)
    copies = Dataset("t", "qa", [Record(r.uuid, [r.paraphrases[1]] * 3, r.answers) for r in DATA.records],
                     DATA.few_shot)
    default, _ = answer_fused(lm, copies, copies.records, 3, stop(), FusionSettings(bias="uniform"))
    shares, _ = answer_fused(lm, copies, copies.records, 3, stop(), FusionSettings(bias="shares"))
    votes = confidence.agreements(lm, copies, copies.records, 3, stop())
    weights = {u: normalised_weights(v) for u, v in votes.values.items()}
    agreed, _ = answer_fused(lm, copies, copies.records, 3, stop(), FusionSettings(bias="agreement"), weights)
    for d, s, a in zip(default, shares, agreed):
        assert s["weights"] == pytest.approx([1 / 3] * 3, abs=1e-6) and a["weights"] == pytest.approx([1 / 3] * 3)
        assert d["token_ids"] == s["token_ids"] == a["token_ids"]


def test_each_fused_row_carries_its_share_of_the_batchs_seconds(llama):
    """seconds: the batch's wall time (the first pass of bias shares included) divided among its questions."""
    import time
    model, tokenizer = llama
    for settings in (FusionSettings(), FusionSettings(bias="shares")):
        start = time.perf_counter()
        rows, stats = answer_fused(LanguageModel(model, tokenizer), DATA, DATA.records, 3, stop(), settings)
        elapsed = time.perf_counter() - start
        assert len({r["seconds"] for r in rows}) == 1
        assert 0 < rows[0]["seconds"] * len(rows) <= elapsed
        assert rows[0]["seconds"] * len(rows) >= stats.seconds  # never less than the decode itself
