"""Crash-safe file writes: one definition of write-to-a-temporary-name-then-rename, used by every writer in the
package (attention dumps, report pages and figures, the compiled C kernel).

A reader (or a concurrent process) sees either the previous file or the complete new one, never a half-written
file: the data goes to ``PATH.tmp-<pid>`` in the same directory, and ``os.replace`` moves it onto ``PATH``, which is
atomic on POSIX within one file system. On any error the temporary file is removed and ``PATH`` is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_path", "atomic_write", "discard", "replace_dir", "temp_path"]


def temp_path(path: str | os.PathLike) -> str:
    """The temporary name next to ``path`` that a writer fills before the rename (per process, so concurrent
    writers of the same path do not share a temporary file)."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}"


def discard(tmp: str) -> None:
    """Remove a temporary file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name for ``path``; rename it onto ``path`` when the block ends normally, remove it
    when the block raises. For writers that want a name rather than a file object (``savefig``, a compiler)."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, os.fspath(path))
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 fsync: bool = False) -> Iterator[IO]:
    """``open(path, mode)`` that replaces ``path`` only once the block has finished without error. ``mode`` is
    ``"w"`` or ``"wb"``; ``fsync=True`` also forces the data to disk before the rename (for files that must survive
    a power cut, not only a crash of this process)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())


def replace_dir(staging: str, outdir: str) -> None:
    """Put the fully written folder ``staging`` (a sibling of ``outdir``) in place of ``outdir``: renamed onto a
    missing or empty ``outdir``; an existing non-empty one is first renamed aside and removed only once the new one
    is in place, so that ``outdir`` is never a half-written folder (at worst, for an instant, absent)."""
    if os.path.isdir(outdir) and os.listdir(outdir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(outdir)}.old-", dir=os.path.dirname(outdir))
        os.rmdir(old)
        os.rename(outdir, old)
        os.rename(staging, outdir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if os.path.isdir(outdir):
        os.rmdir(outdir)
    os.rename(staging, outdir)
