"""Result tables: rows appended batch by batch to a per-rank partial JSONL (so an interrupted run
resumes where it stopped), merged at the end into `<name>.feather` plus a readable `<name>.jsonl`,
scored, and written atomically, readable as the umask says, under a lock while a process writes them."""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd

from constants import EXIT_BAD_INPUT, InputError

log = logging.getLogger(__name__)


def result_row(record, tokenizer, tokens: list[int], *, paraphrases: list[str], prompts: list[str], seconds: float,
               method: str, num_ensemble: int, paraphrase_index: int = -1, **extra) -> dict:
    """One row of a result table: full uuid, every gold answer, the first line and the raw text."""
    from decoding import answer_text
    prediction, generation = answer_text(tokenizer, tokens)
    return dict(uuid=record.uuid, paraphrases=paraphrases, prompts=prompts, answers=record.answers,
                prediction=prediction, generation=generation, token_ids=list(tokens), seconds=seconds,
                new_tokens=len(tokens),
                method=method, num_ensemble=num_ensemble, paraphrase_index=paraphrase_index, **extra)


class OneLineParser(argparse.ArgumentParser):
    """The scripts' argparse: a bad flag is reported in one line (naming --help) with exit code 2, like
    every other bad input, instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see --help)\n")


def current_umask() -> int:
    """The process umask, read from /proc where Linux has it (os.umask can only read it by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp), then move tmp into place: readers never see half a file. The file gets the mode a
    plain open() would give it (0666 less the umask: 0644 under 022), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_dir(folder: Path, flag: str = "--output-dir") -> None:
    """`folder` is, or can be created as, a folder this process may write into; else InputError. Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing and not existing.is_symlink():
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise InputError(f"{flag} {folder}: {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "on a read-only file system" if read_only else "not writable by this user"
        raise InputError(f"{flag} {folder}: {existing} is {why}")


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


UNCOMPARED_SETTINGS = ("provenance", "resumed_with")  # kept beside a table, never a reason to refuse a resume


def check_settings(path: Path, settings: dict, write: bool = True) -> None:
    """A table is only resumed with the settings that made it: they are kept beside it. Their "provenance"
    (git commit, versions, model revision, device: see runner.provenance) is kept, not compared: the run
    that created the table keeps "provenance"; a later run that resumes it with another one is added to
    "resumed_with", so a table made by two versions of the code says so."""
    sidecar = path.with_suffix(".settings.json")
    settings = json.loads(json.dumps(settings, default=str))  # compared as they are kept: JSON values
    provenance = settings.pop("provenance", None)
    if sidecar.exists():
        kept = json.loads(sidecar.read_text(encoding="utf-8"))
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
        text = json.dumps(kept, indent=1, sort_keys=True, default=str)
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
        """Who holds the lock now, without taking it or creating anything; None when nobody does."""
        try:
            fd = os.open(self.file, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                return None  # no flock on this file system: acquire() judges by the pid
            return os.read(fd, 200).decode(errors="replace").strip()
        finally:
            os.close(fd)

    def acquire(self) -> "TableLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                text = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES) or self.pid_alive(text):
                    raise self.refusal(text) from None
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)  # no flock here: the pid said it is free
                break
            try:  # the previous holder may have removed the file we opened: lock the one on disk instead
                if os.fstat(fd).st_ino == os.stat(self.file).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = os.read(fd, 200).decode(errors="replace").strip()
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
        import scoring  # spaCy loads only when a table is scored
        df = scoring.score_frame(df.drop(columns=["exact", "partial"], errors="ignore"))
        if set(LEMMA_COLUMNS) & set(df.columns):  # a --lemmaize'd table resumed: lemmas for the new rows too
            df = with_lemmas(df)
        write_table(df, self.path)
        for file in self.partial_files():
            file.unlink()
        return df
