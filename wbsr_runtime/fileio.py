"""Atomic file writes and signal handling, shared by every package: nothing is ever left half-written under a
final name, and an existing file is only replaced when the caller says so.

Temporary names start with "." and end with ".tmp" (files) or hold ".tmp-" (bundle folders). Ctrl-C, SIGTERM
and SIGHUP remove them (`interrupts_as_exceptions`); a SIGKILL, a power cut or the kernel's OOM killer cannot be
caught and may leave one behind, which no later run treats as an output (it is safe to delete).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)
# Filesystems without hard links (FAT, some network mounts) say so with one of these.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so every temporary file is cleaned up on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + (interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) in the main thread, so the
    `except BaseException` cleanups of atomic writes run as they do for Ctrl-C. Outside the main thread (where
    Python cannot install handlers) signals are left alone."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {}
    try:
        for s in wanted:
            previous[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool) -> None:
    """Give the finished file `tmp` the name `path` (same folder) in one atomic step and remove `tmp`.

    `overwrite`: replace an existing `path` (`os.replace`). Otherwise the name is taken with a hard link, which
    fails when the name exists, so two processes writing one output cannot replace each other's file (a check
    before the rename could not promise that). FileExistsError then names `path`. On a filesystem without hard
    links the name is reserved with O_EXCL and the file renamed onto it (atomic against other writers, though
    an empty file is visible under `path` for that instant)."""
    tmp, path = os.fspath(tmp), os.fspath(path)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists (use --force to overwrite)", path) from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "exists (use --force to overwrite)", path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_file(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    parents: bool = False,
    overwrite: bool = True,
    **open_kwargs: Any,
) -> Iterator[IO]:
    """Yield a file opened on a temporary name beside `path`; it is renamed onto `path` only when the block
    completes (`publish`: with `overwrite=False` an existing `path` raises FileExistsError and is kept), and
    removed on any error or interrupt. The file gets the usual permissions (0666 & ~umask). `parents` creates
    missing parent folders; otherwise a missing folder is an error (FileNotFoundError)."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only
        publish(tmp, path, overwrite)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, parents=True) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> None:
    """Write `obj` as indented JSON, atomically (`atomic_file`); numpy arrays and scalars become lists and
    numbers, anything else JSON has no type for its `str`."""

    def default(o: Any) -> Any:
        return o.tolist() if hasattr(o, "tolist") else str(o)

    with atomic_file(path, "w", overwrite=overwrite, encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, default=default) + "\n")


def one_line(message: object, limit: int | None = None) -> str:
    """`message` (a text or an exception) as one line, for a user: whitespace folded, cut to `limit`
    characters; an exception without a message gives its type's name."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
