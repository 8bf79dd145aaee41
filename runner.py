"""What generate.py and flex_attention_generate.py share: the common flags, loading the model and
data, the loop over batches of questions (sharded across processes, resumable, with a progress bar)
and writing the result table."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from constants import (DATASETS, DEFAULT_DATASET, DEFAULT_FEWSHOT_FORMAT, DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE,
                       DEFAULT_MAX_NEW_TOKENS, DEFAULT_PARAPHRASE_TEMPERATURE, DEFAULT_PARAPHRASE_TOP_P,
                       DEFAULT_POSITIONS, EMBEDDED_MODEL, EXIT_BAD_INPUT, REPO_DIR, WEBQA_SAMPLE_FILE, InputError,
                       safe_name)
from dataset import FEWSHOT_FORMATS, PROMPT_FORMATS, Dataset, Record, load_dataset_by_name, resolve_paraphrase_set
from decoding import POSITIONS, prefix_cache
from results import OneLineParser, ResultWriter, TableLock, check_settings, check_writable_dir, lemmaize_table

log = logging.getLogger("self_ensemble")


class Done(Exception):
    """The command's work is finished before a model was needed (--lemmaize); main_guard exits with code 0
    after printing the message."""


def paraphrase_indexs(text: str) -> str:
    """--indexs as upstream spells it: comma-separated paraphrase indices, 0 being the original question."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated paraphrase indices such as 0,2,4, got {text!r}")
    indices = [int(part) for part in parts]
    if len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"{text!r} names a paraphrase twice")
    return ",".join(map(str, indices))


def chosen_indexs(args) -> list[int] | None:
    """The paraphrase indices --indexs chose, or None (then the first N paraphrases are used)."""
    return [int(i) for i in args.indexs.split(",")] if getattr(args, "indexs", None) else None


class CommonParser(OneLineParser):
    """--indexs decides N (upstream: it replaces --num_ensemble): set it, and refuse a different N given with it."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        indexs = chosen_indexs(ns)
        if indexs:
            for dest in ("num_ensemble", "num_paraphrases"):
                if not hasattr(ns, dest):
                    continue
                value = getattr(ns, dest)
                if value is not None and value != self.get_default(dest) and value != len(indexs):
                    self.error(f"--indexs {ns.indexs} chooses {len(indexs)} paraphrases but --{dest} is {value}; "
                               f"give one of them")
                setattr(ns, dest, len(indexs))
        return ns, rest


def common_parser(description: str) -> argparse.ArgumentParser:
    p = CommonParser(description=description)
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=DATASETS)
    p.add_argument("--data-file", "--data_file", help="local data: JSONL for jsonl/webqa_sample/myriadlama, "
                   "WebQuestions JSON, or a datasets save_to_disk folder")
    p.add_argument("--task", choices=["qa", "mask"], help="prompt style for --dataset jsonl (default qa)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="a model key, Hugging Face id or local folder")
    p.add_argument("--limit", "--max-samples", "--max_samples", dest="limit", type=int,
                   help="answer only the first LIMIT questions (--max_samples: upstream's name)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=8, help="questions per batch")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device-map", "--device_map", help="'auto' spreads one large model over several GPUs")
    p.add_argument("--output-dir", "--output_dir", help="default results/<dataset>/<model>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--paraphrase-temperature", type=float, default=DEFAULT_PARAPHRASE_TEMPERATURE,
                   help="webqa: sampling temperature of paraphrasing")
    p.add_argument("--paraphrase-top-p", type=float, default=DEFAULT_PARAPHRASE_TOP_P, help="webqa: top-p of paraphrasing")
    p.add_argument("--paraphrases", metavar="SET", help="myriadlama: templates per fact: manual, manual+autoK "
                   "(K auto templates drawn per fact as upstream) or all (default manual+auto5, upstream's)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="encode the shared prefix in every batch instead of once per run (the reference)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain",
                   help="chat: the tokenizer's chat template writes the prompt (instruction as the system turn, "
                        "few-shot examples as turns, the question last); plain: Q:/A: text")
    p.add_argument("--indexs", type=paraphrase_indexs, metavar="I,J,...",
                   help="upstream's diversity runs: fuse exactly these paraphrases (0 = the original question; N is "
                        "their count); the table goes to <output-dir>/diversity/<name>-<indexs>.feather")
    p.add_argument("--lemmaize", action="store_true",
                   help="generate nothing: add upstream's lemma columns (predict_lemma, answer_lemmas) to the table "
                        "this command names, rewriting it atomically (a no-op when they are there)")
    return p


def table_path(args, path: Path) -> Path:
    """Where the command's table is: `path`, or with --indexs upstream's diversity/<name>-<indexs>.feather
    (ensemble_avg-0,2,4.feather, flex_attention-0,2,4.feather), the count N in the name replaced by the indices."""
    indexs = chosen_indexs(args)
    if not indexs:
        return Path(path)
    path = Path(path)
    stem = re.sub(rf"-{len(indexs)}(?=-|$)", f"-{args.indexs}", path.stem, count=1)
    if stem == path.stem:
        raise RuntimeError(f"{path.name}: no '-{len(indexs)}' to replace by the --indexs")
    return path.parent / "diversity" / f"{stem}{path.suffix}"


def lemmaize_command(args, table: Path | None) -> None:
    """--lemmaize: upstream's separate mode. The table the same command without --lemmaize wrote gets the lemma
    columns; nothing is generated and no model is loaded. Ends with Done (exit code 0)."""
    if table is None:
        raise InputError("--lemmaize adds lemma columns to a result table; this command writes none")
    path = table_path(args, table)
    if not path.exists():
        raise InputError(f"--lemmaize: no table {path}; run the same command without --lemmaize first")
    with TableLock(path):
        added = lemmaize_table(path)
    raise Done(f"{path}: lemma columns {'added' if added else 'already there, nothing to do'} "
               f"(predict_lemma, answer_lemmas)")


def select_paraphrases(dataset: Dataset, indexs: list[int]) -> None:
    """Each question's paraphrases become the chosen ones, in the order given (--indexs)."""
    dataset.records = [dataclasses.replace(r, paraphrases=[r.paraphrases[i] for i in indexs])
                       for r in dataset.records]


def output_dir(args) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    model = safe_name(Path(args.model).name if Path(args.model).is_dir() else args.model)
    return REPO_DIR / "results" / args.dataset / model


def process_state():
    """accelerate's view of the processes: rank and world size (0 of 1 when not launched); without
    a GPU, several processes talk over gloo."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def check_flags(args) -> torch.device:
    """Every flag on its own and together, before anything is read or loaded; returns the device."""
    from models import check_device_map, check_model_name, resolve_device
    for flag in ("batch_size", "max_new_tokens", "limit", "confidence_samples", "num_ensemble", "num_paraphrases"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.paraphrase_temperature <= 0 or not 0 < args.paraphrase_top_p <= 1:
        raise InputError("--paraphrase-temperature must be > 0 and --paraphrase-top-p in (0, 1]")
    device = resolve_device(args.device)
    check_device_map(args.device_map)
    check_model_name(args.model)
    return device


def data_path(args) -> Path | None:
    """The local file or folder the data is read from, where there is one (the hub's datasets have none)."""
    if args.data_file:
        return Path(args.data_file)
    if args.dataset == "webqa_sample":
        return WEBQA_SAMPLE_FILE
    if args.dataset in ("webqa", "myriadlama"):
        from dataset import downloaded
        return downloaded(args.dataset)
    return None


@contextmanager
def warnings_only_if_it_works():
    """Log lines of the block are shown after it, and only if it succeeds: a step that fails says one line."""
    root, held = logging.getLogger(), []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, root.handlers = root.handlers, [Hold()]
    try:
        yield
    finally:
        root.handlers = handlers
    for record in held:
        root.handle(record)


def read_data(args, num_paraphrases: int) -> Dataset:
    """The dataset, with a file that cannot be read (not UTF-8, not readable) reported in one line naming it;
    what the loaders warn about is shown only when the data is good."""
    extra = {"paraphrase_set": args.paraphrases} if getattr(args, "paraphrases", None) is not None else {}
    where = data_path(args) or args.dataset
    try:
        with warnings_only_if_it_works():
            dataset = load_dataset_by_name(args.dataset, args.data_file, args.task, num_paraphrases, None,
                                           args.limit, **extra)
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         f"save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"{where}: cannot read it ({type(err).__name__}: {err.strerror or err})") from None
    for record in dataset.records:
        if not any(isinstance(a, str) and a.strip() for a in record.answers):
            raise InputError(f"{where}: question {record.uuid!r} has no gold answer ('answers' is empty), "
                             f"so it could never be scored correct")
    return dataset


def load_job(args, num_paraphrases: int, table: Path | None = None):
    """(dataset, model, tokenizer). All the user's input is checked before the model loads: the flags, the
    output folder (writable; `table`, if given, not being written by another process) and the data.
    WebQA's paraphrases are made by the model, so only they wait for it."""
    from models import load_model
    if getattr(args, "lemmaize", False):
        lemmaize_command(args, table)
    args.paraphrases = resolve_paraphrase_set(args.dataset, getattr(args, "paraphrases", None))
    device = check_flags(args)
    indexs = chosen_indexs(args)
    if indexs:  # paraphrases 0..max(indexs) are read (or made), then the chosen ones kept
        num_paraphrases = max(indexs) + 1
        if table is not None:
            table = table_path(args, table)
    state = process_state()
    if args.device == "auto" and state.num_processes > 1:
        device = state.device
    check_writable_dir(output_dir(args))
    if table is not None:
        lock = TableLock(table, state.process_index)
        holder = lock.holder()
        if holder is not None:
            raise lock.refusal(holder)
    model_paraphrases = args.dataset == "webqa" and num_paraphrases > 1
    try:
        dataset = read_data(args, 1 if model_paraphrases else num_paraphrases)
    except InputError as err:
        raise (InputError(f"--indexs {args.indexs}: {err}") if indexs else err) from None
    model, tokenizer = load_model(args.model, str(device), args.dtype, device_map=args.device_map)
    prefix_cache(model).enabled = not getattr(args, "no_prefix_cache", False)
    if getattr(args, "prompt_format", "plain") == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"--prompt-format chat: the tokenizer of {args.model} has no chat template; "
                             f"use --prompt-format plain")
        dataset.chat = tokenizer
    if model_paraphrases:  # the questions were read above; the model adds their paraphrases
        from paraphrase import Paraphraser
        paraphraser = Paraphraser(model, tokenizer, args.model, seed=args.seed,
                                  temperature=args.paraphrase_temperature, top_p=args.paraphrase_top_p)
        dataset.records = paraphraser(dataset.records, num_paraphrases - 1)
        dataset.check_paraphrases(num_paraphrases)
    if indexs:
        select_paraphrases(dataset, indexs)
    return dataset, model, tokenizer


def check_prompts(model, dataset: Dataset, rows_of: Callable[[Record], list], max_new_tokens: int) -> None:
    """Before anything runs or is written: every question's prompt and answer fit the context."""
    from decoding import check_context
    for record in dataset.records:
        check_context(model, rows_of(record), max_new_tokens, record.uuid)


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative paths and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path).as_posix()}\n".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def data_fingerprint(args) -> str:
    """The data's content hash (an edited data file makes another table), or the hub id it came from."""
    path = data_path(args)
    if path is not None and path.exists():
        return f"sha256:{file_sha256(path)}"
    return f"hub:{args.dataset}"


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of this checkout: dirty when a tracked file differs from the commit (untracked files,
    such as results, do not count). ("unknown", None) without git or outside a git checkout of this project.
    Reads only: no optional locks, so it never touches the index."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO_DIR), *argv], capture_output=True,
                                  text=True, timeout=20, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != REPO_DIR.resolve():
        return "unknown", None  # no git, or this folder copied into someone else's repository
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit or "unknown", (None if status is None or commit is None else bool(status))


def provenance(args, model=None) -> dict:
    """Where a table came from, kept in its settings file but never compared on resume: the code (git commit
    and dirty flag), the library versions, the model (its key, what it loads from, the weights' revision) and
    where it ran (device and dtype)."""
    import transformers

    from models import model_revision, model_source, resolve_device, resolve_dtype
    commit, dirty = git_state()
    try:
        model_id = model_source(args.model, convert=False)
    except InputError:
        model_id = args.model  # a tiny test model, built by code
    if model is not None:
        device, dtype = model.device, model.dtype
    else:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "model": args.model,
            "model_id": model_id, "model_revision": model_revision(model) if model is not None else None,
            "device": str(device), "device_map": args.device_map,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(dtype).removeprefix("torch.")}


def output_settings(args, model=None, settings: dict | None = None) -> dict:
    """What a table's rows depend on, kept beside it and compared on resume: the flags that change answers
    (not batch size, progress, where it goes, how many questions or the data file's path), the data's
    content hash, the resolved dtype and device type, the model's revision where known, and the
    attention backend and compile mode (`settings`, as the script resolved them; else its flags).
    Its "provenance" entry (see `provenance`) is kept too but not compared (results.check_settings)."""
    from models import model_revision, resolve_device, resolve_dtype
    ignored = {"batch_size", "no_progress", "output_dir", "device", "device_map", "limit", "data_file", "dtype",
               "no_prefix_cache", "lemmaize"}
    out = {k: v for k, v in vars(args).items() if k not in ignored}
    out["data"] = data_fingerprint(args)
    if model is not None:
        out.update(dtype=str(model.dtype).removeprefix("torch."), device=model.device.type,
                   model_revision=model_revision(model))
    else:
        device = resolve_device(args.device)
        out.update(dtype=str(resolve_dtype(args.dtype, device)).removeprefix("torch."), device=device.type)
    out.update(settings or {})
    out["provenance"] = provenance(args, model)
    return dict(sorted(out.items()))


def run_job(args, dataset: Dataset, path: Path, answer_batch: Callable[[list[Record]], list[dict]], *,
            model=None, settings: dict | None = None):
    """Answer every question not already in `path`, `args.batch_size` at a time, on this process's
    shard; rank 0 merges all shards into the final table. Returns the table (rank 0) or None.
    `model` (the loaded one) and `settings` (e.g. {"attn": "flex", "compile": True}) complete the
    settings the table is kept with (see `output_settings`). The table is locked while this runs.
    With --indexs the table goes where `table_path` says (upstream's diversity/ folder)."""
    state = process_state()
    torch.manual_seed(args.seed)
    path = table_path(args, path)
    with TableLock(path, state.process_index):
        check_settings(path, output_settings(args, model, settings), write=state.is_main_process)
        writer = ResultWriter(path, state.process_index)
        done = writer.done_uuids()
        shard = dataset.records[state.process_index::state.num_processes]
        todo = [r for r in shard if r.uuid not in done]
        if state.num_processes > 1:
            log.warning("process %d of %d: %d questions in this shard", state.process_index, state.num_processes,
                        len(shard))
        if len(todo) < len(shard):
            log.warning("%s: resuming, %d of %d questions already done", path.name, len(shard) - len(todo), len(shard))
        with tqdm(total=len(shard), initial=len(shard) - len(todo), desc=path.stem, unit="q",
                  disable=args.no_progress or not state.is_local_main_process) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                writer.append(answer_batch(batch))
                bar.update(len(batch))
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        df = writer.finish([r.uuid for r in dataset.records])
    print(f"{path.stem}: {len(df)} rows, exact {df['exact'].mean():.3f}, partial {df['partial'].mean():.3f} -> {path}")
    return df


def main_guard(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Bad input ends the program with one line on stderr and exit code 2."""
    def guarded(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        try:
            return main(argv)
        except Done as done:
            print(done)
            return 0
        except InputError as err:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return guarded


def add_fusion_flags(p: argparse.ArgumentParser) -> None:
    """The attention-level flags shared by flex_attention_generate.py and debug_flexattention.py."""
    p.add_argument("--num-paraphrases", "--num_paraphrases", type=int, default=5, help="paraphrases per question (N)")
    p.add_argument("--positions", choices=[*POSITIONS, "aligned"], default=DEFAULT_POSITIONS,
                   help="left (alias aligned): every paraphrase starts after the prefix; right: every paraphrase "
                        "ends before the answer cue; continuous: 0..L-1 (upstream)")
    p.add_argument("--attn", choices=["auto", "flex", "sdpa"], default="auto",
                   help="flex: FlexAttention BlockMask; sdpa: the same mask dense (reference backend); auto: flex "
                        "on CUDA, sdpa on CPU")
    p.add_argument("--fusion-bias", choices=["none", "uniform", "confidence"], default=DEFAULT_FUSION_BIAS,
                   help="score bias of the answer on paraphrase keys: uniform -log N, confidence log(weight)")
    p.add_argument("--fusion-temperature", type=float, default=DEFAULT_FUSION_TEMPERATURE,
                   help="the answer's scores on paraphrase keys divided by T (APE); 1: off")
    p.add_argument("--fewshot-format", choices=FEWSHOT_FORMATS, default=DEFAULT_FEWSHOT_FORMAT,
                   help="single: each few-shot example as one question; fused: as its N isolated paraphrases, "
                        "then its answer (the same shape as the question)")
