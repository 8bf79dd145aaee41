"""Defining behaviour of the logit-level fusion rules (methods.fuse_logits) on hand-made logits where the rules
disagree, and of the small pure pieces of methods.py (token counts, the backend choice, the fusion biases).
Every expected token is worked out by hand from the rule's definition (the sums are in the comments)."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from constants import InputError
from dataset import Record
from decoding import Row
from fusion import FusionSettings
from methods import combine_beside, fuse_logits, fusion_biases, resolve_backend, token_counts
from segment_mask import FUSED_SEGMENT, SHOT_ANSWER, SHOT_STRIDE, segment_biases

# one question, N = 3 paraphrases, V = 4 tokens, as probabilities (each row sums to 1)
P = [[0.01, 0.47, 0.02, 0.50],
     [0.16, 0.58, 0.13, 0.13],
     [0.68, 0.02, 0.04, 0.26]]
W = [0.5, 0.4, 0.1]  # confidence weights: paraphrase 0 the most confident, paraphrase 2 the least
SHIFT = [[3.0], [-2.0], [0.5]]  # logits are log-probabilities plus any constant per row: the rules must not care
#   avg          mean log p:   t0 -2.275  t1 -1.737  t2 -3.057  t3 -1.360  -> 3 (no row gives it a tiny p)
#   avg_prob     mean p:       t0 0.283   t1 0.357   t2 0.063   t3 0.297   -> 1
#   max          max p:        t0 0.68    t1 0.58    t2 0.13    t3 0.50    -> 0
#   weighted_avg sum w log p:  t0 -3.07   t1 -0.987  t2 -3.3    t3 -1.298  -> 1
#   weighted_max the argmax of paraphrase 0 alone (weight 0.5):             -> 3 (paraphrase 2, weight 0.1: 0)
EXPECTED = {"avg": 3, "avg_prob": 1, "max": 0, "weighted_avg": 1, "weighted_max": 3}


def logits_of(probs, shift=SHIFT) -> torch.Tensor:
    return torch.tensor(probs).log() + torch.tensor(shift)


def batch_of_two():
    """Question 0 as above; question 1 the same rows with the vocabulary reversed (token t -> 3 - t) and the
    weights reversed too, so its most confident paraphrase is paraphrase 2."""
    logits = torch.stack([logits_of(P), logits_of([row[::-1] for row in P])])
    weights = torch.tensor([W, W[::-1]])
    return logits, weights


@pytest.mark.parametrize("method", list(EXPECTED))
def test_each_fusion_rule_on_hand_made_logits(method):
    weights = torch.tensor([W]) if method.startswith("weighted") else None
    assert fuse_logits(logits_of(P)[None], method, weights).tolist() == [EXPECTED[method]]


def test_the_rules_disagree_on_these_logits():
    assert len({EXPECTED["avg"], EXPECTED["avg_prob"], EXPECTED["max"]}) == 3
    assert EXPECTED["weighted_avg"] != EXPECTED["avg"] and EXPECTED["weighted_max"] != EXPECTED["weighted_avg"]


def test_each_rule_decides_per_question_of_a_batch():
    logits, weights = batch_of_two()
    for method in ("avg", "avg_prob", "max"):
        assert fuse_logits(logits, method).tolist() == [EXPECTED[method], 3 - EXPECTED[method]], method
    # question 1's weights are reversed: its most confident paraphrase is 2, whose reversed row peaks at token 3
    assert fuse_logits(logits, "weighted_max", weights).tolist() == [3, 3]
    # question 1, sum w log p with w = (0.1, 0.4, 0.5), in reversed token order:
    #   t3 (old t0) -1.387   t2 (old t1) -2.25   t1 (old t2) -2.82   t0 (old t3) -1.559  -> 3
    assert fuse_logits(logits, "weighted_avg", weights).tolist() == [1, 3]


def test_weighted_avg_with_equal_weights_is_avg_and_one_hot_weights_read_one_paraphrase():
    logits = logits_of(P)[None]
    assert fuse_logits(logits, "weighted_avg", torch.full((1, 3), 1 / 3)).tolist() == [EXPECTED["avg"]]
    for i in range(3):
        one_hot = torch.nn.functional.one_hot(torch.tensor([i]), 3).float()
        alone = max(range(4), key=lambda t: P[i][t])
        assert fuse_logits(logits, "weighted_avg", one_hot).tolist() == [alone]
        assert fuse_logits(logits, "weighted_max", one_hot).tolist() == [alone]


def test_max_compares_probabilities_not_raw_logits():
    # paraphrase 1's logits are shifted far up: as raw logits it would win every token; as probabilities it does not
    logits = logits_of(P, [[0.0], [40.0], [0.0]])[None]
    assert fuse_logits(logits, "max").tolist() == [0]
    assert fuse_logits(logits, "avg_prob").tolist() == [1]


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown fusion method 'median'"):
        fuse_logits(logits_of(P)[None], "median")


def test_token_counts_count_prompt_tokens_beyond_the_prefix_and_every_row_per_step():
    F = FUSED_SEGMENT
    rows = [Row([1] * 6, [0, 0, 1, 1, F, F], list(range(6))), Row([1] * 5, [0, 0, 2, F, F], list(range(5)))]
    assert token_counts(rows, [7, 8, 9]) == {"prompt_tokens": 4 + 3, "decode_tokens": 2 * 2}
    assert token_counts(rows[:1], [7]) == {"prompt_tokens": 4, "decode_tokens": 0}
    assert token_counts(rows[:1], []) == {"prompt_tokens": 4, "decode_tokens": 0}
    # fused few-shot examples (paraphrases E1, E2, answer EA) are encoded once per run with the prefix
    e1, e2, ea = SHOT_STRIDE + 1, SHOT_STRIDE + 2, SHOT_STRIDE + SHOT_ANSWER
    fused = Row([1] * 7, [0, e1, e2, ea, 1, 2, F], [0, 1, 1, 2, 3, 3, 4])
    assert token_counts([fused], [7, 8]) == {"prompt_tokens": 3, "decode_tokens": 1}
    # beside plain rows whose examples are not fused, only the plain prefix is shared
    plain = Row([1] * 6, [0, 0, 0, 0, 1, F], list(range(6)))
    assert token_counts([fused, plain], [7]) == {"prompt_tokens": 6 + 5, "decode_tokens": 0}


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("attn", "compile", "device", "expected"), [
    ("auto", "auto", CPU, ("sdpa", False, "sdpa (dense mask) (auto: sdpa measured faster on CPU)")),
    ("auto", "off", CPU, ("sdpa", False, "sdpa (dense mask) (auto: sdpa measured faster on CPU)")),
    ("auto", "auto", CUDA, ("flex", True, "flex (compiled) (auto on CUDA: FlexAttention's block sparsity; not yet "
                                          "measured against sdpa)")),
    ("auto", "off", CUDA, ("flex", False, "flex (eager) (auto on CUDA: FlexAttention's block sparsity; not yet "
                                          "measured against sdpa)")),
    ("sdpa", "auto", CUDA, ("sdpa", False, "sdpa (dense mask)")),
    ("sdpa", "off", CPU, ("sdpa", False, "sdpa (dense mask)")),
    ("flex", "auto", CPU, ("flex", False, "flex (eager)")),
    ("flex", "off", CUDA, ("flex", False, "flex (eager)")),
    ("flex", "auto", CUDA, ("flex", True, "flex (compiled)")),
    ("flex", "on", CUDA, ("flex", True, "flex (compiled)")),
])
def test_resolve_backend(attn, compile, device, expected):
    assert resolve_backend(attn, compile, device) == expected


def test_compiled_flex_on_the_cpu_only_when_asked_and_a_warning_without_avx512(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_backend("flex", "on", CPU) == ("flex", True, "flex (compiled)")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    backend, compiled, label = resolve_backend("flex", "on", CPU)
    assert (backend, compiled) == ("flex", True) and "WARNING: this CPU has no AVX-512" in label
    assert resolve_backend("flex", "off", CPU)[2] == "flex (eager)"  # eager flex is not affected
    assert "WARNING" not in resolve_backend("flex", "on", CUDA)[2]


@pytest.mark.parametrize(("attn", "compile", "device", "device_map", "message"), [
    ("sdpa", "on", CPU, None, "--compile on applies to --attn flex only; drop it or choose --attn flex"),
    ("auto", "on", CPU, None, "--compile on applies to --attn flex only; drop it or choose --attn flex"),
    ("flex", "off", CUDA, "auto", "--attn flex with --device-map auto: the mask cannot follow layers across devices; "
                                  "use --attn sdpa (its dense mask is moved with each layer's inputs)"),
])
def test_resolve_backend_refuses(attn, compile, device, device_map, message):
    with pytest.raises(InputError) as err:
        resolve_backend(attn, compile, device, device_map)
    assert str(err.value) == message


def test_sdpa_takes_a_device_map_and_flex_needs_flexattention(monkeypatch):
    assert resolve_backend("sdpa", "off", CPU, "auto")[0] == "sdpa"
    monkeypatch.setattr(methods, "flex_available", lambda: False)
    with pytest.raises(InputError, match=r"--attn flex: this torch \(.*\) has no FlexAttention; upgrade torch or "
                                         r"choose --attn sdpa"):
        resolve_backend("flex", "off", CPU)
    assert resolve_backend("auto", "auto", CPU)[0] == "sdpa"  # sdpa needs no FlexAttention


def test_segment_biases_by_mode():
    assert segment_biases(3, "none") == [0.0, 0.0, 0.0]
    assert segment_biases(4, "uniform") == [-math.log(4)] * 4
    assert segment_biases(4, "sqrt") == [-0.5 * math.log(4)] * 4  # weights 1/sqrt N
    assert segment_biases(1, "sqrt") == segment_biases(1, "uniform") == [0.0]  # one paraphrase: no bias at all
    assert segment_biases(2, "confidence", [0.25, 0.75]) == [math.log(0.25), math.log(0.75)]
    assert segment_biases(2, "confidence", [1.0, 0.0]) == [0.0, math.log(1e-6)]  # a zero weight: log 1e-6
    assert segment_biases(2, "confidence", [1.0, 1e-7]) == [0.0, math.log(1e-6)]
    assert segment_biases(2, "confidence", [0.5, 2e-6]) == [math.log(0.5), math.log(2e-6)]
    assert segment_biases(3, "-0.5") == [-0.5, -0.5, -0.5]


def test_fusion_biases_per_question():
    batch = [Record("a", ["x", "y"], []), Record("b", ["x", "y"], [])]
    weights = {"a": ([0.25, 0.75], False), "b": ([0.5, 0.5], True)}
    assert fusion_biases(FusionSettings(bias="none"), batch, 2, weights, CPU) is None
    uniform = fusion_biases(FusionSettings(bias="uniform"), batch, 2, None, CPU)
    assert uniform.shape == (2, 2) and torch.allclose(uniform, torch.full((2, 2), -math.log(2)))
    assert torch.allclose(fusion_biases(FusionSettings(), batch, 2, None, CPU), torch.full((2, 2), -0.5 * math.log(2)))
    conf = fusion_biases(FusionSettings(bias="confidence"), batch, 2, weights, CPU)
    assert torch.allclose(conf, torch.tensor([[math.log(0.25), math.log(0.75)], [math.log(0.5)] * 2]))
    assert torch.allclose(fusion_biases(FusionSettings(bias="1.5"), batch, 2, None, CPU), torch.full((2, 2), 1.5))
    with pytest.raises(ValueError, match="fusion bias confidence needs each question's weights"):
        fusion_biases(FusionSettings(bias="confidence"), batch, 2, None, CPU)


# ---------------------------------------------------------------- rows beside the fused row (issue 25)

def test_combine_beside_on_hand_made_logits():
    """singles: (1-w) fused + w mean(singles); prior: (1+w) fused - w prior, only where the fused probability
    is >= 0.1 x its top: the prior's favourite loses, an implausible token never wins."""
    fused = torch.tensor([2.0, 1.9, -3.0, 0.0])
    singles = torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    logits = torch.stack([fused, *singles])[None]
    lp = torch.log_softmax(logits, -1)[0]
    for w in (0.0, 0.3, 1.0):
        torch.testing.assert_close(combine_beside(logits, "singles", w)[0], (1 - w) * lp[0] + w * lp[1:].mean(0))
    assert combine_beside(logits, "singles", 0.0).argmax() == 0 and combine_beside(logits, "singles", 1.0).argmax() == 1
    prior = torch.tensor([[2.0, 1.9, -3.0, 0.0], [3.0, 0.0, -9.0, 0.0]])[None]  # the prior likes token 0
    combined = combine_beside(prior, "prior", 1.0)[0]
    assert combined.argmax() == 1  # token 0 is what the prompt says without the question
    assert combined[2] == torch.finfo(combined.dtype).min  # token 2: far below 0.1 x the top: never chosen
    plp = torch.log_softmax(prior[0], -1)
    assert combined[1] == pytest.approx(float(2 * plp[0, 1] - plp[1, 1]))
    assert combine_beside(prior, "prior", 0.0).argmax() == 0 and combine_beside(prior[:, :1], "none", 0.5).argmax() == 0
    with pytest.raises(ValueError):
        combine_beside(prior, "mean", 0.5)


def test_beside_settings_name_their_table_and_refuse_what_they_cannot_do():
    s = FusionSettings(beside="singles", beside_weight=0.25)
    assert s.table_name(5) == "flex_attention-5-beside_singles_w0.25.feather"
    assert s.row_fields()["beside"] == "singles" and s.row_fields()["beside_weight"] == 0.25
    assert s.table_settings()["beside"] == "singles" and "beside" not in FusionSettings().table_settings()
    assert "beside" not in FusionSettings().row_fields() and FusionSettings().variant() == ""
    assert "beside singles (weight 0.25)" in s.describe()
    assert FusionSettings(bias="agreement").table_name(3) == "flex_attention-3-bias_agreement.feather"
    for bad, message in ((dict(beside="singles", beside_weight=1.5), "in \\[0, 1\\]"),
                         (dict(beside="prior", beside_weight=-1.0), ">= 0"),
                         (dict(beside="prior", temperature=0.7), "temperature 1 only"),
                         (dict(beside="both"), "--beside 'both'")):
        with pytest.raises(InputError, match=message):
            FusionSettings(**bad)
    assert FusionSettings(beside="prior", beside_weight=2.0).beside_weight == 2.0  # contrast may exceed 1


def test_a_table_of_the_old_default_bias_is_never_resumed_as_the_new_default(tmp_path):
    """Before sqrt, uniform was the default and its tables were flex_attention-<N>.feather: resumed under the
    new default they would mix two biases in one table. The kept settings refuse it; uniform has its own name."""
    from results import ResultWriter, check_settings
    from runner import fusion_flags
    assert FusionSettings().table_name(5) == "flex_attention-5.feather"
    assert FusionSettings(bias="uniform").table_name(5) == "flex_attention-5-bias_uniform.feather"
    table = tmp_path / "flex_attention-5.feather"
    check_settings(table, fusion_flags(FusionSettings(bias="uniform"), 5, 10))
    ResultWriter(table).append([dict(uuid="q1", prediction="x", answers=["x"])])
    with pytest.raises(InputError, match="fusion_bias: 'uniform' -> 'sqrt'"):
        check_settings(table, fusion_flags(FusionSettings(), 5, 10))
