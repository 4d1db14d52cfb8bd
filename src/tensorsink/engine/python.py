"""The pure-Python engine: the commit protocol (commit.Committer) in a pool of Python threads.

The fallback where the native engine was not built. Each batch runs in one worker thread, file after
file; with Durability.NONE a batch under `inline_below` bytes runs on the caller's thread instead,
where a queue hop would cost more than the write.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..checksum import crc32_of
from ..formats import write_buffers
from ..manifest import Journal, crc32_of_path
from ..options import Durability
from ..scheduling import Budget, run_in
from ..staging.cudart import own_thread
from .base import Completion, Due, Engine, FileJob, FileOutcome

__all__ = ["PythonEngine"]


class PythonEngine(Engine):
    name = "python"

    def __init__(
        self,
        threads: int,
        durability: Durability,
        root: str,
        on_complete: Completion,
        *,
        follow_symlinks: bool = False,
        journal: Journal | None = None,
        inline_below: int = 0,
        max_count: int = 1 << 62,
        max_bytes: int = 1 << 62,
        on_due: Due | None = None,
    ) -> None:
        super().__init__(
            threads, durability, root, on_complete, follow_symlinks=follow_symlinks, journal=journal,
            max_count=max_count, max_bytes=max_bytes, on_due=on_due,
        )  # fmt: skip
        self._budget = Budget(max_count, max_bytes)
        self._inline_below = inline_below if durability is Durability.NONE else 0
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tensorsink", initializer=own_thread)

    @property
    def budget(self) -> Budget:
        return self._budget

    def reserve(self, paths: list[str]) -> list[int]:
        return [self.committer.order.reserve(path) for path in paths]

    def release(self, paths: list[str]) -> None:
        for path in paths:
            self.committer.order.release(path)

    def submit(self, token: object, files: list[FileJob]) -> None:
        if not files:
            raise ValueError("a batch needs at least one file")
        if self._inline_below and _payload(files) < self._inline_below:
            self._run(token, files)
            return
        if not run_in(self._executor, lambda: self._run(token, files)):
            raise RuntimeError("the Python engine is closed")

    def _run(self, token: object, files: list[FileJob]) -> None:
        self.on_complete([(token, [self._commit(job) for job in files])])

    def _commit(self, job: FileJob) -> FileOutcome:
        size = crc = 0

        def write(fd: int, temporary: str) -> None:
            nonlocal size, crc
            if job.buffers is not None:
                size = write_buffers(fd, job.buffers)
                if job.checksum:
                    crc = job.crc if job.crc is not None else crc32_of(job.buffers)
            elif job.checksum:
                crc, size = crc32_of_path(temporary)  # written by another writer: read it back
            else:
                size = _size(fd)

        committer, journal, record = self.committer, self.journal, job.record
        journaled = None
        if journal is not None and record is not None:

            def journaled(renaming: bool, when: float) -> None:
                journal.write_line(record, size, crc, when, renaming=renaming)

        try:
            if job.buffers is None:
                renamed_at = committer.finish(job.final, job.number, job.temporary, job.fd, write, journaled)
            else:
                directory = job.final.rpartition("/")[0]
                fd = committer.open_temporary(directory, job.temporary)
                renamed_at = committer.finish(job.final, job.number, job.temporary, fd, write, journaled)
        except Exception as exc:
            return FileOutcome(False, size, crc, 0.0, exc)
        finally:
            committer.order.release(job.final)
        return FileOutcome(renamed_at is not None, size, crc, renamed_at or 0.0, None)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _payload(files: list[FileJob]) -> int:
    return sum(sum(len(b) for b in job.buffers) for job in files if job.buffers is not None)


def _size(fd: int) -> int:
    return os.fstat(fd).st_size
