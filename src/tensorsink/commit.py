"""Getting a file under its final name all at once, or not at all.

The protocol: write into a temporary sibling (same directory, so the rename stays on one filesystem),
fsync it (Durability.FILE and FULL), os.replace it onto the final name, then fsync the directory
(Durability.FULL). On any failure the temporary is removed and the final name is left as it was.
Temporaries are named `.<name>.tsink-<token>.partial`: hidden, and never ending in a format's suffix,
so no reader takes one for a result and `sweep` can remove exactly them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from .options import Durability

__all__ = ["Committer", "DirectorySync", "KeyOrder", "is_temporary", "sweep"]

_TEMP_PATTERN = re.compile(r"^\..+\.tsink-[0-9a-f]+\.partial$", re.DOTALL)
_NAME_KEPT = 100  # of the final name, in its temporary's name, so a long final name still fits NAME_MAX
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of tensorsink's temporaries."""
    return _TEMP_PATTERN.match(name) is not None


def sweep(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed writers left under `root`; return what was removed.

    Final files are never touched. Run it when no writer is writing under `root`: a live writer's
    temporaries are indistinguishable from a dead one's.
    """
    removed: list[Path] = []
    for directory, _, files in os.walk(root):
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
    """Runs the commit protocol for one writer, at its durability. Paths are plain strings here."""

    def __init__(self, durability: Durability) -> None:
        self.durability = durability
        self.order = KeyOrder()
        self._directory_sync = DirectorySync()
        self._token = secrets.token_hex(4)
        self._counter = itertools.count()
        self._known_directories: set[str] = set()

    def temporary_for(self, directory: str, name: str) -> str:
        return f"{directory}/.{name[:_NAME_KEPT]}.tsink-{self._token}{next(self._counter):x}.partial"

    def commit(self, final: str, number: int, write: Callable[[int, str], None]) -> bool:
        """Write `final` through a temporary, by `write(fd, temporary_path)`; False if a later write to
        it had already been committed."""
        directory, _, name = final.rpartition("/")
        temporary = self.temporary_for(directory, name)
        fd = self._create(directory, temporary)
        try:
            try:
                write(fd, temporary)
                if self.durability is not Durability.NONE:
                    os.fsync(fd)
            finally:
                os.close(fd)
            with self.order.lock(final):
                replaced = self.order.should_replace(final, number)
                if replaced:
                    os.replace(temporary, final)
            if not replaced:
                os.unlink(temporary)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        if replaced and self.durability is Durability.FULL:
            self._directory_sync.sync(directory)
        return replaced

    def _create(self, directory: str, temporary: str) -> int:
        if directory not in self._known_directories:
            self.make_directories(directory)
        try:
            return os.open(temporary, _CREATE_FLAGS, 0o666)
        except FileNotFoundError:  # removed since we made it
            self.make_directories(directory)
            return os.open(temporary, _CREATE_FLAGS, 0o666)

    def make_directories(self, directory: str) -> None:
        """mkdir -p; at Durability.FULL each new directory's entry is fsynced in its parent too."""
        missing: list[str] = []
        probe = directory
        while not os.path.isdir(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise
            if self.durability is Durability.FULL:
                fsync_directory(os.path.dirname(path))
        self._known_directories.add(directory)
