"""skip_existing: what an earlier run's journals say is written, and which keys this writer has written."""

from __future__ import annotations

import os

from .formats import FileEntry
from .future import WriteHandle
from .manifest import Manifest
from .plan import validate_key

__all__ = ["Resume"]


class Resume:
    """The journals under a root, loaded once, and this writer's own writes: each key's latest (its
    handle and files), and the key whose write each path was last given to."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._manifest = Manifest.load(root)
        self._latest: dict[str, tuple[WriteHandle, list[str]]] = {}
        self._owner: dict[str, str] = {}

    def written(self, entries: list[FileEntry]) -> bool:
        """Whether a journal records every one of these files, still whole."""
        return self._manifest.paths_done([os.path.relpath(e.path, self._root) for e in entries])

    def is_done(self, key: str | os.PathLike[str]) -> bool:
        name = validate_key(key)
        owner = self._owner
        latest = self._latest.get(name)
        if latest is not None:  # written here: its latest write done whole, and every file still its own
            handle, paths = latest
            return handle.done() and handle.exception() is None and all(owner[p] == name for p in paths)
        recorded = self._manifest.files_of(name)
        return self._manifest.done(name) and all(owner.get(p, name) == name for p in recorded)

    def remember(self, keys: list[str], paths: list[str], handle: WriteHandle) -> None:
        """The write's files are given to its keys (a later write of a path, under any key, takes it),
        and it is each key's latest write."""
        files: dict[str, list[str]] = {}
        for key, path in zip(keys, paths, strict=True):
            self._owner[path] = key
            files.setdefault(key, []).append(path)
        for key, own in files.items():
            self._latest[key] = (handle, own)
