"""Which paraphrases: upstream's synced samples (the same selections as its code), the repeat control
(every default method then equals the repeated single prompt), the seeded manual/auto mix, sampled runs
through the commands for every method (resumable, one row per selection), and the notebook entry point."""
from __future__ import annotations

import itertools
import json
import random

import pandas as pd
import pytest

from conftest import FEW_SHOT, cached_tiny, run_main
from constants import InputError
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule
from fusion import FusionSettings
from methods import answer_ensemble, answer_fused, answer_per_prompt
from selection import MAX_PERMUTATIONS, Selection, manual_auto_mix, synced_samples


def upstream_synced(uuid: str, count: int, n: int, samples: int, repeat: bool) -> list[list[int]]:
    """g_ori_sample_sync_xzhao.sample_paraphrases_per_item for one question, written out as upstream has it."""
    all_indices = list(range(count))
    if repeat:
        all_sampled = list([[i] * n for i in all_indices])
    else:
        all_sampled = itertools.permutations(all_indices, n)
    random.seed(uuid)
    all_list = list(all_sampled)
    return [list(p) for p in random.sample(all_list, k=min(samples, len(all_list)))]


@pytest.mark.parametrize("repeat", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_synced_samples_are_upstreams(n, repeat):
    for uuid in ["q1", "6b1c0f0e", "04dc00943c6cc89-2df09b5a4ca3f2e", "12345"]:
        for count, samples in ((6, 5), (9, 3), (5, 200)):
            assert synced_samples(uuid, count, n, samples, repeat) == upstream_synced(uuid, count, n, samples, repeat)


def test_past_the_permutation_limit_selections_are_drawn_distinct_and_repeatable():
    count, n = 100, 5  # 9e9 ordered selections: upstream's list would not fit in memory
    assert count ** n > MAX_PERMUTATIONS
    drawn = synced_samples("q1", count, n, 20)
    assert len({tuple(d) for d in drawn}) == 20 and all(len(set(d)) == n for d in drawn)
    assert drawn == synced_samples("q1", count, n, 20) and drawn != synced_samples("q2", count, n, 20)


def test_manual_auto_mix_repeats_with_the_seed_and_respects_the_kinds():
    record = Record("f1", [f"template {i} [MASK]" for i in range(9)], ["x"], num_manual=5)
    one = manual_auto_mix(record, 3, 2, 4, seed=0)
    assert one == manual_auto_mix(record, 3, 2, 4, seed=0)
    assert len(set(one)) == 4
    draws = [manual_auto_mix(record, 3, 2, 5, seed=s) for s in range(20)]
    assert all(sum(i < 5 for i in d) == 3 for d in draws)  # all of the pool: 3 manual, 2 automatic
    assert len({tuple(d) for d in draws}) > 1  # the seed matters
    with pytest.raises(InputError, match="fewer than --num_manual"):
        manual_auto_mix(record, 6, 0, 3, seed=0)
    with pytest.raises(InputError, match="need to know which paraphrases are manual"):
        manual_auto_mix(Record("f2", ["a", "b"], ["x"]), 1, 1, 2, seed=0)


def test_table_names_are_upstreams():
    synced, repeat, mix = Selection(5), Selection(5, repeat=True), Selection(4, manual=3, auto=2)
    assert synced.table_name("ensemble_avg-2.feather", 2) == "syncedsample_ensemble_avg-2paras-5samples.feather"
    assert repeat.table_name("ensemble_max-3.feather", 3) == "syncedsample_ensemble_max-3paras-5samples-repeat.feather"
    assert mix.table_name("ensemble_avg-4.feather", 4) == "ensemble_avg-m3a2s4.feather"
    assert synced.table_name("flex_attention-2-right.feather", 2) == "syncedsample_flex_attention-2paras-5samples-right.feather"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_with_repeat_paras_logit_methods_and_uniform_fusion_are_the_repeated_single_prompt(family):
    """The repeat control: N copies of one paraphrase. Logit avg/max and fusion under the uniform bias give that
    prompt alone; the default sqrt bias gives the copies sqrt N the weight of one, by design (docs/study.md)."""
    model, tokenizer = cached_tiny(family)
    lm = LanguageModel(model, tokenizer)
    records = [Record("q1", ["what is the capital of france?", "which city is france's capital?", "capital?"], ["Paris"]),
               Record("q2", ["who wrote hamlet?", "hamlet is by whom?"], ["Shakespeare"])]
    ds = Dataset("t", "qa", records, FEW_SHOT)
    stop = StopRule(set(), 5, first_line_only=False)
    single = {(r["uuid"], r["paraphrase_index"]): r["token_ids"]
              for r in answer_per_prompt(lm, ds, records, None, stop, "per_prompt")[0]}
    sampled = Selection(3, repeat=True).expand(records, 3, seed=0)
    assert len(sampled) == 3 + 2
    for method in ("avg", "avg_prob", "max"):
        for row in answer_ensemble(lm, ds, sampled, 3, stop, method)[0]:
            assert row["token_ids"] == single[(row["uuid"], row["paraphrase_indices"][0])], method
    for row in answer_fused(lm, ds, sampled, 3, stop, FusionSettings(bias="uniform"))[0]:
        assert row["token_ids"] == single[(row["uuid"], row["paraphrase_indices"][0])]


def write_data(path, questions=4):
    rows = [{"uuid": f"t{i}", "paraphrases": [f"shot {i}?"], "answers": [f"a{i}"], "split": "train"} for i in range(2)]
    rows += [{"uuid": f"q{i}", "paraphrases": [f"question {i}?", f"asked {i}?", f"again {i}?", f"once more {i}?"],
              "answers": [f"a{i}"]} for i in range(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(script, *args):
    done = run_main(script, *args, "--model", "tiny-llama", "--no-progress", "--max-new-tokens", "3", "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("script, method, name", [
    ("generate.py", ["--method", "avg"], "syncedsample_ensemble_avg-2paras-3samples"),
    ("generate.py", ["--method", "max"], "syncedsample_ensemble_max-2paras-3samples"),
    ("generate.py", ["--method", "avg_prob"], "syncedsample_ensemble_avg_prob-2paras-3samples"),
    ("generate.py", ["--method", "weighted_avg", "--confidence-samples", "2"],
     "syncedsample_ensemble_weighted_avg-2paras-3samples"),
    ("flex_attention_generate.py", [], "syncedsample_flex_attention-2paras-3samples"),
])
def test_sampled_runs_write_one_row_per_selection_and_resume(tmp_path, script, method, name):
    data = write_data(tmp_path / "d.jsonl")
    common = ["--dataset", "jsonl", "--data-file", str(data), "--num_paraphrases", "2", "--num_samples", "3", *method]
    run(script, *common, "--limit", "2", "--output-dir", str(tmp_path / "a"))
    resumed = run(script, *common, "--output-dir", str(tmp_path / "a"))
    assert "resuming, 2 of 4 questions already done" in resumed.stderr
    run(script, *common, "--output-dir", str(tmp_path / "b"))
    a, b = (pd.read_feather(tmp_path / d / f"{name}.feather") for d in "ab")
    assert len(a) == 4 * 3
    timed = [c for c in ("seconds", "confidence_seconds") if c in a.columns]
    assert a.drop(columns=timed).equals(b.drop(columns=timed))
    for uuid, group in a.groupby("uuid", sort=False):
        assert [list(p) for p in group["paraphrase_indices"]] == synced_samples(uuid, 4, 2, 3)
        assert list(group["sample_index"]) == [0, 1, 2]


def test_the_mix_repeats_with_the_seed(tmp_path):
    data = tmp_path / "m.jsonl"
    rows = [{"uuid": f"t{i}", "paraphrases": [f"shot {i} [MASK]."], "answers": ["x"], "split": "train"} for i in range(2)]
    rows += [{"uuid": f"f{i}", "paraphrases": [f"fact {i} form {j} [MASK]." for j in range(7)], "answers": ["x"],
              "num_manual": 4} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--dataset", "jsonl", "--task", "mask", "--data-file", str(data), "--method", "avg",
              "--num_manual", "2", "--num_auto", "2", "--num_samples", "3"]
    tables = []
    for out, seed in (("a", "0"), ("b", "0"), ("c", "7")):
        run("generate.py", *common, "--seed", seed, "--output-dir", str(tmp_path / out))
        tables.append(pd.read_feather(tmp_path / out / "ensemble_avg-m2a2s3.feather"))
    picks = [[list(p) for p in t["paraphrase_indices"]] for t in tables]
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert all(len(p) == 3 for p in picks[0])


def test_answer_table_from_python_equals_the_command(tmp_path):
    """The notebook entry point gives the rows the command writes, scored, without writing anything."""
    from runner import answer_table
    model, tokenizer = cached_tiny("llama")
    data = write_data(tmp_path / "d.jsonl", questions=3)
    run("flex_attention_generate.py", "--dataset", "jsonl", "--data-file", str(data), "--num_paraphrases", "3",
        "--output-dir", str(tmp_path / "out"))
    written = pd.read_feather(tmp_path / "out" / "flex_attention-3.feather")
    records = [Record(f"q{i}", [f"question {i}?", f"asked {i}?", f"again {i}?", f"once more {i}?"], [f"a{i}"])
               for i in range(3)]
    table = answer_table(LanguageModel(model, tokenizer), records, "flex_attention", 3,
                         few_shot=[("shot 0?", "a0"), ("shot 1?", "a1")], max_new_tokens=3)
    assert [list(t) for t in table["token_ids"]] == [list(t) for t in written["token_ids"]]
    assert {"exact", "partial"} <= set(table.columns) and not list(tmp_path.glob("*.feather"))
