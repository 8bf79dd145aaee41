"""--prompt-format chat: the tokenizer's chat template writes the prompt (instruction as the system turn,
few-shot examples as turns, the question as the last user turn, the assistant header as the fused
suffix), and the invariants hold there too: plain prompts are exactly the template's text, N=1 is plain
greedy decoding, paraphrases are isolated, identical copies equal one prompt."""
from __future__ import annotations

import copy

import pytest

from conftest import FEW_SHOT, QUESTIONS, cached_tiny, generate_reference
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, fused_row, single_rows
from fusion import FusionSettings
from inspect_fusion import isolation_diffs
from methods import answer_fused

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_STOP = StopRule(set(), 5, first_line_only=False)


def chat_model(family: str = "llama"):
    model, tokenizer = cached_tiny(family)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHATML
    return model, tokenizer


def chat_dataset(tokenizer, records=None, shots=FEW_SHOT, shot_paraphrases=None) -> Dataset:
    records = records or [Record(r.uuid, list(r.paraphrases), list(r.answers)) for r in QUESTIONS]
    return Dataset("t", "qa", records, shots, shot_paraphrases or [[q, q + " (again)"] for q, _ in shots],
                   chat=tokenizer)


@pytest.mark.parametrize("fewshot", ["single", "fused"])
def test_plain_prompts_are_the_chat_templates_text(fewshot):
    _, tokenizer = chat_model()
    ds = chat_dataset(tokenizer)
    record = ds.records[0]
    parts = ds.prompt_parts(record, 3, fewshot)
    for i, row in enumerate(single_rows(tokenizer, parts, [0, 1, 2])):
        shown = [q if fewshot == "single" else ds.few_shot_paraphrases[k][i % 2] for k, (q, _) in enumerate(FEW_SHOT)]
        messages = [{"role": "system", "content": parts.full(i).split("\n", 1)[1].split("<|im_end|>")[0]}]
        for q, (_, a) in zip(shown, FEW_SHOT):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": record.paraphrases[i]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert parts.full(i) == text
        assert row.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert parts.suffix == "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chat_one_paraphrase_is_greedy_and_paraphrases_are_isolated(family):
    model, tokenizer = chat_model(family)
    ds = chat_dataset(tokenizer)
    record = ds.records[1]
    out = answer_fused(LanguageModel(model, tokenizer), ds, [record], 1, NO_STOP)[0][0]
    plain = single_rows(tokenizer, ds.prompt_parts(record, 1), [0])[0]
    assert out["token_ids"] == generate_reference(model, tokenizer, plain.input_ids, 5)
    diffs = isolation_diffs(model, fused_row(tokenizer, ds.prompt_parts(record, 3)), FusionSettings())
    assert len(diffs) == 4 and max(d.rel for layers in diffs.values() for d in layers) <= 1e-5


def test_chat_identical_copies_equal_the_single_prompt():
    model, tokenizer = chat_model("qwen2")
    ds = chat_dataset(tokenizer, [Record("c", ["who painted the mona lisa?"] * 3, ["Leonardo"])])
    alone = answer_fused(LanguageModel(model, tokenizer), ds, ds.records, 1, NO_STOP)[0][0]
    fused = answer_fused(LanguageModel(model, tokenizer), ds, ds.records, 3, NO_STOP, FusionSettings(bias="uniform"))[0][0]
    assert fused["token_ids"] == alone["token_ids"]


@pytest.mark.embedded
def test_cli_chat_format_on_the_embedded_model_and_refused_without_a_template(tmp_path):
    import pandas as pd

    from conftest import run_main
    base = ["flex_attention_generate.py", "--limit", "2", "--max-new-tokens", "3", "--no-progress",
            "--prompt-format", "chat", "--output-dir", str(tmp_path)]
    proc = run_main(*base, "--num_paraphrases", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_feather(next(tmp_path.glob("flex_attention-3*.feather")))
    assert len(table) == 2 and all(p[0].startswith("<|im_start|>system") for p in table["prompts"])
    refused = run_main(*base, "--model", "tiny-llama", "--output-dir", str(tmp_path / "tiny"))
    assert refused.returncode == 2 and "no chat template" in refused.stderr and refused.stderr.count("\n") == 1
