"""Crash-safe writes: a folder is written under a temporary name beside its destination, synced to disk, then
renamed into place, so that no reader ever sees a half-written checkpoint.

A folder (`write_folder`) goes through these steps, named in `STEPS` (a test hook, `set_step_hook`, sees each):

    .NAME.X.tmp   written, then every file and the folder fsynced           ("written", "synced")
    .NAME.X.new   renamed from .tmp once complete; parent folder fsynced     ("completed")
    .NAME.X.old   the folder already at NAME renamed aside                   ("old_moved_aside")
    NAME          .new renamed into place                                    ("new_moved_in")
                  .old removed                                               ("old_removed")

A process killed between two steps leaves either a complete folder at NAME, or nothing at NAME and a complete
`.NAME.X.new` or `.NAME.X.old` beside it. `recover_folder` (run by every load and every save of a checkpoint) then
finishes the interrupted save (moves `.new` into place, the newest complete checkpoint) or, failing that, puts `.old`
back, and removes the leftovers; it returns a line saying what it did. One writer per folder at a time.

One permission rule for every file and folder written here: the umask's (0666 / 0777 minus the umask), not the
private 0600 / 0700 of mkstemp / mkdtemp. A symlink at NAME is followed: the folder it points to is replaced and the
link keeps pointing there.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable

STEPS = ("written", "synced", "completed", "old_moved_aside", "new_moved_in", "old_removed")
_step_hook: Callable[[str], None] | None = None


def set_step_hook(hook: Callable[[str], None] | None) -> None:
    """Call hook(step) after each step of `write_folder` (`STEPS`); None removes it. For crash tests."""
    global _step_hook
    _step_hook = hook


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_dir(path: str) -> None:
    """Make a rename or a new entry in folder `path` durable (not possible, and not needed, on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(folder: str) -> None:
    """Give every file and sub-folder of `folder` the umask's permissions and fsync them, then the folder itself."""
    umask = _umask()
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            file = os.path.join(root, name)
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        _fsync_dir(root)
    os.chmod(folder, 0o777 & ~umask)


def _leftovers(path: str) -> dict[str, list[str]]:
    """The `.NAME.X.{tmp,new,old}` folders of interrupted writes of `path`, by kind, oldest first."""
    parent, base = os.path.split(path)
    pattern = re.compile(rf"^\.{re.escape(base)}\.[A-Za-z0-9_]+\.(tmp|new|old)$")
    found: dict[str, list[str]] = {"tmp": [], "new": [], "old": []}
    try:
        names = os.listdir(parent)
    except OSError:  # no such folder, or not readable: nothing this process could recover there
        names = []
    for name in names:
        if (m := pattern.match(name)) and os.path.isdir(os.path.join(parent, name)):
            found[m[1]].append(os.path.join(parent, name))
    for kind in found:
        found[kind].sort(key=os.path.getmtime)
    return found


def recover_folder(path: str | os.PathLike) -> str | None:
    """Finish or undo a `write_folder(path)` that was interrupted, and remove its leftovers.

    A complete new folder (`.NAME.X.new`) is moved into place (the old one, if any, is removed); else, if nothing is
    at `path`, the previous folder (`.NAME.X.old`) is put back. Returns a line saying what was done, or None when
    there was nothing to do (leftovers only removed also give None)."""
    path = os.path.realpath(os.fspath(path))
    parent = os.path.dirname(path)
    found = _leftovers(path)
    if not any(found.values()):
        return None
    message = None
    if found["new"]:
        newest = found["new"].pop()
        if os.path.lexists(path):
            os.replace(path, newest[: -len(".new")] + ".old")
            found["old"].append(newest[: -len(".new")] + ".old")
        os.replace(newest, path)
        message = (f"{path}: a save was interrupted after its new checkpoint was complete; moved that one "
                   f"({os.path.basename(newest)}) into place")
    elif found["old"] and not os.path.lexists(path):
        newest = found["old"].pop()
        os.replace(newest, path)
        message = (f"{path}: a save was interrupted before its new checkpoint was complete; put the previous one "
                   f"({os.path.basename(newest)}) back")
    for leftover in found["tmp"] + found["new"] + found["old"]:
        shutil.rmtree(leftover, ignore_errors=True)
    _fsync_dir(parent)
    return message


def write_folder(path: str | os.PathLike, write: Callable[[str], None]) -> str | None:
    """write(tmp) into a new temporary folder next to `path`, then put it in the place of `path` in the steps of the
    module docstring: at every instant `path` holds the old or the new folder, complete, or `recover_folder` finds
    the newest complete one. If `write` fails, the temporary folder is removed and `path` is left as it was.
    Returns `recover_folder`'s line about an earlier interrupted write, if there was one."""
    path = os.path.realpath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    recovered = recover_folder(path)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    stem = tmp[: -len(".tmp")]
    try:
        write(tmp)
        _step("written")
        _settle(tmp)
        _step("synced")
        os.replace(tmp, stem + ".new")
        _fsync_dir(parent)
        _step("completed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(path):
        os.replace(path, stem + ".old")
        _fsync_dir(parent)
        _step("old_moved_aside")
    os.replace(stem + ".new", path)
    _fsync_dir(parent)
    _step("new_moved_in")
    if os.path.exists(stem + ".old"):
        shutil.rmtree(stem + ".old")
        _fsync_dir(parent)
        _step("old_removed")
    return recovered
