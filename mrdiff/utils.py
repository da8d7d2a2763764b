"""Small helpers shared across mrdiff."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside `path`, fsync, then os.replace: readers see the old or the new file.

    A process killed mid-write (pre-emption, OOM) leaves the previous file intact and no temporary behind.
    The file gets the permissions a plain open() would give it (0666 less the umask), not mkstemp's 0600,
    so the rest of a project group can read checkpoints and tables on a shared cluster.
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
