"""Result tables: rows appended batch by batch to a per-rank partial JSONL (so an interrupted run
resumes where it stopped), merged at the end into `<name>.feather` plus a readable `<name>.jsonl`,
scored, and written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

import scoring


def result_row(record, tokenizer, tokens: list[int], *, paraphrases: list[str], prompts: list[str], seconds: float,
               method: str, num_ensemble: int, paraphrase_index: int = -1, **extra) -> dict:
    """One row of a result table: full uuid, every gold answer, the first line and the raw text."""
    from decoding import answer_text
    prediction, generation = answer_text(tokenizer, tokens)
    return dict(uuid=record.uuid, paraphrases=paraphrases, prompts=prompts, answers=record.answers,
                prediction=prediction, generation=generation, seconds=seconds, new_tokens=len(tokens),
                method=method, num_ensemble=num_ensemble, paraphrase_index=paraphrase_index, **extra)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then move the file into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_table(df: pd.DataFrame, path: Path) -> None:
    """`path` (.feather) and a readable copy beside it (.jsonl), each written atomically."""
    df = df.reset_index(drop=True)
    atomic_write(path, lambda tmp: df.to_feather(tmp))
    atomic_write(path.with_suffix(".jsonl"), lambda tmp: df.to_json(tmp, orient="records", lines=True, force_ascii=False))


def read_table(path: Path) -> pd.DataFrame:
    df = pd.read_feather(path)
    for col in df.columns:  # feather gives numpy arrays for list columns: give lists back
        if len(df) and hasattr(df[col].iloc[0], "tolist") and not isinstance(df[col].iloc[0], (str, bytes)):
            if getattr(df[col].iloc[0], "ndim", 0) == 1:
                df[col] = df[col].map(lambda v: v.tolist())
    return df


def check_settings(path: Path, settings: dict, write: bool = True) -> None:
    """A table is only resumed with the settings that made it: they are kept beside it."""
    from constants import InputError
    sidecar = path.with_suffix(".settings.json")
    if sidecar.exists():
        kept = json.loads(sidecar.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(kept) | set(settings) if kept.get(k) != settings.get(k))
        if changed:
            diff = ", ".join(f"{k}: {kept.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise InputError(f"{path} was made with other settings ({diff}); use another --output-dir or delete it")
    elif write:
        text = json.dumps(settings, indent=1, sort_keys=True, default=str)
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class ResultWriter:
    """Appends finished questions of one rank; `finish` merges every rank's rows into the table."""

    def __init__(self, path: Path, rank: int = 0):
        self.path = path
        self.partial = path.with_name(f"{path.stem}.rank{rank}.partial.jsonl")

    def partial_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*.partial.jsonl"))

    def rows(self) -> list[dict]:
        """Rows written so far: the finished table, then every partial file (a torn last line is skipped)."""
        rows = read_table(self.path).to_dict("records") if self.path.exists() else []
        for file in self.partial_files():
            for line in file.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a run killed mid-write; that question is simply redone
        return rows

    def done_uuids(self) -> set[str]:
        return {str(r["uuid"]) for r in self.rows()}

    def append(self, rows: list[dict]) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.drop_torn_tail()
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def drop_torn_tail(self) -> None:
        """A run killed mid-write leaves half a line: cut it, so the next row starts on its own line."""
        if not self.partial.exists():
            return
        data = self.partial.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.partial, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def finish(self, order: list[str]) -> pd.DataFrame:
        """Merge all rows (one copy per uuid and paraphrase) in dataset order, score, write, clean up.
        Rows of questions outside `order` (an earlier run with a larger --limit) are kept, after."""
        df = pd.DataFrame(self.rows())
        have = set(df["uuid"]) if len(df) else set()
        missing = [u for u in order if u not in have]
        if missing:  # e.g. a rank whose partial file is on another machine's disk
            raise RuntimeError(f"{self.path}: no rows for {len(missing)} questions (first: {missing[0]}); "
                               f"the partial files stay for a resumed run")
        df = df.drop_duplicates(subset=["uuid", "paraphrase_index"], keep="last")
        rank = {u: i for i, u in enumerate(order)}
        df = df.assign(_order=df["uuid"].map(rank).fillna(len(rank)))
        df = df.sort_values(["_order", "paraphrase_index"], kind="stable").drop(columns="_order")
        df = scoring.score_frame(df.drop(columns=["exact", "partial"], errors="ignore"))
        write_table(df, self.path)
        for file in self.partial_files():
            file.unlink()
        return df
