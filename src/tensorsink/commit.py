"""Getting a file under its final name all at once, or not at all.

The protocol: write into a temporary sibling (same directory, so the rename stays on one filesystem),
fsync it (Durability.FILE and FULL), os.replace it onto the final name, then fsync the directory
(Durability.FULL). On any failure the temporary is removed and the final name is left as it was.
Temporaries are named `.<name>.tsink-<token>.partial`: hidden, so no reader takes one for a result, and
`sweep` can remove exactly them. A save function writes into a private folder of that name, under the
final file's own name (`.scan.nii.gz.tsink-<token>.partial/scan.nii.gz`): libraries that pick the
format from the path, or add an extension to it (np.save), write what they would have written; the
file is then moved out beside it (`....partial.file`) and the folder removed with whatever else it got.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import SaveFunctionError, SymlinkError
from .options import Durability

__all__ = [
    "Committer",
    "DirectorySync",
    "KeyOrder",
    "find_symlink",
    "is_temporary",
    "remove_private_folder",
    "sweep",
    "take_saved",
]

_TEMP_PATTERN = re.compile(r"\..+\.tsink-[0-9a-f]+\.partial(?:\.file)?", re.DOTALL)
# Bytes of the final name kept in its temporary's name: with the rest (at most 47 bytes) it fits NAME_MAX.
_NAME_KEPT = 200
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of tensorsink's temporaries."""
    return _TEMP_PATTERN.fullmatch(name) is not None  # fullmatch: "$" would allow a trailing newline


def sweep(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed writers left under `root`; return what was removed.

    Final files are never touched. Run it when no writer is writing under `root`: a live writer's
    temporaries are indistinguishable from a dead one's.
    """
    removed: list[Path] = []
    for directory, folders, files in os.walk(root):
        for name in [folder for folder in folders if is_temporary(folder)]:  # a save function's own
            folders.remove(name)
            shutil.rmtree(Path(directory, name), ignore_errors=True)
            removed.append(Path(directory, name))
        for name in files:
            if is_temporary(name):
                path = Path(directory, name)
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path)
    return sorted(removed)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirectoryState:
    __slots__ = ("requested", "running", "synced", "users")

    def __init__(self) -> None:
        self.requested = 0  # renames that asked for a sync
        self.synced = 0  # renames covered by a finished sync
        self.running = False
        self.users = 0


class DirectorySync:
    """Directory fsyncs shared between committers: one fsync covers every rename made before it began.

    A committer asks after its rename; if a sync of that directory that began later has finished, it is
    covered, otherwise it waits for the running one and then starts the next (group commit).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[str, _DirectoryState] = {}

    def sync(self, directory: str) -> None:
        with self._cond:
            state = self._states.setdefault(directory, _DirectoryState())
            state.users += 1
            state.requested += 1
            ticket = state.requested
            while state.running and state.synced < ticket:
                self._cond.wait()
            leader = state.synced < ticket
            if leader:
                state.running = True
                target = state.requested
        synced = False
        try:
            if leader:
                fsync_directory(directory)
                synced = True
        finally:
            with self._cond:
                if leader:
                    state.running = False
                    if synced:
                        state.synced = target
                    self._cond.notify_all()
                state.users -= 1
                if state.users == 0:
                    del self._states[directory]


class KeyOrder:
    """Makes the latest write() to a path win, whichever worker finishes first.

    `reserve` is called in write() order and numbers the write; `should_replace` lets a rename through
    only if no later write to that path has been renamed already. Paths are forgotten once idle.
    """

    _STRIPES = 64

    def __init__(self) -> None:
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]
        self._counter = itertools.count()
        # path -> [writes in flight, number of the latest committed write]
        self._paths: dict[str, list[int]] = {}

    def lock(self, path: str) -> threading.Lock:
        return self._locks[hash(path) % self._STRIPES]

    def reserve(self, path: str) -> int:
        with self.lock(path):
            state = self._paths.setdefault(path, [0, -1])
            state[0] += 1
            return next(self._counter)

    def should_replace(self, path: str, number: int) -> bool:
        """Call holding lock(path); records the rename when it answers True."""
        state = self._paths[path]
        if state[1] > number:
            return False
        state[1] = number
        return True

    def release(self, path: str) -> None:
        with self.lock(path):
            state = self._paths[path]
            state[0] -= 1
            if state[0] == 0:
                del self._paths[path]


class Committer:
    """Runs the commit protocol for one writer under `root`, at its durability. Paths are plain strings.

    Folders under `root` are made by this committer and must be real folders: a symlink among them is
    refused (SymlinkError) unless `follow_symlinks`, so no key can lead a write out of the root.
    """

    def __init__(self, durability: Durability, root: str, *, follow_symlinks: bool = False) -> None:
        self.durability = durability
        self.root = root
        self.follow_symlinks = follow_symlinks
        self.order = KeyOrder()
        self._directory_sync = DirectorySync()
        self._token = secrets.token_hex(4)
        self._counter = itertools.count()
        make_root(root, durability)
        self._known_directories: set[str] = {root}

    def temporary_for(self, directory: str, name: str) -> str:
        """A new temporary's path for the file `name` in `directory`."""
        if len(name) > _NAME_KEPT // 4:  # may be over _NAME_KEPT bytes: cut at a character boundary
            name = name.encode("utf-8", "surrogateescape")[:_NAME_KEPT].decode("utf-8", "ignore")
        return f"{directory}/.{name}.tsink-{self._token}{next(self._counter):x}.partial"

    def create(self, final: str, *, private: bool = False) -> tuple[int, str]:
        """A new temporary for `final`, open for writing: its descriptor and path. With `private`, the
        file is `final`'s own name in a new folder of its own (for a save function: see take_saved)."""
        directory, _, name = final.rpartition("/")
        temporary = self.temporary_for(directory, name)
        if not private:
            return self.open_temporary(directory, temporary), temporary
        self.make_folder(directory, temporary)
        try:
            return os.open(f"{temporary}/{name}", _CREATE_FLAGS, 0o666), f"{temporary}/{name}"
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def make_folder(self, directory: str, folder: str) -> None:
        """Make `folder` (new) in `directory`, making the folders it needs."""
        if directory not in self._known_directories:
            self.make_directories(directory)
        try:
            os.mkdir(folder)
        except FileNotFoundError:  # removed since we made it
            self._known_directories.discard(directory)
            self.make_directories(directory)
            os.mkdir(folder)

    def finish(
        self,
        final: str,
        number: int,
        temporary: str,
        fd: int,
        write: Callable[[int, str], None] | None,
        journaled: Callable[[bool, float], None] | None = None,
    ) -> float | None:
        """Commit a temporary open at `fd` (from create()) as `final`: write it (unless `write` is
        None), fsync, close, rename in order, fsync the folder; on failure the temporary is removed. Under the
        path's lock, `journaled(True, now)` runs just before the rename, `journaled(False, renamed_at)`
        just after (its failure is raised; the file stays renamed)."""
        directory = final.rpartition("/")[0]
        renamed_at = None
        try:
            try:
                if write is not None:
                    write(fd, temporary)
                if self.durability is not Durability.NONE:
                    os.fsync(fd)
            finally:
                os.close(fd)
            with self.order.lock(final):
                latest = self.order.should_replace(final, number)
                if latest:
                    if journaled is not None:
                        journaled(True, time.time())
                    os.replace(temporary, final)
                    renamed_at = time.time()
                    if journaled is not None:
                        journaled(False, renamed_at)
            if not latest:
                os.unlink(temporary)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            named = _naming(exc, final)
            if named is exc:
                raise
            raise named from exc
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        if latest and self.durability is Durability.FULL:
            self._directory_sync.sync(directory)
        return renamed_at

    def open_temporary(self, directory: str, temporary: str) -> int:
        """Create `temporary` (exclusively) in `directory`, making the folders it needs."""
        if directory not in self._known_directories:
            self.make_directories(directory)
        try:
            return os.open(temporary, _CREATE_FLAGS, 0o666)
        except FileNotFoundError:  # removed since we made it
            self._known_directories.discard(directory)
            self.make_directories(directory)
            return os.open(temporary, _CREATE_FLAGS, 0o666)

    def make_directories(self, directory: str) -> None:
        """mkdir -p from the root down, refusing symlinks (unless follow_symlinks) and anything else
        that is not a folder; at Durability.FULL each new folder's entry is fsynced in its parent."""
        path = self.root
        for part in os.path.relpath(directory, self.root).split("/"):
            if part == ".":
                continue
            path = f"{path}/{part}"
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                self._mkdir(path)
                continue
            if stat.S_ISLNK(mode):
                if not self.follow_symlinks:
                    raise SymlinkError(path, os.path.realpath(path), self.root)
                mode = os.stat(path).st_mode
            if not stat.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, "a file stands where a folder is needed", path)
        self._known_directories.add(directory)

    def _mkdir(self, path: str) -> None:
        _mkdir(path, self.durability)


def _mkdir(path: str, durability: Durability) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:  # made meanwhile by another thread or writer: fine if it is a folder
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise
    if durability is Durability.FULL:
        fsync_directory(os.path.dirname(path))


def make_root(root: str, durability: Durability) -> None:
    """The root and its missing parents (the root may itself be, or lie under, a symlink)."""
    missing: list[str] = []
    probe = root
    while not os.path.isdir(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for path in reversed(missing):
        _mkdir(path, durability)


def take_saved(fd: int, path: str, *, allow_empty: bool = False) -> tuple[int, str]:
    """What a save function left at `path`, in its private folder (Committer.create(private=True)),
    moved out beside the folder as an ordinary temporary: its descriptor and path. The folder goes,
    with whatever else the function wrote there (a sidecar, np.save's `.npy` added to another suffix).

    A function that replaced the file (a library that writes atomically itself) is taken at its word:
    the descriptor returned is the new file's, so its size, CRC and fsync are the new file's. One that
    left the file empty most likely wrote beside it: SaveFunctionError, naming what it wrote; so is a
    file replaced by something that is not a regular file, or removed. `allow_empty` lets an empty
    file through. On failure `fd` is still the caller's to close.
    """
    folder = path.rpartition("/")[0]
    try:
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            found = None
        if found is None or not stat.S_ISREG(found.st_mode):
            what = "removed it" if found is None else "put something that is not a regular file there"
            raise SaveFunctionError(f"the save function {what}", _beside(path))
        if found.st_size == 0 and not allow_empty:
            raise SaveFunctionError("the save function left it empty", _beside(path))
        given = os.fstat(fd)
        if (found.st_dev, found.st_ino) != (given.st_dev, given.st_ino):
            replaced = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            os.close(fd)
            fd = replaced
        temporary = f"{folder}.file"  # a temporary's name too: sweep knows it
        os.rename(path, temporary)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return fd, temporary


def _beside(path: str) -> list[str]:
    """What a save function wrote in its folder besides `path` (the folder is removed after)."""
    folder, _, name = path.rpartition("/")
    with contextlib.suppress(OSError):
        return sorted(other for other in os.listdir(folder) if other != name)
    return []


def remove_private_folder(path: str) -> None:
    """Remove the private folder a save function was given `path` in, if it was (a failed write)."""
    folder = path.rpartition("/")[0]
    if is_temporary(folder.rpartition("/")[2]):
        shutil.rmtree(folder, ignore_errors=True)


def _naming(exc: OSError, final: str) -> OSError:
    """The same error naming `final`, the file the caller asked for, rather than its temporary (or no
    file at all, as a failed writev or fsync says)."""
    if exc.filename == final or type(exc).__module__ != "builtins" or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, final)


def find_symlink(root: str, directory: str) -> str | None:
    """The first symlink on the way from `root` down to `directory`, or None (missing parts are fine)."""
    path = root
    for part in os.path.relpath(directory, root).split("/"):
        if part == ".":
            continue
        path = f"{path}/{part}"
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return path
        except FileNotFoundError:
            return None
    return None
