"""Compiled FlexAttention compiles once per shape family, not once per shape: counted on CPU with a
dynamo backend that needs no C++ toolchain, over batches of different sizes and lengths with early
stops. Past torch's recompile limit (8) flex would silently run unfused, so the count is the contract.
Then the real compiler: inductor's CPU kernels at batch 1, every variant against sdpa (docs/compile.md)."""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import FEW_SHOT, cached_tiny
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, decode, fused_row, greedy
from fusion import FusionSettings
from segment_mask import SegmentMask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """inductor's compiled CPU flex kernels crashed (SIGSEGV) with 2 OpenMP threads on the 2-core Intel Xeon of
    2026-12-02 and passed with 1: the module runs them on one thread and gives the others back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def questions(start: int, count: int) -> list[Record]:
    """Questions of varied lengths (so every batch has other prompt lengths and padding)."""
    return [Record(f"q{i}", [f"question {i} " + "x" * (i * 7 % 23) + "?", f"what of {i}" + "y" * (i * 5 % 17) + "?",
                             f"and {i}?"], ["a"]) for i in range(start, start + count)]


def run(model, tokenizer, records: list[Record], sizes: list[int], backend: str, counter=None) -> list[list[int]]:
    ds = Dataset("t", "qa", records, FEW_SHOT)
    stop = StopRule(set(range(60, 75)), 6, first_line_only=False)  # some rows stop early, others run to 6
    outputs = []
    for size in sizes:
        batch, records = records[:size], records[size:]
        rows = [fused_row(tokenizer, ds.prompt_parts(r, 3)) for r in batch]
        settings = FusionSettings(backend=backend, compile=counter is not None)
        renderer = partial(SegmentMask, settings=settings, compile_backend=counter)
        outputs += decode(LanguageModel(model, tokenizer), rows, 1, greedy, stop, renderer)[0]
    return outputs


def test_compiled_flex_compiles_a_fixed_handful_of_graphs():
    torch._dynamo.reset()
    model, tokenizer = cached_tiny("llama")
    counter = CompileCounter()
    first = questions(0, 11)
    compiled = run(model, tokenizer, first, [4, 4, 2, 1], "flex", counter)
    # prefill and decode, each for batches > 1 and for the batch of 1 that dynamo specialises
    assert counter.frame_count <= 4
    warm = counter.frame_count
    later = questions(20, 9)
    compiled += run(model, tokenizer, later, [5, 3, 1], "flex", counter)
    assert counter.frame_count == warm  # no recompile after warm-up: new sizes and lengths reuse the graphs
    reference = run(model, tokenizer, first, [4, 4, 2, 1], "sdpa") + run(model, tokenizer, later, [5, 3, 1], "sdpa")
    assert compiled == reference
    assert any(len(t) < 6 for t in reference) and any(len(t) == 6 for t in reference)  # early stops happened


# ---------------------------------------------------------------- the real compiler: inductor on the CPU

from methods import decode_fused  # noqa: E402

SHORT = [Record(f"s{i}", [f"q{i} " + "x" * i + "?", f"w{i}?", f"the {i}" + "y" * (i % 3) + "?"], ["a"])
         for i in range(4)]  # short prompts (under one 128-token block), of changing lengths


class Recorder:
    """Greedy, keeping every step's logits."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits.clone())
        return logits[:, 0].argmax(-1)


def decode_one_by_one(settings: FusionSettings, records, fewshot=()) -> tuple[list, list]:
    """Each question alone (batch 1): its tokens and its steps' logits."""
    model, tokenizer = cached_tiny("llama")
    lm = LanguageModel(model, tokenizer)
    ds = Dataset("t", "qa", records, list(fewshot), [[q, q + " again"] for q, _ in fewshot])
    stop = StopRule(set(), 4, first_line_only=False)
    weights = {r.uuid: ([0.7, 0.2, 0.1], False) for r in records} if settings.bias == "confidence" else None
    tokens, logits = [], []
    for record in records:
        chooser = Recorder()
        tokens += decode_fused(lm, ds, [record], 3, stop, settings, weights, chooser)[1]
        logits.append(chooser.logits)
    return tokens, logits


def assert_same_as_sdpa(settings: FusionSettings, records=SHORT, fewshot=()) -> None:
    compiled, compiled_logits = decode_one_by_one(replace(settings, backend="flex", compile=True), records, fewshot)
    sdpa, sdpa_logits = decode_one_by_one(settings, records, fewshot)
    assert compiled == sdpa
    for a, b in zip(compiled_logits, sdpa_logits):
        assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= 1e-4


# Measured 2026-12-02 on an AMD EPYC without AVX-512: inductor's CPU flex kernels differ from sdpa by 0.2-2.5 in
# the logits (the commit of 2026-12-01 too, so not a change of the code); on the AVX-512 machine of 2026-12-01
# they matched within 1e-6. Not strict: which CPU feature matters is not established (docs/compile.md).
WRONG_ON_THIS_CPU = pytest.mark.xfail(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                                      strict=False,
                                      reason="inductor's CPU flex kernels give wrong logits without AVX-512 here")


@pytest.fixture(scope="module")
def inductor_graphs():
    """One warm-up for the compiled tests that share graphs (a score_mod: any bias or temperature); the count
    of graphs dynamo compiled, read before and after each test."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    assert_same_as_sdpa(FusionSettings(), SHORT[:2])
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


@pytest.mark.parametrize("settings", [
    FusionSettings(), FusionSettings(positions="right"), FusionSettings(positions="continuous"),
    FusionSettings(bias="-0.8"), FusionSettings(bias="confidence"), FusionSettings(temperature=0.7),
    FusionSettings(positions="right", temperature=0.7)], ids=lambda s: s.variant() or "default")
@WRONG_ON_THIS_CPU
def test_inductor_compiled_flex_equals_sdpa_and_compiles_nothing_new(inductor_graphs, settings):
    """Every variant with a score_mod runs the warmed-up graphs: tokens equal sdpa's, logits within 1e-4,
    over questions of changing lengths, and no graph is compiled after the warm-up."""
    before = inductor_graphs()
    assert_same_as_sdpa(settings)
    assert inductor_graphs() == before


@WRONG_ON_THIS_CPU
def test_inductor_compiled_flex_without_a_score_mod_and_the_fused_fewshot_format():
    """No bias (no score_mod: other graphs) and the few-shot examples as paraphrases (a longer prompt): equal
    to sdpa, in at most 7 graphs (the paraphrases' encoding, which has no score_mod, the answer cue's prefill and
    decode; past one 128-token block, its size-1 specialisation)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    assert_same_as_sdpa(FusionSettings(bias="none"), SHORT[:3])
    assert_same_as_sdpa(FusionSettings(fewshot="fused"), SHORT[:2], FEW_SHOT)
    print("graphs compiled:", counters["stats"]["unique_graphs"] - before)
    assert counters["stats"]["unique_graphs"] - before <= 7
    torch._dynamo.reset()


def test_past_the_recompile_limit_the_run_stops_in_one_line(tmp_path, monkeypatch, capsys):
    """With the limit at 1, the decode step's graph would be a recompile: the command stops in one line
    instead of running flex unfused."""
    import json
    import runpy
    import sys

    from constants import REPO_DIR
    torch._dynamo.reset()
    data = tmp_path / "d.jsonl"
    rows = [{"uuid": "t", "paraphrases": ["shot?"], "answers": ["a"], "split": "train"},
            {"uuid": "q", "paraphrases": ["a?", "b?", "c?"], "answers": ["a"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sys, "argv", ["flex_attention_generate.py", "--dataset", "jsonl", "--data-file", str(data),
                                      "--model", "tiny-llama", "--num_paraphrases", "3", "--attn", "flex", "--compile",
                                      "on", "--batch-size", "1", "--max-new-tokens", "3", "--no-progress",
                                      "--output-dir", str(tmp_path / "out")])
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_DIR / "flex_attention_generate.py"), run_name="__main__")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    torch._dynamo.reset()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "compiled FlexAttention failed" in err[0] and "--compile off" in err[0]
