"""Per-paraphrase confidence, as upstream: the share of K sampled answers that agree (after
lemmatisation) with the paraphrase's greedy answer. Computed once per question, cached in
`confidence.feather` beside the results, reused by weighted methods and attention-level bias."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

import scoring
from dataset import Dataset, Record
from decoding import Sampler, StopRule, answer_text, decode, greedy, single_rows
from results import read_table, write_table


def sampled_agreement(model, tokenizer, dataset: Dataset, record: Record, n: int, k: int, stop: StopRule,
                      generator: torch.Generator) -> list[dict]:
    parts = dataset.prompt_parts(record, n)
    rows = single_rows(tokenizer, parts, list(range(n)))
    greedy_out, _ = decode(model, tokenizer, rows, 1, greedy, stop)
    sampled_rows = [row for row in rows for _ in range(k)]
    sampled_out, _ = decode(model, tokenizer, sampled_rows, 1, Sampler(generator), stop)
    result = []
    for i in range(n):
        answer = answer_text(tokenizer, greedy_out[i])[0]
        samples = [answer_text(tokenizer, t)[0] for t in sampled_out[i * k:(i + 1) * k]]
        # an empty greedy answer is no answer: agreeing with it earns no confidence
        agree = sum(scoring.same_answer(s, answer) for s in samples) / k if answer else 0.0
        result.append({"uuid": record.uuid, "paraphrase_index": i, "paraphrase": record.paraphrases[i],
                       "greedy": answer, "samples": k, "confidence": agree})
    return result


def confidences(model, tokenizer, dataset: Dataset, records: list[Record], n: int, k: int, stop: StopRule,
                path: Path, seed: int = 0) -> dict[str, list[float]]:
    """{uuid: [confidence of paraphrase 0..n-1]}, computing only what `path` does not hold yet."""
    table = read_table(path) if path.exists() else pd.DataFrame(
        columns=["uuid", "paraphrase_index", "paraphrase", "greedy", "samples", "confidence"])
    known = {(r.uuid, r.paraphrase_index, r.paraphrase, r.samples): r.confidence for r in table.itertuples()}
    new_rows = []
    for record in records:
        if all((record.uuid, i, record.paraphrases[i], k) in known for i in range(n)):
            continue
        generator = torch.Generator().manual_seed(seed)
        new_rows += sampled_agreement(model, tokenizer, dataset, record, n, k, stop, generator)
    if new_rows:
        for r in new_rows:
            known[(r["uuid"], r["paraphrase_index"], r["paraphrase"], k)] = r["confidence"]
        write_table(pd.concat([table, pd.DataFrame(new_rows)], ignore_index=True), path)
    return {r.uuid: [known[(r.uuid, i, r.paraphrases[i], k)] for i in range(n)] for r in records}


def normalised_weights(conf: list[float]) -> tuple[list[float], bool]:
    """Confidence normalised to sum 1; all zero gives equal weights (second value True: say so)."""
    total = sum(conf)
    if total <= 0:
        return [1.0 / len(conf)] * len(conf), True
    return [c / total for c in conf], False
