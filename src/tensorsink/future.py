"""The handle write() returns."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

__all__ = ["WriteFuture"]


class WriteFuture(Future[list[Path]]):
    """A concurrent.futures.Future whose result is the list of final Paths a write() committed.

    Writes cannot be cancelled once accepted: cancel() returns False.
    """

    def cancel(self) -> bool:
        return False
