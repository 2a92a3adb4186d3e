"""What one `wbsr-run` call writes, decided and checked before any work.

Each input file gets one output (and an image, with --routing-map, one routing map); --stats is one more file.
`plan_run` refuses the whole run with one line (`UsageError`) when two of these would be the same file (with or
without --force: one would silently replace the other), when an output's extension cannot hold what it would
receive, or when a folder an output goes to is missing, is not a folder or cannot be written. An input that
cannot be used at all (a folder with no image or video in it) is reported as a failed input; the others go on.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .media import IMAGE_EXTS, VIDEO_EXTS


class UsageError(ValueError):
    """The command line asks for something that cannot be done; the whole run is refused, in one line."""


@dataclass(frozen=True)
class Job:
    """One input and the files it produces."""

    src: Path
    dst: Path
    routing_map: Path | None = None

    @property
    def video(self) -> bool:
        return self.src.suffix.lower() in VIDEO_EXTS


@dataclass
class Plan:
    """jobs: in input order. failed: one-line errors of inputs that failed before any work. folder: the OUT
    folder to create before the first job, or None (OUT is a file). inputs: every input file, resolved."""

    jobs: list[Job] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    folder: Path | None = None
    inputs: set[Path] = field(default_factory=set)


def real_path(p: Path) -> Path:
    """`p` with every symlink resolved; a symlink loop is left as its absolute spelling (and reported when the
    file is used) instead of raising."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, on Python < 3.13
        return Path(os.path.abspath(p))


def out_name(src: Path) -> str:
    """The output file name of `src` in a folder OUT: the same name, or `<stem>.png` for other extensions."""
    ext = src.suffix.lower()
    return src.name if ext in IMAGE_EXTS or ext in VIDEO_EXTS else src.stem + ".png"


def _expand(inputs: list[Path], plan: Plan) -> list[Path]:
    """Input files in order: folders listed (sorted, non-recursive, media extensions only); a folder with
    none is a failed input. A missing or looping file is kept: it is reported when its turn comes."""
    files: list[Path] = []
    exts = IMAGE_EXTS | VIDEO_EXTS.keys()
    for p in inputs:
        if not p.is_dir():
            files.append(p)
            continue
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in exts and f.is_file())
        if not found:
            plan.failed.append(f"{p}: folder holds no image or video file ({', '.join(sorted(exts))})")
        files += found
    return files


def plan_run(inputs: list[Path], output: Path, routing_map: Path | None, stats: Path | None) -> Plan:
    """Decide every output of the run and check them (see the module docstring); raises UsageError."""
    plan = Plan()
    files = _expand(inputs, plan)
    plan.inputs = {real_path(p) for p in files}
    to_folder = len(inputs) > 1 or any(p.is_dir() for p in inputs) or output.is_dir()
    if to_folder:
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output}: exists and is not a folder (several inputs need a folder OUT)")
        plan.folder = output
    for src in files:
        dst = output / out_name(src) if to_folder else output
        job = Job(src, dst)
        if routing_map is not None and not job.video:
            rmap = output / f"{Path(out_name(src)).stem}.routing.png" if to_folder else routing_map
            job = Job(src, dst, rmap)
        plan.jobs.append(job)
    if not to_folder and plan.jobs:
        _check_extension(plan.jobs[0])
    _check_collisions(plan.jobs, stats)
    folders = {j.dst.parent for j in plan.jobs} | {j.routing_map.parent for j in plan.jobs if j.routing_map}
    for folder in sorted(folders | ({stats.parent} if stats is not None else set())):
        check_folder(folder, create=folder == plan.folder)
    return plan


def _check_extension(job: Job) -> None:
    """A single output file must have an extension its writer takes (an image's or a video's)."""
    exts = tuple(VIDEO_EXTS) if job.video else tuple(sorted(IMAGE_EXTS))
    what = "a video" if job.video else "an image"
    if job.dst.suffix.lower() not in exts:
        found = f"extension {job.dst.suffix!r}" if job.dst.suffix else "no extension"
        raise UsageError(
            f"{job.dst}: {found}, but the output of {what} needs one of {' '.join(exts)} "
            "(or give an existing folder as OUT)"
        )
    if job.routing_map is not None and job.routing_map.suffix.lower() not in IMAGE_EXTS:
        raise UsageError(f"{job.routing_map}: a routing map is an image: use one of {' '.join(sorted(IMAGE_EXTS))}")


def _check_collisions(jobs: list[Job], stats: Path | None) -> None:
    """Refuse two outputs of this run that resolve to one file (they would replace each other)."""
    seen: dict[Path, str] = {}
    outputs = [(j.dst, f"the output of {j.src}") for j in jobs]
    outputs += [(j.routing_map, f"the routing map of {j.src}") for j in jobs if j.routing_map is not None]
    outputs += [(stats, "--stats")] if stats is not None else []
    for path, what in outputs:
        key = real_path(path)
        if key in seen:
            raise UsageError(
                f"{path}: {seen[key]} and {what} would be the same file; give them different names or folders"
            )
        seen[key] = what


def check_folder(folder: Path, create: bool = False) -> None:
    """Refuse (UsageError) a folder outputs cannot be written to: missing (unless `create`: then its nearest
    existing parent must take a new folder), not a folder, or not writable. Tried by creating and removing a
    temporary file, which is what the atomic writers will do (permission bits alone do not tell: read-only
    mounts, root, ACLs)."""
    target = folder
    if create:
        while not target.exists() and target != target.parent:
            target = target.parent
    if not target.exists():
        raise UsageError(f"{folder}: no such folder (create it first)")
    if not target.is_dir():
        raise UsageError(f"{target}: not a folder, so {folder} cannot be written")
    try:
        fd, probe = tempfile.mkstemp(prefix=".wbsr-run-probe.", suffix=".tmp", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{target}: cannot write there ({e.strerror or type(e).__name__})") from None
