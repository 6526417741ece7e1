"""Atomic writes: a file or a folder is written under a temporary name beside its destination, then renamed into
place, so that no reader ever sees a half-written checkpoint and a failure leaves what was there before. Both get
the permissions of an ordinary file or folder (the umask's), not the private ones of mkstemp / mkdtemp."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary file next to `path`, then rename it over `path` (never a half-written file)."""
    folder, base = os.path.split(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_folder(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary folder next to `path`, then put it in the place of `path`: a folder already there is
    replaced only once the new one is complete, and is left as it was if anything fails."""
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
    try:
        write(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.replace(path, old)  # (an empty directory is replaced by rename)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
