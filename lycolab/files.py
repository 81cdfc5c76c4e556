"""Atomic file writes: every file lycolab produces is either the old one or the complete new one, never half."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash or error at any point leaves the previous file intact (and no temporary file behind), which is what
    lets a notebook be re-run or a training run be killed without losing the last good save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_directory(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary folder beside ``path``, fsync its files, then rename it to ``path``.

    A reader (a resumed run) therefore finds either no folder, the previous one, or the complete new one; a run
    killed mid-write leaves only a hidden ``.NAME.partial`` folder that the next write replaces.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        write(temporary)
        for file in temporary.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        if path.exists():
            retired = path.with_name(f".{path.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.rename(path, retired)
            os.rename(temporary, path)
            shutil.rmtree(retired)
        else:
            os.rename(temporary, path)
        _fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); Windows cannot open folders and renames there are already durable enough."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
