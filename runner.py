"""Running a job, what generate.py and flex_attention_generate.py share below their flags: the job's
configuration (`RunConfig`), loading the data and the model with every input checked first, and the loop
over batches of questions (sharded across processes, resumable, with a progress bar) that writes the
result table. The flags themselves are cli.py's."""
from __future__ import annotations

import dataclasses
from collections import Counter
import logging
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from constants import (DEFAULT_DATASET, DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_PARAPHRASES, DEFAULT_PARAPHRASE_TEMPERATURE,
                       DEFAULT_PARAPHRASE_TOP_P, DEFAULT_SC_PROMPTS, DEFAULT_SC_TEMPERATURE, DEFAULT_SC_TOP_P,
                       EMBEDDED_MODEL, REPO_DIR, WEBQA_SAMPLE_FILE, InputError, safe_name, warnings_only_if_it_works)
from dataset import Dataset, Record, load_dataset_by_name, resolve_paraphrase_set
from selection import Selection
from decoding import LanguageModel, PrefixCache
from files import check_writable_dir, file_sha256
from results import ResultWriter, TableLock, check_settings, check_table_path, provenance, table_file_names

log = logging.getLogger("self_ensemble")
WEBQA_PROMPTS = 6  # upstream's WebQA: the original question and 5 paraphrases made by the model


@dataclass(frozen=True)
class RunConfig:
    """What a job runs: the data, the model and where it runs, decoding limits, the output, and the
    command's own flags that change its answers (`method_flags`, kept in the table's settings)."""
    dataset: str = DEFAULT_DATASET
    data_file: str | None = None
    task: str | None = None
    model: str = EMBEDDED_MODEL
    limit: int | None = None
    half: str | None = None
    batch_size: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    output_dir: str | None = None
    seed: int = 0
    progress: bool = True
    paraphrase_temperature: float = DEFAULT_PARAPHRASE_TEMPERATURE
    paraphrase_top_p: float = DEFAULT_PARAPHRASE_TOP_P
    paraphrases: str | None = None
    prefix_cache: bool = True
    prompt_format: str = "plain"
    indexs: str | None = None
    num_fewshot: int | None = None
    selection: Selection | None = None
    method_flags: dict = field(default_factory=dict)

    @property
    def chosen(self) -> list[int] | None:
        """The paraphrase indices --indexs chose, or None (then the first N paraphrases are used)."""
        return [int(i) for i in self.indexs.split(",")] if self.indexs else None

    def table(self, name: str, n: int) -> Path:
        """The table `name` (for N paraphrases) in the output folder, renamed for a sampled selection."""
        return self.out_dir() / (self.selection.table_name(name, n) if self.selection else name)

    def out_dir(self) -> Path:
        """--output-dir, or results/<dataset>/<model>: a local model folder by its resolved name, so that
        `--model DIR/..` never moves the output up out of results/<dataset>/."""
        if self.output_dir:
            return Path(self.output_dir)
        name = Path(self.model).resolve().name if Path(self.model).is_dir() else self.model
        model = safe_name(name)
        if model.strip(".") == "":
            raise InputError(f"--model {self.model!r}: its folder has no name to file the results under "
                             f"(results/{self.dataset}/<model>); give --output-dir")
        return REPO_DIR / "results" / self.dataset / model

    def table_path(self, path: Path) -> Path:
        """Where the command's table is: `path`, or with --indexs upstream's diversity/<name>-<indexs>.feather
        (ensemble_avg-0,2,4.feather, flex_attention-0,2,4.feather), the count N in the name replaced by the
        indices."""
        chosen = self.chosen
        if not chosen:
            return Path(path)
        path = Path(path)
        stem = re.sub(rf"-{len(chosen)}(?=-|$)", f"-{self.indexs}", path.stem, count=1)
        if stem == path.stem:
            raise RuntimeError(f"{path.name}: no '-{len(chosen)}' to replace by the --indexs")
        return path.parent / "diversity" / f"{stem}{path.suffix}"

    def data_path(self) -> Path | None:
        """The local file or folder the data is read from, where there is one (the hub's datasets have none)."""
        if self.data_file:
            return Path(self.data_file)
        if self.dataset == "webqa_sample":
            return WEBQA_SAMPLE_FILE
        if self.dataset in ("webqa", "myriadlama"):
            from dataset import downloaded
            return downloaded(self.dataset)
        return None

    def answer_settings(self) -> dict:
        """The flags a table's rows depend on, as its settings file keeps them: not batch size, progress,
        where it goes or runs, how many questions or the data file's path."""
        kept = ("dataset", "task", "model", "max_new_tokens", "seed", "paraphrase_temperature", "paraphrase_top_p",
                "paraphrases", "prompt_format", "indexs")
        extra = {"selection": dataclasses.asdict(self.selection)} if self.selection else {}
        if self.half is not None:  # a half's table is its own: never resumed as the other's
            extra["half"] = self.half
        if self.num_fewshot is not None:
            extra["num_fewshot"] = self.num_fewshot
        return {**{k: getattr(self, k) for k in kept}, **extra, **self.method_flags}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run: how many questions are kept for the rerun (exit 130 or 143)."""

    def __init__(self, kept: int, total: int, code: int):
        super().__init__(f"{kept} of {total} questions kept; rerun the same command to resume")
        self.code = code


def process_state():
    """accelerate's view of the processes: rank and world size (0 of 1 when not launched); without
    a GPU, several processes talk over gloo."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


JSONL_LOADERS = ("webqa_sample", "jsonl")  # dataset.load_jsonl hashes the bytes it reads (Dataset.source_sha256)


def read_data(config: RunConfig, num_paraphrases: int) -> Dataset:
    """The dataset, with a file that cannot be read (not UTF-8, not readable) reported in one line naming it;
    what the loaders warn about is shown only when the data is good. `Dataset.source_sha256` is the hash of
    what was read (see `hash_of_what_is_read`), the table's settings record it."""
    where = config.data_path() or config.dataset
    try:
        with warnings_only_if_it_works(), hash_of_what_is_read(config) as dataset_of:
            dataset = dataset_of(load_dataset_by_name(config.dataset, config.data_file, config.task, num_paraphrases, None,
                                           config.limit, paraphrase_set=config.paraphrases,
                                           num_fewshot=config.num_fewshot, half=config.half))
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


@contextmanager
def hash_of_what_is_read(config: RunConfig):
    """Yields a function that gives the loaded dataset its `source_sha256`, the hash of the bytes the loader read:
    load_jsonl hashes them as it reads; the other local loaders (WebQuestions JSON, save_to_disk folders,
    MyriadLAMA) read through libraries, so the file is hashed before and after and must not change between
    (an edit while it is read is refused: the rows could hold either version). Hub data has no file (None)."""
    path = config.data_path()
    local = path is not None and path.exists() and config.dataset not in JSONL_LOADERS
    before = file_sha256(path) if local else None

    def dataset_of(dataset: Dataset) -> Dataset:
        if local:
            after = file_sha256(path)
            if after != before:
                raise InputError(f"{path}: changed while it was read; rerun once nobody is editing it")
            dataset.source_sha256 = after
        return dataset
    yield dataset_of


def check_not_output(config: RunConfig, table: Path | None) -> None:
    """No run reads its input from its own output: a --data-file that is (through any symlink or relative path)
    one of the files of the table it writes (any rank's), or a result table or partial file in the output folder."""
    if not config.data_file:
        return
    data = Path(os.path.realpath(config.data_file))
    data = data.with_name(RANK_FILE.sub(".rank0.", data.name))
    own = set()
    if table is not None:
        path = config.table_path(table)
        own = {Path(os.path.realpath(path.parent)) / name for name in table_file_names(path, 0)}
    out = Path(os.path.realpath(config.out_dir()))
    a_table = data.suffix == ".feather" or ".rank0." in data.name or data.with_suffix(".settings.json").exists()
    if data in own or (a_table and (out == data.parent or out in data.parents)):
        raise InputError(f"--data-file {config.data_file}: is a result table of the output folder ({data.parent}); "
                         f"no run reads what it writes: copy the data elsewhere or use another --output-dir")


RANK_FILE = re.compile(r"\.rank\d+\.")  # every rank's lock and partial file belong to the table


def check_selection(config: RunConfig, dataset: Dataset, num_paraphrases: int) -> None:
    """A sampled selection that the data cannot give (more distinct selections than exist, a mix larger than the
    manual or automatic templates) is refused before the model loads. WebQA's paraphrases are made by the model
    later: their count (WEBQA_PROMPTS) is known."""
    if config.selection is None:
        return
    made = max(num_paraphrases, WEBQA_PROMPTS) if model_paraphrases(config, num_paraphrases) else None
    for record in dataset.records:
        config.selection.check(record, num_paraphrases, made)


def select_paraphrases(dataset: Dataset, indexs: list[int]) -> None:
    """Each question's paraphrases become the chosen ones, in the order given (--indexs)."""
    dataset.records = [dataclasses.replace(r, paraphrases=[r.paraphrases[i] for i in indexs], indices=list(indexs))
                       for r in dataset.records]


def open_job(config: RunConfig, num_paraphrases: int, table: Path | None = None) -> tuple[RunConfig, Dataset]:
    """(config with the resolved template set, dataset), every input checked before any model loads: the
    output folder (writable; `table`, if given, not being written by another process) and the data. WebQA's
    paraphrases are made by the model: `bind_model` adds them."""
    config = dataclasses.replace(config, paraphrases=resolve_paraphrase_set(config.dataset, config.paraphrases))
    if config.chosen:  # paraphrases 0..max(indexs) are read (or made), then the chosen ones kept
        num_paraphrases = max(config.chosen) + 1
    from models import check_cache_dir, has_chat_template
    check_cache_dir()
    if table is not None:
        check_table_path(config.table_path(table))  # names past the file system's limit, before any stat of them
    check_writable_dir(config.out_dir())
    if table is not None:
        path = config.table_path(table)
        lock = TableLock(path, process_state().process_index)
        holder = lock.holder()
        if holder is not None:
            raise lock.refusal(holder)
    check_not_output(config, table)
    try:
        dataset = read_data(config, 1 if model_paraphrases(config, num_paraphrases) else num_paraphrases)
    except InputError as err:
        raise (InputError(f"--indexs {config.indexs}: {err}") if config.chosen else err) from None
    check_selection(config, dataset, num_paraphrases)
    if config.prompt_format == "chat" and has_chat_template(config.model) is False:
        raise InputError(f"--prompt-format chat: the tokenizer of {config.model} has no chat template; "
                         f"use --prompt-format plain")
    if table is not None:  # a resume with other settings is refused before the model loads
        check_settings(config.table_path(table), output_settings(config, dataset), write=False)
    return config, dataset


def model_paraphrases(config: RunConfig, num_paraphrases: int) -> bool:
    return config.dataset == "webqa" and num_paraphrases > 1


def load_lm(config: RunConfig) -> LanguageModel:
    """The model on the configured device (each process's own GPU under accelerate), with its prefix cache."""
    from models import load_model, resolve_device
    if not config.progress:  # --no-progress: transformers' "Loading weights" bar too
        import transformers
        transformers.utils.logging.disable_progress_bar()
    device = resolve_device(config.device)
    state = process_state()
    if config.device == "auto" and state.num_processes > 1:
        device = state.device
    model, tokenizer = load_model(config.model, str(device), config.dtype, device_map=config.device_map)
    return LanguageModel(model, tokenizer, PrefixCache() if config.prefix_cache else None)


def bind_model(config: RunConfig, dataset: Dataset, lm: LanguageModel, num_paraphrases: int) -> None:
    """What the data (fresh from `open_job`) needs from the model: its chat template (--prompt-format chat),
    WebQA's paraphrases made by it, then the --indexs choice."""
    if config.prompt_format == "chat":
        if not getattr(lm.tokenizer, "chat_template", None):
            raise InputError(f"--prompt-format chat: the tokenizer of {config.model} has no chat template; "
                             f"use --prompt-format plain")
        dataset.chat = lm.tokenizer
    if config.chosen:
        num_paraphrases = max(config.chosen) + 1
    if model_paraphrases(config, num_paraphrases):  # the questions were read by open_job; the model adds paraphrases
        from paraphrase import Paraphraser
        paraphraser = Paraphraser(lm, config.model, seed=config.seed, temperature=config.paraphrase_temperature,
                                  top_p=config.paraphrase_top_p)
        made = max(num_paraphrases, WEBQA_PROMPTS) if config.selection else num_paraphrases  # samples draw from all
        dataset.records = paraphraser(dataset.records, made - 1)
        dataset.check_paraphrases(made)
    if config.chosen:
        select_paraphrases(dataset, config.chosen)
    if config.selection:  # one record per sampled selection of the question's paraphrases
        dataset.records = config.selection.expand(dataset.records, num_paraphrases, config.seed)


def load_job(config: RunConfig, num_paraphrases: int, table: Path | None = None
             ) -> tuple[RunConfig, Dataset, LanguageModel]:
    """`open_job`, then the model, then `bind_model`: (config, dataset, loaded model)."""
    config, dataset = open_job(config, num_paraphrases, table)
    lm = load_lm(config)
    bind_model(config, dataset, lm, num_paraphrases)
    return config, dataset, lm


def check_prompts(model, dataset: Dataset, rows_of: Callable[[Record], list], max_new_tokens: int) -> None:
    """Before anything runs or is written: every question's prompt and answer fit the context."""
    from decoding import check_context
    for record in dataset.records:
        check_context(model, rows_of(record), max_new_tokens, record.uuid)


def data_fingerprint(config: RunConfig, dataset: Dataset) -> str:
    """The hash of the data as it was read (an edited data file makes another table: the hash is never taken
    again later, so a file edited while the model loads cannot put its new hash beside rows of the old data),
    or the hub id it came from."""
    if dataset.source_sha256 is not None:
        return f"sha256:{dataset.source_sha256}"
    return f"hub:{config.dataset}"


def output_settings(config: RunConfig, dataset: Dataset) -> dict:
    """What a table's rows depend on, kept beside it and compared on resume, known before the model loads: the
    flags that change answers (RunConfig.answer_settings, the resolved attention backend and compile mode
    among them), the data's content hash, the resolved dtype and device type and the model's revision
    (models.source_revision). The table's "provenance" is kept beside them, never compared (results.provenance)."""
    from models import resolve_device, resolve_dtype, source_revision
    device = resolve_device(config.device)
    out = config.answer_settings()
    out.update(data=data_fingerprint(config, dataset), dtype=str(resolve_dtype(config.dtype, device)).removeprefix("torch."),
               device=device.type, model_revision=source_revision(config.model))
    return dict(sorted(out.items()))


def run_job(config: RunConfig, dataset: Dataset, path: Path, answer_batch: Callable[[list[Record]], list[dict]], *,
            model, rows_per_question: Callable[[Record], int] = lambda record: 1):
    """Answer every question not already in `path`, `config.batch_size` at a time, on this process's
    shard; rank 0 merges all shards into the final table. Returns the table (rank 0) or None.
    A question is finished when its `rows_per_question` rows are all written: an interrupted question is
    redone. The loaded `model` is recorded in the table's provenance. The table is locked while this runs.
    With --indexs the table goes where `RunConfig.table_path` says (upstream's diversity/ folder)."""
    return run_tables([(config, path)], dataset, lambda batches: [answer_batch(batches[0])], model=model,
                      rows_per_question=rows_per_question)[0]


def run_tables(tables: list[tuple[RunConfig, Path]], dataset: Dataset,
               answer: Callable[[list[list[Record]]], list[list[dict]]], *, model,
               rows_per_question: Callable[[Record], int] = lambda record: 1) -> list:
    """`run_job` for several tables of one dataset written together (the variants of a shared sweep): each
    (config, path) its own table, settings, lock and resume; the questions go batch by batch, and `answer`
    gets each table's questions of the batch still to do (possibly none) and gives each table's rows."""
    state = process_state()
    torch.manual_seed(tables[0][0].seed)
    paths = [config.table_path(path) for config, path in tables]
    with ExitStack() as locks:
        for path in paths:
            locks.enter_context(TableLock(path, state.process_index))
        for (config, _), path in zip(tables, paths):
            settings = {**output_settings(config, dataset), "provenance": provenance(config.model, config.device_map,
                                                                                     model)}
            check_settings(path, settings, write=state.is_main_process)
        state.wait_for_everyone()  # no rank writes rows before rank 0 has checked and written the settings
        expected = Counter()
        for record in dataset.records:  # a sampled question is one record per selection
            expected[record.uuid] += rows_per_question(record)
        order = list(expected)
        mine = set(order[state.process_index::state.num_processes])  # a question's selections stay on one rank
        if state.num_processes > 1:
            log.warning("process %d of %d: %d questions in this shard", state.process_index, state.num_processes,
                        len(mine))
        writers, todo = [ResultWriter(path, state.process_index) for path in paths], []
        for writer in writers:
            writer.drop_incomplete(expected)
            done = writer.done_uuids(expected) & mine
            if done:
                log.warning("%s: resuming, %d of %d questions already done", writer.path.name, len(done), len(mine))
            todo.append(mine - done)
        answer_all(dataset.records, todo, answer, writers, tables[0][0], len(mine), state.is_local_main_process)
        state.wait_for_everyone()
        if not state.is_main_process:
            return [None] * len(tables)
        frames = [writer.finish(order, expected) for writer in writers]
    for path, df in zip(paths, frames):
        print(f"{path.stem}: {len(df)} rows, exact {df['exact'].mean():.3f}, partial {df['partial'].mean():.3f} -> "
              f"{path}")
    return frames


def answer_all(records: list[Record], todo: list[set[str]], answer: Callable[[list[list[Record]]], list[list[dict]]],
               writers: list[ResultWriter], config: RunConfig, total: int, show: bool) -> None:
    """Answer and append each table's questions to do (`todo`: its uuids), batch by batch over the questions any
    table still needs, under a progress bar over questions (a question counts when every table has it); Ctrl-C
    or SIGTERM ends it with Interrupted, saying how many questions are kept."""
    needed = [r for r in records if any(r.uuid in uuids for uuids in todo)]
    left = Counter(r.uuid for r in needed)
    kept = total - len(left)
    try:
        with tqdm(total=total, initial=kept, desc=writers[0].path.stem, unit="q",
                  disable=not config.progress or not show) as bar:
            for start in range(0, len(needed), config.batch_size):
                batch = needed[start:start + config.batch_size]
                batches = [[r for r in batch if r.uuid in uuids] for uuids in todo]
                for writer, rows, asked in zip(writers, answer(batches), batches):
                    if asked:
                        writer.append(rows)
                left.subtract(r.uuid for r in batch)
                finished = sum(1 for r in dict.fromkeys(r.uuid for r in batch) if left[r] == 0)
                kept += finished
                bar.update(finished)
    except KeyboardInterrupt as err:
        raise Interrupted(kept, total, 143 if type(err).__name__ == "Terminated" else 130) from None


# ---------------------------------------------------------------- the two kinds of job

def logit_table_name(method: str, n: int, flags: dict | None = None) -> str:
    """The table of a logit-level method; self-consistency's names its non-default settings (from `flags`,
    the table's method flags)."""
    if method == "self_consistency":
        return self_consistency(flags or {}).table_name(n)
    return f"{method}.feather" if method in ("per_prompt", "origin") else f"ensemble_{method}-{n}.feather"


def self_consistency(flags: dict, seed: int = 0):
    """methods.SelfConsistency from a table's method flags (`logit_flags`) and the run's seed."""
    from methods import SelfConsistency
    return SelfConsistency(flags.get("sc_samples"), flags.get("sc_temperature", DEFAULT_SC_TEMPERATURE),
                           flags.get("sc_top_p", DEFAULT_SC_TOP_P), flags.get("sc_prompts", DEFAULT_SC_PROMPTS), seed)


def logit_count(method: str, num: int | None) -> int | None:
    """N of a logit-level method: origin 1; per_prompt with no N every paraphrase (None); else N or 5."""
    from constants import DEFAULT_NUM_PARAPHRASES
    if method == "origin":
        return 1
    return None if method == "per_prompt" and num is None else num or DEFAULT_NUM_PARAPHRASES


def logit_flags(method: str, num: int | None, confidence_samples: int, sc=None) -> dict:
    """generate.py's flags that change its answers, as its tables' settings keep them; `sc`
    (methods.SelfConsistency) for self_consistency only, so the other tables' settings stay as they were."""
    extra = sc.flags(logit_count(method, num)) if sc is not None and method == "self_consistency" else {}
    return dict(method=method, num_ensemble=num, confidence_samples=confidence_samples, **extra)


def fusion_flags(settings, n: int, confidence_samples: int) -> dict:
    """flex_attention_generate.py's flags that change its answers, as its tables' settings keep them (the
    resolved backend and compile mode are added from FusionSettings.table_settings)."""
    return dict(num_paraphrases=n, positions=settings.positions, fusion_bias=settings.bias,
                fusion_temperature=settings.temperature, fewshot_format=settings.fewshot,
                confidence_samples=confidence_samples, **settings.table_settings())


def logit_job(config: RunConfig, dataset: Dataset, lm: LanguageModel, method: str, num: int | None):
    """One logit-level method's table (per_prompt, origin, avg, avg_prob, max, weighted_avg, weighted_max,
    self_consistency)."""
    from confidence import check_cache, confidences
    from decoding import StopRule, eos_ids, single_rows
    from methods import answer_ensemble, answer_per_prompt, answer_self_consistency
    n = logit_count(method, num)
    table = config.table(logit_table_name(method, n or 1, config.method_flags), n or 1)
    stop = StopRule(eos_ids(lm.model, lm.tokenizer), config.max_new_tokens)

    def count(record: Record) -> int:
        return n or len(record.paraphrases)
    check_prompts(lm.model, dataset, lambda r: single_rows(lm.tokenizer, dataset.prompt_parts(r, count(r)),
                                                           list(range(count(r)))), config.max_new_tokens)

    def answer_batch(batch: list[Record]) -> list[dict]:
        if method in ("per_prompt", "origin"):
            return answer_per_prompt(lm, dataset, batch, n, stop, method)[0]
        if method == "self_consistency":
            return answer_self_consistency(lm, dataset, batch, n, stop, self_consistency(config.method_flags,
                                                                                         config.seed))[0]
        if not method.startswith("weighted"):
            return answer_ensemble(lm, dataset, batch, n, stop, method)[0]
        conf = confidences(lm, dataset, batch, n, config.method_flags["confidence_samples"], stop, config.out_dir(),
                           config.seed, model_name=config.model, progress=config.progress)
        return conf.annotate(answer_ensemble(lm, dataset, batch, n, stop, method, conf.values)[0])
    if method.startswith("weighted"):
        check_cache(lm, config.method_flags["confidence_samples"], stop, config.out_dir(), config.seed, config.model)
    per_question = count if method == "per_prompt" else (lambda record: 1)
    return run_job(config, dataset, table, answer_batch, model=lm.model, rows_per_question=per_question)


def fusion_job(config: RunConfig, dataset: Dataset, lm: LanguageModel, settings, n: int):
    """One attention-level variant's table: `settings` (fusion.FusionSettings) over N paraphrases."""
    return fusion_jobs([config], dataset, lm, [settings], n)[0]


def fusion_jobs(configs: list[RunConfig], dataset: Dataset, lm: LanguageModel, variants: list, n: int) -> list:
    """Attention-level variants' tables written together (`configs[i]` runs `variants[i]`, a FusionSettings, over
    N paraphrases of one dataset): in every batch the variants that read the paraphrases alike share their
    prefill (methods.answer_fusions); each table is the one its variant writes alone."""
    from confidence import bias_weights, check_cache, normalised_weights
    from decoding import StopRule, eos_ids, fused_row
    from methods import answer_fusions
    config = configs[0]
    tables = [(c, c.table(v.table_name(n), n)) for c, v in zip(configs, variants)]
    stop = StopRule(eos_ids(lm.model, lm.tokenizer), config.max_new_tokens)
    for layout in dict.fromkeys((v.positions, v.fewshot) for v in variants):
        check_prompts(lm.model, dataset, lambda r: [fused_row(lm.tokenizer, dataset.prompt_parts(r, n, layout[1]),
                                                              layout[0])], config.max_new_tokens)
    if any(v.bias == "confidence" for v in variants):
        check_cache(lm, config.method_flags["confidence_samples"], stop, config.out_dir(), config.seed, config.model)

    def weights_of(settings, batch: list[Record]):
        # plain prompts (confidence, agreement): decoded under sdpa by their own PaddingMask
        return bias_weights(lm, dataset, batch, n, settings.bias, stop, config.method_flags["confidence_samples"],
                            config.out_dir(), config.seed, config.model, config.progress)

    def answer(batches: list[list[Record]]) -> list[list[dict]]:
        out: list[list[dict]] = [[] for _ in variants]
        together: dict[tuple, list[int]] = {}  # the variants asked the same questions decode together
        for i, batch in enumerate(batches):
            if batch:
                together.setdefault(tuple(r.uuid for r in batch), []).append(i)
        for members in together.values():
            batch = batches[members[0]]
            confs = [weights_of(variants[i], batch) for i in members]
            weights = [conf and {u: normalised_weights(c) for u, c in conf.values.items()} for conf in confs]
            with compile_failures_in_one_line(variants[members[0]]):
                rows = answer_fusions(lm, dataset, batch, n, stop, [variants[i] for i in members], weights)[0]
            for i, conf, variant_rows in zip(members, confs, rows):
                out[i] = conf.annotate(variant_rows) if conf else variant_rows
        return out
    return run_tables(tables, dataset, answer, model=lm.model)


@contextmanager
def compile_failures_in_one_line(settings):
    """Compiled FlexAttention that fails to compile (an inductor or dynamo error, the recompile limit) ends the
    run in one line naming the ways around it; nothing falls back to another backend on its own."""
    if not settings.compile:
        yield
        return
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
    from torch._inductor.exc import CppCompileError
    try:
        yield
    except (TorchDynamoException, CppCompileError, FailOnRecompileLimitHit) as err:
        from constants import first_line
        raise InputError(f"compiled FlexAttention failed ({first_line(err)[:300]}); use --compile off (eager flex) "
                         f"or --attn sdpa") from None


# ---------------------------------------------------------------- from Python (a notebook)

def answer_table(lm: LanguageModel, questions: list[Record], method: str, n: int | None = None, *,
                 settings=None, few_shot: list[tuple[str, str]] = (), task: str = "qa", max_new_tokens: int = 16,
                 batch_size: int = 8):
    """The scored result table of `method` over `questions`, in memory (nothing written), the model loaded
    once by the caller: `lm = load_lm(RunConfig(model="smollm2_135m_it"))`. method: per_prompt, origin, a
    logit-level fusion (avg, avg_prob, max), "self_consistency" (with `settings`, default SelfConsistency()) or
    "flex_attention" (with `settings`, default FusionSettings()); n: paraphrases per question (per_prompt: None
    asks every one)."""
    import pandas as pd

    import scoring
    from decoding import StopRule, eos_ids
    from fusion import FusionSettings
    from methods import SelfConsistency, answer_ensemble, answer_fused, answer_per_prompt, \
        answer_self_consistency
    check_answer_table(questions, method, n, max_new_tokens, batch_size)
    n = n if n is not None or method == "per_prompt" else DEFAULT_NUM_PARAPHRASES
    dataset = Dataset("notebook", task, list(questions), list(few_shot))
    dataset.check_paraphrases(n or 1)
    stop = StopRule(eos_ids(lm.model, lm.tokenizer), max_new_tokens)
    rows = []
    for start in range(0, len(questions), batch_size):
        batch = dataset.records[start:start + batch_size]
        if method in ("per_prompt", "origin"):
            rows += answer_per_prompt(lm, dataset, batch, n, stop, method)[0]
        elif method == "flex_attention":
            rows += answer_fused(lm, dataset, batch, n, stop, settings or FusionSettings())[0]
        elif method == "self_consistency":
            rows += answer_self_consistency(lm, dataset, batch, n, stop, settings or SelfConsistency())[0]
        else:
            rows += answer_ensemble(lm, dataset, batch, n, stop, method)[0]
    return scoring.score_frame(pd.DataFrame(rows))


NOTEBOOK_METHODS = ("per_prompt", "origin", "avg", "avg_prob", "max", "self_consistency", "flex_attention")


def check_answer_table(questions, method: str, n, max_new_tokens, batch_size) -> None:
    """answer_table's arguments, each refused in one line rather than bent into something else (n=0 was 5,
    max_new_tokens=0 one token, a string of paraphrases one paraphrase per character)."""
    from dataset import Record
    if method not in NOTEBOOK_METHODS:
        raise InputError(f"method {method!r}: choose {', '.join(NOTEBOOK_METHODS)} (the weighted methods need "
                         f"confidences: run generate.py)")
    if isinstance(questions, (str, bytes, Record)) or not isinstance(questions, (list, tuple)) or not questions:
        raise InputError(f"questions: give a non-empty list of dataset.Record, got {short_repr(questions)}")
    for i, record in enumerate(questions):
        if not isinstance(record, Record):
            raise InputError(f"questions[{i}]: not a dataset.Record ({short_repr(record)})")
        if not isinstance(record.paraphrases, (list, tuple)) or not record.paraphrases or not all(
                isinstance(p, str) and p.strip() for p in record.paraphrases):
            raise InputError(f"questions[{i}] ({record.uuid!r}): paraphrases must be a non-empty list of non-empty "
                             f"strings, got {short_repr(record.paraphrases)}")
    for name, value, allowed_none in (("n", n, True), ("max_new_tokens", max_new_tokens, False),
                                      ("batch_size", batch_size, False)):
        if value is None and allowed_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a whole number of at least 1, got {short_repr(value)}")


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
