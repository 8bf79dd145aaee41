"""Parity with upstream's dataset construction: upstream's recipe (pandas groupby, Dataset.from_pandas,
train_test_split, random.seed/random.sample) is written out here and run on hub-shaped synthetic data; the loaders
must give the same questions in the same order, the same uuids, prompts and few-shot text. And `--dataset webqa`
runs offline from the bundled copy, without waiting on the hub."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import time
import uuid as uuidlib
from collections import Counter

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from conftest import run_main
from constants import MASK_INSTRUCTION, QA_INSTRUCTION, WEBQA_BUNDLED_DIR, WEBQA_TRAIN_FILES, InputError
from dataset import load_dataset_by_name, resolve_paraphrase_set

NUM_FACTS = 2100  # more than upstream's 2000 test facts + 5 few-shot facts


# ---------------------------------------------------------------- synthetic hub-shaped data

def myriadlama_rows() -> list[dict]:
    """Hub rows (one per fact and template) for 4 relations of 5 manual + 15..18 auto templates, shuffled."""
    rng = random.Random(7)
    rows = []
    for f in range(NUM_FACTS):
        rel = f % 4
        uuid = str(uuidlib.UUID(int=rng.getrandbits(128)))
        aliases = [f"obj{f}"] + [f"obj{f} alias{a}" for a in range(rng.randint(0, 2))]
        templates = [(f"[X] manual {rel}.{t} [Y].", True) for t in range(5)]
        templates += [(f"[Y] auto {rel}.{t} of [X]", False) for t in range(15 + rel)]
        rows += [{"uuid": uuid, "rel_uri": f"P{rel}", "sub_ent": f"subject {f}", "obj_uris": [f"Q{f}"],
                  "obj_ents": [f"obj{f}"], "obj_aliases": aliases, "template": t, "is_manual": m} for t, m in templates]
    rng.shuffle(rows)
    return rows


def upstream_myriadlama(rows: list[dict], num_auto: int) -> tuple[list[str], list[list[str]], list[list[str]], str]:
    """Upstream's MyriadLamaDataset: (test uuids, prompts per test fact, answers, few-shot text)."""
    df = pd.DataFrame(rows)
    items = []
    for _, sdf in df.groupby("uuid"):
        subject = sdf["sub_ent"].iloc[0]
        manual = [t.replace("[X]", subject).replace("[Y]", "[MASK]")
                  for t in sdf[sdf["is_manual"] == True]["template"].tolist()]  # noqa: E712 - upstream's test
        auto = [t.replace("[X]", subject).replace("[Y]", "[MASK]")
                for t in sdf[sdf["is_manual"] == False]["template"].tolist()]  # noqa: E712
        items.append({"uuid": sdf["uuid"].iloc[0], "rel": sdf["rel_uri"].iloc[0],
                      "answers": list(sdf["obj_aliases"].iloc[0]), "manual_paraphrases": manual,
                      "auto_paraphrases": auto})
    ds = Dataset.from_pandas(pd.DataFrame(items)).train_test_split(test_size=2000, seed=42, shuffle=True)
    prompts = []
    for item in ds["test"]:
        random.seed(item["uuid"])
        prompts.append(item["manual_paraphrases"] + random.sample(item["auto_paraphrases"], num_auto))
    train = ds["train"]
    random.seed(42)
    indices = random.sample(range(len(train)), 5)
    few_shot = "\n\n".join(f"Q: {train[i]['manual_paraphrases'][0]}\nA: {train[i]['answers'][0]}" for i in indices)
    return list(ds["test"]["uuid"]), prompts, list(ds["test"]["answers"]), few_shot


@functools.lru_cache(maxsize=None)
def upstream_for(num_auto: int) -> tuple:
    return upstream_myriadlama(myriadlama_rows(), num_auto)


@pytest.fixture(scope="module")
def myriadlama_file(tmp_path_factory):
    rows = myriadlama_rows()
    path = tmp_path_factory.mktemp("myriadlama") / "hub_rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, path


@pytest.mark.parametrize("paraphrase_set, num_auto", [(None, 5), ("manual+auto15", 15)])
def test_myriadlama_matches_upstream(myriadlama_file, paraphrase_set, num_auto, caplog):
    rows, path = myriadlama_file
    uuids, prompts, answers, few_shot = upstream_for(num_auto)
    ds = load_dataset_by_name("myriadlama", str(path), num_paraphrases=5 + num_auto, paraphrase_set=paraphrase_set)
    assert [r.uuid for r in ds.records] == uuids  # the same 2000 test facts, in the same order
    assert [r.paraphrases for r in ds.records] == prompts
    assert [r.answers for r in ds.records] == answers
    parts = ds.prompt_parts(ds.records[0], 2)
    assert parts.full(1) == f"{MASK_INSTRUCTION}\n\n{few_shot}\n\nQ: {prompts[0][1]}\nA:"  # upstream's prompt text
    assert "cannot give upstream's" not in caplog.text  # a complete copy is not warned about


def test_myriadlama_save_to_disk_copy_and_other_template_sets(myriadlama_file, tmp_path):
    rows, _ = myriadlama_file
    folder = tmp_path / "myriadlama"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder))  # download_resources.sh's layout
    uuids, prompts, _, _ = upstream_for(5)
    ds = load_dataset_by_name("myriadlama", str(folder))
    assert [r.uuid for r in ds.records] == uuids and [r.paraphrases for r in ds.records] == prompts
    manual = load_dataset_by_name("myriadlama", str(folder), paraphrase_set="manual")
    assert [r.paraphrases for r in manual.records] == [p[:5] for p in prompts]
    every = load_dataset_by_name("myriadlama", str(folder), paraphrase_set="all")
    templates = Counter(r["uuid"] for r in rows)
    assert [len(r.paraphrases) for r in every.records] == [templates[r.uuid] for r in every.records]
    assert [r.paraphrases[:5] for r in every.records] == [p[:5] for p in prompts]


def test_myriadlama_small_copy_says_why_it_is_not_upstream(caplog, tmp_path):
    """A user's small copy says why (the bundled fixture, a few facts by design, does not warn every run)."""
    from constants import MYRIADLAMA_FIXTURE_FILE
    load_dataset_by_name("myriadlama", str(MYRIADLAMA_FIXTURE_FILE))
    assert not [r for r in caplog.records if "upstream" in r.getMessage()]
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(MYRIADLAMA_FIXTURE_FILE.read_bytes())
    load_dataset_by_name("myriadlama", str(copy))
    lines = [r.getMessage() for r in caplog.records if "upstream" in r.getMessage()]
    assert len(lines) == 1 and "too few for upstream's 2000-fact test split" in lines[0]
    assert "fewer than the 5 auto templates" in lines[0]


def test_paraphrase_sets_are_checked():
    assert resolve_paraphrase_set("myriadlama", None) == "manual+auto5"
    assert resolve_paraphrase_set("myriadlama", "all") == "all" and resolve_paraphrase_set("webqa", None) is None
    with pytest.raises(InputError, match="--paraphrases 'auto5': choose manual"):
        resolve_paraphrase_set("myriadlama", "auto5")
    with pytest.raises(InputError, match="only --dataset myriadlama has template sets"):
        resolve_paraphrase_set("webqa", "manual")


# ---------------------------------------------------------------- WebQuestions

def webq_hub(n_test: int = 40, n_train: int = 60) -> DatasetDict:
    """stanfordnlp/web_questions' layout: url, question, answers; train and test."""
    def split(name: str, n: int) -> Dataset:
        return Dataset.from_list([{"url": f"http://www.freebase.com/view/en/{name}{i}",
                                   "question": f"{name} question {i}?", "answers": [f"{name} answer {i}", f"other {i}"]}
                                  for i in range(n)])
    return DatasetDict({"train": split("train", n_train), "test": split("test", n_test)})


def upstream_webqa(hub: DatasetDict) -> tuple[list[str], str]:
    """Upstream's WebQADataset: (uuids of the test questions, few-shot text)."""
    uuids = [hashlib.md5(q.encode()).hexdigest() for q in hub["test"]["question"]]
    train = hub["train"]
    random.seed(42)
    indices = random.sample(range(len(train)), 5)
    few_shot = "\n\n".join(f"Q: {train[i]['question']}\nA: {train[i]['answers'][0]}" for i in indices)
    return uuids, few_shot


def test_webqa_matches_upstream(tmp_path):
    hub = webq_hub()
    hub.save_to_disk(str(tmp_path / "webq"))
    uuids, few_shot = upstream_webqa(hub)
    ds = load_dataset_by_name("webqa", str(tmp_path / "webq"))
    assert [r.uuid for r in ds.records] == uuids
    assert [r.paraphrases for r in ds.records] == [[q] for q in hub["test"]["question"]]
    assert [r.answers for r in ds.records] == hub["test"]["answers"]
    parts = ds.prompt_parts(ds.records[3], 1)
    assert parts.full(0) == f"{QA_INSTRUCTION}\n\n{few_shot}\n\nQ: {hub['test'][3]['question']}\nA:"


def test_webqa_release_json_in_any_order_and_the_bundled_train_split(tmp_path):
    rows = [{"qId": f"wqs{i:06d}", "qText": f"question {i}?", "answers": [f"a{i}"]} for i in range(30)]
    shuffled = random.Random(3).sample(rows, len(rows))
    (tmp_path / "test.json").write_text(json.dumps(shuffled))
    train = sorted((r for name in WEBQA_TRAIN_FILES for r in json.loads((WEBQA_BUNDLED_DIR / name).read_text())),
                   key=lambda r: r["qId"])  # the hub's train split: qId number == row index
    hub = DatasetDict({"train": Dataset.from_list([{"question": r["qText"], "answers": r["answers"]} for r in train]),
                       "test": Dataset.from_list([{"question": r["qText"], "answers": r["answers"]} for r in rows])})
    uuids, few_shot = upstream_webqa(hub)
    ds = load_dataset_by_name("webqa", str(tmp_path / "test.json"))
    assert [r.uuid for r in ds.records] == uuids  # sorted back into qId order, the hub's
    assert ds.prompt_parts(ds.records[0], 1).prefix == f"{QA_INSTRUCTION}\n\n{few_shot}\n\n"
    assert len(train) == 3778 and ds.few_shot[0] == ("who is lamar odom married too?", "Khloé Kardashian")


def test_webqa_falls_back_to_the_bundled_copy_fast_when_the_hub_does_not_answer(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("dataset.CACHE_DIR", tmp_path)  # no download_resources.sh copy
    start = time.perf_counter()
    ds = load_dataset_by_name("webqa", limit=2)
    assert time.perf_counter() - start < 5
    test = json.loads((WEBQA_BUNDLED_DIR / "test.json").read_text())
    assert [r.paraphrases[0] for r in ds.records] == [test[0]["qText"], test[1]["qText"]]
    lines = [r.getMessage() for r in caplog.records if "bundled" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("webqa: stanfordnlp/web_questions is unreachable (http://127.0.0.1")
    assert lines[0].endswith("); reading the bundled copy data/webquestions")


def test_webqa_cli_runs_offline_from_the_bundled_copy(tmp_path):
    env = {k: None for k in os.environ if k.startswith("HF_")}  # in this process (conftest.run_main)
    env.update(HF_HUB_OFFLINE="1", SELF_ENSEMBLE_CACHE=str(tmp_path / "cache"))
    start = time.perf_counter()
    done = run_main("flex_attention_generate.py", "--dataset", "webqa", "--model", "tiny-llama", "--limit", "2",
                    "--num_paraphrases", "1", "--max-new-tokens", "2", "--attn", "sdpa", "--no-progress",
                    "--output-dir", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 60
    lines = [line for line in done.stderr.splitlines() if "bundled" in line]
    assert len(lines) == 1 and lines[0].endswith("reading the bundled copy data/webquestions"), done.stderr
    table = pd.read_feather(next((tmp_path / "out").glob("*.feather")))
    test = json.loads((WEBQA_BUNDLED_DIR / "test.json").read_text())
    assert list(table["uuid"]) == [hashlib.md5(r["qText"].encode()).hexdigest() for r in test[:2]]
