"""The timing half of `make gpu-check`: on one CUDA GPU, a model with Llama-3.2-3B's shapes and random
weights (bf16, built in code: no download), N=5 paraphrases, batch 1 and 32, every method decoding exactly
--max-new-tokens tokens:

    generate     transformers `model.generate`, greedy, one prompt per question (the original question)
    logit_avg    methods.answer_ensemble "avg": N rows per question, log-softmax averaged at every step
    attn_sdpa    methods.answer_fused with FusionSettings(): attention level with the dense SDPA mask
    attn_flex    methods.answer_fused with FusionSettings(backend="flex", compile=True): compiled FlexAttention

Each method runs one warm-up batch per batch size before timing (compiled flex compiles there: its compile
time is reported once, apart), then the timed batches, methods interleaved round-robin. It prints one table
and writes it as JSON (benchmarks/results/gpu_check.json): seconds per question, generated tokens per
second, the throughput ratios attention/avg and attention/generate per batch size, and the readings that
issue 14's targets are judged on (graphs compiled in the whole run and after warm-up, the attention ratios
at the largest batch); the targets themselves are in benchmarks/README.md.

    python benchmarks/gpu_check.py             # on a CUDA GPU (what `make gpu-check` runs after the tests)
    python benchmarks/gpu_check.py --dry-run   # CPU, tiny shapes, sdpa and eager flex, batch 1 and 2: seconds

Prompts are the bundled sample's (webqa_sample). The model's vocabulary is mostly never read: the tokenizer
covers a subset of its ids, which does not matter for speed. What does matter is the prompt length, so on
the 3B shape the text is cut into words by a BPE tokenizer trained here on the prompts themselves (about one
token per word, like Llama 3's tokenizer on this text); `--tokenizer bytes` uses one token per byte instead
(3x longer prompts). The table says which, with the prompt tokens per question.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

import torch  # noqa: E402

from dataset import Dataset, Record, load_dataset_by_name  # noqa: E402
from decoding import LanguageModel, PrefixCache, StopRule, pad_left, single_rows  # noqa: E402
from fusion import FusionSettings  # noqa: E402
from methods import answer_ensemble, answer_fused  # noqa: E402
from models import shaped_model  # noqa: E402
from segment_mask import PAD_SEGMENT  # noqa: E402

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
DEFAULT_OUTPUT = REPO_DIR / "benchmarks" / "results" / "gpu_check.json"
METHODS = ("generate", "logit_avg", "attn_sdpa", "attn_flex")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, float32, sdpa and eager flex, batch 1 and 2, 4 new tokens: the harness only")
    p.add_argument("--shape", default=None, help="models.shaped_model shape (default llama3.2_3b; tiny with --dry-run)")
    p.add_argument("--n", type=int, default=5, help="paraphrases per question")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32; 1,2 with --dry-run)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens decoded per question (default 16; 4 dry)")
    p.add_argument("--timed-questions", type=int, default=None,
                   help="questions timed per batch size, in at least 2 batches (default 16; 2 in 1 batch with --dry-run)")
    p.add_argument("--tokenizer", choices=["auto", "words", "bytes"], default="auto",
                   help="auto: words where the vocabulary has room for them, else bytes")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop timing further batches after this many seconds (warm-ups always run)")
    p.add_argument("--prefix-cache", choices=["on", "off"], default="on",
                   help="logit avg and attention level reuse the shared prefix's KV across batches, as the project "
                        "runs (decoding.LanguageModel's PrefixCache); off: every batch computes it, as generate does")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return apply_defaults(p.parse_args(argv))


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on --dry-run."""
    dry = args.dry_run
    args.shape = args.shape or ("tiny" if dry else "llama3.2_3b")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if dry else "1,32")).split(",")]
    args.max_new_tokens = args.max_new_tokens or (4 if dry else 16)
    args.timed_questions = args.timed_questions or (2 if dry else 16)
    args.device = torch.device("cpu" if dry else "cuda")
    args.dtype = torch.float32 if dry else torch.bfloat16
    args.compile = not dry
    return args


# ---------------------------------------------------------------- model, tokenizer, questions

def word_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` (GPT-2's word split, so no token crosses a word): about one token
    per word on these prompts. Ids 0, 1, 2 are <pad>, <s>, </s> as in models.tiny_tokenizer; BOS is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def questions(n: int, count: int) -> tuple[Dataset, list[Record]]:
    """The bundled sample with its few-shot examples, and `count` questions (cycled if the sample is shorter)."""
    ds = load_dataset_by_name("webqa_sample", num_paraphrases=n)
    records = [dataclasses.replace(ds.records[i % len(ds.records)], uuid=f"{ds.records[i % len(ds.records)].uuid}#{i}")
               for i in range(count)]
    return ds, records


def build(args, ds: Dataset) -> tuple[LanguageModel, str]:
    """The shaped model with its tokenizer (and the prefix cache unless --prefix-cache off), and the tokenizer kind."""
    model, tokenizer = shaped_model(args.shape, args.dtype, args.device)
    kind = args.tokenizer
    if kind == "auto":
        kind = "words" if model.config.vocab_size >= 4096 else "bytes"
    if kind == "words":
        texts = [ds.prompt_parts(r, args.n).full(i) for r in ds.records for i in range(args.n)]
        tokenizer = word_tokenizer(texts, min(model.config.vocab_size, 16384))
    return LanguageModel(model, tokenizer, PrefixCache() if args.prefix_cache == "on" else None), kind


# ---------------------------------------------------------------- the methods: a batch -> (tokens, prefill tokens)

@torch.inference_mode()
def generate_batch(lm: LanguageModel, ds: Dataset, batch: list[Record], stop: StopRule) -> tuple[list, int]:
    """transformers' greedy `generate` on each question's original prompt, the batch left-padded."""
    rows = [single_rows(lm.tokenizer, ds.prompt_parts(r, 1), [0])[0] for r in batch]
    ids, _, seg = pad_left(rows, lm.tokenizer.pad_token_id, lm.device)
    out = lm.model.generate(ids, attention_mask=(seg != PAD_SEGMENT).long(), max_new_tokens=stop.max_new_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=lm.tokenizer.pad_token_id)
    return out[:, ids.shape[1]:].tolist(), ids.numel()


def run_method(method: str, lm: LanguageModel, ds: Dataset, batch: list[Record], args, stop: StopRule):
    if method == "generate":
        return generate_batch(lm, ds, batch, stop)
    if method == "logit_avg":
        rows, stats = answer_ensemble(lm, ds, batch, args.n, stop, "avg")
    else:
        flex = method == "attn_flex"
        settings = FusionSettings(backend="flex", compile=args.compile) if flex else FusionSettings()
        rows, stats = answer_fused(lm, ds, batch, args.n, stop, settings)
    return [r["token_ids"] for r in rows], stats.prefill_tokens


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (every compile and recompile counts one)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Row:
    method: str
    label: str
    batch: int
    n: int
    status: str = "ok"
    warmup_s: float | None = None
    seconds: float = 0.0           # timed wall seconds, all batches
    questions: int = 0             # questions timed
    new_tokens: int = 0            # tokens generated in the timed batches
    prefill_tokens: int = 0        # prompt tokens (padding included) run through the model, timed batches
    peak_mb: float | None = None   # CUDA max allocated over the method's batches
    tokens: list = dataclasses.field(default_factory=list)

    def s_per_q(self) -> float | None:
        return self.seconds / self.questions if self.questions else None

    def tok_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.seconds else None

    def add_batch(self, tokens: list, prefill: int, seconds: float) -> None:
        self.seconds += seconds
        self.questions += len(tokens)
        self.new_tokens += sum(len(t) for t in tokens)
        self.prefill_tokens += prefill
        self.tokens += tokens


def label(method: str, args) -> str:
    flex = "flex compiled" if args.compile else "flex eager"
    return {"generate": "transformers generate, 1 prompt", "logit_avg": f"logit avg, N={args.n}",
            "attn_sdpa": f"attention, sdpa, N={args.n}", "attn_flex": f"attention, {flex}, N={args.n}"}[method]


# ---------------------------------------------------------------- the run

@dataclasses.dataclass
class Counts:
    """Graphs compiled in the warm-ups and after them, and compiled flex's compile seconds."""
    warmup: int = 0
    timed: int = 0
    compile_s: float = 0.0


@dataclasses.dataclass
class Harness:
    """The model, the data, the stop rule and the flags of one run; each method is timed one batch at a time."""
    lm: LanguageModel
    ds: Dataset
    stop: StopRule
    args: argparse.Namespace
    counts: Counts = dataclasses.field(default_factory=Counts)
    log: Callable = print

    def timed_call(self, row: Row, method: str, batch: list[Record]) -> tuple[list, int, float] | None:
        """One batch of one method: (tokens, prefill tokens, seconds), or None with row.status set on failure."""
        device = self.args.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        try:
            tokens, prefill = run_method(method, self.lm, self.ds, batch, self.args, self.stop)
            sync(device)
        except Exception as err:  # noqa: BLE001 - a failing method is reported in its row, the others still run
            row.status = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            return None
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            row.peak_mb = max(row.peak_mb or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
        return tokens, prefill, seconds

    def warm_up(self, group: dict[str, Row], batch: list[Record]) -> None:
        """One untimed batch per method (compiled flex compiles here)."""
        for method, row in group.items():
            graphs = compiled_graphs()
            out = self.timed_call(row, method, batch)
            self.counts.warmup += compiled_graphs() - graphs
            if out is not None:
                row.warmup_s = out[2]
            self.log(f"  warm-up batch {len(batch):>3} {method:<10} {row.warmup_s or 0.0:8.2f} s  {row.status}",
                     flush=True)

    def time_batches(self, group: dict[str, Row], timed: list[list[Record]], deadline: float) -> None:
        """The timed batches, every method on each in turn, until the batches or the time budget run out."""
        for i, batch in enumerate(timed):
            if i > 0 and time.perf_counter() > deadline:
                self.log(f"  batch {len(batch)}: time budget ({self.args.budget_s:.0f} s) spent after {i} timed "
                         f"batches", flush=True)
                return
            for method, row in group.items():
                out = self.timed_call(row, method, batch) if row.status == "ok" else None
                if out is not None:
                    row.add_batch(*out)

    def run_size(self, size: int, records: list[Record], batches: int, deadline: float) -> list[Row]:
        """Every method at one batch size: the warm-up batch, then `batches` timed ones."""
        group = {m: Row(m, label(m, self.args), size, 1 if m == "generate" else self.args.n) for m in METHODS}
        self.warm_up(group, records[:size])
        graphs = compiled_graphs()
        self.time_batches(group, [records[size * (i + 1):size * (i + 2)] for i in range(batches)], deadline)
        self.counts.timed += compiled_graphs() - graphs
        flex = group["attn_flex"]
        if flex.warmup_s is not None and flex.s_per_q() is not None:  # compile time: the first batch's extra time
            self.counts.compile_s += max(0.0, flex.warmup_s - flex.s_per_q() * size)
        return list(group.values())


def run(args, log=print) -> dict:
    began = time.perf_counter()
    stop = StopRule(set(), args.max_new_tokens, first_line_only=False)  # exactly max_new_tokens each
    batches = {b: max(1 if args.dry_run else 2, math.ceil(args.timed_questions / b)) for b in args.batch_sizes}
    ds, records = questions(args.n, max(b * (1 + batches[b]) for b in args.batch_sizes))
    lm, kind = build(args, ds)
    log(f"model: {args.shape} ({sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f} B parameters, random "
        f"weights), {str(args.dtype).removeprefix('torch.')} on {device_name(args.device)}; tokenizer: {kind}; "
        f"N={args.n}, {args.max_new_tokens} new tokens per question, built in {time.perf_counter() - began:.1f} s",
        flush=True)
    harness = Harness(lm, ds, stop, args, log=log)
    rows = [row for size in args.batch_sizes
            for row in harness.run_size(size, records, batches[size], began + args.budget_s)]
    return report(args, rows, kind, harness.counts, time.perf_counter() - began)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


# ---------------------------------------------------------------- the table

def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def table_entry(r: Row, rows: list[Row]) -> dict:
    """One row of the JSON table: times, throughput against logit avg and generate at its batch size."""
    def find(method: str) -> Row:
        return next(x for x in rows if x.method == method and x.batch == r.batch)
    sdpa, same = find("attn_sdpa"), None
    if r.method == "attn_flex" and r.tokens and sdpa.tokens:
        same = [sum(a == b for a, b in zip(r.tokens, sdpa.tokens)), min(len(r.tokens), len(sdpa.tokens))]
    return dict(
        method=r.method, label=r.label, batch=r.batch, N=r.n, status=r.status,
        s_per_q=round(r.s_per_q(), 5) if r.s_per_q() is not None else None,
        tok_per_s=round(r.tok_per_s(), 2) if r.tok_per_s() is not None else None,
        x_vs_logit_avg=ratio(r.tok_per_s(), find("logit_avg").tok_per_s()),
        x_vs_generate=ratio(r.tok_per_s(), find("generate").tok_per_s()),
        prefill_tok_per_q=round(r.prefill_tokens / r.questions, 1) if r.questions else None,
        questions=r.questions, warmup_s=round(r.warmup_s, 3) if r.warmup_s is not None else None,
        cuda_peak_mb=round(r.peak_mb, 1) if r.peak_mb is not None else None, same_tokens_as_sdpa=same)


def readings(table: list[dict], largest: int, counts: Counts, compiled: bool) -> list[dict]:
    """What issue 14's targets (benchmarks/README.md) are judged on; no verdict here. Eager flex compiles
    its own wrapper with dynamo's eager backend: the graph counts are None then."""
    out = [dict(name="compiled graphs in the whole run", value=counts.warmup + counts.timed if compiled else None),
           dict(name="graphs compiled after warm-up", value=counts.timed if compiled else None)]
    by = {(t["method"], t["batch"]): t for t in table}
    for method in ("attn_sdpa", "attn_flex"):
        for key in ("x_vs_logit_avg", "x_vs_generate"):
            out.append(dict(name=f"{method} throughput {key.removeprefix('x_vs_')} ratio at batch {largest}",
                            value=by[(method, largest)][key]))
    return out


def report(args, rows: list[Row], kind: str, counts: Counts, total_s: float) -> dict:
    import transformers
    table = [table_entry(r, rows) for r in rows]
    return dict(
        dry_run=args.dry_run, device=device_name(args.device), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(), shape=args.shape,
        dtype=str(args.dtype).removeprefix("torch."), tokenizer=kind, n=args.n, max_new_tokens=args.max_new_tokens,
        prefix_cache=args.prefix_cache, batch_sizes=args.batch_sizes, flex_compiled=args.compile,
        compile_s=round(counts.compile_s, 2) if args.compile else None,
        compiled_graphs=dict(warmup=counts.warmup, after_warmup=counts.timed), total_s=round(total_s, 1),
        rows=table, readings=readings(table, max(args.batch_sizes), counts, args.compile))


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table_lines(result: dict) -> list[list[str]]:
    head = ["method", "batch", "N", "s/question", "tokens/s", "x avg", "x generate", "prompt tok/q", "warm-up s",
            "peak MB", "same tokens", "status"]
    lines = [head]
    for t in result["rows"]:
        same = f"{t['same_tokens_as_sdpa'][0]}/{t['same_tokens_as_sdpa'][1]} sdpa" if t["same_tokens_as_sdpa"] else ""
        lines.append([t["label"], str(t["batch"]), str(t["N"]), fmt(t["s_per_q"], ".4f"), fmt(t["tok_per_s"], ".1f"),
                      fmt(t["x_vs_logit_avg"], ".2f"), fmt(t["x_vs_generate"], ".2f"), fmt(t["prefill_tok_per_q"], ".0f"),
                      fmt(t["warmup_s"], ".2f"), fmt(t["cuda_peak_mb"], ".0f"), same, t["status"]])
    return lines


def print_table(result: dict, path: Path) -> None:
    print(f"\nGPU check: {result['shape']} shape, {result['dtype']}, {result['device']}, torch {result['torch']}, "
          f"transformers {result['transformers']}; N={result['n']}, {result['max_new_tokens']} new tokens per "
          f"question, tokenizer {result['tokenizer']}, prefix cache {result['prefix_cache']}")
    lines = table_lines(result)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if j in (0, 10, 11) else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    graphs = result["compiled_graphs"]
    if result["flex_compiled"]:
        print(f"compile: {result['compile_s']:.1f} s in the warm-up batches (not in the times above); graphs "
              f"compiled: {graphs['warmup']} in warm-up, {graphs['after_warmup']} after it")
    print("x avg / x generate: throughput (generated tokens/s) relative to logit avg / generate at the same batch")
    for t in result["readings"]:  # the targets are in benchmarks/README.md
        unread = t["value"] is None and not result["flex_compiled"]
        print(f"{t['name']}: {'n/a (flex not compiled)' if unread else fmt(t['value'])}")
    print(f"total {result['total_s']:.0f} s; written to {path} (targets: benchmarks/README.md)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: gpu_check: no CUDA GPU is visible to torch {torch.__version__}; run it on a GPU machine, "
              f"or --dry-run to exercise the harness on CPU", file=sys.stderr)
        return 2
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result, args.output)
    return 0 if all(t["status"] == "ok" for t in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
