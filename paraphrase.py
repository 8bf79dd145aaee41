"""WebQA paraphrases made by the evaluated model itself, as upstream makes them: passes over the questions, pass i
showing the i-th hand-written paraphrase of each of 5 examples and sampling with seed + i (T=1.5, top-p 0.9, 30 new
tokens), the first line kept. Upstream made 5 passes; pass 5 and later reuse the example columns cyclically with their
own seeds. Cached per model and settings on disk (`$SELF_ENSEMBLE_CACHE/paraphrases/<model>/webqa-upstream-...jsonl`):
a larger N runs the further passes only, after the paraphrases earlier tables used."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from constants import (CACHE_DIR, DEFAULT_PARAPHRASE_TEMPERATURE, DEFAULT_PARAPHRASE_TOP_P, PARAPHRASE_BATCH_SIZE,
                       PARAPHRASE_EXAMPLES, PARAPHRASE_INSTRUCTION, InputError, safe_name)
from dataset import Record
from decoding import LanguageModel, Row, Sampler, StopRule, answer_text, build_row, decode, eos_ids
from files import atomic_write

log = logging.getLogger(__name__)


def paraphrase_prompt(question: str, pass_index: int) -> str:
    """Upstream's prompt text for one question in pass `pass_index`."""
    column = pass_index % len(PARAPHRASE_EXAMPLES[0][1])
    shots = "\n\n".join(f"Q: {q}\nParaphrase: {paraphrases[column]}" for q, paraphrases in PARAPHRASE_EXAMPLES)
    return f"{PARAPHRASE_INSTRUCTION}\n{shots}\n\nQ: {question}\nParaphrase:"


def cache_row(line: str) -> tuple[str | None, list[str]]:
    """(question, paraphrases) of one cache line, or (None, []) when it is not one."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None, []
    if not isinstance(row, dict) or not isinstance(row.get("question"), str):
        return None, []
    paraphrases = row.get("paraphrases")
    if not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
        return None, []
    return row["question"], paraphrases


@dataclass
class Paraphraser:
    lm: LanguageModel
    model_name: str
    seed: int = 0
    temperature: float = DEFAULT_PARAPHRASE_TEMPERATURE
    top_p: float = DEFAULT_PARAPHRASE_TOP_P
    max_new_tokens: int = 30
    batch_size: int = PARAPHRASE_BATCH_SIZE

    @property
    def cache_file(self) -> Path:
        """One file per model, its revision, dtype and device type, and the sampling settings."""
        from models import model_revision
        revision = safe_name(model_revision(self.lm.model) or "built")[:24]
        weights = f"{revision}-{str(self.lm.model.dtype).removeprefix('torch.')}-{self.lm.device.type}"
        settings = f"{weights}-seed{self.seed}-t{self.temperature}-p{self.top_p}-len{self.max_new_tokens}"
        return CACHE_DIR / "paraphrases" / safe_name(self.model_name) / f"webqa-upstream-{settings}.jsonl"

    def load_cache(self) -> dict[str, list[str]]:
        """question -> its paraphrases so far; a cache that is corrupt or of another schema is one line naming it."""
        if not self.cache_file.exists():
            return {}
        try:
            text = self.cache_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise self.bad_cache(getattr(err, "strerror", None) or "not UTF-8 text") from None
        cache = {}
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                question, paraphrases = cache_row(line)
                if question is None:
                    raise self.bad_cache(f"line {lineno} is not a {{question, paraphrases}} row")
                cache[question] = paraphrases
        return cache

    def bad_cache(self, why: str) -> InputError:
        return InputError(f"{self.cache_file}: {why}, not a paraphrase cache of this program; delete it (the "
                          f"paraphrases are made again)")

    def save_cache(self, cache: dict[str, list[str]]) -> None:
        text = "".join(json.dumps({"question": q, "paraphrases": p}, ensure_ascii=True) + "\n" for q, p in cache.items())
        atomic_write(self.cache_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def prompt_row(self, question: str, pass_index: int = 0) -> Row:
        # the whole text tokenised at once, BOS included, as upstream's tokenizer(prompts) call does
        return build_row(self.lm.tokenizer(paraphrase_prompt(question, pass_index))["input_ids"], [], [])

    def sample(self, questions: list[str], pass_index: int) -> list[str]:
        """One paraphrase per question: the first line of a sample. The seed restarts with every batch, as
        upstream's set_seed(i) before each batch does."""
        generator = torch.Generator().manual_seed(self.seed + pass_index)
        rows = [self.prompt_row(q, pass_index) for q in questions]
        stop = StopRule(eos_ids(self.lm.model, self.lm.tokenizer), self.max_new_tokens)
        outputs, _ = decode(self.lm, rows, 1, Sampler(generator, self.temperature, self.top_p), stop)
        return [answer_text(self.lm.tokenizer, tokens)[0] for tokens in outputs]

    def __call__(self, records: list[Record], k: int) -> list[Record]:
        """Each record with k generated paraphrases after its original question (paraphrase i from pass i)."""
        cache = self.load_cache()
        questions = list(dict.fromkeys(r.paraphrases[0] for r in records))
        for pass_index in range(k):
            todo = [q for q in questions if len(cache.get(q, [])) == pass_index]  # earlier passes stay as they were
            for start in tqdm(range(0, len(todo), self.batch_size), desc=f"paraphrasing, pass {pass_index + 1} of {k}",
                              unit="batch", disable=not todo):
                batch = todo[start:start + self.batch_size]
                for question, text in zip(batch, self.sample(batch, pass_index)):
                    if not text:
                        log.warning("paraphrase: an empty sample for %r was replaced by the question itself", question)
                    cache[question] = cache.get(question, []) + [text or question]
                self.save_cache(cache)
        return [replace(r, paraphrases=[r.paraphrases[0], *cache[r.paraphrases[0]][:k]]) for r in records]
