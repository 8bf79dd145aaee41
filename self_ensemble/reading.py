"""The result tables of a results folder: which files count, reading and checking them, scores where a table lacks
them, rows repeated by hand, tables that cover other questions."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from constants import InputError
from results import read_settings

REQUIRED_COLUMNS = (
    "uuid", "answers", "prediction", "seconds", "new_tokens", "method", "num_ensemble", "paraphrase_index",
)
LEGACY_CACHE_NAMES = ("confidence.feather",)  # where earlier versions kept the confidence cache


def is_result_table(path: Path) -> bool:
    """A result table is a `*.feather` file directly in the results folder; not a hidden or temporary file,
    a partial one, or an earlier version's confidence cache (today's lives in confidence-cache/)."""
    return (path.suffix == ".feather" and path.is_file() and not path.name.startswith(".")
            and ".partial" not in path.name and path.name not in LEGACY_CACHE_NAMES)


def result_files(results_dir: Path) -> list[Path]:
    """The result tables directly in `results_dir`, sorted (`is_result_table`); InputError for a missing
    folder, a file, or a folder without any."""
    if not results_dir.exists():
        raise InputError(f"results dir not found: {results_dir}")
    if not results_dir.is_dir():
        raise InputError(f"--results-dir {results_dir}: is a file, not a folder")
    files = sorted(p for p in results_dir.glob("*.feather") if is_result_table(p))
    if not files:
        raise InputError(f"no result tables (*.feather) in {results_dir}")
    return files


def read_result_table(path: Path) -> pd.DataFrame:
    """A result table, read and checked: InputError, in one line, when it cannot be read, lacks one of
    REQUIRED_COLUMNS or has no rows."""
    try:
        df = pd.read_feather(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input, reported in one line
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}".replace("\n", " ")) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {', '.join(missing)}")
    if df.empty:
        raise InputError(f"{path}: no rows (an empty table); delete it or run its command again")
    return df


def _warn(line: str) -> None:
    from files import printable
    print(printable(f"evaluate.py: warning: {line}"), file=sys.stderr)


def _row_keys(df: pd.DataFrame) -> list[str]:
    """What makes a row one of its question's rows (results.row_key): uuid, paraphrase and sample."""
    return ["uuid", "paraphrase_index", *(["sample_index"] if "sample_index" in df.columns else [])]


def without_duplicates(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    """A table whose rows repeat (the same question, paraphrase and sample twice: files concatenated by hand) is
    counted once per row, with a warning line; copies that disagree on the answer cannot be counted: InputError."""
    keys = _row_keys(df)
    copies = df.astype({"uuid": str}).duplicated(keys, keep=False)
    if not copies.any():
        return df
    answers = df[copies].astype({"uuid": str}).groupby(keys, dropna=False)["prediction"].nunique(dropna=False)
    if (answers > 1).any():
        raise InputError(f"{path}: {int((answers > 1).sum())} rows appear twice with different answers (same "
                         f"{', '.join(keys)}); keep one copy of each, or rerun its command into a new folder")
    extra = int(df.astype({"uuid": str}).duplicated(keys).sum())
    _warn(f"{path.name}: {extra} duplicated rows (same {', '.join(keys)}) counted once")
    return df[~df.astype({"uuid": str}).duplicated(keys)].reset_index(drop=True)


def warn_mixed_questions(tables: list[tuple[Path, pd.DataFrame]]) -> None:
    """One warning line when the report's tables do not cover the same questions of the same data: their rows
    are put side by side, but their accuracies are not comparable."""
    questions = {path.name: frozenset(df["uuid"].astype(str)) for path, df in tables}
    data = {path.name: tuple((read_settings(path) or {}).get(k) for k in ("dataset", "data")) for path, _ in tables}
    data = {name: source for name, source in data.items() if source != (None, None)}  # tables without settings
    kinds = [what for what, values in (("question sets", questions), ("datasets", data))
             if len(set(values.values())) > 1]
    if kinds:
        sizes = ", ".join(f"{name}: {len(q)}" for name, q in list(questions.items())[:4])
        _warn(f"the tables cover different {' and '.join(kinds)} (questions per table: {sizes}"
              f"{', ...' if len(questions) > 4 else ''}); their accuracies are not comparable")


def scored(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with `exact` and `partial` as booleans, scored here (`scoring.score_frame`) when the table
    lacks them."""
    if not ({"exact", "partial"} <= set(df.columns) and df[["exact", "partial"]].notna().all().all()):
        from scoring import score_frame  # spaCy loads only when a table lacks scores

        df = score_frame(df)
    return df.assign(exact=df["exact"].astype(bool), partial=df["partial"].astype(bool))
