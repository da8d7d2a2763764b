"""One writer per run dir: an exclusive lock on <run dir>/.mrdiff.lock, and no temp files a killed writer left.

Two `mrdiff fit` started at once into one new run dir both passed the "no checkpoints here yet" check, then wrote
into one checkpoints/ folder; with the lock the second refuses before it writes anything. It is flock(2), not a
pid file: the kernel drops it when its holder dies, however it dies (SIGKILL, OOM, pre-emption), so a requeued job
or a resume after a crash never finds a stale lock. Readers (`mrdiff sample` into another folder) take none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from mrdiff.console import info

LOCK_NAME = ".mrdiff.lock"
# The names mrdiff.utils.atomic_write writes to: tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp"), whose random
# part is 8 characters of tempfile's alphabet (a-z, 0-9, _). Nothing broader: other tools' files are not ours.
ATOMIC_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# flock's errors on file systems without working locks (some NFS and FUSE mounts)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunDirInUse(Exception):
    """Another live process holds the run dir's lock: who (from the lock file), and what to do."""

    def __init__(self, run_dir: Path, holder: dict) -> None:
        pid, host, since = (holder.get(key, "?") for key in ("pid", "host", "since"))
        super().__init__(f"run dir {run_dir} is in use by another mrdiff process (pid {pid} on host {host}, since "
                         f"{since}): wait for it, or pick another --trainer.default_root_dir")


class RunLock:
    """flock(LOCK_EX | LOCK_NB) on <run dir>/.mrdiff.lock, held from acquire() to release() or the process' end.

    The file's content (pid, host, start time) only names the holder in a refusal; a killed holder's line stays
    until the next holder, as the lock, not the line, is what counts. Release empties it, and where the run dir
    holds nothing else removes it and the folders acquire made, so a command that fails before writing (bad data,
    a bad --ckpt_path) leaves no trace. Hence acquire checks that the file it locked is still the one at the path.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []  # folders acquire created, innermost first

    def acquire(self) -> bool:
        """True once held; False where the file system has no working locks (said on stderr).

        Raises RunDirInUse at once, having created at most the run dir and an empty lock file, when it is held.
        """
        while True:  # again when a releasing holder removed the file (or folder) this process had opened
            self._made = self._made or [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # CLOEXEC: DDP children lack it
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = read_holder(fd) if isinstance(error, BlockingIOError) else None
                os.close(fd)
                if holder is not None:
                    raise RunDirInUse(self.run_dir, holder) from None
                if error.errno not in NO_LOCKS:
                    raise
                info(f"mrdiff: warning: file locks do not work in {self.run_dir} ({os.strerror(error.errno)}): "
                     "going on without the one-writer check, and without removing stale temporary files", stderr=True)
                return False
            locked, current = os.fstat(fd), self.path.stat() if self.path.exists() else None
            if current is not None and (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                break
            os.close(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time()))
        os.ftruncate(fd, 0)  # a killed holder's line may be longer
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode() + b"\n")
        self._fd = fd
        return True

    def release(self) -> None:
        """Empty the holder line (remove the file and made folders if the run dir holds nothing else), unlock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if os.listdir(self.run_dir) == [LOCK_NAME]:
            self.path.unlink()  # while locked: a process that opened it sees it is no longer the lock file
            with contextlib.suppress(OSError):  # stops at the first folder that is not empty
                for folder in self._made:
                    folder.rmdir()
        os.close(self._fd)
        self._fd = None


def read_holder(fd: int, tries: int = 20) -> dict:
    """The holder's pid, host and start time; it writes them just after locking, so an empty file is retried."""
    for _ in range(tries):
        with contextlib.suppress(ValueError):
            holder = json.loads(os.pread(fd, 4096, 0) or b"null")
            if isinstance(holder, dict):
                return holder
        time.sleep(0.05)
    return {}


def remove_stale_temps(run_dir: str | os.PathLike) -> int:
    """Delete atomic_write's leftovers (see ATOMIC_TEMP) anywhere under the run dir; how many. Only safe locked."""
    removed = 0
    for folder, _, names in os.walk(run_dir):
        for name in names:
            path = Path(folder, name)
            if ATOMIC_TEMP.fullmatch(name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def holding(run_dir: str | os.PathLike | None, *, global_zero: bool = True) -> Iterator[None]:
    """Hold `run_dir`'s lock while the body writes into it, after removing the stale temporary files there.

    Only global rank 0 locks: under DDP the other ranks write nothing of their own into the run dir, and each
    would otherwise be refused by rank 0's lock. `run_dir` None (a command that only reads) takes no lock.
    """
    if run_dir is None or not global_zero:
        yield
        return
    lock = RunLock(run_dir)
    try:
        if lock.acquire():
            removed = remove_stale_temps(lock.run_dir)
            if removed:
                info(f"mrdiff: removed {removed} stale temporary file(s) that a killed process left in {lock.run_dir}")
        yield
    finally:
        lock.release()
