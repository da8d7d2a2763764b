"""Small helpers shared across mrdiff."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

NO_SPACE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is reached",
                   errno.EFBIG: "the file-size limit (ulimit -f) is reached"}


class NoSpaceError(OSError):
    """A write ran out of space (full disk, quota, file-size limit); the previous file, if any, is intact."""

    def __init__(self, code: int, path: Path, needed: int | None) -> None:
        free = shutil.disk_usage(path.parent).free
        need = f"it needs about {_megabytes(needed)} and " if needed else ""
        kept = f"the previous {path.name} is intact" if path.exists() else f"no partial {path.name} was left"
        super().__init__(code, f"cannot write {path}: {NO_SPACE_ERRNOS[code]} ({need}{_megabytes(free)} are free "
                               f"on its file system); {kept}. Free some space or write elsewhere, then run again",
                         str(path))

    def __str__(self) -> str:
        return self.strerror


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def no_space_errno(error: BaseException) -> int | None:
    """The errno when `error`, or an error it was raised from or while handling, is an out-of-space write.

    torch.save reports a failed write as RuntimeError("… unexpected pos …"); the OSError sits in its context.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, size_hint: int | None = None) -> Iterator[IO]:
    """Write to a temporary file beside `path`, fsync, then os.replace: readers see the old or the new file.

    A process killed mid-write (pre-emption, OOM) leaves the previous file intact and no temporary behind.
    Running out of space raises NoSpaceError: which file, how much it needs (`size_hint`, bytes) and how much
    is free. The file gets the permissions a plain open() would give it (0666 less the umask), not mkstemp's
    0600, so the rest of a project group can read checkpoints and tables on a shared cluster.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        code = no_space_errno(error)
        if code is not None and not isinstance(error, NoSpaceError):
            raise NoSpaceError(code, path, size_hint) from error
        raise


def _umask() -> int:
    """The process umask: from /proc on Linux (no race with other threads), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def unused_path(path: Path, siblings: tuple[str, ...] = ()) -> Path:
    """`path`, or `<stem>-2<suffix>`, `-3`, … when it (or a sibling with one of `siblings`' suffixes) exists.

    Grids and evaluation tables of earlier runs are never replaced: a new one gets the next free number.
    """
    candidate, number = path, 1
    while candidate.exists() or any(candidate.with_suffix(s).exists() for s in siblings):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def cache_dir(env: str, name: str) -> Path:
    """$env if set, else $XDG_CACHE_HOME/mrdiff/<name>, else ~/.cache/mrdiff/<name>."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mrdiff" / name


def file_hash(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-256, computed once per file version (path, size, mtime)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)[:16]


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
