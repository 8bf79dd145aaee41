"""What generate.py and flex_attention_generate.py share: the common flags, loading the model and
data, the loop over batches of questions (sharded across processes, resumable, with a progress bar)
and writing the result table."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from constants import DATASETS, DEFAULT_DATASET, DEFAULT_MAX_NEW_TOKENS, EMBEDDED_MODEL, EXIT_BAD_INPUT, REPO_DIR, InputError, safe_name
from dataset import Dataset, Record, load_dataset_by_name
from results import ResultWriter, check_settings

log = logging.getLogger("self_ensemble")


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=DATASETS)
    p.add_argument("--data-file", "--data_file", help="local data: JSONL for jsonl/webqa_sample/myriadlama, "
                   "WebQuestions JSON, or a datasets save_to_disk folder")
    p.add_argument("--task", choices=["qa", "mask"], help="prompt style for --dataset jsonl (default qa)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="a model key, Hugging Face id or local folder")
    p.add_argument("--limit", type=int, help="answer only the first LIMIT questions")
    p.add_argument("--batch-size", "--batch_size", type=int, default=8, help="questions per batch")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device-map", "--device_map", help="'auto' spreads one large model over several GPUs")
    p.add_argument("--output-dir", "--output_dir", help="default results/<dataset>/<model>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--paraphrase-temperature", type=float, default=1.5, help="webqa: sampling temperature of paraphrasing")
    p.add_argument("--paraphrase-top-p", type=float, default=0.9, help="webqa: top-p of paraphrasing")
    return p


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


def load_job(args, num_paraphrases: int, attn_implementation: str = "sdpa"):
    """(dataset, model, tokenizer), all checked before anything is written."""
    from models import load_model
    for flag in ("batch_size", "max_new_tokens", "limit", "confidence_samples"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.paraphrase_temperature <= 0 or not 0 < args.paraphrase_top_p <= 1:
        raise InputError("--paraphrase-temperature must be > 0 and --paraphrase-top-p in (0, 1]")
    state = process_state()
    device = str(state.device) if args.device == "auto" and state.num_processes > 1 else args.device
    model, tokenizer = load_model(args.model, device, args.dtype, attn_implementation, args.device_map)
    paraphraser = None
    if args.dataset == "webqa":
        from paraphrase import Paraphraser
        paraphraser = Paraphraser(model, tokenizer, args.model, seed=args.seed,
                                  temperature=args.paraphrase_temperature, top_p=args.paraphrase_top_p)
    dataset = load_dataset_by_name(args.dataset, args.data_file, args.task, num_paraphrases, paraphraser, args.limit)
    return dataset, model, tokenizer


def check_prompts(model, dataset: Dataset, rows_of: Callable[[Record], list], max_new_tokens: int) -> None:
    """Before anything runs or is written: every question's prompt and answer fit the context."""
    from decoding import check_context
    for record in dataset.records:
        check_context(model, rows_of(record), max_new_tokens, record.uuid)


def output_settings(args) -> dict:
    """The flags that change what a table holds (not batch size, device or where it goes)."""
    ignored = {"batch_size", "no_progress", "output_dir", "device", "device_map", "limit", "attn", "compile"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in ignored}


def run_job(args, dataset: Dataset, path: Path, answer_batch: Callable[[list[Record]], list[dict]]):
    """Answer every question not already in `path`, `args.batch_size` at a time, on this process's
    shard; rank 0 merges all shards into the final table. Returns the table (rank 0) or None."""
    state = process_state()
    torch.manual_seed(args.seed)
    check_settings(path, output_settings(args), write=state.is_main_process)
    writer = ResultWriter(path, state.process_index)
    done = writer.done_uuids()
    shard = dataset.records[state.process_index::state.num_processes]
    todo = [r for r in shard if r.uuid not in done]
    if state.num_processes > 1:
        log.warning("process %d of %d: %d questions in this shard", state.process_index, state.num_processes, len(shard))
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
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return guarded
