"""Result tables: rows appended batch by batch to a per-rank partial JSONL (so an interrupted run
resumes where it stopped), merged at the end into `<name>.feather` plus a readable `<name>.jsonl`,
scored, and written atomically, readable as the umask says, under a lock while a process writes them."""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import math
import numbers
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pandas as pd

from constants import EXIT_BAD_INPUT, REPO_DIR, InputError, first_line
from files import (WriteError, atomic_write, check_own, check_writable_dir, current_umask,  # noqa: F401
                   existing_ancestor, file_kind, not_ours, open_own, plain_file, printable, symlink_trouble)

log = logging.getLogger(__name__)


class ResultsError(InputError, RuntimeError):
    """A table cannot be finished: some question has not exactly its expected rows (e.g. a rank's partial file
    is on another machine's disk). One line; the partial files stay for a resumed run. A RuntimeError too, as
    this error was before it had a class of its own."""


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a file by b"\n" only (never str.splitlines, which also ends a line at U+2028, U+0085, \x0c...);
    the last piece is returned as it is (it is a torn line when the data does not end with b"\n")."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def result_row(record, tokenizer, tokens: list[int], *, paraphrases: list[str], prompts: list[str], seconds: float,
               method: str, num_ensemble: int, paraphrase_index: int = -1, **extra) -> dict:
    """One row of a result table: full uuid, every gold answer, the first line and the raw text, and which
    of the question's paraphrases it used (`paraphrase_indices`; `sample_index` for a sampled selection)."""
    from decoding import answer_text
    prediction, generation = answer_text(tokenizer, tokens)
    used = [paraphrase_index] if paraphrase_index >= 0 else list(range(len(paraphrases)))
    indices = [record.indices[i] for i in used] if getattr(record, "indices", None) else used
    sample = {"sample_index": record.sample} if getattr(record, "sample", None) is not None else {}
    return dict(uuid=record.uuid, paraphrases=paraphrases, prompts=prompts, answers=record.answers,
                prediction=prediction, generation=generation, token_ids=list(tokens), seconds=seconds,
                new_tokens=len(tokens), method=method, num_ensemble=num_ensemble, paraphrase_index=paraphrase_index,
                paraphrase_indices=indices, **sample, **extra)


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of this checkout: dirty when a tracked file differs from the commit (untracked files,
    such as results, do not count). ("unknown", None) without git or outside a git checkout of this project.
    Reads only: no optional locks, so it never touches the index."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO_DIR), *argv], capture_output=True,
                                  text=True, timeout=20, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != REPO_DIR.resolve():
        return "unknown", None  # no git, or this folder copied into someone else's repository
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit or "unknown", (None if status is None or commit is None else bool(status))


def provenance(model_name: str, device_map: str | None, model) -> dict:
    """Where a table came from, kept in its settings file but never compared on resume: the code (git commit
    and dirty flag), the library versions, the model (its key, what it loads from, the weights' revision) and
    where it ran (device and dtype)."""
    import torch
    import transformers

    from models import model_revision, model_source
    commit, dirty = git_state()
    try:
        model_id = model_source(model_name, convert=False)
    except InputError:
        model_id = model_name  # a tiny test model, built by code
    device = model.device
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "model": model_name,
            "model_id": model_id, "model_revision": model_revision(model), "device": str(device),
            "device_map": device_map,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(model.dtype).removeprefix("torch."), **lemmatizer_provenance()}


def lemmatizer_provenance() -> dict:
    """Which lemmatiser the partial metric's scores come from (a spaCy pipeline or the lookup tables), and its
    versions: the rows' `partial` column depends on it."""
    from scoring import lemmatizer_name, lemmatizer_version
    return {"lemmatizer": lemmatizer_name(), "lemmatizer_version": lemmatizer_version()}


MAX_RANK_DIGITS = 4  # the longest rank number a table's per-rank files are checked for (rank9999)


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system holding `folder` (or its nearest existing ancestor) takes."""
    try:
        return int(os.pathconf(existing_ancestor(folder), "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def table_file_names(path: Path, rank: int = 10 ** MAX_RANK_DIGITS - 1) -> list[str]:
    """Every file name a table at `path` leads to: the table, its .jsonl copy, settings, a rank's lock and partial
    file, and atomic_write's temp file of each."""
    path = Path(path)
    names = [path.name, path.with_suffix(".jsonl").name, path.with_suffix(".settings.json").name,
             f"{path.stem}.rank{rank}.lock", f"{path.stem}.rank{rank}.partial.jsonl"]
    return names + [f".{name}.XXXXXXXX.tmp" for name in names]


def check_table_path(path: Path) -> None:
    """Every file a table at `path` needs can be created: no folder or file name past the file system's limit
    (os.pathconf PC_NAME_MAX, 255 where it cannot be asked; PC_PATH_MAX for the whole path). Raises InputError;
    writes nothing. Called before anything is written."""
    path = Path(path)
    limit = name_max(path.parent)
    for part in path.parent.parts:
        if len(os.fsencode(part)) > limit:
            raise InputError(f"{path.parent}: the folder name {part[:40]!r}... is {len(os.fsencode(part))} bytes, "
                             f"longer than this file system's limit of {limit}; choose a shorter --output-dir")
    longest = max(table_file_names(path), key=lambda name: len(os.fsencode(name)))
    if len(os.fsencode(longest)) > limit:
        raise InputError(f"{path}: the file name is too long for this file system ({len(os.fsencode(longest))} bytes "
                         f"for {longest[:40]!r}..., the limit is {limit}); choose fewer or shorter name parts "
                         f"(e.g. --indexs) or another --output-dir")
    try:
        path_max = int(os.pathconf(existing_ancestor(path.parent), "PC_PATH_MAX"))
    except (OSError, ValueError):
        path_max = 4096
    full = len(os.fsencode(str(path.parent.absolute() / longest)))
    if full >= path_max:
        raise InputError(f"{path}: the path is too long for this file system ({full} bytes, the limit is "
                         f"{path_max}); choose a shorter --output-dir")


JSON_LINE_ENDS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}  # ends a line for str.splitlines


def jsonl_text(df: pd.DataFrame) -> str:
    """`df` as JSON Lines, non-ASCII kept readable, except the characters other readers end a line at (U+2028,
    U+2029, U+0085: pandas leaves them raw; they only occur inside strings, where their escape means the same)."""
    text = df.to_json(orient="records", lines=True, force_ascii=False)
    for char, escape in JSON_LINE_ENDS.items():
        text = text.replace(char, escape)
    return text if text.endswith("\n") or not text else text + "\n"


def write_table(df: pd.DataFrame, path: Path) -> None:
    """`path` (.feather) and a readable copy beside it (.jsonl), each written atomically; an OSError is raised as
    WriteError (the old files stay)."""
    df = df.reset_index(drop=True)
    atomic_write(path, lambda tmp: df.to_feather(tmp))
    text = jsonl_text(df)
    atomic_write(path.with_suffix(".jsonl"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_table(path: Path) -> pd.DataFrame:
    """A table written by write_table; a file that is not one (truncated, corrupt, unreadable) is an InputError
    naming it."""
    plain_file(path)  # a FIFO or device planted as the table would hang the read
    try:
        df = pd.read_feather(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file means the same to the user
        raise InputError(f"cannot read {path}: {first_line(err)}; delete it or use another --output-dir") from None
    for col in df.columns:  # feather gives numpy arrays for list columns: give lists back
        if len(df) and hasattr(df[col].iloc[0], "tolist") and not isinstance(df[col].iloc[0], (str, bytes)):
            if getattr(df[col].iloc[0], "ndim", 0) == 1:
                df[col] = df[col].map(lambda v: v.tolist())
    return df


AFRESH = ("to start afresh delete {name}, its .jsonl copy, .settings.json and .rank*.partial.jsonl files, or use "
          "another --output-dir")
UNCOMPARED_SETTINGS = ("provenance", "resumed_with")  # kept beside a table, never a reason to refuse a resume


def non_finite(value, key: str = "") -> str | None:
    """The key (dotted) of the first NaN or infinite number in a settings value, or None."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = non_finite(v, f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = non_finite(v, f"{key}[{i}]")
            if found is not None:
                return found
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
        return key or "value"
    return None


def has_rows(path: Path) -> bool:
    """Whether the table at `path` exists or any rank's partial file of it holds a complete row (read only up to
    the first one)."""
    if Path(path).exists():
        return True
    for file in ResultWriter(path).partial_files():
        try:
            with open(file, "rb") as f:
                for line in f:  # a binary file's lines end at b"\n" only
                    if line.endswith(b"\n") and ResultWriter.parse_line(line[:-1]) is not None:
                        return True
        except FileNotFoundError:
            continue
        except OSError as err:
            raise InputError(f"cannot read {file}: {err.strerror or first_line(err)}") from None
    return False


def check_settings(path: Path, settings: dict, write: bool = True) -> None:
    """A table is only resumed with the settings that made it: they are kept beside it. Their "provenance"
    (git commit, versions, model revision, device: see runner.provenance) is kept, not compared: the run
    that created the table keeps "provenance"; a later run that resumes it with another one is added to
    "resumed_with", so a table made by two versions of the code says so. Settings beside nothing (no table, no
    partial row: a run that crashed before its first row) are stale: replaced, never a reason to refuse.
    A NaN or infinite number in `settings` is an InputError naming its key (nothing is written)."""
    bad = non_finite(settings)
    if bad is not None:
        raise InputError(f"{path}: setting {bad} is not a finite number; give a finite value")
    sidecar = path.with_suffix(".settings.json")
    settings = json.loads(json.dumps(settings, default=str))  # compared as they are kept: JSON values
    provenance = settings.pop("provenance", None)
    kept = None
    if plain_file(sidecar):
        try:
            kept = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            if has_rows(path):
                raise InputError(f"cannot read {sidecar} ({first_line(err)}); delete the table and it, or use "
                                 f"another --output-dir") from None
        if not has_rows(path):
            kept = None  # stale: left by a run that wrote no row
        elif not isinstance(kept, dict):
            raise InputError(f"{sidecar} is not a JSON object, so the settings that made {path.name}'s rows are "
                             f"unknown; {AFRESH.format(name=path.name)}")
    elif has_rows(path):  # rows whose flags nobody knows: never resumed, never given this run's settings
        raise InputError(f"{path} has rows but no settings file ({sidecar.name}), so the settings that made them "
                         f"are unknown; {AFRESH.format(name=path.name)}")
    if kept is not None:
        compared = {k: v for k, v in kept.items() if k not in UNCOMPARED_SETTINGS}
        changed = sorted(k for k in set(compared) | set(settings) if compared.get(k) != settings.get(k))
        if changed:
            diff = ", ".join(f"{k}: {compared.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise InputError(f"{path} was made with other settings ({diff}); use another --output-dir or delete it")
        later = kept.get("resumed_with", [])
        if write and provenance is not None and provenance != kept.get("provenance") and provenance not in later:
            text = json.dumps({**kept, "resumed_with": [*later, provenance]}, indent=1, sort_keys=True)
            atomic_write(sidecar, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    elif write:
        kept = {**settings, **({"provenance": provenance} if provenance is not None else {})}
        text = json.dumps(kept, indent=1, sort_keys=True, default=str, allow_nan=False)
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_settings(path: Path) -> dict | None:
    """The settings kept beside a table (with its provenance), or None when there are none or they are unreadable."""
    try:
        return json.loads(Path(path).with_suffix(".settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


LEMMA_COLUMNS = ("predict_lemma", "answer_lemmas")  # upstream's names (its --lemmaize)


def with_lemmas(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of `df` with upstream's lemma columns: predict_lemma, the prediction's lemmas, and answer_lemmas,
    each gold answer's lemmas, from the project's lemmatiser (the one `partial` is scored with: lower-cased,
    punctuation dropped)."""
    import scoring
    seen: dict[str, list[str]] = {}

    def lemmas(text) -> list[str]:
        text = text if isinstance(text, str) else ""
        if text not in seen:
            seen[text] = scoring.lemmas(text)
        return seen[text]

    out = df.copy()
    out["predict_lemma"] = pd.Series([lemmas(p) for p in out["prediction"]], index=out.index, dtype=object)
    out["answer_lemmas"] = pd.Series(
        [[lemmas(a) for a in ([answers] if isinstance(answers, str) else list(answers)) if isinstance(a, str)]
         for answers in out["answers"]], index=out.index, dtype=object)
    return out


def lemmaize_table(path: Path) -> bool:
    """Add the lemma columns to the table at `path` (its .jsonl copy too), atomically; False when it has them."""
    df = read_table(path)
    if set(LEMMA_COLUMNS) <= set(df.columns):
        return False
    write_table(with_lemmas(df), path)
    return True


LOCK_BYTES = 512  # a lock file holds "pid P on HOST": more is not ours
LOCK_SHOWN = 80   # the most of a lock file's first line a message shows


def lock_text(data: bytes) -> str:
    """A lock file's content as a message may show it: its first line, escaped (`printable`) and cut short, never
    the raw bytes (which could hold terminal escape codes)."""
    line = data.decode("utf-8", errors="replace").strip().split("\n")[0]
    shown = printable(line)
    return shown if len(shown) <= LOCK_SHOWN else f"{shown[:LOCK_SHOWN]}... ({len(data)} bytes)"


class TableLock:
    """`<stem>.rank<r>.lock` beside a table while a process writes it. A second live writer of the same
    table is refused in one line; the lock of a killed process is taken over, since the kernel drops a
    dead process's flock (the file it leaves only names it)."""

    def __init__(self, path: Path, rank: int = 0):
        self.table = Path(path)
        self.file = self.table.with_name(f"{self.table.stem}.rank{rank}.lock")
        self.fd: int | None = None

    def refusal(self, holder: str) -> InputError:
        return InputError(f"{self.table} is being written by another process ({holder or 'unknown'}; lock "
                          f"{self.file.name}); wait for it to finish or use another --output-dir")

    def holder(self) -> str | None:
        """Who holds the lock now, without taking it or creating anything; None when nobody does. A lock file that
        is not a regular file of this user's (a symlink, a FIFO) is refused (InputError), never followed."""
        if not plain_file(self.file, own=True):
            return None
        try:
            fd = os.open(self.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                return None  # no flock on this file system: acquire() judges by the pid
            return lock_text(os.pread(fd, LOCK_BYTES, 0))
        finally:
            os.close(fd)

    def acquire(self) -> "TableLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = open_own(self.file, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                text = lock_text(os.pread(fd, LOCK_BYTES, 0))
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES) or self.pid_alive(text):
                    raise self.refusal(text) from None
                fd = open_own(self.file, os.O_RDWR)  # no flock here: the pid said it is free
                break
            try:  # the previous holder may have removed the file we opened: lock the one on disk instead
                if os.fstat(fd).st_ino == os.lstat(self.file).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = lock_text(os.pread(fd, LOCK_BYTES, 0))
        if stale:
            log.warning("%s: taking over the lock left by %s, which is no longer running", self.table.name, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def pid_alive(text: str) -> bool:
        """For file systems without flock: whether the process a lock file names ("pid P on HOST") runs."""
        parts = text.split()
        if len(parts) != 4 or parts[0] != "pid" or not parts[1].isdigit():
            return False  # nothing readable: nobody to wait for
        if parts[3] != socket.gethostname():
            return True  # another machine's process: it cannot be checked from here, so it counts as live
        pid = int(parts[1])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.file.unlink()  # before unlocking: a waiter that locked this inode sees it is gone and retries
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "TableLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def row_key(row: Mapping) -> tuple:
    """What makes a row one of its question's expected rows: (uuid, paraphrase_index[, sample_index]). A row
    without a sample_index (or with a missing one: NaN in a table) counts as sample None."""
    def norm(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer()):
            return int(value)
        return value
    return str(row["uuid"]), norm(row.get("paraphrase_index", -1)), norm(row.get("sample_index"))


def row_trouble(row: Mapping) -> str | None:
    """What makes a decoded partial row unusable (None when nothing): the key fields of the wrong type."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)
    if not (isinstance(row["uuid"], str) or whole(row["uuid"])):
        return f"its uuid is {type(row['uuid']).__name__}"
    for key in ("paraphrase_index", "sample_index"):
        if row.get(key) is not None and not whole(row[key]):
            return f"its {key} is {type(row[key]).__name__}"
    return None


def row_counts(rows: Iterable[Mapping]) -> dict[str, int]:
    """Per uuid, how many distinct rows (row_key) there are."""
    counts: dict[str, int] = {}
    for key in {row_key(r) for r in rows}:
        counts[key[0]] = counts.get(key[0], 0) + 1
    return counts


class ResultWriter:
    """Appends finished questions of one rank; `finish` merges every rank's rows into the table.

    Partial files are JSON Lines split by "\n" only, each row written with ensure_ascii (no character inside a
    row can end its line). A question is done only when it has all its expected rows: see `done_uuids`,
    `drop_incomplete` and `finish`."""

    def __init__(self, path: Path, rank: int = 0):
        self.path = Path(path)
        self.partial = self.path.with_name(f"{self.path.stem}.rank{rank}.partial.jsonl")

    def partial_files(self) -> list[Path]:
        """Every rank's partial file, oldest first (by modification time, then name): when two hold the same row
        (a run with fewer ranks redid an orphan rank's question), the newer one's copy is the one kept."""
        def age(file: Path):
            try:
                return file.stat().st_mtime_ns, file.name
            except OSError:
                return 0, file.name
        files = sorted(self.path.parent.glob(f"{self.path.stem}.rank*.partial.jsonl"), key=age)
        return [file for file in files if plain_file(file, own=True)]  # a planted FIFO or symlink: one line

    @staticmethod
    def read_partial(file: Path) -> list[tuple[bytes, dict]]:
        """(line, row) for each complete row of a partial file, split by b"\n" only; a torn or undecodable line
        (a run killed mid-write) is skipped: that question is simply redone."""
        try:
            if not plain_file(file, own=True):
                return []
            data = Path(file).read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise InputError(f"cannot read {file}: {err.strerror or first_line(err)}") from None
        out = []
        for lineno, line in enumerate(split_lines(data), 1):
            row = ResultWriter.parse_line(line)
            if row is not None:
                trouble = row_trouble(row)
                if trouble:
                    raise InputError(f"{file}:{lineno}: {trouble}, not a row this program writes; delete {file.name} "
                                     f"to redo its questions")
                out.append((line, row))
        return out

    @staticmethod
    def parse_line(line: bytes) -> dict | None:
        """A partial file's line as its row, or None when it is not one (torn, undecodable, no uuid)."""
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return row if isinstance(row, dict) and "uuid" in row else None

    def partial_rows(self) -> list[tuple[Path, list[dict]]]:
        return [(file, [row for _, row in self.read_partial(file)]) for file in self.partial_files()]

    def rows(self) -> list[dict]:
        """Rows written so far: the finished table, then every partial file (a torn last line is skipped)."""
        rows = []
        if plain_file(self.path):
            table = read_table(self.path)
            if "uuid" not in table.columns:
                raise InputError(f"{self.path}: no uuid column, so it is not a result table of this program; "
                                 f"{AFRESH.format(name=self.path.name)}")
            rows = table.to_dict("records")
        for _, partial in self.partial_rows():
            rows.extend(partial)
        return rows

    def counts(self) -> dict[str, int]:
        """Per uuid, its distinct rows (one per (uuid, paraphrase_index[, sample_index])) in the table and every
        partial file."""
        return row_counts(self.rows())

    def done_uuids(self, expected: Mapping[str, int] | None = None) -> set[str]:
        """The questions that need no more work: those of `expected` whose distinct rows number exactly
        expected[uuid]. Without `expected` (the old behaviour): every uuid with any row."""
        counts = self.counts()
        if expected is None:
            return set(counts)
        return {u for u, n in counts.items() if u in expected and n == expected[u]}

    def incomplete(self, expected: Mapping[str, int], counts: Mapping[str, int] | None = None) -> set[str]:
        """The questions of `expected` that have some rows but not exactly their expected number."""
        counts = self.counts() if counts is None else counts
        return {u for u, n in counts.items() if u in expected and n != expected[u]}

    def drop_incomplete(self, expected: Mapping[str, int]) -> set[str]:
        """At the start of a (resumed) run: rewrite this rank's partial file, atomically, without the rows of
        questions that are incomplete (see `incomplete`) and without a torn last line, so that they are redone
        whole. Other ranks' files are left to their own writers (a row they still hold is outranked by the newer
        copy, see partial_files). Returns the uuids dropped; writes nothing when there is nothing to drop."""
        drop = self.incomplete(expected)
        if not self.partial.exists():
            return drop
        lines = self.read_partial(self.partial)
        keep = [line for line, row in lines if str(row["uuid"]) not in drop]
        try:
            torn = self.partial.stat().st_size != sum(len(line) + 1 for line, _ in lines)
        except OSError as err:
            raise WriteError(self.partial, err) from None
        if len(keep) < len(lines) or torn:
            data = b"".join(line + b"\n" for line in keep)
            atomic_write(self.partial, lambda tmp: Path(tmp).write_bytes(data))
        return drop

    def append(self, rows: list[dict]) -> None:
        """Add rows to this rank's partial file, synced to disk. An OSError (disk full, I/O error, read-only file
        system) cuts the file back to what it held and is raised as WriteError naming it."""
        data = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows).encode("ascii")
        try:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.drop_torn_tail()
            fd = open_own(self.partial, os.O_WRONLY | os.O_APPEND)
        except OSError as err:
            raise WriteError(self.partial, err) from None
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as err:
                try:
                    os.ftruncate(fd, size)  # no half row left behind (needs no space)
                except OSError:
                    pass  # the next append or drop_incomplete cuts the torn line
                raise WriteError(self.partial, err) from None
        finally:
            os.close(fd)

    def drop_torn_tail(self) -> None:
        """A run killed mid-write leaves half a line: cut it, so the next row starts on its own line."""
        if not plain_file(self.partial, own=True):
            return
        try:
            size = self.partial.stat().st_size
        except FileNotFoundError:
            return
        if not size:
            return
        with open(self.partial, "r+b") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            end, chunk = size, 1 << 16
            while end > 0:  # look back for the last complete line's end
                start = max(0, end - chunk)
                f.seek(start)
                block = f.read(end - start)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    f.truncate(start + cut + 1)
                    return
                end = start
            f.truncate(0)

    def finish(self, order: list[str], expected: Mapping[str, int] | None = None) -> pd.DataFrame:
        """Merge all rows (one copy per uuid, paraphrase_index and, where rows have one, sample_index) in dataset
        order, score, write, clean up. Every question of `order` must have exactly expected[uuid] rows (without
        `expected`, or for a uuid missing from it: at least one), else ResultsError (the partial files stay for a
        resumed run; this rank's rows of incomplete questions are dropped first, see drop_incomplete). Rows of
        questions outside `order` (an earlier run with a larger --limit) are kept, after."""
        rows = self.rows()
        counts = row_counts(rows)
        expected = expected or {}
        missing = [u for u in order if not counts.get(u)]
        wrong = [u for u in order if counts.get(u) and u in expected and counts[u] != expected[u]]
        if missing or wrong:  # e.g. a rank whose partial file is on another machine's disk
            parts = []
            if missing:
                parts.append(f"no rows for {len(missing)} questions (first: {missing[0]})")
            if wrong:
                parts.append(f"{len(wrong)} questions incomplete (first: {wrong[0]}, {counts[wrong[0]]} of "
                             f"{expected[wrong[0]]} rows)")
                self.drop_incomplete(expected)  # their rows are redone whole by the rerun
            raise ResultsError(f"{self.path}: {'; '.join(parts)}; the partial files stay for a resumed run")
        df = pd.DataFrame(rows)
        if "paraphrase_index" not in df.columns:
            df["paraphrase_index"] = -1
        keys = ["uuid", "paraphrase_index", *(["sample_index"] if "sample_index" in df.columns else [])]
        df = df.drop_duplicates(subset=keys, keep="last")
        rank = {u: i for i, u in enumerate(order)}
        df = df.assign(_order=df["uuid"].map(rank).fillna(len(rank)))
        df = df.sort_values(["_order", *keys[2:], "paraphrase_index"], kind="stable").drop(columns="_order")
        import scoring  # spaCy loads only when a table is scored
        df = scoring.score_frame(df.drop(columns=["exact", "partial"], errors="ignore"))
        if set(LEMMA_COLUMNS) & set(df.columns):  # a --lemmaize'd table resumed: lemmas for the new rows too
            df = with_lemmas(df)
        write_table(df, self.path)
        for file in self.partial_files():
            file.unlink(missing_ok=True)
        return df
