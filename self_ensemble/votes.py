"""The post-hoc vote: the single prompts behind each ensemble row, and the majority of their answers over the same
paraphrase selections, one group per vote label and N."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from self_ensemble.groups import Group
from self_ensemble.labels import SELF_CONSISTENCY, selections, with_tags

SINGLE_COLUMNS = ("prediction", "key", "exact", "partial", "seconds", "new_tokens", "prompt_tokens", "decode_tokens",
                  "answer_logprob")
COST_COLUMNS = ("seconds", "new_tokens", "prompt_tokens", "decode_tokens")


def with_vote_keys(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """per_prompt with `key`: each prediction normalised as the metric normalises it (the vote's key)."""
    from scoring import normalize
    preds = [p if isinstance(p, str) else "" for p in per_prompt["prediction"]]
    norm = {p: normalize(p) for p in set(preds)}
    return per_prompt.assign(key=[norm[p] for p in preds])


def singles(rows: pd.DataFrame, per_prompt: pd.DataFrame, n: int) -> pd.DataFrame:
    """The single prompts behind each row, one line per (row, paraphrase) in the order of the row's indices:
    `row` (its position in `rows`), `pos` (in its indices), uuid, paraphrase_index, and the per_prompt line's
    prediction, key, scores and costs. A row whose paraphrases the per_prompt table does not all hold gets no
    lines: a vote of 7 from 5 single answers would be a vote of 5 under another name."""
    picks = pd.DataFrame({"row": range(len(rows)), "uuid": rows["uuid"].to_numpy(),
                          "paraphrase_index": selections(rows, n)}).explode("paraphrase_index").dropna()
    picks = picks.assign(pos=picks.groupby("row").cumcount(), paraphrase_index=picks["paraphrase_index"].astype(int))
    keep = ["uuid", "paraphrase_index", *(c for c in SINGLE_COLUMNS if c in per_prompt.columns)]
    table = per_prompt[keep].drop_duplicates(["uuid", "paraphrase_index"])
    lines = picks.merge(table, on=["uuid", "paraphrase_index"])
    found, wanted = lines.groupby("row").size(), picks.groupby("row").size()
    complete = found.index[found == wanted[found.index]]
    return lines[lines["row"].isin(complete)].sort_values(["row", "pos"]).reset_index(drop=True)


def vote_position(keys: Sequence[str]) -> int:
    """Which of the N single answers the vote picks (`scoring.vote`: the most frequent non-empty key, ties to the
    earliest)."""
    from scoring import vote
    return vote(list(keys))[0]


def vote_table(rows: pd.DataFrame, lines: pd.DataFrame, n: int) -> pd.DataFrame:
    """The vote for each of `rows` (uuid, answers, paraphrase_indices[, sample_index]) from its single prompts
    `lines` (`singles`): the picked single answer, scored against the row's gold answers, as confidence the share of
    the N answers that voted for it (with its own answer_logprob when recorded), and as cost the sum of the N single
    prompts'."""
    from scoring import score_frame, vote

    costs = [c for c in COST_COLUMNS if c in lines.columns]
    out = []
    for r, single in lines.groupby("row", sort=True):
        src = rows.iloc[r]
        pick, share = vote(single["key"].tolist())
        logprob = {"answer_logprob": single["answer_logprob"].iloc[pick]} if "answer_logprob" in single.columns else {}
        out.append({"uuid": src["uuid"], "answers": src["answers"], "prediction": single["prediction"].iloc[pick],
                    "confidence": share, **logprob, "method": "vote", "num_ensemble": n, "paraphrase_index": -1,
                    "paraphrase_indices": single["paraphrase_index"].tolist(),
                    **({"sample_index": src["sample_index"]} if "sample_index" in rows.columns else {}),
                    **single[costs].sum().to_dict()})
    return score_frame(pd.DataFrame(out))


@dataclass
class VoteSelection:
    """What one vote label votes over: (uuid, sample) -> (paraphrase indices, gold answers)."""
    design: tuple[str, ...]
    sampled: bool
    chosen: dict


def compared_rows(group: Group) -> pd.DataFrame:
    """The group's rows with the paraphrase selections it is compared at: its own, but self-consistency's are the
    first N (as the vote's and avg's at that N) unless it read N paraphrases itself (--sc-prompts each, K >= N)."""
    if group.method != SELF_CONSISTENCY or all(len(i) == group.n for i in selections(group.rows, group.n)):
        return group.rows
    return group.rows.assign(paraphrase_indices=[list(range(group.n))] * len(group.rows))


def _vote_selections(ensembles: list[Group]) -> dict[tuple[str, int], VoteSelection]:
    """Per vote (label, N): the selections of the groups it is compared with (each group's `vote` is set); a
    group whose selections clash with another's of the same design gets its own vote, named by its file."""
    votes: dict[tuple[str, int], VoteSelection] = {}
    for g in ensembles:
        sampled = "sample_index" in g.rows.columns
        samples = g.rows["sample_index"] if sampled else [0] * len(g.rows)
        mine = {(u, s): (tuple(i), a) for u, s, i, a in zip(g.rows["uuid"], samples, selections(compared_rows(g), g.n),
                                                             g.rows["answers"])}
        label = with_tags("vote", g.design)
        have = votes.get((label, g.n))
        if have is not None and any(have.chosen.get(k, v)[0] != v[0] for k, v in mine.items()):
            label = f"{label} ({Path(g.file).stem})"
        votes.setdefault((label, g.n), VoteSelection(g.design, sampled, {})).chosen.update(mine)
        g.vote = label
    return votes


def vote_groups(ensembles: list[Group], per_prompt: pd.DataFrame) -> list[Group]:
    """The vote over the same selections as each ensemble group, one group per vote label and N."""
    votes = []
    for (label, n), vote in _vote_selections(ensembles).items():
        rows = pd.DataFrame({"uuid": [u for u, _ in vote.chosen], "sample_index": [s for _, s in vote.chosen],
                             "paraphrase_indices": [list(i) for i, _ in vote.chosen.values()],
                             "answers": [a for _, a in vote.chosen.values()]})
        rows = rows if vote.sampled else rows.drop(columns="sample_index")
        lines = singles(rows, per_prompt, n)
        if not lines.empty:
            votes.append(Group(label, n, vote_table(rows, lines, n), str(per_prompt["file"].iloc[0]), vote.design))
    return votes
