"""Benchmark: what self-ensembling costs per question, method by method, on the same questions.

    python benchmarks/bench_ensemble.py                       # embedded model, bundled sample, N=5
    python benchmarks/bench_ensemble.py --quick --model tiny-llama   # CI smoke test (seconds)
    python benchmarks/bench_ensemble.py --profile attn_sdpa   # where one method's time goes

Methods, all greedy, all decoding exactly --max-new-tokens tokens (EOS ignored, no first-line stop):
  single_generate     (1) transformers `model.generate`, batch 1, the original question's prompt only
  upstream_nocache    (2) the upstream algorithm, written here as the reference: no KV cache, the whole
                          sequence re-run at every step, one forward per paraphrase per step, batch 1,
                          log-softmax averaged over the N paraphrases (methods.fuse_logits "avg")
  logit_avg           (3) ours, logit level: methods.answer_ensemble (N rows, batched, KV cache)
  attn_sdpa           (4) ours, attention level: methods.answer_fused with FusionSettings() (left positions,
                          the default sqrt bias), dense SDPA mask
  attn_flex               the same with FlexAttention, eager (unfused on CPU): FusionSettings(backend="flex")
  attn_flex_compiled      the same under torch.compile: FusionSettings(backend="flex", compile=True)
plus ours with the shared prefix encoded in every batch (…_noprefix: a LanguageModel with prefix_cache=None),
at batch size 8 (…_bs8) and at N = 1, 3, 10 (…_n1 …; --sweep-n takes any N, 50 and more included); N above
the number of stored paraphrases repeats them cyclically (said in the output).

Time: wall seconds per question, median (and min) over --repeats, methods interleaved round-robin
within each repeat so that load from other processes hits all of them alike; CPU seconds too.
Work: tokens run through the model (prefill, decode), decode steps, forward calls, counted by each
method and cross-checked by a forward hook on the model. Memory: peak RSS per method (Linux: the
VmHWM high-water mark reset before each run; elsewhere psutil sampling), CUDA max allocated on GPU.
Ratios: each attention-level case against (1), (2), (3) and, at the large batch, against logit avg there,
and its prefill tokens per question; the targets they are read against are in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import ctypes
import dataclasses
import datetime as dt
import gc
import io
import json
import os
import platform
import pstats
import shlex
import signal
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

import psutil  # noqa: E402
import torch  # noqa: E402

from constants import DATASETS, DEFAULT_DATASET, EMBEDDED_MODEL, EXIT_BAD_INPUT, InputError, first_line  # noqa: E402
from dataset import Dataset, Record, load_dataset_by_name  # noqa: E402
from decoding import DecodeStats, LanguageModel, StopRule, single_rows  # noqa: E402
from fusion import FusionSettings  # noqa: E402
from methods import answer_ensemble, answer_fused, fuse_logits  # noqa: E402

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
DEFAULT_OUTPUT = REPO_DIR / "benchmarks" / "results"
ATTENTION = {"attn_sdpa": FusionSettings(), "attn_flex": FusionSettings(backend="flex"),
             "attn_flex_compiled": FusionSettings(backend="flex", compile=True)}  # method -> what it decodes with
REFERENCES = ("single_generate", "upstream_nocache", "logit_avg")  # (1), (2), (3)


# ---------------------------------------------------------------- what is measured

@dataclasses.dataclass
class Case:
    name: str
    method: str       # single_generate, upstream_nocache, logit_avg, attn_sdpa, attn_flex, attn_flex_compiled
    n: int            # paraphrases per question
    batch_size: int   # questions per decode call
    group: str        # main (N and batch 1 for all), no-prefix-cache, batch, n-sweep
    reference: str | None = None  # a case whose tokens this one should reproduce (float noise aside)
    reuse_prefix: bool = True     # the shared prefix's KV from the run's prefix cache (False: every batch)


@dataclasses.dataclass
class Work:
    """What one pass over the questions ran through the model."""
    prefill_tokens: int = 0
    decode_tokens: int = 0
    steps: int = 0           # decode steps summed over decode calls (each call: new tokens - 1)
    decode_calls: int = 0    # generate/decode invocations (one per batch; per question for the baselines)
    forwards: int = 0        # model forward calls

    @classmethod
    def of(cls, stats: DecodeStats) -> "Work":
        """One decode call of ours: a prefill forward, then one forward per step."""
        return cls(stats.prefill_tokens, stats.decode_tokens, stats.steps, 1, 1 + stats.steps)

    def add(self, other: "Work") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass
class Result:
    case: Case
    status: str = "ok"
    wall: list[float] = dataclasses.field(default_factory=list)   # seconds per question, one per repeat
    cpu: list[float] = dataclasses.field(default_factory=list)
    warmup_s: float = 0.0
    work: Work | None = None
    hook_tokens: int = 0
    hook_forwards: int = 0
    peak_rss_mb: float = 0.0
    rss_delta_mb: float = 0.0
    cuda_peak_mb: float | None = None
    tokens: list[list[int]] | None = None  # the answers of the first timed pass
    agree: str = ""

    def add_repeat(self, wall: float, cpu: float, mem: "PeakMemory") -> None:
        """One timed pass: seconds per question and the memory it peaked at."""
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.peak_rss_mb = max(self.peak_rss_mb, mem.peak)
        self.rss_delta_mb = max(self.rss_delta_mb, mem.peak - mem.start)
        if mem.cuda_peak is not None:
            self.cuda_peak_mb = max(self.cuda_peak_mb or 0.0, mem.cuda_peak)


# ---------------------------------------------------------------- the methods

def cycled(record: Record, n: int) -> Record:
    """The record with exactly n paraphrases: its stored ones repeated cyclically (p1..pK, p1, ...)."""
    return dataclasses.replace(record, paraphrases=[record.paraphrases[i % len(record.paraphrases)] for i in range(n)])


class Bench:
    """The methods on one model and data set, each from a batch of questions to (tokens per question, work);
    a forward hook on the model counts what really ran through it."""

    def __init__(self, lm: LanguageModel, dataset: Dataset, stop: StopRule):
        self.lm, self.dataset, self.stop = lm, dataset, stop
        self.fresh = LanguageModel(lm.model, lm.tokenizer, prefix_cache=None)  # the prefix encoded in every batch
        self.datasets: dict[int, Dataset] = {}
        self.notes: list[str] = []
        self.forward_tokens = self.forward_calls = 0
        lm.model.register_forward_pre_hook(self.count_forward, with_kwargs=True)

    def count_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.forward_tokens += ids.numel()
            self.forward_calls += 1

    def dataset_for(self, n: int) -> Dataset:
        """The questions with (at least) n paraphrases: stored ones, repeated cyclically when too few."""
        if n not in self.datasets:
            records = self.dataset.records
            have = min(len(r.paraphrases) for r in records)
            if have < n:
                self.notes.append(f"N={n}: the data has {have} paraphrases per question (the original counts); "
                                  f"N={n} repeats them cyclically (p1..p{have}, p1, ...)")
                records = [cycled(r, n) for r in records]
            self.datasets[n] = dataclasses.replace(self.dataset, records=records)
        return self.datasets[n]

    def run_batch(self, case: Case, batch: list[Record]) -> tuple[list[list[int]], Work]:
        """One batch of questions -> (tokens per question, work)."""
        ds = self.dataset_for(case.n)
        if case.method == "single_generate":
            return self.single_generate(ds, batch)
        if case.method == "upstream_nocache":
            return self.upstream_nocache(ds, batch, case.n)
        lm = self.lm if case.reuse_prefix else self.fresh
        if case.method == "logit_avg":
            rows, stats = answer_ensemble(lm, ds, batch, case.n, self.stop, "avg")
        else:
            rows, stats = answer_fused(lm, ds, batch, case.n, self.stop, ATTENTION[case.method])
        return [r["token_ids"] for r in rows], Work.of(stats)

    @torch.inference_mode()
    def single_generate(self, ds: Dataset, batch: list[Record]) -> tuple[list[list[int]], Work]:
        model, tok = self.lm.model, self.lm.tokenizer
        outputs, work = [], Work()
        for record in batch:
            row = single_rows(tok, ds.prompt_parts(record, 1), [0])[0]
            ids = torch.tensor([row.input_ids], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.stop.max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            outputs.append(new)
            work.add(Work(ids.shape[1], len(new) - 1, len(new) - 1, 1, len(new)))
        return outputs, work

    @torch.inference_mode()
    def upstream_nocache(self, ds: Dataset, batch: list[Record], n: int) -> tuple[list[list[int]], Work]:
        """The reference: every step re-runs every paraphrase's whole sequence, one at a time, no cache."""
        outputs, work = [], Work()
        for record in batch:
            rows = single_rows(self.lm.tokenizer, ds.prompt_parts(record, n), list(range(n)))
            outputs.append(self.upstream_question([list(r.input_ids) for r in rows], work))
        return outputs, work

    def upstream_question(self, seqs: list[list[int]], work: Work) -> list[int]:
        """One question's N sequences decoded together, the log-softmax averaged at every step."""
        tokens: list[int] = []
        work.decode_calls += 1
        while True:
            logits = torch.stack([self.full_forward(seq, work, prefill=not tokens) for seq in seqs])
            tokens.append(int(fuse_logits(logits.float().unsqueeze(0), "avg")[0]))
            if self.stop.done(tokens, self.lm.tokenizer):
                return tokens
            for seq in seqs:
                seq.append(tokens[-1])
            work.steps += 1

    def full_forward(self, seq: list[int], work: Work, prefill: bool) -> torch.Tensor:
        """The whole sequence through the model, no cache: the next token's logits."""
        work.forwards += 1
        if prefill:
            work.prefill_tokens += len(seq)
        else:
            work.decode_tokens += len(seq)
        ids = torch.tensor([seq], device=self.lm.device)
        return self.lm.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]

    def run_pass(self, case: Case, num_questions: int) -> tuple[list[list[int]], Work]:
        """The first `num_questions` questions (with the case's N paraphrases), batch by batch."""
        records = self.dataset_for(case.n).records[:num_questions]
        assert all(len(r.paraphrases) >= case.n for r in records), f"{case.name}: fewer than N={case.n} paraphrases"
        outputs, work = [], Work()
        for start in range(0, len(records), case.batch_size):
            out, w = self.run_batch(case, records[start:start + case.batch_size])
            outputs += out
            work.add(w)
        return outputs, work


# ---------------------------------------------------------------- memory

def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def malloc_trim() -> None:
    """Give freed heap back to the OS so that one method's peak is not another's leftover (glibc only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def read_hwm_mb() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def reset_hwm() -> bool:
    """Linux: writing 5 to clear_refs resets the peak-RSS high-water mark (VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return read_hwm_mb() is not None
    except OSError:
        return False


class PeakMemory:
    """Peak RSS over a block (VmHWM if resettable, else psutil sampled every 5 ms) and CUDA max allocated."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stopped = threading.Event()
        self.sampler: threading.Thread | None = None

    def __enter__(self):
        gc.collect()
        malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = self.sampled = rss_mb()
        if not reset_hwm():
            self.sampler = threading.Thread(target=self.sample, daemon=True)
            self.sampler.start()
        return self

    def sample(self) -> None:
        while not self.stopped.wait(0.005):
            self.sampled = max(self.sampled, rss_mb())

    def __exit__(self, *exc):
        self.stopped.set()
        if self.sampler is not None:
            self.sampler.join()
        self.peak = max(self.sampled, rss_mb()) if self.sampler is not None else max(read_hwm_mb() or 0.0, rss_mb())
        self.cuda_peak = (torch.cuda.max_memory_allocated(self.device) / 2**20
                          if self.device.type == "cuda" else None)
        return False


# ---------------------------------------------------------------- the cases

def main_cases(n: int, compiled: bool) -> list[Case]:
    """N and batch 1 for every method."""
    cases = [Case("single_generate", "single_generate", 1, 1, "main"),
             Case("upstream_nocache", "upstream_nocache", n, 1, "main"),
             Case("logit_avg", "logit_avg", n, 1, "main", reference="upstream_nocache"),
             Case("attn_sdpa", "attn_sdpa", n, 1, "main"),
             Case("attn_flex", "attn_flex", n, 1, "main", reference="attn_sdpa")]
    if compiled:
        cases.append(Case("attn_flex_compiled", "attn_flex_compiled", n, 1, "main", reference="attn_sdpa"))
    return cases


def no_prefix_cases(n: int, batch: int) -> list[Case]:
    """Ours with the prefix encoded in every batch, as before the prefix cache: the same tokens as reused."""
    suffix = "" if batch == 1 else f"_bs{batch}"
    return [Case(f"{method}{suffix}_noprefix", method, n, batch, "no-prefix-cache", reference=method,
                 reuse_prefix=False) for method in ("logit_avg", "attn_sdpa")]


def batch_cases(n: int, batch: int, compiled: bool) -> list[Case]:
    methods = ["logit_avg", "attn_sdpa", "attn_flex"] + (["attn_flex_compiled"] if compiled else [])
    return [Case(f"{method}_bs{batch}", method, n, batch, "batch", reference=method) for method in methods]


def sweep_cases(n: int, sweep: list[int], batch: int = 1) -> list[Case]:
    """Ours at other N, at batch 1 or `batch` (N=1 at batch 1 must give single_generate's tokens)."""
    suffix = "" if batch == 1 else f"_bs{batch}"
    return [Case(f"{method}{suffix}_n{k}", method, k, batch, "n-sweep",
                 reference="single_generate" if k == 1 and batch == 1 else None)
            for k in sweep if k != n for method in ("logit_avg", "attn_sdpa")]


def select_cases(cases: list[Case], wanted: list[str] | None) -> list[Case]:
    if not wanted:
        return cases
    unknown = set(wanted) - {c.name for c in cases}
    if unknown:
        raise InputError(f"--cases: unknown {sorted(unknown)}; known: {', '.join(c.name for c in cases)}")
    return [c for c in cases if c.name in set(wanted)]


def build_cases(args) -> list[Case]:
    n, big, compiled = args.n, args.large_batch, not args.no_compile
    cases = main_cases(n, compiled) + no_prefix_cases(n, 1)
    if big != 1:
        cases += batch_cases(n, big, compiled) + no_prefix_cases(n, big)
    return select_cases(cases + sweep_cases(n, args.sweep_n, args.sweep_batch), args.cases)


# ---------------------------------------------------------------- running the cases

class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int | None):
    """Raise CompileTimeout after `seconds` (main thread, Unix); no limit when None or unsupported."""
    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise CompileTimeout(f"no result within {seconds} s (--compile-timeout)")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(bench: Bench, case: Case, results: dict[str, Result], compile_timeout: int | None) -> None:
    """The case's first batch, untimed; compiled flex compiles here, under a time limit."""
    res, compiled = results[case.name], case.method == "attn_flex_compiled"
    first = results.get("attn_flex_compiled")
    if compiled and case.batch_size != 1 and first is not None and first.status != "ok":
        res.status = "skipped: compiled flex failed at batch 1"
        return
    start = time.perf_counter()
    try:
        with time_limit(compile_timeout if compiled else None):
            bench.run_pass(case, case.batch_size)
            sync(bench.lm.device)
    except Exception as err:  # noqa: BLE001 - a failing method is reported, the others still run
        res.status = f"failed: {first_line(err)}"
        if compiled:
            torch.compiler.reset()
    res.warmup_s = time.perf_counter() - start


def time_pass(bench: Bench, res: Result, num_questions: int) -> str | None:
    """One timed pass over the questions into `res` (the first one's tokens and work kept); an error's line."""
    tokens0, calls0 = bench.forward_tokens, bench.forward_calls
    try:
        with PeakMemory(bench.lm.device) as mem:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            outputs, work = bench.run_pass(res.case, num_questions)
            sync(bench.lm.device)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    except Exception as err:  # noqa: BLE001
        return f"failed: {first_line(err)}"
    res.add_repeat(wall / num_questions, cpu / num_questions, mem)
    if res.work is None:
        res.work, res.tokens = work, outputs
        res.hook_tokens, res.hook_forwards = bench.forward_tokens - tokens0, bench.forward_calls - calls0
    return None


def time_repeat(bench: Bench, live: list[Case], results: dict[str, Result], repeat: int, args, log) -> None:
    """Repeat number `repeat`: every live case once, round-robin (upstream only for --upstream-repeats)."""
    num_questions = len(bench.dataset.records)
    for case in live:
        res = results[case.name]
        if res.status != "ok" or (case.method == "upstream_nocache" and repeat >= args.upstream_repeats):
            continue
        error = time_pass(bench, res, num_questions)
        if error:
            res.status = error
            log(f"  repeat {repeat + 1}: {case.name} {res.status}", flush=True)
    done = [c for c in live if len(results[c.name].wall) == repeat + 1]
    log(f"  repeat {repeat + 1}/{args.repeats} (s/question): "
        + ", ".join(f"{c.name} {results[c.name].wall[-1]:.3f}" for c in done), flush=True)


def check_result(res: Result, results: dict[str, Result]) -> None:
    """Its tokens against its reference case's, and its own token count against the forward hook's."""
    ref = results.get(res.case.reference or "")
    if res.tokens is not None and ref is not None and ref.tokens is not None:
        same = sum(a == b for a, b in zip(res.tokens, ref.tokens))
        res.agree = f"{same}/{len(res.tokens)} = {res.case.reference}"
    counted = res.work.prefill_tokens + res.work.decode_tokens if res.work is not None else None
    if counted is not None and res.hook_tokens != counted:
        res.status = f"count mismatch: model saw {res.hook_tokens} tokens, method counted {counted}"


def run_benchmark(bench: Bench, cases: list[Case], args, log=print) -> list[Result]:
    """A warm-up per case, then --repeats timed passes round-robin, then the checks."""
    results = {c.name: Result(c) for c in cases}
    for case in cases:
        warm_up(bench, case, results, args.compile_timeout)
        log(f"  warm-up {case.name:<24} {results[case.name].warmup_s:7.2f} s  {results[case.name].status}", flush=True)
    live = [c for c in cases if results[c.name].status == "ok"]
    for repeat in range(args.repeats):
        time_repeat(bench, live, results, repeat, args, log)
    for res in results.values():
        check_result(res, results)
    return list(results.values())


# ---------------------------------------------------------------- the table

COLUMNS = ["case", "method", "group", "N", "batch", "s_per_q", "s_per_q_min", "cpu_s_per_q", "x_vs_single",
           "speedup_vs_upstream", "speedup_vs_logit_avg", "prefill_tok_per_q", "decode_tok_per_q", "tok_per_q",
           "steps", "forwards_per_q", "peak_rss_mb", "rss_delta_mb", "cuda_peak_mb", "warmup_s", "repeats",
           "same_tokens_as", "status"]


def median_s(res: Result | None) -> float | None:
    return statistics.median(res.wall) if res is not None and res.wall else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def time_columns(r: Result, refs: dict[str, float | None]) -> dict:
    s = median_s(r)
    return dict(s_per_q=round(s, 4) if s is not None else None, s_per_q_min=round(min(r.wall), 4) if r.wall else None,
                cpu_s_per_q=round(statistics.median(r.cpu), 4) if r.cpu else None,
                x_vs_single=ratio(s, refs["single_generate"]), speedup_vs_upstream=ratio(refs["upstream_nocache"], s),
                speedup_vs_logit_avg=ratio(refs["logit_avg"], s))


def work_columns(w: Work | None, num_questions: int) -> dict:
    if w is None:
        return dict.fromkeys(("prefill_tok_per_q", "decode_tok_per_q", "tok_per_q", "steps", "forwards_per_q"))
    return dict(prefill_tok_per_q=round(w.prefill_tokens / num_questions, 1),
                decode_tok_per_q=round(w.decode_tokens / num_questions, 1),
                tok_per_q=round((w.prefill_tokens + w.decode_tokens) / num_questions, 1),
                steps=round(w.steps / w.decode_calls, 2) if w.decode_calls else None,
                forwards_per_q=round(w.forwards / num_questions, 2))


def table_row(r: Result, refs: dict[str, float | None], num_questions: int) -> dict:
    c = r.case
    return dict(case=c.name, method=c.method, group=c.group, N=c.n, batch=c.batch_size, **time_columns(r, refs),
                **work_columns(r.work, num_questions),
                peak_rss_mb=round(r.peak_rss_mb) if r.wall else None,
                rss_delta_mb=round(r.rss_delta_mb) if r.wall else None,
                cuda_peak_mb=round(r.cuda_peak_mb) if r.cuda_peak_mb is not None else None,
                warmup_s=round(r.warmup_s, 2), repeats=len(r.wall), same_tokens_as=r.agree, status=r.status)


def table_rows(results: list[Result], num_questions: int) -> list[dict]:
    by = {r.case.name: r for r in results}
    refs = {name: median_s(by.get(name)) for name in REFERENCES}
    return [table_row(r, refs, num_questions) for r in results]


SHORT = {"s_per_q": "s/q", "s_per_q_min": "min s/q", "cpu_s_per_q": "cpu s/q", "x_vs_single": "x(1)",
         "speedup_vs_upstream": "(2)/x", "speedup_vs_logit_avg": "(3)/x", "prefill_tok_per_q": "prefill/q",
         "decode_tok_per_q": "decode/q", "tok_per_q": "tok/q", "forwards_per_q": "fwd/q",
         "peak_rss_mb": "RSS MB", "rss_delta_mb": "dRSS MB", "cuda_peak_mb": "CUDA MB", "warmup_s": "warmup s",
         "same_tokens_as": "same tokens"}
TEXT_COLUMNS = ["case", "N", "batch", "s_per_q", "s_per_q_min", "cpu_s_per_q", "x_vs_single", "speedup_vs_upstream",
                "speedup_vs_logit_avg", "prefill_tok_per_q", "decode_tok_per_q", "steps", "forwards_per_q",
                "peak_rss_mb", "rss_delta_mb", "cuda_peak_mb", "same_tokens_as", "status"]
LEGEND = ("s/q: wall seconds per question, median over repeats (min s/q: the fastest repeat; cpu s/q: "
          "process CPU seconds); x(1): time / single_generate's; (2)/x and (3)/x: speed-up over "
          "upstream_nocache and logit_avg; prefill/q, decode/q: tokens run through the model per question "
          "(with the prefix reused, its tokens run once per run, in the warm-up, and are not in prefill/q) "
          "(padding included); steps: decode steps per decode call; fwd/q: model forward calls per question; "
          "RSS MB: peak RSS during the timed runs (dRSS: above the RSS at their start); same tokens: "
          "questions whose answer tokens equal the named case's")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def shown_columns(cuda: bool) -> list[str]:
    return [c for c in TEXT_COLUMNS if cuda or c != "cuda_peak_mb"]


def text_table(rows: list[dict], cuda: bool) -> str:
    cols = shown_columns(cuda)
    cells = [[SHORT.get(c, c) for c in cols]] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    left = (0, len(cols) - 1, len(cols) - 2)
    lines = ["  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[dict], cuda: bool) -> str:
    cols = shown_columns(cuda)
    out = ["| " + " | ".join(SHORT.get(c, c) for c in cols) + " |",
           "|" + "|".join("---" if c in ("case", "same_tokens_as", "status") else "---:" for c in cols) + "|"]
    out += ["| " + " | ".join(fmt(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- ratios (the targets are in the README)

def case_ratios(by: dict[str, dict], name: str, key: str, large_batch: int) -> str:
    """One attention-level case on `key` (median or min s/q) against (2), (3), (1) and the large batch."""
    s = by[name][key]
    parts = [f"{by['upstream_nocache'][key] / s:.1f}x faster than (2)", f"{by['logit_avg'][key] / s:.2f}x faster "
             f"than (3)", f"{s / by['single_generate'][key]:.2f}x the time of (1)"]
    big, big_avg = by.get(f"{name}_bs{large_batch}"), by.get(f"logit_avg_bs{large_batch}")
    if big and big_avg and big[key] and big_avg[key]:
        parts.append(f"batch {large_batch}: {big_avg[key] / big[key]:.2f}x faster than logit_avg_bs{large_batch}")
    return f"{name} [{'median' if key == 's_per_q' else 'min'}]: " + "; ".join(parts)


def ratio_lines(rows: list[dict], large_batch: int) -> list[str]:
    """What benchmarks/README.md's targets are read against: each attention-level case's ratios on median
    and min s/q, and its prefill tokens per question. No verdict here: the targets live in the README."""
    by = {r["case"]: r for r in rows}
    if not all(by.get(k) and by[k]["s_per_q"] for k in REFERENCES):
        return ["ratios: not computed (single_generate, upstream_nocache and logit_avg must all run)"]
    lines = []
    for name in ATTENTION:
        r = by.get(name)
        if r and not r["s_per_q"]:
            lines.append(f"{name}: not measured ({r['status']})")
        elif r:
            lines += [case_ratios(by, name, key, large_batch) for key in ("s_per_q", "s_per_q_min")]
            if r.get("prefill_tok_per_q") is not None:
                lines.append(f"{name}: {r['prefill_tok_per_q']:.0f} prefill tokens per question "
                             f"(prefix counted once per run)")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}"


# ---------------------------------------------------------------- profiling one method

# the cumulative view without the generic call stack (module wrappers, decoder layers)
PROFILED = (r"flex_attention|mask|sdpa|attention_forward|_attention|prefill|decode|fuse|choose|done|render|generate"
            r"|run_batch")


def torch_ops(bench: Bench, case: Case, num_questions: int, top: int) -> str:
    """torch.profiler's top ops by self time over one pass."""
    from torch.profiler import ProfilerActivity, profile
    cuda = bench.lm.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        bench.run_pass(case, num_questions)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=top)


def listing(profiler: cProfile.Profile, sort: str, top: int, *restrict) -> str:
    """cProfile's table sorted by `sort`, its header line and the rows only."""
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats(sort).print_stats(*restrict, top)
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join([lines[0].strip()] + lines[start:])


def profile_case(bench: Bench, case: Case, num_questions: int, out_dir: Path, top: int) -> str:
    bench.run_pass(case, case.batch_size)  # warm up
    ops = torch_ops(bench, case, num_questions, top)
    profiler = cProfile.Profile()
    profiler.enable()
    bench.run_pass(case, num_questions)
    profiler.disable()
    text = (f"profile of {case.name} (N={case.n}, batch {case.batch_size}) over {num_questions} questions\n\n"
            f"torch.profiler, top {top} ops by self time:\n{ops}\n\n"
            f"cProfile, top {top} functions by own time:\n{listing(profiler, 'tottime', top)}\n\n"
            f"cProfile, attention/mask/decoding functions by cumulative time:\n"
            f"{listing(profiler, 'cumulative', top, PROFILED)}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_{case.name}.txt").write_text(text)
    return text


# ---------------------------------------------------------------- flags

def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """What is run: model, data, N, batch sizes, tokens."""
    p.add_argument("--model", default=None, help=f"model key/folder/HF id (default {EMBEDDED_MODEL}; "
                   f"tiny-llama etc. for smoke tests)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=DATASETS)
    p.add_argument("--data-file", help="a JSONL for --dataset jsonl (or a replacement for the bundled sample)")
    p.add_argument("--questions", type=int, default=None, help="questions to answer (default 12; --quick 3)")
    p.add_argument("--n", type=int, default=5, help="paraphrases per question for the main comparison (default 5)")
    p.add_argument("--sweep-n", default="1,3,5,10", help="N values for ours (default 1,3,5,10; '' for none; any N, "
                   "e.g. 50: above the stored paraphrases they repeat cyclically)")
    p.add_argument("--sweep-batch", type=int, default=1, help="the batch size of the N sweep (default 1)")
    p.add_argument("--large-batch", type=int, default=8, help="the larger batch size for ours (default 8; 1: none)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="every method decodes exactly this many tokens")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-compile", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--cases", help="comma-separated case names to run (default: all)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """How it is timed, profiled and written."""
    p.add_argument("--repeats", type=int, default=None, help="timed passes per method (default 3; --quick 1)")
    p.add_argument("--upstream-repeats", type=int, help="timed passes of upstream_nocache, the slowest by far "
                   "(default: --repeats)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile-timeout", type=int, default=300, help="seconds allowed for compiled flex's warm-up")
    p.add_argument("--profile", metavar="CASE", help="profile one case (torch.profiler + cProfile) instead of the benchmark")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="smoke test: 3 questions, 1 repeat, N sweep 1,10, compile timeout 120 s")
    p.add_argument("--output-dir", default=str(DEFAULT_OUTPUT), help="where the CSV/Markdown/JSON go "
                   "(default benchmarks/results/)")


def apply_defaults(args) -> None:
    """The defaults that depend on --quick."""
    args.questions = args.questions or (3 if args.quick else 12)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.upstream_repeats = min(args.upstream_repeats or args.repeats, args.repeats)
    if args.quick and args.sweep_n == "1,3,5,10":
        args.sweep_n = "1,10"
    if args.quick and args.compile_timeout == 300:
        args.compile_timeout = 120
    args.model = args.model or EMBEDDED_MODEL


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_workload_flags(p)
    add_run_flags(p)
    args = p.parse_args(argv)
    apply_defaults(args)
    try:
        args.sweep_n = [int(k) for k in args.sweep_n.split(",") if k.strip()]
    except ValueError:
        raise InputError(f"--sweep-n {args.sweep_n!r}: expected comma-separated integers") from None
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    if min([args.questions, args.repeats, args.n, args.large_batch, args.sweep_batch, args.max_new_tokens,
            *args.sweep_n]) < 1:
        raise InputError("--questions, --repeats, --n, --sweep-n, --large-batch, --sweep-batch and --max-new-tokens "
                         "must be >= 1")
    return args


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv), argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def load_bench(args, cases: list[Case]) -> Bench:
    """The model (with its prefix cache), the questions, and every N the cases need, cycled where short."""
    from models import load_model
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    dataset = load_dataset_by_name(args.dataset, args.data_file, None, num_paraphrases=1, limit=args.questions)
    stop = StopRule(set(), args.max_new_tokens, first_line_only=False)
    bench = Bench(LanguageModel(model, tokenizer), dataset, stop)
    for k in sorted({c.n for c in cases}):
        bench.dataset_for(k)
    return bench


def header_lines(args, argv: list[str] | None, bench: Bench) -> list[str]:
    model = bench.lm.model
    command = "python benchmarks/bench_ensemble.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return [
        f"bench_ensemble: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"command: {command.strip()}",
        f"machine: {machine()}, device {model.device}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, python {platform.python_version()}",
        f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.dtype}); "
        f"data: {bench.dataset.name}, {len(bench.dataset.records)} questions, N={args.n}",
        f"stop rule: every method decodes exactly {args.max_new_tokens} new tokens "
        f"(StopRule(eos_ids=set(), max_new_tokens={args.max_new_tokens}, first_line_only=False); "
        f"model.generate(eos_token_id=None)), greedy",
        *bench.notes,
    ]


def write_outputs(out_dir: Path, header: list[str], rows: list[dict], ratios: list[str], n: int, cuda: bool) -> None:
    """bench_ensemble.csv (every column), .md (header, table, legend, ratios) and .json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench_ensemble.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "bench_ensemble.md").write_text(
        "\n".join(f"- {h}" for h in header) + "\n\n" + markdown_table(rows, cuda) + "\n\n" + LEGEND + "\n\n"
        + f"Ratios (CPU, N={n}, batch 1; the targets are in benchmarks/README.md):\n\n"
        + "\n".join(f"- {t}" for t in ratios) + "\n")
    (out_dir / "bench_ensemble.json").write_text(json.dumps(dict(header=header, rows=rows, ratios=ratios), indent=1))
    print(f"written: {out_dir / 'bench_ensemble.csv'}, .md, .json")


def run(args, argv) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = build_cases(args)
    if args.profile and args.profile not in {c.name for c in cases}:
        raise InputError(f"--profile {args.profile!r}: not a case; known: {', '.join(c.name for c in cases)}")
    bench = load_bench(args, cases)
    header = header_lines(args, argv, bench)
    print("\n".join(header), flush=True)
    num_questions, out_dir = len(bench.dataset.records), Path(args.output_dir)
    if args.profile:
        print(profile_case(bench, next(c for c in cases if c.name == args.profile), num_questions, out_dir,
                           args.profile_top))
        return 0
    print(f"timing {len(cases)} cases x {args.repeats} repeats (round-robin; upstream_nocache {args.upstream_repeats}), "
          f"after one warm-up each:", flush=True)
    rows = table_rows(run_benchmark(bench, cases, args), num_questions)
    ratios, cuda = ratio_lines(rows, args.large_batch), bench.lm.device.type == "cuda"
    header += [note for note in bench.notes if note not in header]
    print("\n" + text_table(rows, cuda) + "\n\n" + LEGEND + f"\n\nratios (CPU, N={args.n}, batch 1; the targets "
          f"are in benchmarks/README.md):\n  " + "\n  ".join(ratios))
    write_outputs(out_dir, header, rows, ratios, args.n, cuda)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
