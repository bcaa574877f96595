"""Atomic file writes: the one way this package creates or replaces a file.

`write_atomically(path, write)` lets `write` fill a temporary file in the destination's folder,
gives it the mode a plain `open(path, "w")` would (0o666 less the umask), fsyncs it, moves it over
`path` with os.replace and fsyncs the folder. A crash or an exception at any point leaves the old
file or the complete new one, never half a file, and no temporary file after an exception.

Temporary names start with ".tmp-" (checkpoint discovery and dataset listings skip hidden files) and
end with the caller's suffix (MindSpore only writes names ending in ".ckpt"). Appending a line to
an existing file (log.jsonl) is not a rewrite and does not come here.
"""
from __future__ import annotations

import os
import secrets
from typing import Callable, Tuple, Union

__all__ = ["write_atomically", "write_text_atomically"]

PathLike = Union[str, "os.PathLike[str]"]
_TEMP_PREFIX = ".tmp-"
_NEW_FILE_MODE = 0o666  # the kernel takes the umask off, as for open(path, "w")


def _create_temp(folder: str, base: str, suffix: str) -> Tuple[int, str]:
    """(fd, path) of a new empty file `.tmp-<base>.<random><suffix>` in `folder` (O_EXCL)."""
    for _ in range(100):
        tmp = os.path.join(folder, f"{_TEMP_PREFIX}{base}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _NEW_FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {base} in {folder}")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # POSIX fsync needs no write access
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    """Make the rename durable; folders that cannot be opened or synced (some platforms) are skipped."""
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


def write_atomically(path: PathLike, write: Callable[[str], None], suffix: str = "") -> str:
    """Create or replace `path` with what `write(tmp_path)` writes to a temporary file beside it.

    write: fills the file at the path it is given (it may also reload it to verify: anything it
    raises aborts the replacement). suffix: the temporary name's ending. The folder is created
    when absent. A writer that leaves the file read-only (MindSpore does) has its mode reset to the
    usual one for a new file. Returns `path` as a string.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.basename(path), suffix)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
    return path


def write_text_atomically(path: PathLike, text: str) -> str:
    """write_atomically for a UTF-8 text file holding `text`. Returns `path` as a string."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write_atomically(path, write)
