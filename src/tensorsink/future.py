"""The handle write() returns."""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from pathlib import Path

__all__ = ["WriteFuture"]


class WriteFuture(Future[list[Path]]):
    """A concurrent.futures.Future whose result is the list of final Paths a write() committed.

    It has two stages: *staged*, when the writer no longer reads the caller's tensors (they may be
    modified again), and *done*, when the files are committed. CPU tensors are read until their files
    are written, so for them the two coincide; device tensors are staged once their copy to host
    memory has finished, and with write(..., copy=True) at once. Writes cannot be cancelled: cancel()
    returns False.
    """

    def __init__(self, *, staged_apart: bool = False) -> None:
        super().__init__()
        self._staged = threading.Event() if staged_apart else None

    def staged(self) -> bool:
        """Whether the source tensors may be modified again."""
        return self.done() if self._staged is None else self._staged.is_set()

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Wait until the source tensors may be modified again; False if `timeout` passed first."""
        if self._staged is None:
            return bool(wait([self], timeout).done)
        return self._staged.wait(timeout)

    def set_staged(self) -> None:
        assert self._staged is not None, "only a future created with staged_apart=True is staged apart"
        self._staged.set()

    def set_result(self, result: list[Path]) -> None:
        if self._staged is not None:
            self._staged.set()
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if self._staged is not None:
            self._staged.set()
        super().set_exception(exception)

    def cancel(self) -> bool:
        return False
