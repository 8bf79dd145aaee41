"""The CUDA path (`make gpu-check` runs `pytest -m cuda tests/test_cuda.py`): compiled FlexAttention against
SDPA, N=1 against transformers' greedy `generate`, K/V isolation and the compile count, on the tiny Llama,
Qwen2 and Qwen3 models (float32, as tiny_model builds them) and on a model with Llama-3.2-3B's shapes and
random weights in bfloat16. Without a GPU these skip; what runs everywhere: the CPU dry run of
benchmarks/gpu_check.py, and a check that the graph counter used on the GPU counts what dynamo compiles.

Comparisons in bfloat16 are teacher-forced: both sides decode the reference's tokens, so every step's
logits are compared on the same prefix; free-running greedy tokens must agree except where the
reference's top two logits are closer than the two sides' logits differ (a near-tie that rounding decides)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import FEW_SHOT, QUESTIONS, run_main
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, decode, fused_row, greedy, pad_left, prefill
from fusion import FusionSettings
from inspect_fusion import isolation_diffs, layer_diff, plain_prefill, segments_of, take, tolerance
from models import shaped_model, tiny_model
from segment_mask import FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT, SegmentMask, segment_biases

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 8
MODELS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "llama3.2_3b"]
# relative tolerance on logits (max |a - b| / max |b|): two attention kernels, float32 or bf16 through the stack
LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
LEAK = 0.1  # a paraphrase seeing another moves its K/V by tens of percent; rounding by far less


def cuda_model(name: str) -> LanguageModel:
    """The model on the GPU, with its tokenizer and prefix cache: a tiny model as tiny_model builds it, or
    the 3B shape in bf16."""
    if name.startswith("tiny-"):
        model, tokenizer = tiny_model(name.removeprefix("tiny-"))
        return LanguageModel(model.to("cuda"), tokenizer)
    return LanguageModel(*shaped_model(name, torch.bfloat16, "cuda"))


cached_model = functools.lru_cache(maxsize=None)(cuda_model)


def dataset() -> Dataset:
    return Dataset("t", "qa", [Record(r.uuid, list(r.paraphrases), list(r.answers)) for r in QUESTIONS], FEW_SHOT)


def uniform(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """The uniform fusion bias (-log N per paraphrase): every compiled call has the same score_mod, so the
    tests share graphs (one per prefill/decode and batch of 1 or more) instead of compiling each variant."""
    return torch.tensor([segment_biases(n, "uniform")] * batch, device=device)


def fixed_length(max_new: int = MAX_NEW) -> StopRule:
    return StopRule(set(), max_new, first_line_only=False)


def renderer(model, biases: torch.Tensor, backend: str, compile_backend="inductor"):
    """decode()'s renderer: SegmentMask with the given bias, on `backend` (flex compiled)."""
    settings = FusionSettings(backend=backend, compile=backend == "flex")
    return functools.partial(SegmentMask, settings=settings, biases=biases, dtype=model.dtype,
                             compile_backend=compile_backend)


class Recorder:
    """A decode() chooser that keeps each step's logits [Q, V] and either picks greedily or plays back `tokens`."""

    def __init__(self, tokens: list[list[int]] | None = None):
        self.tokens, self.logits = tokens, []

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits[:, 0].float().cpu())
        if self.tokens is None:
            return greedy(logits, live)
        step = len(self.logits) - 1
        return torch.tensor([self.tokens[q][step] for q in live.tolist()], device=logits.device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check_greedy(ref_tokens, ref_logits, got_tokens, forced_logits, tol: float, what: str) -> None:
    """Teacher-forced logits within tol at every step; free-running tokens equal up to a near-tie."""
    for step, (ref, got) in enumerate(zip(ref_logits, forced_logits)):
        assert relative(got, ref) <= tol, f"{what}: step {step} logits differ by {relative(got, ref):.1e} > {tol:.0e}"
    for q, (ref, got) in enumerate(zip(ref_tokens, got_tokens)):
        if ref == got:
            continue
        step = next(i for i, (a, b) in enumerate(zip(ref, got)) if a != b)
        top2 = ref_logits[step][q].topk(2).values
        diff = (forced_logits[step][q] - ref_logits[step][q]).abs().max()
        assert top2[0] - top2[1] <= 2 * diff, (f"{what}: question {q} diverges at step {step} without a near-tie "
                                               f"(gap {top2[0] - top2[1]:.3g}, logits differ by {diff:.3g})")


def graphs() -> int:
    """Graphs compiled by dynamo in this process so far (each compile and recompile counts one)."""
    return int(counters["stats"]["unique_graphs"])


def questions(start: int, count: int) -> list[Record]:
    """Questions of varied lengths, so every batch has other prompt lengths and padding."""
    return [Record(f"q{i}", [f"question {i} " + "x" * (i * 7 % 23) + "?", f"what of {i}" + "y" * (i * 5 % 17) + "?",
                             f"and {i}?"], ["a"]) for i in range(start, start + count)]


STOP_ID = 2  # </s> of the tiny tokenizers


class EarlyStops:
    """A decode() chooser: greedy, except that question q of a batch emits STOP_ID as its token number
    2 (q % 3 == 0) or 4 (q % 3 == 1); the others run to max_new_tokens. Early stops whatever the model."""

    def __init__(self):
        self.step = 0

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        self.step += 1
        tokens = greedy(logits, live)
        stops = ((live % 3 == 0) & (self.step == 2)) | ((live % 3 == 1) & (self.step == 4))
        return torch.where(stops, torch.full_like(tokens, STOP_ID), tokens)


def run_batches(lm: LanguageModel, records: list[Record], sizes: list[int], backend: str, max_new: int = 6,
                compile_backend="inductor") -> list[list[int]]:
    """Batches of the given sizes through the fused decode loop (N=3, the uniform bias: one score_mod for every bias),
    with early stops."""
    ds = Dataset("t", "qa", records, FEW_SHOT)
    stop = StopRule({STOP_ID}, max_new, first_line_only=False)
    outputs = []
    for size in sizes:
        batch, records = records[:size], records[size:]
        rows = [fused_row(lm.tokenizer, ds.prompt_parts(r, 3)) for r in batch]
        mask = renderer(lm.model, uniform(len(batch), 3, lm.device), backend, compile_backend)
        outputs += decode(lm, rows, 1, EarlyStops(), stop, mask)[0]
    return outputs


# ---------------------------------------------------------------- everywhere

def test_graph_counter_counts_what_dynamo_compiles():
    """The GPU tests count compiles with dynamo's own counter (any backend, inductor included); on CPU it
    must agree with a CompileCounter backend over a batch of 2 and a batch of 1."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    lm = LanguageModel(*tiny_model("llama"))
    counter = CompileCounter()
    before = graphs()
    outputs = run_batches(lm, questions(0, 3), [2, 1], "flex", 3, counter)
    assert graphs() - before == counter.frame_count > 0
    assert [len(t) for t in outputs] == [2, 3, 2]  # question 0 of each batch stops at its 2nd token


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py --dry-run: every method at batch 1 and 2 on CPU, rows ok, flex == sdpa tokens."""
    out = tmp_path / "gpu_check.json"
    proc = run_main(str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--output", str(out))  # in this process
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["method"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in ("generate", "logit_avg", "attn_sdpa", "attn_flex") for b in (1, 2)}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row)
        assert row["s_per_q"] > 0 and row["tok_per_s"] > 0 and row["x_vs_logit_avg"] > 0 and row["x_vs_generate"] > 0
    for b in (1, 2):
        equal, total = rows[("attn_flex", b)]["same_tokens_as_sdpa"]
        assert equal == total == rows[("attn_sdpa", b)]["questions"] > 0
        # attention level runs the shared prefix once: fewer prompt tokens than N separate prompts
        assert rows[("attn_sdpa", b)]["prefill_tok_per_q"] < rows[("logit_avg", b)]["prefill_tok_per_q"]
    readings = {t["name"]: t["value"] for t in result["readings"]}  # the targets are in benchmarks/README.md
    assert readings["graphs compiled after warm-up"] is None  # eager flex: no inductor graphs to count
    assert readings["attn_sdpa throughput logit_avg ratio at batch 2"] == rows[("attn_sdpa", 2)]["x_vs_logit_avg"]
    assert all(set(t) == {"name", "value"} for t in result["readings"])  # readings only, no verdict
    assert "s/question" in proc.stdout and str(out) in proc.stdout


# ---------------------------------------------------------------- on a CUDA GPU

LAST_FAMILY: list[str] = []


@pytest.fixture(scope="module", params=MODELS)
def name(request) -> str:
    """The model under test. Module scope groups the tests by model; dynamo's caches are cleared when the
    attention shapes change (tiny float32 -> 3B bf16), so that this process, which compiles flex for two
    shape families, stays far from dynamo's recompile limit (8 graphs per function), past which flex would
    silently run eager."""
    family = "tiny" if request.param.startswith("tiny-") else request.param
    if LAST_FAMILY and LAST_FAMILY[-1] != family:
        torch._dynamo.reset()
    LAST_FAMILY.append(family)
    return request.param


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
class TestCuda:
    def test_compiled_flex_matches_sdpa(self, name):
        """Prefill logits of a padded batch of 3 questions (N=3, uniform bias) within tolerance; decoding:
        greedy tokens equal up to a near-tie and every step's logits within tolerance, teacher-forced."""
        lm = cached_model(name)
        model, ds = lm.model, dataset()
        rows = [fused_row(lm.tokenizer, ds.prompt_parts(r, 3)) for r in ds.records]
        biases = uniform(3, 3, model.device)
        tol = LOGIT_TOL[model.dtype]
        ids, pos, seg = pad_left(rows, lm.tokenizer.pad_token_id, model.device)
        prefill_logits = {}
        for backend in ("sdpa", "flex"):
            mask = renderer(model, biases, backend)(seg, MAX_NEW)
            with mask.attention(model):
                prefill_logits[backend] = prefill(model, ids, pos, mask.prefill(), logits_to_keep=0)[0]
        real = seg != PAD_SEGMENT
        assert relative(prefill_logits["flex"][real], prefill_logits["sdpa"][real]) <= tol
        ref = Recorder()
        ref_tokens, _ = decode(lm, rows, 1, ref, fixed_length(), renderer(model, biases, "sdpa"))
        free = decode(lm, rows, 1, greedy, fixed_length(), renderer(model, biases, "flex"))[0]
        forced = Recorder(ref_tokens)
        decode(lm, rows, 1, forced, fixed_length(), renderer(model, biases, "flex"))
        check_greedy(ref_tokens, ref.logits, free, forced.logits, tol, f"{name} flex vs sdpa")
        if model.dtype == torch.float32:
            assert free == ref_tokens
        assert model.config._attn_implementation == "sdpa"  # flex was scoped to its own decode

    def test_one_paraphrase_equals_generate(self, name):
        """N=1 attention level with compiled flex against transformers' greedy `generate` of the same prompt."""
        lm = cached_model(name)
        model, tokenizer, ds = lm.model, lm.tokenizer, dataset()
        rows = [fused_row(tokenizer, ds.prompt_parts(ds.records[0], 1))]
        ids = torch.tensor([rows[0].input_ids], device=model.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                                 return_dict_in_generate=True)
        ref_tokens = [out.sequences[0, ids.shape[1]:].tolist()]
        assert len(ref_tokens[0]) == MAX_NEW
        ref_logits = [step.float().cpu() for step in out.logits]
        mask = renderer(model, uniform(1, 1, model.device), "flex")
        free = decode(lm, rows, 1, greedy, fixed_length(), mask)[0]
        forced = Recorder(ref_tokens)
        decode(lm, rows, 1, forced, fixed_length(), mask)
        check_greedy(ref_tokens, ref_logits, free, forced.logits, LOGIT_TOL[model.dtype], f"{name} N=1 vs generate")
        if model.dtype == torch.float32:
            assert free == ref_tokens

    @pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
    def test_each_paraphrase_is_encoded_as_if_alone(self, name, compiled):
        """Each paraphrase's K/V after the fused prefill through flex against prefix + that paraphrase run alone
        (plain causal SDPA). The prefix, the same computation in both runs, gives the rounding floor."""
        lm = cached_model(name)
        model, ds = lm.model, dataset()
        row = fused_row(lm.tokenizer, ds.prompt_parts(ds.records[1], 3))
        if compiled:
            diffs = compiled_isolation_diffs(model, row)
        else:
            diffs = isolation_diffs(model, row, FusionSettings(backend="flex"))
        floor = max(d.rel for d in diffs["prefix"])
        limit = min(max(tolerance(model.dtype), 4 * floor), LEAK)
        worst = {seg: max(d.rel for d in layers) for seg, layers in diffs.items() if seg != "prefix"}
        assert len(worst) == 3 and max(worst.values()) <= limit, (worst, floor)

    def test_compiled_flex_compiles_a_fixed_handful_of_graphs(self, name):
        """Inductor on the GPU: batches of 4, 4, 2, 1 with early stops compile at most 4 graphs (prefill and
        decode, for batches > 1 and for the batch of 1 that dynamo specialises); batches of 5, 3, 1 of other
        lengths afterwards compile none. Run last for each model: it clears dynamo's caches."""
        if name in ("tiny-qwen2", "tiny-qwen3"):
            pytest.skip("the same attention shapes as tiny-llama, counted there")
        lm = cached_model(name)
        first, later = questions(0, 11), questions(20, 9)
        torch._dynamo.reset()
        before = graphs()
        compiled = run_batches(lm, first, [4, 4, 2, 1], "flex")
        warm = graphs() - before
        assert 0 < warm <= 4
        compiled += run_batches(lm, later, [5, 3, 1], "flex")
        assert graphs() - before == warm, "recompiled after warm-up"
        assert {len(t) for t in compiled} == {2, 4, 6}  # early stops happened
        if lm.model.dtype == torch.float32:
            reference = run_batches(lm, first, [4, 4, 2, 1], "sdpa")
            assert compiled[:len(first)] == reference


def compiled_isolation_diffs(model, row) -> dict:
    """inspect_fusion.isolation_diffs with the fused prefill through compiled flex (the CUDA default)."""
    ids, pos, seg = pad_left([row], 0, model.device)
    mask = renderer(model, uniform(1, 3, model.device), "flex")(seg, 0)
    with mask.attention(model):
        fused = prefill(model, ids, pos, mask.prefill())[1]
    prefix = [i for i, s in enumerate(row.segment_ids) if s == PREFIX_SEGMENT]
    out = {}
    for part in segments_of(row.segment_ids):
        if part.segment_id in (PREFIX_SEGMENT, FUSED_SEGMENT, PAD_SEGMENT):
            continue
        alone = plain_prefill(model, take(row, prefix + list(range(part.start, part.end))))
        out.setdefault("prefix", [layer_diff(f, a, slice(0, len(prefix)), slice(0, len(prefix)))
                                  for f, a in zip(fused.layers, alone.layers)])
        out[part.name] = [layer_diff(f, a, slice(part.start, part.end), slice(len(prefix), None))
                          for f, a in zip(fused.layers, alone.layers)]
    return out
