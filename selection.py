"""Which paraphrases a question is asked with, beyond "the first N": upstream's synced samples (S ordered
selections of N paraphrases per question, drawn with random.seed(uuid), or the repeat control: one
paraphrase N times) and MyriadLAMA's manual/auto mix (M manual and A automatic templates drawn, then N of
them; seeded from the uuid and --seed, where upstream's unseeded np.random.choice could not be repeated).
A selection turns each question into one Record per sample, carrying its paraphrase indices."""
from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, replace

from constants import InputError
from dataset import Record

MAX_PERMUTATIONS = 1_000_000  # upstream lists every permutation; past this many, ordered selections are drawn


@dataclass(frozen=True)
class Selection:
    """samples S and repeat (synced samples), or manual M / auto A (the mix, N drawn from M + A)."""
    samples: int
    repeat: bool = False
    manual: int | None = None
    auto: int | None = None

    @property
    def mix(self) -> bool:
        return self.manual is not None

    def __post_init__(self) -> None:
        if self.samples < 1 or min(self.manual or 0, self.auto or 0) < 0:
            raise InputError("--num_samples must be at least 1 and --num_manual/--num_auto at least 0")
        if self.mix and (self.auto is None or self.repeat):
            raise InputError("--num_manual and --num_auto go together, without --repeat_paras")
        if self.mix and self.samples > self.manual + self.auto:
            raise InputError(f"--num_samples {self.samples} cannot exceed --num_manual + --num_auto "
                             f"({self.manual + self.auto}): N is drawn from them")

    def table_name(self, name: str, n: int) -> str:
        """Upstream's file names: ensemble_avg-5.feather -> syncedsample_ensemble_avg-5paras-3samples[-repeat]
        .feather, or (the mix) ensemble_avg-m3a2s5.feather; an attention-level variant keeps its suffix."""
        spelled = f"m{self.manual}a{self.auto}s{self.samples}" if self.mix else (
            f"{n}paras-{self.samples}samples{'-repeat' if self.repeat else ''}")
        renamed = re.sub(rf"-{n}(?=-|\.feather$)", f"-{spelled}", name, count=1)
        return renamed if self.mix else f"syncedsample_{renamed}"

    def indices(self, record: Record, n: int, seed: int) -> list[list[int]]:
        """The selections of `record` (each a list of paraphrase indices), in draw order."""
        if self.mix:
            return [manual_auto_mix(record, self.manual, self.auto, self.samples, seed)]
        return synced_samples(record.uuid, len(record.paraphrases), n, self.samples, self.repeat)

    def check(self, record: Record, n: int, count: int | None = None) -> None:
        """Whether `record` (with `count` paraphrases, default its own) can give these selections, without drawing
        them: run before the model loads, so that a draw that cannot end or a mix the data lacks is one line."""
        count = len(record.paraphrases) if count is None else count
        if self.mix:
            mix_pools(record, self.manual, self.auto)
        elif not self.repeat:
            distinct_selections(record.uuid, count, n, self.samples)

    def expand(self, records: list[Record], n: int, seed: int) -> list[Record]:
        """One Record per selection: its paraphrases in the selection's order, `indices` and `sample` set."""
        return [replace(r, paraphrases=[r.paraphrases[i] for i in chosen], indices=list(chosen), sample=s)
                for r in records for s, chosen in enumerate(self.indices(r, n, seed))]


def synced_samples(uuid: str, count: int, n: int, samples: int, repeat: bool = False) -> list[list[int]]:
    """Upstream's g_ori_sample_sync: random.seed(uuid); random.sample(every ordered selection of n of the
    `count` paraphrases (or each paraphrase n times), k=min(samples, how many)). Past MAX_PERMUTATIONS
    (e.g. 5 of 100 templates) the list is not built: `samples` distinct ordered selections are drawn with
    the same seed instead (upstream's code could not run there either)."""
    if n > count and not repeat:
        raise InputError(f"question {uuid}: {count} paraphrases cannot give ordered selections of {n}")
    rng = random.Random(uuid)
    if repeat:
        return rng.sample([[i] * n for i in range(count)], k=min(samples, count))
    distinct = distinct_selections(uuid, count, n, samples)
    if distinct <= MAX_PERMUTATIONS:
        return [list(p) for p in rng.sample(list(itertools.permutations(range(count), n)), k=min(samples, distinct))]
    drawn: dict[tuple[int, ...], None] = {}
    while len(drawn) < samples:
        drawn.setdefault(tuple(rng.sample(range(count), n)))
    return [list(p) for p in drawn]


def distinct_selections(uuid: str, count: int, n: int, samples: int) -> int:
    """How many ordered selections of n of `count` paraphrases exist (math.perm). Up to MAX_PERMUTATIONS upstream
    takes min(samples, that many); past it they are drawn one by one, and asking for more than exist would never
    end: refused in one line naming the number."""
    if n > count:
        raise InputError(f"question {uuid}: {count} paraphrases cannot give ordered selections of {n}")
    distinct = math.perm(count, n)
    if distinct > MAX_PERMUTATIONS and samples > distinct:
        raise InputError(f"--num_samples {samples}: question {uuid} has only {distinct:,} distinct ordered selections "
                         f"of {n} of its {count} paraphrases; ask for at most that many")
    return distinct


def mix_pools(record: Record, manual: int, auto: int) -> tuple[list[int], list[int]]:
    """(manual, automatic) paraphrase indices of `record`, checked to hold `manual` and `auto` of them."""
    if record.num_manual is None:
        raise InputError(f"question {record.uuid}: --num_manual/--num_auto need to know which paraphrases are manual "
                         f"templates (MyriadLAMA, or a JSONL with 'num_manual')")
    manual_ids = list(range(record.num_manual))
    auto_ids = list(range(record.num_manual, len(record.paraphrases)))
    if manual > len(manual_ids) or auto > len(auto_ids):
        raise InputError(f"question {record.uuid}: has {len(manual_ids)} manual and {len(auto_ids)} automatic "
                         f"paraphrases, fewer than --num_manual {manual} / --num_auto {auto}")
    return manual_ids, auto_ids


def manual_auto_mix(record: Record, manual: int, auto: int, n: int, seed: int) -> list[int]:
    """Upstream's generate_original: draw `manual` of the manual templates and `auto` of the automatic ones,
    then n of those, without replacement; seeded from (seed, uuid), so a run repeats."""
    manual_ids, auto_ids = mix_pools(record, manual, auto)
    rng = random.Random(f"{seed}:{record.uuid}")
    pool = rng.sample(manual_ids, manual) + rng.sample(auto_ids, auto)
    return rng.sample(pool, n)
