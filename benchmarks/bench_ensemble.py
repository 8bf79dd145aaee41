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
  attn_sdpa           (4) ours, attention level: methods.answer_fused, dense SDPA mask
  attn_flex               the same with FlexAttention, eager (unfused on CPU)
  attn_flex_compiled      the same with FlexAttention under torch.compile (SegmentMask(compile=True))
plus ours at batch size 8 (…_bs8) and ours at N = 1, 3, 10 (…_n1 …); N above the number of stored
paraphrases repeats them cyclically (said in the output).

Time: wall seconds per question, median (and min) over --repeats, methods interleaved round-robin
within each repeat so that load from other processes hits all of them alike; CPU seconds too.
Work: tokens run through the model (prefill, decode), decode steps, forward calls, counted by each
method and cross-checked by a forward hook on the model. Memory: peak RSS per method (Linux: the
VmHWM high-water mark reset before each run; elsewhere psutil sampling), CUDA max allocated on GPU.
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
from decoding import StopRule, prefix_cache, single_rows  # noqa: E402
from methods import answer_ensemble, answer_fused, fuse_logits  # noqa: E402

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
DEFAULT_OUTPUT = REPO_DIR / "benchmarks" / "results"


# ---------------------------------------------------------------- what is measured

@dataclasses.dataclass
class Case:
    name: str
    method: str       # single_generate, upstream_nocache, logit_avg, attn_sdpa, attn_flex, attn_flex_compiled
    n: int            # paraphrases per question
    batch_size: int   # questions per decode call
    group: str        # main (N and batch 1 for all), batch, n-sweep
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


# ---------------------------------------------------------------- the methods

class Bench:
    def __init__(self, model, tokenizer, dataset: Dataset, stop: StopRule, args):
        self.model, self.tok, self.dataset, self.stop, self.args = model, tokenizer, dataset, stop, args
        self.datasets: dict[int, Dataset] = {}
        self.notes: list[str] = []
        self.forward_tokens = 0
        self.forward_calls = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.forward_tokens += ids.numel()
            self.forward_calls += 1

    def dataset_for(self, n: int) -> Dataset:
        """The questions with (at least) n paraphrases: stored ones, repeated cyclically when too few."""
        if n not in self.datasets:
            records = self.dataset.records
            short = [r for r in records if len(r.paraphrases) < n]
            if short:
                have = min(len(r.paraphrases) for r in records)
                self.notes.append(f"N={n}: the data has {have} paraphrases per question (the original counts); "
                                  f"N={n} repeats them cyclically (p1..p{have}, p1, ...)")
                records = [Record(r.uuid, [r.paraphrases[i % len(r.paraphrases)] for i in range(n)], r.answers)
                           for r in records]
            self.datasets[n] = dataclasses.replace(self.dataset, records=records)
        return self.datasets[n]

    # -- one batch of questions -> (tokens per question, work)

    def run_batch(self, case: Case, batch: list[Record]) -> tuple[list[list[int]], Work]:
        ds = self.dataset_for(case.n)
        if case.method == "single_generate":
            return self.single_generate(ds, batch)
        if case.method == "upstream_nocache":
            return self.upstream_nocache(ds, batch, case.n)
        if case.method == "logit_avg":
            rows, stats = answer_ensemble(self.model, self.tok, ds, batch, case.n, self.stop, "avg")
        else:
            backend = "sdpa" if case.method == "attn_sdpa" else "flex"
            rows, stats = answer_fused(self.model, self.tok, ds, batch, case.n, self.stop, positions="aligned",
                                       backend=backend, compile=case.method == "attn_flex_compiled")
        return [r["token_ids"] for r in rows], Work(stats.prefill_tokens, stats.decode_tokens, stats.steps, 1, 1 + stats.steps)

    @torch.inference_mode()
    def single_generate(self, ds: Dataset, batch: list[Record]) -> tuple[list[list[int]], Work]:
        outputs, work = [], Work()
        for record in batch:
            row = single_rows(self.tok, ds.prompt_parts(record, 1), [0])[0]
            ids = torch.tensor([row.input_ids], device=self.model.device)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.stop.max_new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=self.tok.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            outputs.append(new)
            work.add(Work(ids.shape[1], len(new) - 1, len(new) - 1, 1, len(new)))
        return outputs, work

    @torch.inference_mode()
    def upstream_nocache(self, ds: Dataset, batch: list[Record], n: int) -> tuple[list[list[int]], Work]:
        """The reference: every step re-runs every paraphrase's whole sequence, one at a time, no cache."""
        outputs, work = [], Work()
        for record in batch:
            seqs = [list(r.input_ids) for r in single_rows(self.tok, ds.prompt_parts(record, n), list(range(n)))]
            tokens: list[int] = []
            work.decode_calls += 1
            while True:
                step_logits = []
                for seq in seqs:
                    ids = torch.tensor([seq], device=self.model.device)
                    step_logits.append(self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1])
                    work.forwards += 1
                    if tokens:
                        work.decode_tokens += len(seq)
                    else:
                        work.prefill_tokens += len(seq)
                token = int(fuse_logits(torch.stack(step_logits).float().unsqueeze(0), "avg")[0])
                tokens.append(token)
                if self.stop.done(tokens, self.tok):
                    break
                for seq in seqs:
                    seq.append(token)
                work.steps += 1
            outputs.append(tokens)
        return outputs, work

    # -- a pass over all questions

    def run_pass(self, case: Case, num_questions: int) -> tuple[list[list[int]], Work]:
        """The first `num_questions` questions (with the case's N paraphrases), batch by batch."""
        records = self.dataset_for(case.n).records[:num_questions]
        prefix_cache(self.model).enabled = case.reuse_prefix
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

    def __enter__(self):
        gc.collect()
        malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = rss_mb()
        self.hwm = reset_hwm()
        self.sampled = self.start
        self._stop = threading.Event()
        if not self.hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        if not self.hwm:
            self._thread.join()
        self.peak = max(read_hwm_mb() or 0.0, rss_mb()) if self.hwm else max(self.sampled, rss_mb())
        self.cuda_peak = (torch.cuda.max_memory_allocated(self.device) / 2**20
                          if self.device.type == "cuda" else None)
        return False


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


def build_cases(args) -> list[Case]:
    n, big = args.n, args.large_batch
    cases = [
        Case("single_generate", "single_generate", 1, 1, "main"),
        Case("upstream_nocache", "upstream_nocache", n, 1, "main"),
        Case("logit_avg", "logit_avg", n, 1, "main", reference="upstream_nocache"),
        Case("attn_sdpa", "attn_sdpa", n, 1, "main"),
        Case("attn_flex", "attn_flex", n, 1, "main", reference="attn_sdpa"),
    ]
    if not args.no_compile:
        cases.append(Case("attn_flex_compiled", "attn_flex_compiled", n, 1, "main", reference="attn_sdpa"))
    for method in ("logit_avg", "attn_sdpa"):  # the prefix encoded in every batch, as before the prefix cache
        cases.append(Case(f"{method}_noprefix", method, n, 1, "no-prefix-cache", reference=method, reuse_prefix=False))
    if big != 1:
        for method in ["logit_avg", "attn_sdpa", "attn_flex"] + ([] if args.no_compile else ["attn_flex_compiled"]):
            cases.append(Case(f"{method}_bs{big}", method, n, big, "batch", reference=method))
        for method in ("logit_avg", "attn_sdpa"):
            cases.append(Case(f"{method}_bs{big}_noprefix", method, n, big, "no-prefix-cache", reference=method,
                              reuse_prefix=False))
    for k in args.sweep_n:
        if k != n:
            for method in ("logit_avg", "attn_sdpa"):
                cases.append(Case(f"{method}_n{k}", method, k, 1, "n-sweep",
                                  reference="single_generate" if k == 1 else None))
    if args.cases:
        wanted = set(args.cases)
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise InputError(f"--cases: unknown {sorted(unknown)}; known: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in wanted]
    return cases


def run_benchmark(bench: Bench, cases: list[Case], records: list[Record], args, log=print) -> list[Result]:
    device = bench.model.device
    results = {c.name: Result(c) for c in cases}
    # warm up each method once (its first batch); compiled flex compiles here, under a time limit
    for case in cases:
        res = results[case.name]
        if case.method == "attn_flex_compiled" and case.batch_size != 1 and "attn_flex_compiled" in results \
                and results["attn_flex_compiled"].status != "ok":
            res.status = "skipped: compiled flex failed at batch 1"
            continue
        start = time.perf_counter()
        try:
            with time_limit(args.compile_timeout if case.method == "attn_flex_compiled" else None):
                bench.run_pass(case, case.batch_size)
                sync(device)
        except Exception as err:  # noqa: BLE001 - a failing method is reported, the others still run
            res.status = f"failed: {first_line(err)}"
            if case.method == "attn_flex_compiled":
                torch._dynamo.reset()
        res.warmup_s = time.perf_counter() - start
        log(f"  warm-up {case.name:<24} {res.warmup_s:7.2f} s  {res.status}", flush=True)
    live = [c for c in cases if results[c.name].status == "ok"]
    for r in range(args.repeats):
        for case in live:
            res = results[case.name]
            if res.status != "ok" or (case.method == "upstream_nocache" and r >= args.upstream_repeats):
                continue
            tokens0, calls0 = bench.forward_tokens, bench.forward_calls
            try:
                with PeakMemory(device) as mem:
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    outputs, work = bench.run_pass(case, len(records))
                    sync(device)
                    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            except Exception as err:  # noqa: BLE001
                res.status = f"failed: {first_line(err)}"
                log(f"  repeat {r + 1}: {case.name} {res.status}", flush=True)
                continue
            res.wall.append(wall / len(records))
            res.cpu.append(cpu / len(records))
            res.peak_rss_mb = max(res.peak_rss_mb, mem.peak)
            res.rss_delta_mb = max(res.rss_delta_mb, mem.peak - mem.start)
            if mem.cuda_peak is not None:
                res.cuda_peak_mb = max(res.cuda_peak_mb or 0.0, mem.cuda_peak)
            if res.work is None:
                res.work, res.tokens = work, outputs
                res.hook_tokens = bench.forward_tokens - tokens0
                res.hook_forwards = bench.forward_calls - calls0
        done = [c for c in live if len(results[c.name].wall) == r + 1]
        log(f"  repeat {r + 1}/{args.repeats} (s/question): "
            + ", ".join(f"{c.name} {results[c.name].wall[-1]:.3f}" for c in done), flush=True)
    for res in results.values():
        ref = results.get(res.case.reference or "")
        if res.tokens is not None and ref is not None and ref.tokens is not None:
            same = sum(a == b for a, b in zip(res.tokens, ref.tokens))
            res.agree = f"{same}/{len(res.tokens)} = {res.case.reference}"
        if res.work is not None and res.hook_tokens != res.work.prefill_tokens + res.work.decode_tokens:
            res.status = (f"count mismatch: model saw {res.hook_tokens} tokens, method counted "
                          f"{res.work.prefill_tokens + res.work.decode_tokens}")
    return list(results.values())


# ---------------------------------------------------------------- the table

COLUMNS = ["case", "method", "group", "N", "batch", "s_per_q", "s_per_q_min", "cpu_s_per_q", "x_vs_single",
           "speedup_vs_upstream", "speedup_vs_logit_avg", "prefill_tok_per_q", "decode_tok_per_q", "tok_per_q",
           "steps", "forwards_per_q", "peak_rss_mb", "rss_delta_mb", "cuda_peak_mb", "warmup_s", "repeats",
           "same_tokens_as", "status"]


def table_rows(results: list[Result], num_questions: int) -> list[dict]:
    by = {r.case.name: r for r in results}
    def med(name: str) -> float | None:
        r = by.get(name)
        return statistics.median(r.wall) if r and r.wall else None
    single, upstream, logit = med("single_generate"), med("upstream_nocache"), med("logit_avg")
    rows = []
    for r in results:
        c, w = r.case, r.work
        s = statistics.median(r.wall) if r.wall else None
        def ratio(a, b):
            return round(a / b, 2) if a is not None and b else None
        rows.append(dict(
            case=c.name, method=c.method, group=c.group, N=c.n, batch=c.batch_size,
            s_per_q=round(s, 4) if s is not None else None,
            s_per_q_min=round(min(r.wall), 4) if r.wall else None,
            cpu_s_per_q=round(statistics.median(r.cpu), 4) if r.cpu else None,
            x_vs_single=ratio(s, single), speedup_vs_upstream=ratio(upstream, s), speedup_vs_logit_avg=ratio(logit, s),
            prefill_tok_per_q=round(w.prefill_tokens / num_questions, 1) if w else None,
            decode_tok_per_q=round(w.decode_tokens / num_questions, 1) if w else None,
            tok_per_q=round((w.prefill_tokens + w.decode_tokens) / num_questions, 1) if w else None,
            steps=round(w.steps / w.decode_calls, 2) if w and w.decode_calls else None,
            forwards_per_q=round(w.forwards / num_questions, 2) if w else None,
            peak_rss_mb=round(r.peak_rss_mb) if r.wall else None,
            rss_delta_mb=round(r.rss_delta_mb) if r.wall else None,
            cuda_peak_mb=round(r.cuda_peak_mb) if r.cuda_peak_mb is not None else None,
            warmup_s=round(r.warmup_s, 2), repeats=len(r.wall), same_tokens_as=r.agree, status=r.status))
    return rows


SHORT = {"s_per_q": "s/q", "s_per_q_min": "min s/q", "cpu_s_per_q": "cpu s/q", "x_vs_single": "x(1)",
         "speedup_vs_upstream": "(2)/x", "speedup_vs_logit_avg": "(3)/x", "prefill_tok_per_q": "prefill/q",
         "decode_tok_per_q": "decode/q", "tok_per_q": "tok/q", "forwards_per_q": "fwd/q",
         "peak_rss_mb": "RSS MB", "rss_delta_mb": "dRSS MB", "cuda_peak_mb": "CUDA MB", "warmup_s": "warmup s",
         "same_tokens_as": "same tokens"}
TEXT_COLUMNS = ["case", "N", "batch", "s_per_q", "s_per_q_min", "cpu_s_per_q", "x_vs_single", "speedup_vs_upstream",
                "speedup_vs_logit_avg", "prefill_tok_per_q", "decode_tok_per_q", "steps", "forwards_per_q",
                "peak_rss_mb", "rss_delta_mb", "cuda_peak_mb", "same_tokens_as", "status"]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def text_table(rows: list[dict], cuda: bool) -> str:
    cols = [c for c in TEXT_COLUMNS if cuda or c != "cuda_peak_mb"]
    cells = [[SHORT.get(c, c) for c in cols]] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i in (0, len(cols) - 1, len(cols) - 2) else v.rjust(w)
                       for i, (v, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[dict], cuda: bool) -> str:
    cols = [c for c in TEXT_COLUMNS if cuda or c != "cuda_peak_mb"]
    out = ["| " + " | ".join(SHORT.get(c, c) for c in cols) + " |",
           "|" + "|".join("---" if c in ("case", "same_tokens_as", "status") else "---:" for c in cols) + "|"]
    out += ["| " + " | ".join(fmt(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    """The issues' CPU targets for attention-level fusion (issue 15: with the prefix reused), on median
    (and min) s/q: batch 1 against single_generate and upstream, batch 8 against logit avg at batch 8."""
    by = {r["case"]: r for r in rows}
    need = ("single_generate", "upstream_nocache", "logit_avg")
    if not all(by.get(k) and by[k]["s_per_q"] for k in need):
        return ["targets: not evaluated (single_generate, upstream_nocache and logit_avg must all run)"]
    lines = []
    for name in ("attn_sdpa", "attn_flex", "attn_flex_compiled"):
        r = by.get(name)
        if not r or not r["s_per_q"]:
            if r:
                lines.append(f"{name}: not measured ({r['status']})")
            continue
        for key in ("s_per_q", "s_per_q_min"):
            s = r[key]
            up, lg = by["upstream_nocache"][key] / s, by["logit_avg"][key] / s
            single = s / by["single_generate"][key]
            checks = [(f"{up:.1f}x faster than (2)", up >= 10), (f"{lg:.2f}x faster than (3)", lg >= 1.5),
                      (f"{single:.2f}x the time of (1)", single <= 0.8)]
            big, big_avg = by.get(f"{name}_bs8"), by.get("logit_avg_bs8")
            if big and big_avg and big[key] and big_avg[key]:
                ratio = big_avg[key] / big[key]
                checks.append((f"batch 8: {ratio:.2f}x faster than logit_avg_bs8", ratio >= 3))
            lines.append(f"{name} [{'median' if key == 's_per_q' else 'min'}]: " + "; ".join(
                f"{text} {'MET' if ok else 'MISSED'}" for text, ok in checks))
        prefill = r.get("prefill_tok_per_q")
        if prefill is not None:
            lines.append(f"{name}: {prefill:.0f} prefill tokens per question (prefix counted once per run) "
                         f"{'MET' if prefill <= 75 else 'MISSED'} (<= 75)")
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

def profile_case(bench: Bench, case: Case, records: list[Record], out_dir: Path, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    bench.run_pass(case, case.batch_size)  # warm up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.model.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        bench.run_pass(case, len(records))
    sort = "self_cuda_time_total" if bench.model.device.type == "cuda" else "self_cpu_time_total"
    ops = prof.key_averages().table(sort_by=sort, row_limit=top)
    profiler = cProfile.Profile()
    profiler.enable()
    bench.run_pass(case, len(records))
    profiler.disable()
    def listing(sort: str, *restrict) -> str:
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats(sort).print_stats(*restrict, top)
        lines = [line for line in stream.getvalue().splitlines() if line.strip()]
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
        return "\n".join([lines[0].strip()] + lines[start:])
    # the cumulative view without the generic call stack (module wrappers, decoder layers)
    interesting = r"flex_attention|mask|sdpa|attention_forward|_attention|decode|fuse|choose|done|render|generate|run_batch"
    text = (f"profile of {case.name} (N={case.n}, batch {case.batch_size}) over {len(records)} questions\n\n"
            f"torch.profiler, top {top} ops by self time:\n{ops}\n\n"
            f"cProfile, top {top} functions by own time:\n{listing('tottime')}\n\n"
            f"cProfile, attention/mask/decoding functions by cumulative time:\n{listing('cumulative', interesting)}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_{case.name}.txt").write_text(text)
    return text


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, help=f"model key/folder/HF id (default {EMBEDDED_MODEL}; "
                   f"tiny-llama etc. for smoke tests)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=DATASETS)
    p.add_argument("--data-file", help="a JSONL for --dataset jsonl (or a replacement for the bundled sample)")
    p.add_argument("--questions", type=int, default=None, help="questions to answer (default 12; --quick 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per method (default 3; --quick 1)")
    p.add_argument("--upstream-repeats", type=int, help="timed passes of upstream_nocache, the slowest by far "
                   "(default: --repeats)")
    p.add_argument("--n", type=int, default=5, help="paraphrases per question for the main comparison (default 5)")
    p.add_argument("--sweep-n", default="1,3,5,10", help="N values for ours (default 1,3,5,10; '' for none)")
    p.add_argument("--large-batch", type=int, default=8, help="the larger batch size for ours (default 8; 1: none)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="every method decodes exactly this many tokens")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--compile-timeout", type=int, default=300, help="seconds allowed for compiled flex's warm-up")
    p.add_argument("--cases", help="comma-separated case names to run (default: all)")
    p.add_argument("--profile", metavar="CASE", help="profile one case (torch.profiler + cProfile) instead of the benchmark")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="smoke test: 3 questions, 1 repeat, N sweep 1,10, compile timeout 120 s")
    p.add_argument("--output-dir", default=str(DEFAULT_OUTPUT), help="where the CSV/Markdown/JSON go "
                   "(default benchmarks/results/)")
    args = p.parse_args(argv)
    args.questions = args.questions or (3 if args.quick else 12)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.upstream_repeats = min(args.upstream_repeats or args.repeats, args.repeats)
    if args.quick and args.sweep_n == "1,3,5,10":
        args.sweep_n = "1,10"
    if args.quick and args.compile_timeout == 300:
        args.compile_timeout = 120
    args.model = args.model or EMBEDDED_MODEL
    try:
        args.sweep_n = [int(k) for k in args.sweep_n.split(",") if k.strip()]
    except ValueError:
        raise InputError(f"--sweep-n {args.sweep_n!r}: expected comma-separated integers") from None
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    if min([args.questions, args.repeats, args.n, args.large_batch, args.max_new_tokens, *args.sweep_n]) < 1:
        raise InputError("--questions, --repeats, --n, --sweep-n, --large-batch and --max-new-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv), argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run(args, argv) -> int:
    from models import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = build_cases(args)
    if args.profile and args.profile not in {c.name for c in cases}:
        raise InputError(f"--profile {args.profile!r}: not a case; known: {', '.join(c.name for c in cases)}")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    dataset = load_dataset_by_name(args.dataset, args.data_file, None, num_paraphrases=1, limit=args.questions)
    records = dataset.records
    stop = StopRule(set(), args.max_new_tokens, first_line_only=False)
    bench = Bench(model, tokenizer, dataset, stop, args)
    for k in sorted({c.n for c in cases}):
        bench.dataset_for(k)
    out_dir = Path(args.output_dir)
    command = "python benchmarks/bench_ensemble.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = [
        f"bench_ensemble: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"command: {command.strip()}",
        f"machine: {machine()}, device {model.device}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, python {platform.python_version()}",
        f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.dtype}); "
        f"data: {dataset.name}, {len(records)} questions, N={args.n}",
        f"stop rule: every method decodes exactly {args.max_new_tokens} new tokens "
        f"(StopRule(eos_ids=set(), max_new_tokens={args.max_new_tokens}, first_line_only=False); "
        f"model.generate(eos_token_id=None)), greedy",
        *bench.notes,
    ]
    print("\n".join(header), flush=True)
    if args.profile:
        case = next(c for c in cases if c.name == args.profile)
        print(profile_case(bench, case, records, out_dir, args.profile_top))
        return 0
    print(f"timing {len(cases)} cases x {args.repeats} repeats (round-robin; upstream_nocache {args.upstream_repeats}), "
          f"after one warm-up each:", flush=True)
    results = run_benchmark(bench, cases, records, args)
    rows = table_rows(results, len(records))
    cuda = model.device.type == "cuda"
    table = text_table(rows, cuda)
    legend = ("s/q: wall seconds per question, median over repeats (min s/q: the fastest repeat; cpu s/q: "
              "process CPU seconds); x(1): time / single_generate's; (2)/x and (3)/x: speed-up over "
              "upstream_nocache and logit_avg; prefill/q, decode/q: tokens run through the model per question "
              "(with the prefix reused, its tokens run once per run, in the warm-up, and are not in prefill/q) "
              "(padding included); steps: decode steps per decode call; fwd/q: model forward calls per question; "
              "RSS MB: peak RSS during the timed runs (dRSS: above the RSS at their start); same tokens: "
              "questions whose answer tokens equal the named case's")
    target_lines = targets(rows)
    header += [note for note in bench.notes if note not in header]
    print("\n" + table + "\n\n" + legend + "\n\ntargets (CPU, N=%d, batch 1):\n  " % args.n + "\n  ".join(target_lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench_ensemble.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "bench_ensemble.md").write_text(
        "\n".join(f"- {h}" for h in header) + "\n\n" + markdown_table(rows, cuda) + "\n\n" + legend + "\n\n"
        + "Targets (CPU, N=%d, batch 1):\n\n" % args.n + "\n".join(f"- {t}" for t in target_lines) + "\n")
    (out_dir / "bench_ensemble.json").write_text(json.dumps(dict(header=header, rows=rows, targets=target_lines), indent=1))
    print(f"written: {out_dir / 'bench_ensemble.csv'}, .md, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
