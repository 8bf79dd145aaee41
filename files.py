"""File plumbing every writer shares: atomic writes readable as the umask says, the checks that a file is a regular
one of the run's own (never through a symlink, never blocking on a FIFO), writable output folders, content hashes,
and text made safe for a terminal. Nothing here knows what a result table is (results.py) or a model (models.py)."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from constants import InputError, first_line


class WriteError(InputError):
    """Writing a result file failed (disk full, I/O error, read-only file system, name too long...): one line
    naming the file and the cause. Nothing half-written is left: an append that fails is cut back to the rows
    before it, and a table is written atomically (the old one stays)."""

    def __init__(self, path: Path, err: OSError):
        self.path, self.cause = Path(path), err
        self.errno = err.errno
        why = err.strerror or first_line(err)
        super().__init__(f"cannot write {path}: {why}; what was written before is kept: fix the cause and rerun "
                         f"the same command")


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words."""
    return ("a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a regular file" if stat.S_ISREG(mode) else "not a regular file")


def not_ours(path: Path, what: str) -> InputError:
    return InputError(f"{path} is {what}, not a file this program wrote; remove it (or use another --output-dir)")


def check_own(path: Path, st: os.stat_result, own: bool) -> None:
    """A regular file, and (`own`: one written in place, a lock or a partial file) this user's with no other link:
    a symlink, a FIFO (its open or read would hang) or a hard link to a file elsewhere is refused, never followed."""
    if not stat.S_ISREG(st.st_mode):
        raise not_ours(path, file_kind(st.st_mode))
    if own and st.st_uid != os.geteuid():
        raise not_ours(path, f"owned by another user (uid {st.st_uid})")
    if own and st.st_nlink > 1:
        raise not_ours(path, f"a hard link ({st.st_nlink} names)")


def plain_file(path: Path, own: bool = False) -> bool:
    """Whether `path` exists as a regular file (see check_own, which raises InputError for anything else); not
    followed when it is a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or first_line(err)}") from None
    check_own(Path(path), st, own)
    return True


def open_own(path: Path, flags: int) -> int:
    """os.open of a file the run writes in place (lock, partial file): created exclusively when absent, never through
    a symlink, never blocking on a FIFO, and refused (InputError) when not a regular file of this user's (check_own)."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except FileExistsError:
        try:
            fd = os.open(path, (flags & ~os.O_CREAT) | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise not_ours(path, "a symlink") from None
            raise
        try:
            check_own(path, os.fstat(fd), own=True)
        except InputError:
            os.close(fd)
            raise
        os.set_blocking(fd, True)
    return fd


def current_umask() -> int:
    """The process umask, read from /proc where Linux has it (os.umask can only read it by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().split("\n"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp), then move tmp into place: readers never see half a file. The file gets the mode a
    plain open() would give it (0666 less the umask: 0644 under 022), not mkstemp's private 0600. An OSError
    (disk full, I/O error, read-only file system, name too long) is raised as WriteError naming `path`; the
    old file, if any, stays as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(err, OSError):
            raise WriteError(path, err) from None
        raise


def existing_ancestor(folder: Path) -> Path:
    """`folder` itself, or the nearest folder above it that exists (or is a symlink, dangling or looping)."""
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing and not existing.is_symlink():
        existing = existing.parent
    return existing


def symlink_trouble(path: Path) -> str | None:
    """"a symlink loop" / "a dangling symlink" when `path` cannot be followed, else None."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        if Path(path).is_symlink():
            return f"a dangling symlink (to {os.readlink(path)})"
    return None


def check_writable_dir(folder: Path, flag: str = "--output-dir") -> None:
    """`folder` is, or can be created as, a folder this process may write into; else InputError. Creates nothing."""
    folder = Path(folder)
    existing = existing_ancestor(folder)
    trouble = symlink_trouble(existing)
    if trouble:
        raise InputError(f"{flag} {folder}: {existing} is {trouble}")
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


def printable(text: str) -> str:
    """`text` with every character a terminal could act on (ESC and the other control characters, bidi and other
    format characters) written as Python's repr writes it (\\x1b): data strings never reach the terminal raw."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (their relative paths and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path).as_posix()}\n".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
