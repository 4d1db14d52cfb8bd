"""A stand-in device for the staging bookkeeping: chosen tensors count as 'on the device', and their
copies land late, from another thread, so code that reads staged memory too early sees poison."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from tensorsink.staging import Stager

POISON = 0xAB


def stage_on(writer: Any, stager: Stager) -> Stager:
    """Give `writer` a stager over the stand-in device. Its tensors are host tensors to everything but
    that stager, so the writer's plain route (host arrays, taken whole in C) is closed for it."""
    writer._stager = stager
    writer._writer.plain = None
    return stager


class _LateCompletion:
    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread

    def wait(self) -> None:
        self.thread.join()


class FakeEngine:
    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self._device: dict[int, weakref.ref[torch.Tensor]] = {}
        self.copies: list[int] = []  # tensors per copy() call
        self.readies = 0
        self.snapshots = 0
        self.capture = False  # as if the caller's stream were capturing a CUDA graph

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark `tensor` as living on the fake device."""
        self._device[id(tensor)] = weakref.ref(tensor)
        return tensor

    def owns(self, array: object) -> bool:
        ref = self._device.get(id(array))
        return ref is not None and ref() is array

    def capturing(self) -> bool:
        return self.capture

    def ready(self, source: torch.Tensor) -> object:
        self.readies += 1
        return object()

    def snapshot(self, source: torch.Tensor) -> torch.Tensor:
        self.snapshots += 1
        return self.put(source.clone())

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], after: object) -> _LateCompletion:
        self.copies.append(len(pairs))
        values = [(destination, source.clone()) for destination, source in pairs]  # as queued now
        done = threading.Event()

        def land() -> None:
            done.wait(self.delay)
            for destination, value in values:
                destination.copy_(value)

        thread = threading.Thread(target=land)
        thread.start()
        return _LateCompletion(thread)

    def fence(self, after: object, sources: Sequence[torch.Tensor]) -> _LateCompletion:
        thread = threading.Thread(target=lambda: None)
        thread.start()
        return _LateCompletion(thread)

    def aligned_like(self, source: torch.Tensor, alignment: int) -> torch.Tensor:
        return torch.empty_like(source, memory_format=torch.contiguous_format)
