"""One way to write a file so that readers see the old file or the new one, never a torn one.

:func:`atomic_write` is used by every writer of the project that replaces a file (checkpoints,
FiniteGuard's diagnosis file, the decoded image and text caches, files extracted from fetched
archives):

1. the data go to a hidden temporary file in the target's own folder (same file system, so the
   rename below is atomic), created with ``O_CREAT | O_EXCL`` and mode ``0o666``, which the
   kernel masks with the process umask: the file gets the permissions of any ordinary file,
   with no read-modify-write of the process-global umask (``os.umask`` cannot be read without
   setting it, which races with any other thread that creates files, e.g. Lightning's
   asynchronous checkpoint writer);
2. it is flushed and fsynced;
3. ``os.replace`` renames it over the target (atomic on POSIX and Windows within one file system);
4. the folder is fsynced, so the rename survives a power loss.

An exception (or a KeyboardInterrupt) while writing removes the temporary file and leaves the
target as it was; a process killed in the middle leaves the previous target and one hidden
``<prefix>XXXX.partial`` file, which no reader takes for the target and which can be deleted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["PARTIAL_SUFFIX", "atomic_write", "atomic_write_bytes", "fsync_dir"]

#: Suffix of every temporary file of :func:`atomic_write`.
PARTIAL_SUFFIX = ".partial"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_partial(folder: Path, prefix: str) -> tuple[Path, int]:
    """A new, empty, uniquely named ``<prefix>XXXX.partial`` in ``folder``, opened for writing."""
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{PARTIAL_SUFFIX}"
        try:
            return tmp, os.open(tmp, _FLAGS, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file {prefix}*{PARTIAL_SUFFIX} in {folder}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], prefix: str | None = None) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: ``with atomic_write(path) as f: f.write(...)``.

    Yields a binary file; when the block ends without an exception, the file is fsynced and renamed
    over ``path`` and the folder fsynced (see the module docstring). The folder is created if needed.

    Args:
        path: the file to create or replace.
        prefix: name prefix of the temporary file (default ``.<name>.``, hidden).
    """
    target = Path(path)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_partial(folder, f".{target.name}." if prefix is None else prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` with :func:`atomic_write`; returns the path."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)
