"""The native engine: the `_native` extension's C threads commit the files; one Python thread, the
reaper, collects finished batches several at a time and hands them to `on_complete`."""

from __future__ import annotations

import logging
import os
import threading
from typing import cast

from ..commit import find_symlink
from ..errors import SymlinkError
from ..manifest import Journal
from ..options import Durability
from ..staging.cudart import own_thread
from ._native import Engine as _Native
from .base import Completion, Engine, FileJob, FileOutcome

__all__ = ["NativeEngine"]

log = logging.getLogger("tensorsink")
_DURABILITY = {Durability.NONE: 0, Durability.FILE: 1, Durability.FULL: 2}
_REAP_SECONDS = 0.5  # how long the reaper sleeps in C between looks at whether it should stop


class NativeEngine(Engine):
    name = "native"

    def __init__(
        self,
        threads: int,
        durability: Durability,
        root: str,
        on_complete: Completion,
        *,
        follow_symlinks: bool = False,
        journal: Journal | None = None,
    ) -> None:
        super().__init__(
            threads, durability, root, on_complete, follow_symlinks=follow_symlinks, journal=journal
        )
        fd = journal.fd if journal is not None else -1
        self._engine = _Native(threads, _DURABILITY[durability], root, follow_symlinks, fd)
        self._reaper = threading.Thread(target=self._reap, name="tensorsink-reaper", daemon=True)
        self._reaper.start()

    def reserve(self, paths: list[str]) -> list[int]:
        numbers: list[int] = self._engine.reserve(paths)
        return numbers

    def release(self, paths: list[str]) -> None:
        self._engine.release(paths)

    def submit(self, token: object, files: list[FileJob]) -> None:
        self._engine.submit((token, files), files)

    def _reap(self) -> None:
        own_thread()  # completions wait for copy events and give pool blocks back
        while (finished := self._engine.reap(_REAP_SECONDS)) is not None:
            if not finished:
                continue
            batches = []
            for submitted, results in finished:
                token, files = cast(tuple[object, list[FileJob]], submitted)
                batches.append((token, [self._outcome(*pair) for pair in zip(files, results, strict=True)]))
            try:
                self.on_complete(batches)
            except BaseException:  # never lose the reaper: later batches still need their futures
                log.exception("tensorsink: completing %d batches failed", len(batches))

    def _outcome(self, job: FileJob, result: tuple[bool, int, int, float, int, str | None]) -> FileOutcome:
        replaced, size, crc, renamed_at, error, operation = result
        if not error:
            return FileOutcome(replaced, size, crc, renamed_at, None)
        failure: BaseException
        if operation == "symlink":
            folder = job.final.rpartition("/")[0]
            link = find_symlink(self.root, folder) or folder
            failure = SymlinkError(link, os.path.realpath(link), self.root)
        else:
            failure = OSError(error, f"{os.strerror(error)} ({operation})", job.final)
        return FileOutcome(replaced, size, crc, renamed_at, failure)

    def close(self) -> None:
        self._engine.close()
        self._reaper.join()
