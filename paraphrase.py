"""WebQA paraphrases made by the evaluated model itself, as upstream: an instruction, 5 hand-written
examples, sampling (T=1.5, top-p 0.9, 30 tokens), the first line kept. Cached per model on disk
(`$SELF_ENSEMBLE_CACHE/paraphrases/<model>/webqa.jsonl`) and reused on later runs."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from constants import CACHE_DIR, safe_name, PARAPHRASE_EXAMPLES, PARAPHRASE_INSTRUCTION
from dataset import Record
from decoding import Sampler, StopRule, answer_text, build_row, decode, encode_prompt, eos_ids
from results import atomic_write

log = logging.getLogger(__name__)


@dataclass
class Paraphraser:
    model: object
    tokenizer: object
    model_name: str
    seed: int = 0
    temperature: float = 1.5
    top_p: float = 0.9
    max_new_tokens: int = 30
    batch_size: int = 16

    @property
    def cache_file(self) -> Path:
        settings = f"seed{self.seed}-t{self.temperature}-p{self.top_p}-len{self.max_new_tokens}"
        return CACHE_DIR / "paraphrases" / safe_name(self.model_name) / f"webqa-{settings}.jsonl"

    def load_cache(self) -> dict[str, list[str]]:
        if not self.cache_file.exists():
            return {}
        rows = [json.loads(line) for line in self.cache_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {r["question"]: r["paraphrases"] for r in rows}

    def save_cache(self, cache: dict[str, list[str]]) -> None:
        text = "".join(json.dumps({"question": q, "paraphrases": p}) + "\n" for q, p in cache.items())
        atomic_write(self.cache_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def prompt_row(self, question: str):
        shots = "".join(f"Question: {q}\nParaphrase: {p}\n\n" for q, p in PARAPHRASE_EXAMPLES)
        prefix, _, suffix = encode_prompt(self.tokenizer, f"{PARAPHRASE_INSTRUCTION}\n\n{shots}", [],
                                          f"Question: {question}\nParaphrase:")
        return build_row(prefix, [], suffix)

    def sample(self, questions: list[str], k: int, generator: torch.Generator) -> list[list[str]]:
        rows = [self.prompt_row(q) for q in questions for _ in range(k)]
        stop = StopRule(eos_ids(self.model, self.tokenizer), self.max_new_tokens)
        outputs, _ = decode(self.model, self.tokenizer, rows, 1, Sampler(generator, self.temperature, self.top_p), stop)
        texts = [answer_text(self.tokenizer, t)[0] for t in outputs]
        return [texts[i * k:(i + 1) * k] for i in range(len(questions))]

    def __call__(self, records: list[Record], k: int) -> list[Record]:
        """Each record with k generated paraphrases after its original question."""
        cache = self.load_cache()
        todo = [r.paraphrases[0] for r in records if len(cache.get(r.paraphrases[0], [])) < k]
        generator = torch.Generator().manual_seed(self.seed)
        for start in tqdm(range(0, len(todo), self.batch_size), desc="paraphrasing", unit="batch", disable=not todo):
            batch = todo[start:start + self.batch_size]
            for question, texts in zip(batch, self.sample(batch, k, generator)):
                have = cache.get(question, [])  # paraphrases earlier tables used stay as they were
                cache[question] = have + [t or question for t in texts[:k - len(have)]]
                if not all(texts):
                    log.warning("paraphrase: an empty sample for %r was replaced by the question itself", question)
            self.save_cache(cache)
        return [replace(r, paraphrases=[r.paraphrases[0], *cache[r.paraphrases[0]][:k]]) for r in records]
