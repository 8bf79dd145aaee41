"""Datasets: one `Record` per question (the original first among its paraphrases, every gold answer)
and the prompt of its task. Loaders: webqa_sample (bundled), webqa, myriadlama, jsonl. webqa and myriadlama are
built as upstream builds them (same questions/facts in the same order, uuids, prompts and few-shot examples)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from constants import (CACHE_DIR, MYRIADLAMA_FIXTURE_FILE, MASK_INSTRUCTION, MYRIADLAMA_DEFAULT_PARAPHRASES, MYRIADLAMA_FEW_SHOT_SEED,
                       MYRIADLAMA_HUB_ID, MYRIADLAMA_SPLIT_SEED, MYRIADLAMA_TEST_FACTS, NUM_FEW_SHOT, QA_INSTRUCTION,
                       REPO_DIR, WEBQA_BUNDLED_DIR, WEBQA_FEW_SHOT_SEED, WEBQA_HUB_ID, WEBQA_SAMPLE_FILE,
                       WEBQA_TRAIN_FILES, WEBQA_TRAIN_QUESTIONS, InputError, first_line)

log = logging.getLogger(__name__)


@dataclass
class Record:
    uuid: str
    paraphrases: list[str]  # the original question first
    answers: list[str]
    num_manual: int | None = None     # MyriadLAMA: how many of the paraphrases are manual templates (they come first)
    indices: list[int] | None = None  # which of the question's paraphrases these are (a selection), in order
    sample: int | None = None         # which of a question's sampled selections this is (--num_samples)


@dataclass
class PromptParts:
    """A prompt cut where attention-level fusion needs it: shared texts (seen once) alternating with
    paraphrase texts (one per paraphrase, isolated from each other while they are encoded)

        [shared 0][paraphrases 1][shared 1] ... [paraphrases K][shared K]

    Usually K = 1: the prefix (instruction and few-shot examples), the question's N paraphrases and the
    answer cue. In the fused few-shot format each example is a block of its own: its N paraphrases, then
    its answer as the shared text after them."""
    shared: list[str]
    paraphrases: list[list[str]]
    special_tokens: bool = True  # the tokenizer adds BOS etc. (False: a chat template wrote them in the text)

    @property
    def prefix(self) -> str:
        return self.shared[0]

    @property
    def segments(self) -> list[str]:
        """The question's paraphrases (the last block)."""
        return self.paraphrases[-1]

    @property
    def suffix(self) -> str:
        return self.shared[-1]

    def full(self, i: int) -> str:
        """The plain prompt of paraphrase i: the text the model reads when it is asked alone."""
        return self.shared[0] + "".join(block[i] + after for block, after in zip(self.paraphrases, self.shared[1:]))


FEWSHOT_FORMATS = ("single", "fused")
PROMPT_FORMATS = ("plain", "chat")
MARK = "\x1fself-ensemble-{}\x1f"  # stands for a question while a chat template is rendered


@dataclass
class Dataset:
    name: str
    task: str  # "qa" or "mask"
    records: list[Record]
    few_shot: list[tuple[str, str]] = field(default_factory=list)  # (question as shown, answer)
    few_shot_paraphrases: list[list[str]] = field(default_factory=list)  # each example's paraphrases, if known
    chat: object | None = None  # a tokenizer whose chat template writes the prompt (--prompt-format chat)
    source_sha256: str | None = None  # the data file's bytes as the loader read them (JSONL), for the settings

    def prompt_parts(self, record: Record, n: int, fewshot: str = "single") -> PromptParts:
        """single: every few-shot example as one question and its answer; fused: as its N paraphrases (cycled
        if it has fewer), isolated like the question's, then its answer."""
        if len(record.paraphrases) < n:  # never silently fuse fewer paraphrases than asked for
            raise InputError(f"{self.name}: question {record.uuid} has {len(record.paraphrases)} paraphrases, "
                             f"fewer than the {n} asked for")
        instruction = QA_INSTRUCTION if self.task == "qa" else MASK_INSTRUCTION
        if self.chat is not None:
            return self.chat_parts(instruction, record.paraphrases[:n], fewshot)
        question = [f"Q: {p}" for p in record.paraphrases[:n]]
        if fewshot == "single":
            shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in self.few_shot)
            return PromptParts([f"{instruction}\n\n{shots}", "\nA:"], [question])
        examples = [[f"Q: {p}" for p in shot] for shot in self.example_paraphrases(n)]
        answers = [f"\nA: {a}\n\n" for _, a in self.few_shot]
        return PromptParts([f"{instruction}\n\n", *answers, "\nA:"], [*examples, question])

    def example_paraphrases(self, n: int) -> list[list[str]]:
        """Each few-shot example as n paraphrases (cycled if it has fewer), for the fused format."""
        if len(self.few_shot_paraphrases) != len(self.few_shot):
            raise InputError(f"{self.name}: its few-shot examples have no paraphrases; use --fewshot-format single")
        return [[shot[i % len(shot)] for i in range(n)] for shot in self.few_shot_paraphrases]

    def chat_parts(self, instruction: str, paraphrases: list[str], fewshot: str) -> PromptParts:
        """The prompt as the tokenizer's chat template writes it: the instruction as the system turn, each
        few-shot example as a user and an assistant turn, the question as the last user turn; everything
        after the question (its turn's end, the assistant header) is the shared suffix the answer fuses on."""
        n = len(paraphrases)
        blocks = ([*self.example_paraphrases(n), paraphrases] if fewshot == "fused" else [paraphrases])
        shown = [MARK.format(j) for j in range(len(blocks))]
        examples = shown[:-1] if fewshot == "fused" else [q for q, _ in self.few_shot]
        messages = [{"role": "system", "content": instruction}]
        for question, (_, answer) in zip(examples, self.few_shot):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": shown[-1]})
        try:
            text = self.chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template that raises (Gemma's refuse a system turn) or won't parse
            raise InputError(f"--prompt-format chat: the tokenizer's chat template fails on this prompt "
                             f"({first_line(err)[:200]}); use --prompt-format plain") from None
        shared = re.split("|".join(re.escape(m) for m in shown), text)
        if len(shared) != len(blocks) + 1:
            raise InputError("--prompt-format chat: the tokenizer's chat template does not keep the question text "
                             "as given; use --prompt-format plain")
        return PromptParts(shared, blocks, special_tokens=False)

    def check_paraphrases(self, n: int) -> None:
        """Every record must have at least n paraphrases (the original counts)."""
        if n < 1:
            raise InputError(f"the number of paraphrases must be at least 1, got {n}")
        for r in self.records:
            if len(r.paraphrases) < n:
                raise InputError(f"{self.name}: question {r.uuid} has {len(r.paraphrases)} paraphrases, "
                                 f"fewer than the {n} asked for")


# ---------------------------------------------------------------- the user's JSONL (and the bundled sample)

MASK_PLACEHOLDER = "[MASK]"  # what a --task mask prompt asks the model to fill in
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a (lone or paired) surrogate can enter JSON text
JSON_BLANK = " \t\r"  # the JSON whitespace a blank line may hold besides its "\n"


def has_lone_surrogate(value) -> bool:
    """Whether a JSON value holds a lone surrogate (json.loads gives one for "\\ud800" alone; a valid pair
    decodes to one character): text no file, table or tokenizer can encode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json(text: str, where: str):
    """One JSON value, with every way it can be bad as an InputError naming `where` (file:line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply") from None
    if SURROGATE_ESCAPE.search(text) and has_lone_surrogate(value):
        raise InputError(f"{where}: invalid Unicode (lone surrogate)")
    return value


def check_data_file(path: Path) -> None:
    """A data file must be a regular file: a folder, a device or a FIFO (which would hang the read) is named."""
    import stat
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"data file not found: {path}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({type(err).__name__}: {err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        from files import file_kind
        raise InputError(f"data file {path} is {file_kind(mode)}, not a file of JSON lines")


def jsonl_lines(path: Path, digest=None):
    """(line number, text) of each non-blank line, read once from disk; `digest` (hashlib) gets every byte read,
    so that what is hashed is what was read. Lines end at "\\n" only: U+2028, U+0085, \\x0c... inside a line are
    data (str.splitlines would cut the line there)."""
    check_data_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            try:
                line = raw.decode("utf-8").removesuffix("\n")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}); save it as UTF-8") from None
            if line.strip(JSON_BLANK):
                yield lineno, line


def json_object(line: str, where: str) -> dict:
    row = parse_json(line, where)
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object")
    return row


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line (see jsonl_lines)."""
    rows = [(lineno, json_object(line, f"{path}:{lineno}")) for lineno, line in jsonl_lines(path)]
    if not rows:
        raise InputError(f"{path}: no records")
    return rows


def check_uuid(uuid, where: str) -> str:
    """A uuid as the tables keep it (a string): a non-blank string or an integer; anything else (true/false, a
    float, a list, an object, "   ") is an InputError naming `where`."""
    if uuid is None:
        raise InputError(f"{where}: missing 'uuid'")
    if isinstance(uuid, str) and uuid.strip():
        return uuid
    if isinstance(uuid, int) and not isinstance(uuid, bool):
        return str(uuid)
    shown = repr(uuid) if len(repr(uuid)) <= 40 else repr(uuid)[:40] + "..."
    raise InputError(f"{where}: 'uuid' must be a non-blank string or an integer, got {shown}")


def check_num_fewshot(num_fewshot: int | None) -> int:
    """The number of few-shot examples: None is the default (constants.NUM_FEW_SHOT, upstream's 5); 0 allowed."""
    if num_fewshot is None:
        return NUM_FEW_SHOT
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise InputError(f"--num-fewshot {num_fewshot!r}: must be a whole number, 0 or more")
    return num_fewshot


def missing_mask(paraphrases: list[str]) -> int | None:
    """The index of the first paraphrase without the [MASK] placeholder, or None."""
    return next((i for i, p in enumerate(paraphrases) if MASK_PLACEHOLDER not in p), None)


def parse_record(row: dict, where: str) -> Record:
    uuid, paraphrases, answers = row.get("uuid"), row.get("paraphrases"), row.get("answers")
    uuid = check_uuid(uuid, where)
    if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) and p.strip() for p in paraphrases):
        raise InputError(f"{where}: 'paraphrases' must be a non-empty list of non-empty strings")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: 'answers' must be a list of strings")
    manual = row.get("num_manual")
    if manual is not None and (isinstance(manual, bool) or not isinstance(manual, int) or not 0 <= manual <= len(paraphrases)):
        raise InputError(f"{where}: 'num_manual' must be a whole number between 0 and the number of paraphrases")
    return Record(uuid, [p.strip() for p in paraphrases], answers, manual)


HALVES = ("choose", "confirm")  # the study's protocol: the defaults are chosen on one half, confirmed on the other


def question_stratum(question: str) -> str:
    """A WebQuestions question's kind, by its first word (what, who, where, when, which, how; else other)."""
    first = question.split()[0].lower() if question.split() else ""
    return first if first in ("what", "who", "where", "when", "which", "how") else "other"


def assign_halves(uuids_by_stratum: dict[str, list[str]], seed: int = 0) -> dict[str, str]:
    """uuid -> choose or confirm: within each stratum (in sorted order of stratum) the uuids shuffled with
    random.Random(seed) and alternated, choose first: the halves differ by at most one question per stratum."""
    rng, halves = random.Random(seed), {}
    for stratum in sorted(uuids_by_stratum):
        uuids = sorted(uuids_by_stratum[stratum])
        rng.shuffle(uuids)
        halves.update({u: HALVES[i % 2] for i, u in enumerate(uuids)})
    return halves


def keep_half(record_rows: list[tuple[Record, dict, str]], half: str | None) -> list[Record]:
    """The records of one half (each row's "half" field), or all of them."""
    if half is None:
        return [record for record, _, _ in record_rows]
    if half not in HALVES:
        raise InputError(f"--half {half!r}: choose one of {', '.join(HALVES)}")
    for record, row, where in record_rows:
        if row.get("half") not in HALVES:
            raise InputError(f"{where}: no 'half' (choose or confirm) for --half {half}")
    return [record for record, row, _ in record_rows if row["half"] == half]


def load_jsonl(path: Path, task: str = "qa", name: str = "jsonl", num_fewshot: int | None = None,
               limit: int | None = None, half: str | None = None) -> Dataset:
    """Rows with split "train" are the few-shot pool (the first K are the examples); without any, the first K rows
    are the examples (and are not scored). K = num_fewshot (None: 5; 0: no examples, every row is scored).
    With task "mask" every paraphrase must hold the [MASK] placeholder. With a `limit`, lines past the first
    K + limit questions are parsed only where they could be few-shot rows (they name "train", or escape a
    character); every byte is hashed all the same (`Dataset.source_sha256`: the data as read). `half`: only the
    questions of that half of the study's protocol (their "half" field; the few-shot rows are shared)."""
    k = check_num_fewshot(num_fewshot)
    records, train, seen, digest = [], [], set(), hashlib.sha256()
    for lineno, line in jsonl_lines(path, digest):
        if limit is not None and half is None and len(records) >= k + limit and "train" not in line and "\\" not in line:
            continue  # a question past the limit: not needed (a few-shot row names "train")
        row = json_object(line, f"{path}:{lineno}")
        record = parse_record(row, f"{path}:{lineno}")
        if record.uuid in seen:
            raise InputError(f"{path}:{lineno}: duplicate uuid {record.uuid!r}")
        seen.add(record.uuid)
        if task == "mask" and missing_mask(record.paraphrases) is not None:
            raise InputError(f"{path}:{lineno}: paraphrase {missing_mask(record.paraphrases)} has no "
                             f"{MASK_PLACEHOLDER} placeholder (--task mask)")
        if row.get("split") == "train":
            train.append(record)
        else:
            records.append((record, row, f"{path}:{lineno}"))
    if not seen:
        raise InputError(f"{path}: no records")
    if not train:
        train, records = [record for record, _, _ in records[:k]], records[k:]
        if k:
            log.warning("%s: no rows with split=train; the first %d rows are the few-shot examples and are not "
                        "scored (--num-fewshot %d; 0 takes none)", path, len(train), k)
    elif num_fewshot is not None and len(train) < k:
        raise InputError(f"--num-fewshot {k}: {path} has only {len(train)} rows with split=train")
    records = keep_half(records, half)
    if not records:
        raise InputError(f"{path}: no questions left to answer after taking the few-shot examples"
                         + ("" if k == 0 else " (--num-fewshot 0 takes none)"))
    shots = [(r.paraphrases[0], r.answers[0] if r.answers else "") for r in train[:k]]
    return Dataset(name, task, records, shots, [r.paraphrases for r in train[:k]], source_sha256=digest.hexdigest())


# ---------------------------------------------------------------- the hub, failing fast when offline

HUB_PROBE_S = 3.0  # the reachability check never waits longer (plus 1 s: a thread join bounds DNS, urlopen does not)


def offline_mode() -> bool:
    return any(os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def probe(url: str, result: dict) -> None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_S)
    except urllib.error.HTTPError:
        pass  # the server answered: reachable
    except Exception as err:  # noqa: BLE001 - refused, unknown host, timeout: all mean unreachable
        result["error"] = first_line(err)
        return
    result["ok"] = True


def hub_unreachable() -> str | None:
    """Why the hub cannot answer now, or None: checked first because datasets retries for ~25 s offline."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    result: dict = {}
    thread = threading.Thread(target=probe, args=(endpoint, result), daemon=True)
    thread.start()
    thread.join(HUB_PROBE_S + 1)
    if result.get("ok"):
        return None
    return f"{endpoint}: {result.get('error', f'no answer within {HUB_PROBE_S + 1:.0f} s')}"


def from_hub(hub_id: str, split: str | None = None):
    """(the hub's dataset, None) or (None, why not, in one line). In offline mode only the local HF cache is asked."""
    why = None if offline_mode() else hub_unreachable()
    if why:
        return None, why
    from datasets import load_dataset
    try:
        return load_dataset(hub_id, split=split), None
    except Exception as err:  # noqa: BLE001 - any hub failure means the same thing to the user
        return None, first_line(err)


def downloaded(name: str) -> Path | None:
    """The copy download_resources.sh saved, if any: used before asking the hub."""
    folder = CACHE_DIR / "datasets" / name
    return folder if folder.is_dir() else None


def upstream_few_shot(size: int, seed: int, k: int = NUM_FEW_SHOT) -> list[int]:
    """Upstream's few-shot rows: random.seed(seed); random.sample(range(size), 5) (a private generator, same draws).
    k = 5 is upstream's; another k (--num-fewshot) draws random.Random(seed).sample(range(size), k)."""
    if size < k:
        raise InputError(f"the train split has {size} rows, fewer than the {k} few-shot examples (--num-fewshot)")
    return random.Random(seed).sample(range(size), k)


# ---------------------------------------------------------------- WebQuestions

def question_uuid(question: str) -> str:
    """Upstream's uuid of a WebQA question: the md5 of its text."""
    return hashlib.md5(question.encode()).hexdigest()


def webq_row(row, where: str) -> dict:
    """{qId, question, answers} from a hub row {question, answers} or a released one {qId, qText, answers}."""
    row = row if isinstance(row, dict) else {}
    question, answers = row.get("question", row.get("qText")), row.get("answers")
    if not isinstance(question, str) or not question.strip() or not isinstance(answers, list):
        raise InputError(f"{where}: not a WebQuestions row ({{question, answers}} or {{qId, qText, answers}})")
    if has_lone_surrogate([question, answers]):
        raise InputError(f"{where}: invalid Unicode (lone surrogate)")
    return {"qId": row.get("qId"), "question": question, "answers": [str(a) for a in answers]}


def webq_order(rows: list[dict]) -> list[dict]:
    """The hub's row order: the number in a released qId is the question's row in the hub's split."""
    return sorted(rows, key=lambda r: r["qId"]) if all(r["qId"] for r in rows) else rows


def read_webq_file(path: Path) -> list[dict]:
    """A WebQuestions JSON array (the release's layout) or JSON Lines of hub rows."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return webq_order([webq_row(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)])
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply") from None
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a JSON array of WebQuestions rows")
    return webq_order([webq_row(row, f"{path}: row {i + 1}") for i, row in enumerate(rows)])


def bundled_train() -> list[dict]:
    return webq_order([r for name in WEBQA_TRAIN_FILES for r in read_webq_file(WEBQA_BUNDLED_DIR / name)])


def read_webq_folder(path: Path) -> tuple[list[dict], list[dict] | None]:
    """A `save_to_disk` folder: the hub's splits (download_resources.sh) or one split of test rows."""
    from datasets import load_from_disk
    try:
        ds = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{path}: not a datasets save_to_disk folder ({first_line(err)})") from None
    if not hasattr(ds, "keys"):
        return [webq_row(r, str(path)) for r in ds], None
    if "test" not in ds:
        raise InputError(f"{path}: no 'test' split (has {', '.join(ds)})")
    train = [webq_row(r, f"{path} train") for r in ds["train"]] if "train" in ds else None
    return [webq_row(r, f"{path} test") for r in ds["test"]], train


def read_webquestions(data_file: Path | None) -> tuple[list[dict], list[dict]]:
    """(test, train) rows in the hub's order from --data-file (the release's JSON, JSONL of hub rows, or a save_to_disk
    folder), download_resources.sh's copy, the hub, or the bundled copy when the hub is unreachable. A source without a
    train split gets the bundled one, which is the hub's."""
    path = data_file or downloaded("webqa")
    if path is None:
        ds, why = from_hub(WEBQA_HUB_ID)
        if ds is not None:
            return [webq_row(r, WEBQA_HUB_ID) for r in ds["test"]], [webq_row(r, WEBQA_HUB_ID) for r in ds["train"]]
        log.warning("webqa: %s is unreachable (%s); reading the bundled copy %s", WEBQA_HUB_ID, why,
                    WEBQA_BUNDLED_DIR.relative_to(REPO_DIR))
        return read_webq_file(WEBQA_BUNDLED_DIR / "test.json"), bundled_train()
    test, train = read_webq_folder(path) if path.is_dir() else (read_webq_file(path), None)
    return test, train if train is not None else bundled_train()


def load_webqa(data_file: Path | None, num_paraphrases: int, paraphraser=None, limit: int | None = None,
               num_fewshot: int | None = None) -> Dataset:
    """WebQuestions as upstream builds it: uuid = md5(question); few-shot = 5 train rows drawn with random.seed(42),
    each as its question and first answer; paraphrases made by the model itself (cached per model: paraphrase.py).
    num_fewshot K (None: upstream's 5) draws random.Random(42).sample(range(len(train)), K); 0: no examples."""
    k = check_num_fewshot(num_fewshot)
    test, train = read_webquestions(data_file)
    if len(train) != WEBQA_TRAIN_QUESTIONS:
        log.warning("webqa: the train split has %d questions, not the hub's %d: the few-shot examples are not "
                    "upstream's", len(train), WEBQA_TRAIN_QUESTIONS)
    shots = [(train[i]["question"], (train[i]["answers"] or [""])[0])
             for i in upstream_few_shot(len(train), WEBQA_FEW_SHOT_SEED, k)]
    records, seen = [], set()
    for row in test[:limit]:
        uuid = question_uuid(row["question"])
        if uuid in seen:
            raise InputError(f"webqa: the question {row['question']!r} occurs twice, and so would its uuid (md5)")
        seen.add(uuid)
        records.append(Record(uuid, [row["question"]], row["answers"]))
    if num_paraphrases > 1:
        if paraphraser is None:
            raise InputError("webqa: paraphrases are generated by the model; no model given")
        records = paraphraser(records, num_paraphrases - 1)
    return Dataset("webqa", "qa", records, shots)


# ---------------------------------------------------------------- MyriadLAMA

MYRIADLAMA_FIELDS = ("uuid", "sub_ent", "template", "is_manual")


@dataclass
class Fact:
    """One MyriadLAMA fact: subject and answers from its first row, its templates in row order."""
    uuid: str
    subject: str
    answers: list[str]
    manual: list[str] = field(default_factory=list)
    auto: list[str] = field(default_factory=list)


def table_rows(ds) -> list[dict]:
    """A datasets table as row dicts, read column by column (far faster than row by row at the hub's size)."""
    wanted = [c for c in (*MYRIADLAMA_FIELDS, "obj_aliases", "obj_ents") if c in ds.column_names]
    columns = ds.select_columns(wanted).to_dict()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def read_myriadlama(data_file: Path | None) -> tuple[list[dict], str]:
    """The hub's rows in the hub's order (or a local copy's), and where they came from."""
    path = data_file or downloaded("myriadlama")
    if path is None:
        ds, why = from_hub(MYRIADLAMA_HUB_ID, split="train")
        if ds is None:
            raise InputError(f"myriadlama: cannot load {MYRIADLAMA_HUB_ID} from the hub ({why}); "
                             f"offline? pass --data-file with a local copy")
        return table_rows(ds), MYRIADLAMA_HUB_ID
    if path.is_dir():
        from datasets import load_from_disk
        ds = load_from_disk(str(path))
        return table_rows(ds["train"] if hasattr(ds, "keys") and "train" in ds else ds), str(path)
    return [row for _, row in read_jsonl(path)], str(path)


def fill_template(template: str, subject: str, obj: str = "[MASK]") -> str:
    return template.replace("[X]", subject).replace("[Y]", obj)


def as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [x for v in value for x in as_list(v)]  # flattens lists of alias lists


def is_manual(value, where: str) -> bool:
    if value not in (True, False):  # 1/0 and numpy bools compare equal too
        raise InputError(f"{where}: 'is_manual' must be true or false, got {value!r}")
    return bool(value)


def group_facts(rows: list[dict], source: str) -> list[Fact]:
    """One Fact per uuid, sorted by uuid as pandas' groupby sorts them."""
    facts: dict[str, Fact] = {}
    for i, row in enumerate(rows):
        missing = [name for name in MYRIADLAMA_FIELDS if name not in row]
        if missing:
            raise InputError(f"myriadlama {source} row {i + 1}: missing fields {missing}")
        uuid = check_uuid(row["uuid"], f"myriadlama {source} row {i + 1}")
        if uuid not in facts:
            aliases = as_list(row.get("obj_aliases")) or as_list(row.get("obj_ents"))  # upstream: the aliases
            facts[uuid] = Fact(uuid, row["sub_ent"], list(dict.fromkeys(a for a in aliases if a)))
        manual = is_manual(row["is_manual"], f"myriadlama {source} row {i + 1}")
        (facts[uuid].manual if manual else facts[uuid].auto).append(row["template"])
    return [facts[uuid] for uuid in sorted(facts)]


def auto_count(paraphrase_set: str) -> int | None:
    """How many auto templates a set adds: manual 0, manual+autoK K, all None (every one, in row order)."""
    match = re.fullmatch(r"manual(?:\+auto(\d+))?|all", paraphrase_set)
    if match is None:
        raise InputError(f"--paraphrases {paraphrase_set!r}: choose manual, manual+autoK (e.g. manual+auto5) or all")
    return None if paraphrase_set == "all" else int(match.group(1) or 0)


def resolve_paraphrase_set(dataset: str, paraphrase_set: str | None) -> str | None:
    """The template set a run uses (for its settings): upstream's unless chosen; None for a dataset without sets."""
    if dataset != "myriadlama":
        if paraphrase_set is not None:
            raise InputError(f"--paraphrases {paraphrase_set!r}: only --dataset myriadlama has template sets, "
                             f"not {dataset}")
        return None
    paraphrase_set = paraphrase_set or MYRIADLAMA_DEFAULT_PARAPHRASES
    auto_count(paraphrase_set)
    return paraphrase_set


def fact_prompts(fact: Fact, num_auto: int | None) -> list[str]:
    """Every manual template, then num_auto auto ones drawn as upstream: random.seed(uuid); random.sample(auto, k)."""
    auto = fact.auto if num_auto is None else random.Random(fact.uuid).sample(fact.auto, min(num_auto, len(fact.auto)))
    return [fill_template(t, fact.subject) for t in fact.manual + auto]


def few_shot_example(fact: Fact) -> tuple[str, str]:
    """Upstream shows a few-shot fact as its first manual template and its first alias."""
    if not fact.manual:
        raise InputError(f"myriadlama: few-shot fact {fact.uuid} has no manual template")
    return fill_template(fact.manual[0], fact.subject), (fact.answers or [""])[0]


def parity_gaps(facts: list[Fact], num_auto: int | None) -> list[str]:
    """What keeps these rows from giving upstream's facts and prompts (nothing, for the hub's)."""
    gaps = []
    if len(facts) < MYRIADLAMA_TEST_FACTS + NUM_FEW_SHOT:
        gaps.append(f"{len(facts)} facts are too few for upstream's {MYRIADLAMA_TEST_FACTS}-fact test split")
    short = sum(len(f.auto) < num_auto for f in facts) if num_auto else 0
    if short:
        gaps.append(f"{short} facts have fewer than the {num_auto} auto templates to sample")
    return gaps


def load_myriadlama(data_file: Path | None, paraphrase_set: str | None = None,
                    num_fewshot: int | None = None) -> Dataset:
    """Upstream's construction: facts grouped and sorted by uuid, `train_test_split(test_size=2000, seed=42,
    shuffle=True)`, the test facts in that order, prompts from `fact_prompts`, few-shot = 5 training facts drawn with
    random.seed(42). A local copy must keep the hub's row order: a fact's template order decides its prompts.
    num_fewshot K (None: upstream's 5) draws random.Random(42).sample(range(len(train)), K), 0 none; the split is
    the same for every K up to 5 (a small copy keeps max(K, 5) facts out of the test split)."""
    from datasets import Dataset as HFDataset
    k = check_num_fewshot(num_fewshot)
    reserved = max(k, NUM_FEW_SHOT)
    num_auto = auto_count(paraphrase_set or MYRIADLAMA_DEFAULT_PARAPHRASES)
    rows, source = read_myriadlama(data_file)
    facts = group_facts(rows, source)
    if len(facts) <= reserved:
        raise InputError(f"myriadlama: {source} has only {len(facts)} facts; need more than {reserved}"
                         + ("" if reserved == NUM_FEW_SHOT else f" (--num-fewshot {k})"))
    gaps = parity_gaps(facts, num_auto)
    if gaps and Path(source) != MYRIADLAMA_FIXTURE_FILE:  # the bundled fixture is a handful of facts by design
        log.warning("myriadlama: %s cannot give upstream's facts and prompts: %s", source, "; ".join(gaps))
    # the split's permutation depends only on the number of rows, so fact indices stand in for upstream's table
    split = HFDataset.from_dict({"fact": list(range(len(facts)))}).train_test_split(
        test_size=min(MYRIADLAMA_TEST_FACTS, len(facts) - reserved), seed=MYRIADLAMA_SPLIT_SEED, shuffle=True)
    train = [facts[i] for i in split["train"]["fact"]]
    examples = [train[i] for i in upstream_few_shot(len(train), MYRIADLAMA_FEW_SHOT_SEED, k)]
    records = [Record(facts[i].uuid, fact_prompts(facts[i], num_auto), facts[i].answers, len(facts[i].manual))
               for i in split["test"]["fact"]]
    return Dataset("myriadlama", "mask", records, [few_shot_example(f) for f in examples],
                   [fact_prompts(f, num_auto) for f in examples])


# ---------------------------------------------------------------- the entry point

def check_masks(ds: Dataset) -> None:
    """--task mask: every paraphrase of every question and few-shot example holds the [MASK] placeholder."""
    for record in ds.records:
        i = missing_mask(record.paraphrases)
        if i is not None:
            raise InputError(f"{ds.name}: question {record.uuid}: paraphrase {i} has no {MASK_PLACEHOLDER} "
                             f"placeholder (--task mask)")
    for j, (question, _) in enumerate(ds.few_shot):
        shown = [question, *(ds.few_shot_paraphrases[j] if j < len(ds.few_shot_paraphrases) else [])]
        i = missing_mask(shown)
        if i is not None:
            raise InputError(f"{ds.name}: few-shot example {j}: {'its question' if i == 0 else f'paraphrase {i - 1}'} "
                             f"has no {MASK_PLACEHOLDER} placeholder (--task mask)")


def load_dataset_by_name(name: str, data_file: str | None = None, task: str | None = None,
                         num_paraphrases: int = 1, paraphraser=None, limit: int | None = None,
                         paraphrase_set: str | None = None, num_fewshot: int | None = None,
                         half: str | None = None) -> Dataset:
    """The records of a dataset, checked to have `num_paraphrases` paraphrases each, cut to `limit`.
    `paraphrase_set`: MyriadLAMA's templates (see `resolve_paraphrase_set`); None is upstream's.
    `num_fewshot`: how many few-shot examples (--num-fewshot); None is the default 5, 0 none.
    A mask task's prompts must all hold the [MASK] placeholder."""
    path = Path(data_file) if data_file else None
    if half is not None and name != "jsonl":
        raise InputError(f"--half {half}: applies to --dataset jsonl (a file whose questions name their half)")
    paraphrase_set = resolve_paraphrase_set(name, paraphrase_set)
    check_num_fewshot(num_fewshot)
    if name == "webqa_sample":
        ds = load_jsonl(path or WEBQA_SAMPLE_FILE, task or "qa", name, num_fewshot, limit)
    elif name == "jsonl":
        if path is None:
            raise InputError("--dataset jsonl needs --data-file PATH (one JSON object a line)")
        ds = load_jsonl(path, task or "qa", num_fewshot=num_fewshot, limit=limit, half=half)
    elif name == "webqa":
        ds = load_webqa(path, num_paraphrases, paraphraser, limit, num_fewshot)
    elif name == "myriadlama":
        ds = load_myriadlama(path, paraphrase_set, num_fewshot)
    else:
        raise InputError(f"--dataset {name!r}: unknown; choose webqa_sample, webqa, myriadlama or jsonl")
    if ds.task == "mask":
        check_masks(ds)
    ds.records = ds.records[:limit]
    ds.check_paraphrases(num_paraphrases)
    return ds
