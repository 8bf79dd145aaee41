"""Self-consistency (generate.py --method self_consistency): K answers sampled per question through transformers'
own warpers, each with a seed of its own, then the post-hoc vote's majority. A tiny temperature gives greedy
decoding; the vote follows samples written out here; every sample equals one drawn alone, without a KV cache;
a run repeats, resumes and is refused bad flags in one line."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

import methods
from conftest import cached_tiny
from confidence import row_generator
from decoding import LanguageModel, StopRule, answer_text, single_rows
from methods import SelfConsistency, answer_per_prompt, answer_self_consistency

MAX_NEW = 5


def lm(family: str = "llama") -> LanguageModel:
    return LanguageModel(*cached_tiny(family))


def no_stop() -> StopRule:
    return StopRule(set(), MAX_NEW, first_line_only=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_tiny_temperature_gives_the_greedy_single_answers(small_dataset, family):
    """T = 1e-4: every sample is the greedy answer of the paraphrase it reads. first: K copies of origin's answer,
    all voting for it (confidence 1); each: sample k is per_prompt's answer of paraphrase k mod N."""
    model = lm(family)
    records = small_dataset.records
    origin = answer_per_prompt(model, small_dataset, records, 1, no_stop(), "origin")[0]
    first = answer_self_consistency(model, small_dataset, records, 3, no_stop(), SelfConsistency(4, 1e-4))[0]
    for sc, alone in zip(first, origin):
        assert [list(t) for t in sc["sample_token_ids"]] == [alone["token_ids"]] * 4
        assert sc["token_ids"] == alone["token_ids"] and sc["confidence"] == 1.0
        assert sc["paraphrase_indices"] == [0] and sc["sample_paraphrase_indices"] == [0] * 4
    singles = answer_per_prompt(model, small_dataset, records, 3, no_stop(), "per_prompt")[0]
    each = answer_self_consistency(model, small_dataset, records, 3, no_stop(),
                                   SelfConsistency(4, 1e-4, prompts="each"))[0]
    for q, sc in enumerate(each):
        assert [list(t) for t in sc["sample_token_ids"]] == [singles[3 * q + k % 3]["token_ids"] for k in range(4)]
        assert sc["sample_paraphrase_indices"] == [0, 1, 2, 0] and sc["paraphrase_indices"] == [0, 1, 2]


class ScriptedSampler:
    """Stands in for SeededSampler: row r of the decode emits the tokens of SCRIPT[r], whatever the logits."""

    def __init__(self, generators, temperature, top_p):
        self.script = [iter(tokens) for tokens in ScriptedSampler.tokens]

    def distribution(self, logits, live):
        return torch.log_softmax(logits[:, 0], -1)

    def __call__(self, logits, live):
        return torch.tensor([next(self.script[r]) for r in live.tolist()])


# K = 5 identical prompts (one paraphrase asked 5 times) per question, and what each sample says
SAMPLES = {"q1": ["Paris", "paris.", "Lyon", "Lyon", ""],          # a tie of 2 and 2: the earliest, "Paris"
           "q2": ["", "", "Rome", "", ""],                         # empty answers never win against one
           "q3": ["The Hague", "Oslo", "hague", "Oslo", "the hague!"]}  # normalised: the hague x3
VOTED = {"q1": ("Paris", 0.4), "q2": ("Rome", 0.2), "q3": ("The Hague", 0.6)}


def test_the_vote_follows_the_written_samples(small_dataset, monkeypatch):
    model = lm()
    eos = model.tokenizer.eos_token_id
    ScriptedSampler.tokens = [model.tokenizer(a + "\n", add_special_tokens=False)["input_ids"] if a else [eos]
                              for uuid in ("q1", "q2", "q3") for a in SAMPLES[uuid]]
    monkeypatch.setattr(methods, "SeededSampler", ScriptedSampler)
    records = [type(r)(r.uuid, [r.paraphrases[0]] * 5, r.answers) for r in small_dataset.records]
    rows = answer_self_consistency(model, small_dataset, records, 5, StopRule({eos}, 20),
                                   SelfConsistency(prompts="each"))[0]
    for row in rows:
        assert row["samples"] == SAMPLES[row["uuid"]]
        assert (row["prediction"], row["confidence"]) == VOTED[row["uuid"]]
        picked = row["samples"].index(row["prediction"])
        assert row["answer_logprob"] == row["sample_logprobs"][picked]
        assert len(set(map(tuple, row["prompts"]))) == 1  # the K prompts are one text


def drawn_alone(model: LanguageModel, input_ids: list[int], generator: torch.Generator, sc: SelfConsistency,
                stop: StopRule) -> tuple[list[int], float]:
    """One sample without a KV cache or a batch: every step the whole sequence through the model, the last
    logits warped by transformers' warpers, one token drawn with the sample's own generator."""
    warp = [TemperatureLogitsWarper(sc.temperature), TopPLogitsWarper(sc.top_p)]
    tokens, logprob = [], 0.0
    while not tokens or not stop.done(tokens, model.tokenizer):
        with torch.inference_mode():
            logits = model.model(input_ids=torch.tensor([input_ids + tokens])).logits[:, -1].float()
        for w in warp:
            logits = w(None, logits)
        logp = torch.log_softmax(logits, -1)[0]
        tokens.append(int(torch.multinomial(logp.exp(), 1, generator=generator)))
        logprob += float(logp[tokens[-1]])
    return tokens, logprob


def test_each_sample_is_the_one_drawn_alone_with_its_seed(small_dataset):
    """Samples are seeded from the run's seed, the uuid and the sample's index: a question batched with others
    draws what it draws alone, and what a cache-free loop draws with the same generator (T 1, top-p 0.9)."""
    model, stop = lm(), no_stop()
    sc = SelfConsistency(3, temperature=1.0, top_p=0.9, seed=7)
    batched = answer_self_consistency(model, small_dataset, small_dataset.records, 3, stop, sc)[0]
    alone = answer_self_consistency(model, small_dataset, small_dataset.records[1:2], 3, stop, sc)[0]
    assert alone[0]["sample_token_ids"] == batched[1]["sample_token_ids"]
    for record, row in zip(small_dataset.records, batched):
        prompt = single_rows(model.tokenizer, small_dataset.prompt_parts(record, 1), [0])[0].input_ids
        for k in range(3):
            generator = row_generator(f"self_consistency:7:{record.uuid}:None", k)
            tokens, logprob = drawn_alone(model, prompt, generator, sc, stop)
            assert list(row["sample_token_ids"][k]) == tokens
            assert row["sample_logprobs"][k] == pytest.approx(logprob, abs=1e-4)
        assert row["samples"] == [answer_text(model.tokenizer, list(t))[0] for t in row["sample_token_ids"]]
    samples = {tuple(map(tuple, r["sample_token_ids"])) for r in batched}
    assert len(samples) == 3 and any(len(set(map(tuple, r["sample_token_ids"]))) > 1 for r in batched)
    other = answer_self_consistency(model, small_dataset, small_dataset.records, 3, stop, SelfConsistency(
        3, temperature=1.0, top_p=0.9, seed=8))[0]
    assert [r["sample_token_ids"] for r in other] != [r["sample_token_ids"] for r in batched]


def test_its_cost_is_the_k_decodes(small_dataset):
    """prompt_tokens and decode_tokens are the sums over the K sampled rows (each a per_prompt-like row)."""
    model, stop = lm(), no_stop()
    row = answer_self_consistency(model, small_dataset, small_dataset.records[:1], 3, stop, SelfConsistency(4))[0][0]
    origin = answer_per_prompt(model, small_dataset, small_dataset.records[:1], 1, stop, "origin")[0][0]
    assert row["prompt_tokens"] == 4 * origin["prompt_tokens"]
    assert row["decode_tokens"] == sum(len(t) - 1 for t in row["sample_token_ids"])
    assert (row["sc_samples"], row["sc_temperature"], row["sc_top_p"], row["sc_prompts"]) == (4, 0.7, 1.0, "first")


# ---------------------------------------------------------------- the command


def write_data(path, questions: int = 5):
    rows = [{"uuid": f"t{i}", "paraphrases": [f"shot {i}?"], "answers": [f"a{i}"], "split": "train"} for i in range(2)]
    rows += [{"uuid": f"q{i}", "paraphrases": [f"question {i}?", f"asked {i}?", f"again {i}?"], "answers": [f"a{i}"]}
             for i in range(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(data, out, *extra) -> list[str]:
    return ["--method", "self_consistency", "--dataset", "jsonl", "--data-file", str(data), "--model", "tiny-llama",
            "--num_ensemble", "3", "--max-new-tokens", "4", "--batch-size", "2", "--no-progress", "--sc-temperature",
            "1.0", "--output-dir", str(out), *extra]


def test_an_interrupted_run_resumes_to_the_uninterrupted_table(tmp_path, monkeypatch):
    import generate
    data = write_data(tmp_path / "d.jsonl")
    assert generate.main(command(data, tmp_path / "ref")) == 0
    name = "ensemble_self_consistency-3-t1.feather"
    reference = pd.read_feather(tmp_path / "ref" / name)
    calls, real = [], methods.answer_self_consistency

    def interrupted(*args, **kwargs):  # Ctrl-C while the second batch decodes
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(methods, "answer_self_consistency", interrupted)
    assert generate.main(command(data, tmp_path / "run")) == 130
    assert not (tmp_path / "run" / name).exists()
    monkeypatch.setattr(methods, "answer_self_consistency", real)
    assert generate.main(command(data, tmp_path / "run")) == 0
    resumed = pd.read_feather(tmp_path / "run" / name)
    assert len(resumed) == 5 and resumed["sample_token_ids"].map(len).eq(3).all()
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"), reference.drop(columns="seconds"))
    settings = json.loads((tmp_path / "run" / name.replace(".feather", ".settings.json")).read_text())
    assert (settings["sc_samples"], settings["sc_temperature"], settings["sc_prompts"]) == (3, 1.0, "first")


@pytest.mark.parametrize("flags, message", [
    (["--sc-temperature", "0"], "--sc-temperature must be a finite number > 0, got 0.0"),
    (["--sc-temperature", "-1"], "--sc-temperature must be a finite number > 0, got -1.0"),
    (["--sc-top-p", "0"], "--sc-top-p must be in (0, 1], got 0.0"),
    (["--sc-top-p", "1.5"], "--sc-top-p must be in (0, 1], got 1.5"),
    (["--sc-samples", "0"], "--sc-samples must be at least 1, got 0"),
])
def test_bad_flags_end_in_one_line(tmp_path, capsys, flags, message):
    import generate
    data = write_data(tmp_path / "d.jsonl")
    assert generate.main(command(data, tmp_path / "out", *flags)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n" and not (tmp_path / "out").exists()


def test_an_infinite_temperature_and_sc_flags_on_another_method_are_refused(tmp_path, capsys):
    import generate
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(SystemExit) as done:  # argparse's type check: one line too (cli.OneLineParser)
        generate.main(command(data, tmp_path / "out", "--sc-temperature", "inf"))
    assert done.value.code == 2 and "expected a finite number, got 'inf'" in capsys.readouterr().err
    argv = ["--method", "avg", "--sc-samples", "4", "--dataset", "jsonl", "--data-file", str(data),
            "--model", "tiny-llama"]
    assert generate.main(argv) == 2
    assert capsys.readouterr().err == "error: --sc-samples applies to --method self_consistency only\n"


def test_the_table_name_spells_the_settings_that_differ():
    assert SelfConsistency().table_name(5) == "ensemble_self_consistency-5.feather"
    assert (SelfConsistency(10, 0.5, 0.9, "each").table_name(5) ==
            "ensemble_self_consistency-5-each-t0.5-p0.9-k10.feather")


@pytest.mark.embedded
def test_the_embedded_model_end_to_end(tmp_path, capsys):
    """SmolLM2: a tiny temperature answers as origin does; at the defaults (K = N = 5, T 0.7) the samples differ
    somewhere, the report puts self_consistency beside the vote at their costs, with calibration."""
    import evaluate
    import generate
    base = ["--limit", "3", "--no-progress", "--output-dir", str(tmp_path), "--max-new-tokens", "8"]
    assert generate.main(["--method", "origin", *base]) == 0
    assert generate.main(["--method", "per_prompt", "--num_ensemble", "5", *base]) == 0
    assert generate.main(["--method", "self_consistency", "--sc-temperature", "1e-4", "--sc-samples", "2", *base]) == 0
    assert generate.main(["--method", "self_consistency", *base]) == 0
    origin = pd.read_feather(tmp_path / "origin.feather")
    cold = pd.read_feather(tmp_path / "ensemble_self_consistency-5-t0.0001-k2.feather")
    assert [list(t) for t in cold["token_ids"]] == [list(t) for t in origin["token_ids"]]
    sc = pd.read_feather(tmp_path / "ensemble_self_consistency-5.feather")
    assert any(len(set(s)) > 1 for s in sc["samples"]) and sc["samples"].map(len).eq(5).all()
    assert evaluate.main(["--results-dir", str(tmp_path)]) == 0
    report = pd.read_csv(tmp_path / "report.csv").set_index("method")
    assert {"self_consistency", "vote", "sc[t0.0001,k2]"} <= set(report.index)
    assert report.loc["self_consistency", "N"] == report.loc["vote", "N"] == 5
    assert report.loc["self_consistency", "model tokens/question"] > 0 and not math.isnan(
        report.loc["self_consistency", "brier"])
    assert (tmp_path / "reliability.png").exists()
