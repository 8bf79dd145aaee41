"""Per-paraphrase confidence, as upstream defines it: the share of K sampled answers of a paraphrase's
prompt that agree with its greedy answer, where two answers agree when either one's normalised lemmas
contain the other's (upstream's `is_matched_str`; an empty greedy answer agrees with every non-empty
sample). Cached in `<output-dir>/confidence-cache/` (never a result table), one entry per prompt under a
key of the model and its revision, dtype and device type, the prompt's token ids, K, seed, temperature,
top-p and max new tokens: a changed setting recomputes. Every sample has its own generator, seeded from that key, so an entry does not
depend on which other prompts shared its batch."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from constants import CONFIDENCE_TEMPERATURE, CONFIDENCE_TOP_P, InputError, safe_name
from dataset import Dataset, Record
from decoding import LanguageModel, Sampler, StopRule, answer_text, decode, greedy, single_rows
from files import atomic_write
from results import read_table

CACHE_FOLDER = "confidence-cache"  # inside the output dir; evaluate.py reads only the folder's own *.feather


@dataclass
class Confidences:
    """What `confidences` gives for a batch of questions."""
    values: dict[str, list[float]]  # uuid -> confidence of paraphrases 0..N-1
    seconds: dict[str, float]       # uuid -> seconds its confidences took to compute (kept in the cache)

    def annotate(self, rows: list[dict]) -> list[dict]:
        """The result rows with `confidence_seconds` (the cost of their question's confidences) added."""
        for row in rows:
            row["confidence_seconds"] = self.seconds[row["uuid"]]
        return rows


@dataclass(frozen=True)
class ConfidenceSettings:
    """Everything a confidence depends on besides the prompt."""
    model: str
    revision: str | None
    dtype: str
    device: str  # the device type: cpu or cuda
    samples: int
    seed: int
    temperature: float
    top_p: float
    max_new_tokens: int

    def cache_file(self, results_dir: Path) -> Path:
        revision = f"-{safe_name(self.revision)[:20]}" if self.revision else ""
        name = (f"{safe_name(self.model)}{revision}-{self.dtype}-{self.device}-k{self.samples}-seed{self.seed}"
                f"-t{self.temperature}-p{self.top_p}-len{self.max_new_tokens}.feather")
        return Path(results_dir) / CACHE_FOLDER / name

    def key(self, input_ids: list[int]) -> str:
        """The cache key of one prompt: these settings and its token ids."""
        text = json.dumps([self.model, self.revision, self.dtype, self.device, self.samples, self.seed,
                           self.temperature, self.top_p, self.max_new_tokens, list(input_ids)])
        return hashlib.sha256(text.encode()).hexdigest()


class RowSampler:
    """A chooser that samples every row with its own generator (row i: generators[i]), through `Sampler`."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.samplers = [Sampler(g, temperature, top_p) for g in generators]

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.samplers[q](logits[j:j + 1], live[j:j + 1]) for j, q in enumerate(live.tolist())])


def row_generator(key: str, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{key}:{sample}".encode()).hexdigest()[:15], 16))


def agreement(lm: LanguageModel, rows: list, keys: list[str], settings: ConfidenceSettings,
              stop: StopRule) -> list[dict]:
    """Greedy answer, K samples and confidence of each prompt row (upstream's rule, see `scoring.answers_agree`)."""
    import scoring
    k = settings.samples
    greedy_out, _ = decode(lm, rows, 1, greedy, stop)
    generators = [row_generator(key, j) for key in keys for j in range(k)]
    sampled_out, _ = decode(lm, [row for row in rows for _ in range(k)], 1,
                            RowSampler(generators, settings.temperature, settings.top_p), stop)
    entries = []
    for i, key in enumerate(keys):
        answer = answer_text(lm.tokenizer, greedy_out[i])[0]
        samples = [answer_text(lm.tokenizer, t)[0] for t in sampled_out[i * k:(i + 1) * k]]
        entries.append({"key": key, "greedy": answer, "samples": samples,
                        "confidence": sum(scoring.answers_agree(answer, samples)) / k})
    return entries


def confidences(lm: LanguageModel, dataset: Dataset, records: list[Record], n: int, k: int, stop: StopRule,
                results_dir: Path, seed: int = 0, *, model_name: str, temperature: float = CONFIDENCE_TEMPERATURE,
                top_p: float = CONFIDENCE_TOP_P, progress: bool = True) -> Confidences:
    """Confidence of paraphrases 0..n-1 of every record, computing only the prompts the cache lacks.
    `results_dir` is the run's output dir (the cache is its `confidence-cache/` folder); `model_name` the
    --model given (with the loaded model's revision it is part of the key)."""
    settings = confidence_settings(lm, k, stop, seed, model_name, temperature, top_p)
    path = settings.cache_file(results_dir)
    known = cached_entries(path)
    new_entries, keys_of = [], {}
    bar = tqdm(records, desc=f"confidence: {k} samples per paraphrase", unit="q", leave=False,
               disable=not progress or len(records) < 2)
    for record in bar:
        rows = single_rows(lm.tokenizer, dataset.prompt_parts(record, n), list(range(n)))
        keys = [settings.key(row.input_ids) for row in rows]
        keys_of[record.uuid] = keys
        missing = [i for i in range(n) if keys[i] not in known]
        if not missing:
            continue
        start = time.perf_counter()
        entries = agreement(lm, [rows[i] for i in missing], [keys[i] for i in missing], settings, stop)
        seconds = (time.perf_counter() - start) / len(missing)
        for i, entry in zip(missing, entries):
            entry.update(uuid=record.uuid, paraphrase_index=i, paraphrase=record.paraphrases[i], seconds=seconds)
            known[entry["key"]] = entry
        new_entries += entries
    if new_entries:
        save_entries(path, new_entries)
    return Confidences({u: [float(known[key]["confidence"]) for key in keys] for u, keys in keys_of.items()},
                       {u: float(sum(known[key]["seconds"] for key in keys)) for u, keys in keys_of.items()})


def agreements(lm: LanguageModel, dataset: Dataset, records: list[Record], n: int, stop: StopRule) -> Confidences:
    """Per paraphrase, how many of its question's N greedy single answers (its own included) agree with its
    answer by upstream's rule (`scoring.answers_agree`): the votes its answer gets in the post-hoc majority
    vote. An empty answer casts no vote and gets none. Costs the vote's N plain decodes per question."""
    import scoring
    rows = [row for r in records for row in single_rows(lm.tokenizer, dataset.prompt_parts(r, n), list(range(n)))]
    start = time.perf_counter()
    outputs, _ = decode(lm, rows, 1, greedy, stop)
    seconds = (time.perf_counter() - start) / len(records)
    values = {}
    for q, record in enumerate(records):
        answers = [answer_text(lm.tokenizer, tokens)[0] for tokens in outputs[q * n:(q + 1) * n]]
        voters = [a for a in answers if a]
        values[record.uuid] = [float(sum(scoring.answers_agree(a, voters))) if a else 0.0 for a in answers]
    return Confidences(values, {r.uuid: seconds for r in records})


def bias_weights(lm: LanguageModel, dataset: Dataset, records: list[Record], n: int, bias: str, stop: StopRule,
                 k: int, results_dir: Path, seed: int, model_name: str, progress: bool = True) -> Confidences | None:
    """What --fusion-bias confidence or agreement weighs each paraphrase with (None for the other biases)."""
    if bias == "agreement":
        return agreements(lm, dataset, records, n, stop)
    if bias == "confidence":
        return confidences(lm, dataset, records, n, k, stop, results_dir, seed, model_name=model_name,
                           progress=progress)
    return None


def confidence_settings(lm: LanguageModel, k: int, stop: StopRule, seed: int, model_name: str,
                        temperature: float = CONFIDENCE_TEMPERATURE, top_p: float = CONFIDENCE_TOP_P
                        ) -> ConfidenceSettings:
    from models import model_revision
    return ConfidenceSettings(model_name, model_revision(lm.model), str(lm.model.dtype).removeprefix("torch."),
                              lm.device.type, k, seed, float(temperature), float(top_p), stop.max_new_tokens)


def check_cache(lm: LanguageModel, k: int, stop: StopRule, results_dir: Path, seed: int, model_name: str) -> None:
    """The run's confidence cache can be read (InputError naming it, before anything is written)."""
    cached_entries(confidence_settings(lm, k, stop, seed, model_name).cache_file(results_dir))


def cached_entries(path: Path) -> dict[str, dict]:
    """The cache's entries by key; a cache that is corrupt or of another schema is one line naming the file."""
    if not path.exists():
        return {}
    table = read_table(path)
    trouble = cache_trouble(table)
    if trouble:
        raise InputError(f"{path}: {trouble}, not a confidence cache of this program; delete it (its confidences "
                         f"are computed again)")
    return {row["key"]: row for row in table.to_dict("records")}


def cache_trouble(table: pd.DataFrame) -> str | None:
    """What makes a confidence-cache table unusable, or None: the columns `confidences` reads, of their types."""
    missing = [c for c in ("key", "confidence", "seconds") if c not in table.columns]
    if missing:
        return f"no column {', '.join(missing)}"
    if not table["key"].map(lambda k: isinstance(k, str)).all():
        return "a key that is not text"
    for column, low, high in (("confidence", 0.0, 1.0), ("seconds", 0.0, math.inf)):
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any() or not values.between(low, high).all():
            return f"a {column} that is not a number in [{low:g}, {high:g}]"
    return None


def save_entries(path: Path, entries: list[dict]) -> None:
    """Add entries to the cache file, merged with what another process may have added meanwhile (an entry
    is the same whoever computes it, so a lost race only costs a recomputation)."""
    table = pd.DataFrame([*cached_entries(path).values(), *entries]).drop_duplicates("key", keep="last")
    atomic_write(path, lambda tmp: table.reset_index(drop=True).to_feather(tmp))


def normalised_weights(conf: list[float]) -> tuple[list[float], bool]:
    """Confidence normalised to sum 1; all zero gives equal weights (second value True: say so)."""
    total = sum(conf)
    if total <= 0:
        return [1.0 / len(conf)] * len(conf), True
    return [c / total for c in conf], False
