"""Atomic file writes, shared by every package: nothing is ever left half-written under a final name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_file(
    path: str | os.PathLike, mode: str = "wb", *, parents: bool = False, **open_kwargs: Any
) -> Iterator[IO]:
    """Yield a file opened on a temporary name beside `path`; it is renamed onto `path` only when the block
    completes, and removed on any error or interrupt. The file gets the usual permissions (0666 & ~umask).
    `parents` creates missing parent folders; otherwise a missing folder is an error (FileNotFoundError)."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, parents=True) as f:
        f.write(data)
