"""Defining behaviour of dataset.py's prompt building (PromptParts, Dataset.prompt_parts in the single and fused
few-shot formats, plain and chat) and of upstream's dataset recipes (WebQA: md5 uuids, random.seed(42) few-shot
rows, the hub's order; MyriadLAMA: facts grouped and sorted by uuid, random.seed(uuid) template samples, the
split, the few-shot facts), each prompt text written out by hand and each recipe as upstream writes it (the
global `random` module, hashlib), never taken from the loaders' output."""
from __future__ import annotations

import hashlib
import json
import random

import pytest

import dataset as ds_module
from constants import MASK_INSTRUCTION, QA_INSTRUCTION, InputError
from dataset import (Dataset, Fact, PromptParts, Record, as_list, auto_count, check_masks, fact_prompts, few_shot_example,
                     fill_template, group_facts, is_manual, load_myriadlama, load_webqa, parity_gaps, question_uuid,
                     resolve_paraphrase_set, upstream_few_shot, webq_order)

QA = QA_INSTRUCTION
RECORD = Record("q1", ["p one?", "p two?", "p three?"], ["A"])


def qa_dataset(**kw) -> Dataset:
    return Dataset("t", "qa", [RECORD], [("s1?", "a1"), ("s2?", "a2")], [["s1?", "s1b?"], ["s2?"]], **kw)


# ---------------------------------------------------------------- PromptParts

def test_prompt_parts_pieces_and_full_prompts():
    parts = PromptParts(["<pre>", " | ", "<suf>"], [["a1", "a2"], ["b1", "b2"]])
    assert parts.prefix == "<pre>" and parts.suffix == "<suf>" and parts.segments == ["b1", "b2"]
    assert parts.full(0) == "<pre>a1 | b1<suf>"
    assert parts.full(1) == "<pre>a2 | b2<suf>"
    assert parts.special_tokens is True


# ---------------------------------------------------------------- the single few-shot format

def test_single_format_prompt_of_paraphrase_i():
    parts = qa_dataset().prompt_parts(RECORD, 2)
    shots = "Q: s1?\nA: a1\n\nQ: s2?\nA: a2\n\n"
    assert parts.shared == [f"{QA}\n\n{shots}", "\nA:"]
    assert parts.paraphrases == [["Q: p one?", "Q: p two?"]]
    assert parts.full(1) == f"{QA}\n\nQ: s1?\nA: a1\n\nQ: s2?\nA: a2\n\nQ: p two?\nA:"
    assert parts.special_tokens is True
    assert qa_dataset().prompt_parts(RECORD, 2, "single").shared == parts.shared  # single is the default


def test_a_mask_task_has_the_mask_instruction_and_no_shots_means_no_examples():
    data = Dataset("t", "mask", [Record("m", ["[MASK] is red.", "the red one: [MASK]."], ["x"])])
    parts = data.prompt_parts(data.records[0], 2)
    assert parts.full(0) == f"{MASK_INSTRUCTION}\n\nQ: [MASK] is red.\nA:"
    assert parts.full(1) == f"{MASK_INSTRUCTION}\n\nQ: the red one: [MASK].\nA:"


def test_too_few_paraphrases_are_refused():
    with pytest.raises(InputError) as err:
        qa_dataset().prompt_parts(RECORD, 4)
    assert str(err.value) == "t: question q1 has 3 paraphrases, fewer than the 4 asked for"
    assert len(qa_dataset().prompt_parts(RECORD, 3).segments) == 3


# ---------------------------------------------------------------- the fused few-shot format

def test_fused_format_every_example_is_a_block_of_its_paraphrases_then_its_answer():
    parts = qa_dataset().prompt_parts(RECORD, 2, "fused")
    assert parts.shared == [f"{QA}\n\n", "\nA: a1\n\n", "\nA: a2\n\n", "\nA:"]
    assert parts.paraphrases == [["Q: s1?", "Q: s1b?"], ["Q: s2?", "Q: s2?"], ["Q: p one?", "Q: p two?"]]
    assert parts.full(1) == f"{QA}\n\nQ: s1b?\nA: a1\n\nQ: s2?\nA: a2\n\nQ: p two?\nA:"
    # paraphrase 0 of every block reads as the single format's prompt 0
    assert parts.full(0) == qa_dataset().prompt_parts(RECORD, 2).full(0)


def test_fused_format_cycles_an_examples_paraphrases():
    assert qa_dataset().example_paraphrases(3) == [["s1?", "s1b?", "s1?"], ["s2?", "s2?", "s2?"]]
    assert qa_dataset().prompt_parts(RECORD, 3, "fused").paraphrases[0] == ["Q: s1?", "Q: s1b?", "Q: s1?"]


def test_fused_format_needs_each_examples_paraphrases():
    data = Dataset("t", "qa", [RECORD], [("s1?", "a1")])
    with pytest.raises(InputError) as err:
        data.prompt_parts(RECORD, 2, "fused")
    assert str(err.value) == "t: its few-shot examples have no paraphrases; use --fewshot-format single"


# ---------------------------------------------------------------- chat

class Template:
    """A chat template written by hand: <role>content</role> per message, then <assistant> when asked."""

    def __init__(self, keep=True):
        self.keep, self.calls = keep, []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        text = "".join(f"<{m['role']}>{m['content'] if self.keep else m['content'].upper()}</{m['role']}>"
                       for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_chat_single_format_the_template_writes_the_prompt():
    template = Template()
    parts = qa_dataset(chat=template).prompt_parts(RECORD, 2)
    assert parts.shared == [f"<system>{QA}</system><user>s1?</user><assistant>a1</assistant><user>s2?</user>"
                            f"<assistant>a2</assistant><user>", "</user><assistant>"]
    assert parts.paraphrases == [["p one?", "p two?"]]  # the question as given, no "Q: "
    assert parts.special_tokens is False  # the template wrote them
    messages, tokenize, generation = template.calls[0]
    assert tokenize is False and generation is True
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_chat_fused_format_every_example_is_a_block():
    parts = qa_dataset(chat=Template()).prompt_parts(RECORD, 2, "fused")
    assert parts.shared == [f"<system>{QA}</system><user>", "</user><assistant>a1</assistant><user>",
                            "</user><assistant>a2</assistant><user>", "</user><assistant>"]
    assert parts.paraphrases == [["s1?", "s1b?"], ["s2?", "s2?"], ["p one?", "p two?"]]
    assert parts.full(1) == (f"<system>{QA}</system><user>s1b?</user><assistant>a1</assistant><user>s2?</user>"
                             f"<assistant>a2</assistant><user>p two?</user><assistant>")


def test_chat_mask_task_uses_the_mask_instruction():
    data = Dataset("t", "mask", [Record("m", ["[MASK] is red."], ["x"])], chat=Template())
    assert data.prompt_parts(data.records[0], 1).prefix == f"<system>{MASK_INSTRUCTION}</system><user>"


def test_a_template_that_changes_the_question_is_refused():
    with pytest.raises(InputError) as err:
        qa_dataset(chat=Template(keep=False)).prompt_parts(RECORD, 2)
    assert str(err.value) == ("--prompt-format chat: the tokenizer's chat template does not keep the question text as "
                              "given; use --prompt-format plain")


def test_check_paraphrases():
    data = Dataset("t", "qa", [Record("a", ["x", "y"], []), Record("b", ["x"], [])])
    data.check_paraphrases(1)
    with pytest.raises(InputError) as err:
        data.check_paraphrases(2)
    assert str(err.value) == "t: question b has 1 paraphrases, fewer than the 2 asked for"
    with pytest.raises(InputError) as err:
        data.check_paraphrases(0)
    assert str(err.value) == "the number of paraphrases must be at least 1, got 0"


# ---------------------------------------------------------------- WebQA, as upstream builds it

def test_upstream_few_shot_is_random_seed_then_random_sample():
    random.seed(42)
    upstream = random.sample(range(3778), 5)  # upstream's code, on the global generator
    assert upstream_few_shot(3778, 42) == upstream
    random.seed(7)
    assert upstream_few_shot(10, 7, 3) == random.sample(range(10), 3)
    assert upstream_few_shot(5, 1, 0) == []
    assert upstream_few_shot(5, 1, 5) != [] and sorted(upstream_few_shot(5, 1, 5)) == [0, 1, 2, 3, 4]
    with pytest.raises(InputError) as err:
        upstream_few_shot(4, 42, 5)
    assert str(err.value) == "the train split has 4 rows, fewer than the 5 few-shot examples (--num-fewshot)"


def test_question_uuid_is_the_md5_of_the_text():
    assert question_uuid("") == "d41d8cd98f00b204e9800998ecf8427e"
    assert question_uuid("a") == "0cc175b9c0f1b6a831c399e269772661"
    assert question_uuid("what is x?") == hashlib.md5(b"what is x?").hexdigest()


def test_webq_order_sorts_by_qid_only_when_every_row_has_one():
    rows = [{"qId": "b", "x": 1}, {"qId": "a", "x": 2}]
    assert [r["x"] for r in webq_order(rows)] == [2, 1]
    assert [r["x"] for r in webq_order([{"qId": "b", "x": 1}, {"qId": None, "x": 2}])] == [1, 2]


@pytest.fixture
def webq_file(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"qId": "WebQTest-1", "qText": "who is b?", "answers": ["B", "Bee"]},
                                {"qId": "WebQTest-0", "qText": "what is a?", "answers": ["A"]},
                                {"qId": "WebQTest-2", "qText": "where is c?", "answers": []}]))
    return path


def test_load_webqa_as_upstream(webq_file):
    data = load_webqa(webq_file, 1)
    assert [r.paraphrases for r in data.records] == [["what is a?"], ["who is b?"], ["where is c?"]]
    assert [r.uuid for r in data.records] == [hashlib.md5(q.encode()).hexdigest()
                                              for q in ("what is a?", "who is b?", "where is c?")]
    assert [r.answers for r in data.records] == [["A"], ["B", "Bee"], []]
    assert data.name == "webqa" and data.task == "qa"
    train = ds_module.bundled_train()
    random.seed(42)
    expected = [(train[i]["question"], (train[i]["answers"] or [""])[0]) for i in random.sample(range(len(train)), 5)]
    assert data.few_shot == expected
    assert load_webqa(webq_file, 1, num_fewshot=0).few_shot == []
    assert [r.uuid for r in load_webqa(webq_file, 1, limit=2).records] == [r.uuid for r in data.records[:2]]


def test_load_webqa_paraphrases_come_from_the_paraphraser(webq_file):
    asked = []

    def paraphraser(records, k):
        asked.append(([r.uuid for r in records], k))
        return [Record(r.uuid, r.paraphrases + [f"{r.paraphrases[0]} ({j})" for j in range(k)], r.answers)
                for r in records]
    data = load_webqa(webq_file, 3, paraphraser)
    assert asked == [([r.uuid for r in data.records], 2)]
    assert data.records[0].paraphrases == ["what is a?", "what is a? (0)", "what is a? (1)"]
    with pytest.raises(InputError) as err:
        load_webqa(webq_file, 2)
    assert str(err.value) == "webqa: paraphrases are generated by the model; no model given"


def test_load_webqa_refuses_a_question_twice(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"qText": "same?", "answers": ["x"]}, {"qText": "same?", "answers": ["y"]}]))
    with pytest.raises(InputError) as err:
        load_webqa(path, 1)
    assert str(err.value) == "webqa: the question 'same?' occurs twice, and so would its uuid (md5)"


# ---------------------------------------------------------------- MyriadLAMA, as upstream builds it

def test_fill_template_and_as_list():
    assert fill_template("[X] is the capital of [Y].", "Paris") == "Paris is the capital of [MASK]."
    assert fill_template("[X] in [Y], [X]", "a", "b") == "a in b, a"
    assert as_list(None) == [] and as_list("x") == ["x"] and as_list([["a", "b"], "c", [["d"]]]) == ["a", "b", "c", "d"]


def test_is_manual_takes_true_or_false_only():
    assert is_manual(True, "w") is True and is_manual(False, "w") is False and is_manual(1, "w") is True
    with pytest.raises(InputError) as err:
        is_manual("yes", "row 3")
    assert str(err.value) == "row 3: 'is_manual' must be true or false, got 'yes'"


def row(uuid, template, manual, subject="S", aliases=("o",), ents=("e",)):
    return {"uuid": uuid, "sub_ent": subject, "template": template, "is_manual": manual, "obj_aliases": list(aliases),
            "obj_ents": list(ents)}


def test_group_facts_one_fact_per_uuid_sorted_with_templates_in_row_order():
    rows = [row("b", "[X] m1 [Y]", True, "Bob", ["x", "", "x", "y"]), row("a", "[X] a1 [Y]", False, "Ann"),
            row("b", "[X] a1 [Y]", False, "other"), row("b", "[X] m2 [Y]", True), row("a", "[X] m1 [Y]", True)]
    facts = group_facts(rows, "src")
    assert [f.uuid for f in facts] == ["a", "b"]
    b = facts[1]
    assert (b.subject, b.answers) == ("Bob", ["x", "y"])  # from its first row; aliases deduplicated, empty dropped
    assert b.manual == ["[X] m1 [Y]", "[X] m2 [Y]"] and b.auto == ["[X] a1 [Y]"]
    assert facts[0].subject == "Ann" and facts[0].manual == ["[X] m1 [Y]"] and facts[0].auto == ["[X] a1 [Y]"]


def test_group_facts_answers_are_the_aliases_else_the_entities():
    assert group_facts([row("a", "t", True, aliases=(), ents=("e1", "e2"))], "s")[0].answers == ["e1", "e2"]
    assert group_facts([{**row("a", "t", True), "obj_aliases": None}], "s")[0].answers == ["e"]
    no_answers = {k: v for k, v in row("a", "t", True).items() if k not in ("obj_aliases", "obj_ents")}
    assert group_facts([no_answers], "s")[0].answers == []


def test_group_facts_refuses_bad_rows():
    with pytest.raises(InputError) as err:
        group_facts([row("a", "t", True), {"uuid": "b", "template": "t"}], "file.jsonl")
    assert str(err.value) == "myriadlama file.jsonl row 2: missing fields ['sub_ent', 'is_manual']"
    with pytest.raises(InputError, match=r"^myriadlama f row 1: 'is_manual' must be true or false, got 'no'$"):
        group_facts([row("a", "t", "no")], "f")
    with pytest.raises(InputError, match=r"^myriadlama f row 1: 'uuid' must be"):
        group_facts([row(None, "t", True) | {"uuid": 1.5}], "f")


def test_auto_count_and_paraphrase_sets():
    assert auto_count("manual") == 0 and auto_count("manual+auto5") == 5 and auto_count("manual+auto15") == 15
    assert auto_count("all") is None
    for bad in ("auto5", "manual+auto", "manual+", "all+auto1", "Manual"):
        with pytest.raises(InputError) as err:
            auto_count(bad)
        assert str(err.value) == f"--paraphrases {bad!r}: choose manual, manual+autoK (e.g. manual+auto5) or all"
    assert resolve_paraphrase_set("myriadlama", None) == "manual+auto5"
    assert resolve_paraphrase_set("myriadlama", "manual") == "manual"
    assert resolve_paraphrase_set("jsonl", None) is None
    with pytest.raises(InputError) as err:
        resolve_paraphrase_set("webqa", "all")
    assert str(err.value) == "--paraphrases 'all': only --dataset myriadlama has template sets, not webqa"
    with pytest.raises(InputError):
        resolve_paraphrase_set("myriadlama", "bad")


FACT = Fact("uuid-7", "Rome", ["Italy", "Italia"], ["[X] is in [Y].", "[X], [Y]."],
            [f"auto {i}: [X] [Y]" for i in range(8)])


def test_fact_prompts_are_every_manual_template_then_upstreams_sample_of_auto_ones():
    random.seed("uuid-7")
    sampled = random.sample(FACT.auto, 3)  # upstream: random.seed(uuid); random.sample(auto, k)
    assert fact_prompts(FACT, 3) == ["Rome is in [MASK].", "Rome, [MASK]."] + [
        t.replace("[X]", "Rome").replace("[Y]", "[MASK]") for t in sampled]
    assert fact_prompts(FACT, 0) == ["Rome is in [MASK].", "Rome, [MASK]."]
    assert fact_prompts(FACT, None) == ["Rome is in [MASK].", "Rome, [MASK]."] + [
        f"auto {i}: Rome [MASK]" for i in range(8)]  # all: every one, in row order
    assert len(fact_prompts(FACT, 20)) == 2 + 8  # fewer auto templates than asked: all of them, sampled


def test_a_few_shot_fact_is_its_first_manual_prompt_and_first_alias():
    assert few_shot_example(FACT) == ("Rome is in [MASK].", "Italy")
    assert few_shot_example(Fact("u", "s", [], ["[X] [Y]"])) == ("s [MASK]", "")
    with pytest.raises(InputError) as err:
        few_shot_example(Fact("u9", "s", ["a"], [], ["[X] [Y]"]))
    assert str(err.value) == "myriadlama: few-shot fact u9 has no manual template"


def test_parity_gaps_say_why_a_copy_is_not_upstreams():
    facts = [Fact(str(i), "s", ["a"], ["m"], ["x"] * (i % 3)) for i in range(10)]
    assert parity_gaps(facts, 2) == ["10 facts are too few for upstream's 2000-fact test split",
                                     "7 facts have fewer than the 2 auto templates to sample"]
    assert parity_gaps(facts, 0) == ["10 facts are too few for upstream's 2000-fact test split"]
    assert parity_gaps(facts, None) == ["10 facts are too few for upstream's 2000-fact test split"]
    enough = [Fact(str(i), "s", ["a"], ["m"], ["x"] * 5) for i in range(2005)]
    assert parity_gaps(enough, 5) == [] and parity_gaps(enough[:2004], 5) != []


def myriadlama_file(tmp_path, facts: int = 8, autos: int = 6):
    rows = []
    for f in range(facts):
        uuid = f"fact-{(f * 11) % facts:02d}"  # written out of uuid order
        rows += [row(uuid, f"[X] manual{t} [Y] ({uuid})", True, f"subj{f}", [f"ans{f}", f"alias{f}"])
                 for t in range(2)]
        rows += [row(uuid, f"[Y] auto{t} [X] ({uuid})", False) for t in range(autos)]
    path = tmp_path / "myriadlama.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def subject_of(uuid: str, facts: int = 8) -> str:
    """fact f of myriadlama_file is uuid fact-(11f mod facts), subject subj<f>"""
    return f"subj{next(f for f in range(facts) if (f * 11) % facts == int(uuid[-2:]))}"


def upstream_split(num_facts: int, test_size: int):
    """upstream: Dataset.from_pandas(items).train_test_split(test_size, seed=42, shuffle=True) over the facts
    sorted by uuid (the permutation depends only on the number of rows)."""
    from datasets import Dataset as HFDataset
    split = HFDataset.from_dict({"i": list(range(num_facts))}).train_test_split(test_size=test_size, seed=42,
                                                                                shuffle=True)
    return split["train"]["i"], split["test"]["i"]


def test_load_myriadlama_as_upstream(tmp_path):
    data = load_myriadlama(myriadlama_file(tmp_path), "manual+auto2")
    uuids = [f"fact-{i:02d}" for i in range(8)]  # sorted
    train, test = upstream_split(8, 3)  # 8 facts, 5 kept out for the few-shot examples
    assert [r.uuid for r in data.records] == [uuids[i] for i in test]
    first = data.records[0]
    u = first.uuid
    random.seed(u)
    autos = random.sample([f"[Y] auto{t} [X] ({u})" for t in range(6)], 2)
    subject = subject_of(u)
    assert first.paraphrases == [f"{subject} manual0 [MASK] ({u})", f"{subject} manual1 [MASK] ({u})"] + [
        t.replace("[X]", subject).replace("[Y]", "[MASK]") for t in autos]
    assert first.num_manual == 2 and first.answers == [f"ans{subject[4:]}", f"alias{subject[4:]}"]
    random.seed(42)
    shots = [uuids[train[i]] for i in random.sample(range(len(train)), 5)]
    assert [q for q, _ in data.few_shot] == [f"{subject_of(s)} manual0 [MASK] ({s})" for s in shots]
    assert [a for _, a in data.few_shot] == [f"ans{subject_of(s)[4:]}" for s in shots]
    assert len(data.few_shot_paraphrases) == 5 and all(len(p) == 4 for p in data.few_shot_paraphrases)
    assert data.name == "myriadlama" and data.task == "mask"


def test_load_myriadlama_needs_more_facts_than_the_few_shot_examples(tmp_path):
    path = myriadlama_file(tmp_path, facts=5)
    with pytest.raises(InputError) as err:
        load_myriadlama(path)
    assert str(err.value) == f"myriadlama: {path} has only 5 facts; need more than 5"
    with pytest.raises(InputError) as err:
        load_myriadlama(myriadlama_file(tmp_path, facts=7), num_fewshot=7)
    assert str(err.value).endswith("has only 7 facts; need more than 7 (--num-fewshot 7)")
    assert len(load_myriadlama(myriadlama_file(tmp_path, facts=6), "manual").records) == 1
    assert load_myriadlama(myriadlama_file(tmp_path, facts=8), "manual", num_fewshot=2).few_shot.__len__() == 2
    # the split keeps max(K, 5) facts out of the test split: K = 2 gives the same test facts as K = 5
    assert [r.uuid for r in load_myriadlama(myriadlama_file(tmp_path), "manual", num_fewshot=2).records] == [
        r.uuid for r in load_myriadlama(myriadlama_file(tmp_path), "manual").records]


def test_load_myriadlama_warns_when_a_copy_cannot_be_upstreams(tmp_path, caplog):
    path = myriadlama_file(tmp_path, autos=1)
    load_myriadlama(path, "manual+auto2")
    assert f"myriadlama: {path} cannot give upstream's facts and prompts: 8 facts are too few for upstream's " \
           "2000-fact test split; 8 facts have fewer than the 2 auto templates to sample" in caplog.text


def test_check_masks_names_the_paraphrase_without_the_placeholder():
    good = Dataset("d", "mask", [Record("r", ["[MASK] a", "b [MASK]"], [])], [("[MASK]?", "x")], [["[MASK]?", "[MASK]!"]])
    check_masks(good)
    bad = Dataset("d", "mask", [Record("r", ["[MASK] a", "b"], [])])
    with pytest.raises(InputError) as err:
        check_masks(bad)
    assert str(err.value) == "d: question r: paraphrase 1 has no [MASK] placeholder (--task mask)"
    with pytest.raises(InputError) as err:
        check_masks(Dataset("d", "mask", [], [("[MASK]", "x"), ("no mask", "y")]))
    assert str(err.value) == "d: few-shot example 1: its question has no [MASK] placeholder (--task mask)"
    with pytest.raises(InputError) as err:
        check_masks(Dataset("d", "mask", [], [("[MASK]", "x")], [["[MASK]", "[MASK].", "nope"]]))
    assert str(err.value) == "d: few-shot example 0: paraphrase 2 has no [MASK] placeholder (--task mask)"
