"""Atomic file writes: every file lycolab produces is either the old one or the complete new one, never half.

Three promises hold for every file and folder written through here:

- a crash, kill or failed write leaves the previous version intact and no temporary file behind (a later write of
  the same name clears what a kill left);
- a failure the user can fix (disk full, read-only folder, no permission) is a :class:`WriteError` whose message
  is one line naming the file and the fix;
- new files get the mode the user's umask gives (``0666 & ~umask``, folders ``0777 & ~umask``), as ``open()``
  would. safetensors ≥ 0.7 creates its files with 0600 through its own temporary file, and a rename keeps that
  mode, so without this another user's A1111/ComfyUI on a shared server could not read what we wrote.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

# What went wrong and what the user can do, by errno; anything else shows the system's own words.
_REASONS = {
    errno.ENOSPC: ("the disk is full (no space left on the device)", "free space on that disk or choose a folder "
                   "on another one"),
    getattr(errno, "EDQUOT", -1): ("the disk quota is used up", "free space in your quota or choose another folder"),
    errno.EFBIG: ("the file is larger than this file system allows", "choose a folder on another disk"),
    errno.EROFS: ("the file system is read-only", "choose a folder you can write to"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.ENAMETOOLONG: ("the name is too long for this file system", "choose a shorter name"),
    errno.EIO: ("input/output error (a failing disk, or a network drive such as Google Drive that dropped)",
                "check the drive and run again"),
}
_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)")  # how safetensors' Rust code reports an I/O error


class WriteError(OSError, ValueError):
    """A file or folder could not be written; the message is one line naming it and the fix.

    An OSError, so code that already copes with failed writes (the latent cache keeps latents in memory) still
    does; also a ValueError, so the command line prints it as one line like every other fixable mistake (the same
    double parentage as :class:`io.UnsupportedOperation`). ``errno`` is the underlying error's.
    """

    def __init__(self, message: str, code: int | None = None, path: Path | None = None):
        super().__init__(message)
        self.errno = code
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])


def error_code(error: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's own, or the ``(os error N)`` safetensors puts in its text."""
    if isinstance(error, OSError):
        return error.errno
    if type(error).__name__ == "SafetensorError":
        match = _OS_ERROR_IN_MESSAGE.search(str(error))
        return int(match.group(1)) if match else None
    return None


def as_write_error(error: BaseException, path: str | Path, previous_kept: bool = False) -> WriteError | None:
    """``error`` as a one-line :class:`WriteError` about ``path``; None when it is not an operating-system failure
    (a bug or a bad tensor, which must keep its traceback)."""
    if isinstance(error, WriteError):
        return error
    code = error_code(error)
    if code is None:
        return None
    reason, fix = _REASONS.get(code, (os.strerror(code).lower(), "check the folder and run again"))
    kept = " (the previous version is unchanged)" if previous_kept else ""
    return WriteError(f"{path}: could not be written, {reason}; {fix}{kept}", code, Path(path))


def current_umask(directory: str | Path | None = None) -> int:
    """The process's umask, read without changing it.

    ``os.umask`` can only be read by setting it, and another thread creating a file in between would get the wrong
    mode. Linux (≥ 4.7) shows it in /proc/self/status; elsewhere a probe file created in ``directory`` (where we
    are about to write, so it is writable) shows what the umask removes.
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return _probe_umask(Path(directory) if directory is not None else Path.cwd())


def _probe_umask(directory: Path) -> int:
    probe = directory / f".lycolab-umask-{os.getpid()}-{threading.get_ident()}"
    try:
        descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o777)
    except OSError:
        return 0o022  # the usual default; only reached where nothing can be created anyway
    try:
        return 0o777 & ~stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def file_mode(directory: str | Path | None = None) -> int:
    """The mode ``open()`` gives a new file here: ``0666 & ~umask``."""
    return 0o666 & ~current_umask(directory)


def folder_mode(directory: str | Path | None = None) -> int:
    """The mode ``mkdir`` gives a new folder here: ``0777 & ~umask``."""
    return 0o777 & ~current_umask(directory)


def temporary_path(path: str | Path) -> Path:
    """Where :func:`atomic_write` builds ``path``: hidden, beside it, with a suffix no image or model reader takes."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def writing_folder(path: str | Path) -> Path:
    """The hidden folder :func:`save_safetensors` works in (safetensors puts its own temporary file there)."""
    path = Path(path)
    return path.with_name(f".{path.name}.writing")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, give it the umask's mode, fsync it, rename it over
    ``path``.

    A crash or error at any point leaves the previous file intact (and no temporary file behind), which is what
    lets a notebook be re-run or a training run be killed without losing the last good save. Operating-system
    failures (disk full, …) come out as one-line :class:`WriteError`; anything else is re-raised unchanged.
    """
    path = Path(path)
    temporary = temporary_path(path)
    with _writing(path, temporary):
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        _commit_file(temporary, path)
    return path


@contextlib.contextmanager
def _writing(path: Path, scratch: Path) -> Iterator[None]:
    """Around one write of ``path`` built in ``scratch`` (a file or folder): clears what a killed run left there,
    removes it again on failure, and turns operating-system failures into a one-line :class:`WriteError`."""
    existed = False
    try:
        existed = path.exists()
        _remove(scratch)
        yield
    except BaseException as error:
        with contextlib.suppress(OSError):
            _remove(scratch)
        failure = as_write_error(error, path, existed)
        if failure is None:
            raise
        raise failure from None


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` made atomic, umask-moded and one-line on failure.

    safetensors writes through its own randomly named temporary file beside the target, which a killed process
    leaves behind; here that happens inside a hidden ``.NAME.writing`` folder that the next write of the same name
    (or the latent cache's start-up) removes, so nothing stray ever lands among the user's files.
    """
    from safetensors.torch import save_file

    path = Path(path)
    folder = writing_folder(path)
    with _writing(path, folder):
        path.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
        save_file(tensors, str(folder / "data"), metadata)
        _commit_file(folder / "data", path)
    with contextlib.suppress(OSError):
        _remove(folder)
    return path


def atomic_directory(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary folder beside ``path``, set umask modes and fsync everything in it, then
    rename it to ``path``.

    A reader (a resumed run) therefore finds either no folder, the previous one, or the complete new one; a run
    killed mid-write leaves only a hidden ``.NAME.partial`` folder that the next write replaces. Operating-system
    failures come out as one-line :class:`WriteError`, as in :func:`atomic_write`.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    with _writing(path, temporary):
        temporary.mkdir(parents=True)
        write(temporary)
        _finish_tree(temporary)
        _swap_in(temporary, path)
    return path


def _commit_file(temporary: Path, path: Path) -> None:
    """Mode, durability, then the rename that makes the new file visible at once."""
    _finish_file(temporary, file_mode(path.parent))
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _finish_file(file: Path, mode: int) -> None:
    os.chmod(file, mode)
    with file.open("rb") as handle:
        os.fsync(handle.fileno())


def _finish_tree(root: Path) -> None:
    """Every folder and file under ``root`` gets the umask's mode and reaches the disk before the rename."""
    files, folders = file_mode(root), folder_mode(root)
    for folder, _, names in os.walk(root):
        os.chmod(folder, folders)
        for name in names:
            file = Path(folder) / name
            if not file.is_symlink():
                _finish_file(file, files)


def _swap_in(temporary: Path, path: Path) -> None:
    if path.exists():
        retired = path.with_name(f".{path.name}.old")
        _remove(retired)
        os.rename(path, retired)
        os.rename(temporary, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(temporary, path)
    _fsync_directory(path.parent)


def _remove(path: Path) -> None:
    """Delete a file or a whole folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); Windows cannot open folders and renames there are already durable enough."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some network file systems refuse fsync on a folder; the data itself was synced
    finally:
        os.close(descriptor)
