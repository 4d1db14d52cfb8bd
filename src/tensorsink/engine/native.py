"""The native engine: the `_native` extension's C threads commit the files.

Writes whose bytes are in host memory take the ready route (`write_ready`): numbered, admitted under
the budget and queued in one call, then completed, counted and given their budget back by the C
threads, with no Python thread involved. The others (prepared by a custom writer, staged from a
device) are submitted as batches; one Python thread, the reaper, collects those several at a time
and hands them to `on_complete`, and hands on the done-callbacks of ready-route writes.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Any, cast

import numpy as np
import torch

from ..commit import find_symlink
from ..errors import SymlinkError, naming
from ..formats import Format, NpyFormat, PtFormat, SafetensorsFormat
from ..formats.pt import pt_template
from ..manifest import Journal
from ..options import Durability
from ..staging.cudart import own_thread
from ._native import Engine as _Native
from ._native import Handle
from .base import Completion, Due, Engine, FileJob, FileOutcome, PlainRoute, Settled

__all__ = ["Handle", "NativeEngine"]

log = logging.getLogger("tensorsink")
_DURABILITY = {Durability.NONE: 0, Durability.FILE: 1, Durability.FULL: 2}
_REAP_SECONDS = 0.5  # how long the reaper sleeps in C between looks at whether it should stop
#: The formats plain.c lays out itself, by its names for them.
_PLAIN: dict[type[Format], int] = {NpyFormat: 1, SafetensorsFormat: 2, PtFormat: 3}


class _Budget:
    """The C engine's budget, as the pipeline takes it (its threads give the ready route's room back)."""

    def __init__(self, engine: _Native) -> None:
        self.acquire = engine.admit
        self._give_back = engine.give_back
        self._engine = engine

    @property
    def waiting(self) -> int:
        """Callers waiting for room now."""
        return self._engine.budget_waiting

    def release(self, nbytes: int, count: int = 1) -> None:
        self._give_back(nbytes, count)


class NativeEngine(Engine):
    name = "native"
    ready_route = True

    def __init__(
        self,
        threads: int,
        durability: Durability,
        root: str,
        on_complete: Completion,
        *,
        follow_symlinks: bool = False,
        journal: Journal | None = None,
        max_count: int = 1 << 62,
        max_bytes: int = 1 << 62,
        on_due: Due | None = None,
    ) -> None:
        super().__init__(
            threads, durability, root, on_complete, follow_symlinks=follow_symlinks, journal=journal,
            max_count=max_count, max_bytes=max_bytes, on_due=on_due,
        )  # fmt: skip
        fd = journal.fd if journal is not None else -1
        self._engine = _Native(
            threads, _DURABILITY[durability], root, follow_symlinks, fd, max_count, max_bytes, self._error,
        )  # fmt: skip
        self._budget = _Budget(self._engine)
        self.write_ready = self._engine.write_ready  # type: ignore[method-assign,assignment]  # no frame
        self.drain = self._engine.drain  # type: ignore[method-assign]
        self.counters = self._engine.counters  # type: ignore[method-assign]
        self.folder_checked = self._engine.folder_checked  # type: ignore[method-assign,assignment]
        self.plain_off = self._engine.plain_off  # type: ignore[method-assign,assignment]
        self._reaper = threading.Thread(target=self._reap, name="tensorsink-reaper", daemon=True)
        self._reaper.start()

    @property
    def budget(self) -> _Budget:
        return self._budget

    def failure(self) -> BaseException | None:
        return self._engine.failure

    def open_plain(self, fmt: Format) -> PlainRoute | None:
        code = _PLAIN.get(type(fmt))
        if code is None:  # another format, or one wrapped: Python lays it out
            self._engine.plain_off()
            return None
        token = secrets.token_hex(4)
        if isinstance(fmt, PtFormat):  # its archive is laid out by a template made once per dtype and shape
            self._engine.plain(code, 1, torch.Tensor, np.ndarray, token, pt_template)
        else:
            alignment = cast(NpyFormat | SafetensorsFormat, fmt).alignment
            self._engine.plain(code, alignment, torch.Tensor, np.ndarray, token)
        return PlainRoute(self._engine.write_plain, self._engine.write_plain_batch)

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
            batches, due = [], 0
            for submitted, results in finished:
                if results is None:  # a ready-route handle settled with done-callbacks to hand on
                    due += 1
                    self._hand_on(submitted)
                    continue
                token, files = cast(tuple[object, list[FileJob]], submitted)
                batches.append((token, [self._outcome(*pair) for pair in zip(files, results, strict=True)]))
            if due:
                self._engine.handed(due)
            if not batches:
                continue
            try:
                self.on_complete(batches)
            except BaseException:  # never lose the reaper: later batches still need their futures
                log.exception("tensorsink: completing %d batches failed", len(batches))

    def _hand_on(self, handle: Any) -> None:
        """Run the engine's own callbacks here (Settled), and hand the writer's on."""
        callbacks = handle._take_callbacks()
        for settled in [c for c in callbacks if isinstance(c, Settled)]:
            try:
                settled(handle)
            except BaseException:
                log.exception("tensorsink: settling a write failed")
        callbacks = [c for c in callbacks if not isinstance(c, Settled)]
        try:
            if callbacks and self.on_due is not None:
                self.on_due(handle, callbacks)
        except BaseException:
            log.exception("tensorsink: handing on %d done-callbacks failed", len(callbacks))

    def _error(self, error: int, operation: str, final: str, key: str) -> BaseException:
        """A ready-route file's failure as the exception it is raised as, naming its key and file."""
        failure = self._failure(error, operation, final)
        return naming(failure, key, final)

    def _failure(self, error: int, operation: str, final: str) -> BaseException:
        if operation == "symlink":
            folder = final.rpartition("/")[0]
            link = find_symlink(self.root, folder) or folder
            return SymlinkError(link, os.path.realpath(link), self.root)
        return OSError(error, f"{os.strerror(error)} ({operation})", final)

    def _outcome(self, job: FileJob, result: tuple[bool, int, int, float, int, str | None]) -> FileOutcome:
        replaced, size, crc, renamed_at, error, operation = result
        if not error:
            return FileOutcome(replaced, size, crc, renamed_at, None)
        return FileOutcome(replaced, size, crc, renamed_at, self._failure(error, operation or "", job.final))

    def close(self) -> None:
        self._engine.close()
        self._reaper.join()
