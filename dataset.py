"""Datasets: one `Record` per question (the original first among its paraphrases, every gold answer)
and the prompt of its task. Loaders: webqa_sample (bundled), webqa, myriadlama, jsonl."""
from __future__ import annotations

import json
import logging
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from constants import (CACHE_DIR, MASK_INSTRUCTION, MYRIADLAMA_HUB_ID, MYRIADLAMA_SPLIT_SEED, MYRIADLAMA_TEST_FACTS,
                       NUM_FEW_SHOT, QA_INSTRUCTION, WEBQA_FEW_SHOT, WEBQA_HUB_ID, WEBQA_SAMPLE_FILE, InputError)

log = logging.getLogger(__name__)


@dataclass
class Record:
    uuid: str
    paraphrases: list[str]  # the original question first
    answers: list[str]


@dataclass
class PromptParts:
    """A prompt cut where attention-level fusion needs it: prefix (instruction and few-shot, shared),
    one segment per paraphrase, suffix (the answer cue, shared)."""
    prefix: str
    segments: list[str]
    suffix: str

    def full(self, i: int) -> str:
        return self.prefix + self.segments[i] + self.suffix


@dataclass
class Dataset:
    name: str
    task: str  # "qa" or "mask"
    records: list[Record]
    few_shot: list[tuple[str, str]] = field(default_factory=list)

    def prompt_parts(self, record: Record, n: int) -> PromptParts:
        if len(record.paraphrases) < n:  # never silently fuse fewer paraphrases than asked for
            raise InputError(f"{self.name}: question {record.uuid} has {len(record.paraphrases)} paraphrases, "
                             f"fewer than the {n} asked for")
        instruction = QA_INSTRUCTION if self.task == "qa" else MASK_INSTRUCTION
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in self.few_shot)
        return PromptParts(f"{instruction}\n\n{shots}", [f"Q: {p}" for p in record.paraphrases[:n]], "\nA:")

    def check_paraphrases(self, n: int) -> None:
        """Every record must have at least n paraphrases (the original counts)."""
        if n < 1:
            raise InputError(f"the number of paraphrases must be at least 1, got {n}")
        for r in self.records:
            if len(r.paraphrases) < n:
                raise InputError(f"{self.name}: question {r.uuid} has {len(r.paraphrases)} paraphrases, "
                                 f"fewer than the {n} asked for")


# ---------------------------------------------------------------- the user's JSONL (and the bundled sample)

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, row))
    if not rows:
        raise InputError(f"{path}: no records")
    return rows


def parse_record(row: dict, where: str) -> Record:
    uuid, paraphrases, answers = row.get("uuid"), row.get("paraphrases"), row.get("answers")
    if uuid is None or str(uuid) == "":
        raise InputError(f"{where}: missing 'uuid'")
    if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) and p.strip() for p in paraphrases):
        raise InputError(f"{where}: 'paraphrases' must be a non-empty list of non-empty strings")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: 'answers' must be a list of strings")
    return Record(str(uuid), [p.strip() for p in paraphrases], answers)


def load_jsonl(path: Path, task: str = "qa", name: str = "jsonl") -> Dataset:
    """Rows with split "train" are the few-shot pool; without any, the first 5 rows are (and are not scored)."""
    records, train, seen = [], [], set()
    for lineno, row in read_jsonl(path):
        record = parse_record(row, f"{path}:{lineno}")
        if record.uuid in seen:
            raise InputError(f"{path}:{lineno}: duplicate uuid {record.uuid!r}")
        seen.add(record.uuid)
        (train if row.get("split") == "train" else records).append(record)
    if not train:
        train, records = records[:NUM_FEW_SHOT], records[NUM_FEW_SHOT:]
        log.warning("%s: no rows with split=train; the first %d rows are the few-shot examples and are not scored",
                    path, len(train))
    if not records:
        raise InputError(f"{path}: no questions left to answer after taking the few-shot examples")
    shots = [(r.paraphrases[0], r.answers[0] if r.answers else "") for r in train[:NUM_FEW_SHOT]]
    return Dataset(name, task, records, shots)


# ---------------------------------------------------------------- WebQuestions

def downloaded(name: str) -> Path | None:
    """The copy download_resources.sh saved, if any: used before asking the hub."""
    folder = CACHE_DIR / "datasets" / name
    return folder if folder.is_dir() else None


def read_webquestions(data_file: Path | None) -> list[dict]:
    """[{question, answers}] from a local JSON (../shared/data/webquestions layout), a `save_to_disk` folder,
    or the hub (stanfordnlp/web_questions, test split)."""
    data_file = data_file or downloaded("webqa")
    if data_file is not None:
        if data_file.is_dir():
            from datasets import load_from_disk
            ds = load_from_disk(str(data_file))
            ds = ds["test"] if hasattr(ds, "keys") and "test" in ds else ds
            return [{"id": f"wqs{i:06d}", "question": r["question"], "answers": list(r["answers"])} for i, r in enumerate(ds)]
        if not data_file.is_file():
            raise InputError(f"data file not found: {data_file}")
        try:
            rows = json.loads(data_file.read_text(encoding="utf-8"))
            return [{"id": r["qId"], "question": r["qText"], "answers": list(r["answers"])} for r in rows]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{data_file}: not a WebQuestions JSON array of {{qId, qText, answers}} ({err})") from None
    from datasets import load_dataset
    try:
        ds = load_dataset(WEBQA_HUB_ID, split="test")
    except Exception as err:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise InputError(f"webqa: cannot load {WEBQA_HUB_ID} from the hub ({type(err).__name__}); offline? "
                         f"pass --data-file ../shared/data/webquestions/test.json") from None
    return [{"id": f"wqs{i:06d}", "question": r["question"], "answers": list(r["answers"])} for i, r in enumerate(ds)]


def load_webqa(data_file: Path | None, num_paraphrases: int, paraphraser=None, limit: int | None = None) -> Dataset:
    """WebQuestions with paraphrases made by the model itself (cached per model, see paraphrase.py)."""
    rows = read_webquestions(data_file)[:limit]
    records = [Record(r["id"], [r["question"]], r["answers"]) for r in rows]
    if num_paraphrases > 1:
        if paraphraser is None:
            raise InputError("webqa: paraphrases are generated by the model; no model given")
        records = paraphraser(records, num_paraphrases - 1)
    return Dataset("webqa", "qa", records, list(WEBQA_FEW_SHOT))


# ---------------------------------------------------------------- MyriadLAMA

def read_myriadlama(data_file: Path | None) -> list[dict]:
    data_file = data_file or downloaded("myriadlama")
    if data_file is not None:
        if data_file.is_dir():
            from datasets import load_from_disk
            ds = load_from_disk(str(data_file))
            return list(ds["train"] if hasattr(ds, "keys") and "train" in ds else ds)
        return [row for _, row in read_jsonl(data_file)]
    from datasets import load_dataset
    try:
        return list(load_dataset(MYRIADLAMA_HUB_ID, split="train"))
    except Exception as err:  # noqa: BLE001
        raise InputError(f"myriadlama: cannot load {MYRIADLAMA_HUB_ID} from the hub ({type(err).__name__}); "
                         f"offline? pass --data-file with a local copy") from None


def fill_template(template: str, subject: str, obj: str = "[MASK]") -> str:
    return template.replace("[X]", subject).replace("[Y]", obj)


def fact_record(uuid: str, rows: list[dict], num_templates: int) -> Record:
    """The 5 manual templates first, then auto templates sampled with a seed derived from the uuid."""
    manual = [r for r in rows if r["is_manual"]]
    auto = [r for r in rows if not r["is_manual"]]
    random.Random(zlib.crc32(uuid.encode())).shuffle(auto)
    chosen = (manual + auto)[:num_templates]
    first = rows[0]
    aliases = as_list(first.get("obj_aliases")) or as_list(first.get("obj_ents"))  # upstream: the aliases
    answers = list(dict.fromkeys(a for a in aliases if a))
    return Record(uuid, [fill_template(r["template"], first["sub_ent"]) for r in chosen], answers)


def as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [x for v in value for x in as_list(v)]  # flattens lists of alias lists


def load_myriadlama(data_file: Path | None, num_templates: int) -> Dataset:
    """Grouped per fact; the test split is upstream's: `train_test_split(test_size=2000, seed=42)` over the
    facts in file order. The few-shot examples are the first 5 training facts (first manual template)."""
    from datasets import Dataset as HFDataset
    facts: dict[str, list[dict]] = {}
    for i, row in enumerate(read_myriadlama(data_file)):
        missing = {"uuid", "sub_ent", "template", "is_manual"} - set(row)
        if missing:
            raise InputError(f"myriadlama row {i + 1}: missing fields {sorted(missing)}")
        facts.setdefault(str(row["uuid"]), []).append(row)
    if len(facts) <= NUM_FEW_SHOT:
        raise InputError(f"myriadlama: only {len(facts)} facts; need more than {NUM_FEW_SHOT}")
    split = HFDataset.from_dict({"uuid": list(facts)}).train_test_split(
        test_size=min(MYRIADLAMA_TEST_FACTS, len(facts) - NUM_FEW_SHOT), seed=MYRIADLAMA_SPLIT_SEED)
    shots = []
    for uuid in split["train"]["uuid"][:NUM_FEW_SHOT]:
        record = fact_record(uuid, facts[uuid], 1)
        shots.append((record.paraphrases[0], record.answers[0] if record.answers else ""))
    records = [fact_record(u, facts[u], len(facts[u])) for u in split["test"]["uuid"]]
    return Dataset("myriadlama", "mask", records, shots)


# ---------------------------------------------------------------- the entry point

def load_dataset_by_name(name: str, data_file: str | None = None, task: str | None = None,
                         num_paraphrases: int = 1, paraphraser=None, limit: int | None = None) -> Dataset:
    """The records of a dataset, checked to have `num_paraphrases` paraphrases each, cut to `limit`."""
    path = Path(data_file) if data_file else None
    if name == "webqa_sample":
        ds = load_jsonl(path or WEBQA_SAMPLE_FILE, task or "qa", name)
    elif name == "jsonl":
        if path is None:
            raise InputError("--dataset jsonl needs --data-file PATH (one JSON object a line)")
        ds = load_jsonl(path, task or "qa")
    elif name == "webqa":
        ds = load_webqa(path, num_paraphrases, paraphraser, limit)
    elif name == "myriadlama":
        ds = load_myriadlama(path, max(num_paraphrases, 1))
    else:
        raise InputError(f"--dataset {name!r}: unknown; choose webqa_sample, webqa, myriadlama or jsonl")
    ds.records = ds.records[:limit]
    ds.check_paraphrases(num_paraphrases)
    return ds
