"""Device-to-host copies ordered by events: the only place that touches CUDA streams.

The caller's thread records a `ready` event on the producer's current stream and queues the copies on
a dedicated copy stream that waits for it, so the producer never waits; a worker waits for the
`Completion` before it reads the destination. Nothing here touches CUDA at import.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from .cudart import before_cuda, event_wait

if TYPE_CHECKING:
    from ..engine.base import CopyWait

__all__ = ["Completion", "CopyEngine", "CudaEngine"]


class Completion(Protocol):
    """Copies queued together; wait() returns once the host memory holds their results."""

    def wait(self) -> None: ...

    def native(self) -> CopyWait | None:
        """The same wait as C functions that a thread of the native engine calls itself, without the
        GIL (engine.base.CopyWait); None where there are none (then a Python worker waits)."""
        ...


class CopyEngine(Protocol):
    """What the stager needs from a device."""

    def owns(self, array: object) -> bool:
        """Whether `array` lives on this engine's device (and so must be copied to the host)."""
        ...

    def ready(self, source: torch.Tensor) -> object:
        """A marker on the producer's stream: work queued there so far has finished writing `source`."""
        ...

    def capturing(self) -> bool:
        """Whether the calling thread's current stream is capturing a graph (no copy may be queued)."""
        ...

    def snapshot(self, source: torch.Tensor) -> torch.Tensor:
        """A device-side copy of `source`, ordered on the producer's stream (its buffer may be reused)."""
        ...

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], after: object) -> Completion:
        """Queue destination.copy_(device_source) for each pair, after the `after` marker."""
        ...

    def fence(self, after: object, sources: Sequence[torch.Tensor]) -> Completion:
        """A completion for the `after` marker itself, keeping `sources` alive until it is waited for."""
        ...

    def aligned_like(self, source: torch.Tensor, alignment: int) -> torch.Tensor:
        """An empty contiguous device tensor like `source` whose address is a multiple of `alignment`."""
        ...


class _EventCompletion:
    __slots__ = ("_event", "_sources")

    def __init__(self, event: torch.cuda.Event, sources: list[torch.Tensor]) -> None:
        self._event = event
        self._sources = sources  # alive until the copy is done, whatever the caller does

    def wait(self) -> None:
        before_cuda()
        # torch's synchronize() sets no device itself: on a fresh thread it would make a context on
        # device 0. (An event never recorded has no device, and nothing to wait for.)
        index = getattr(self._event.device, "index", None)
        with torch.cuda.device(index) if index is not None else contextlib.nullcontext():
            self._event.synchronize()
        self._sources = []

    def native(self) -> CopyWait | None:
        index = getattr(self._event.device, "index", None)  # None: never recorded
        return event_wait(self._event.cuda_event, index) if index is not None else None


class CudaEngine:
    """Copies on a dedicated stream per producer stream, ordered after the producer by CUDA events.

    One copy stream per producer: a copy waits for its producer's marker on its stream, so with one
    copy stream a write from an idle stream would queue behind a busy stream's wait (and streams that
    wait on each other could deadlock over a full pool). At most `MAX_STREAMS` are kept; beyond that
    the oldest is forgotten (torch pools its streams, so none is destroyed under a queued copy).
    """

    MAX_STREAMS = 64

    def __init__(self) -> None:
        self._streams: dict[tuple[int, int], torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def owns(self, array: object) -> bool:
        return isinstance(array, torch.Tensor) and array.is_cuda

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The copy stream for the calling thread's current stream on `device` (the producer's)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, torch.cuda.current_stream(index).cuda_stream)
        stream = self._streams.get(key)
        if stream is None:
            with self._lock:
                stream = self._streams.get(key)
                if stream is None:
                    if len(self._streams) >= self.MAX_STREAMS:
                        del self._streams[next(iter(self._streams))]
                    # from torch's high-priority pool, which producers' streams rarely come from
                    stream = torch.cuda.Stream(device=index, priority=-1)  # type: ignore[no-untyped-call]
                    self._streams[key] = stream
        return stream

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def ready(self, source: torch.Tensor) -> torch.cuda.Event:
        # Blocking: a worker may wait on it (fence) while the producer runs; a default event's
        # synchronize() would spin a core at 100% for as long as the producer's kernels take.
        event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(source.device))
        return event

    def snapshot(self, source: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(source.device):
            return source.clone()

    def fence(self, after: object, sources: Sequence[torch.Tensor]) -> _EventCompletion:
        assert isinstance(after, torch.cuda.Event)
        return _EventCompletion(after, list(sources))

    def aligned_like(self, source: torch.Tensor, alignment: int) -> torch.Tensor:
        size = source.numel() * source.element_size()
        raw = torch.empty(size + alignment, dtype=torch.uint8, device=source.device)
        start = -raw.data_ptr() % alignment
        return raw[start : start + size].view(source.dtype).view(source.shape)

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], after: object) -> _EventCompletion:
        assert isinstance(after, torch.cuda.Event)
        before_cuda()  # a worker's chunked copy; on the caller's thread this does nothing
        stream = self._copy_stream(pairs[0][1].device)
        stream.wait_event(after)
        sources = []
        with torch.cuda.stream(stream):
            for destination, source in pairs:
                destination.copy_(source, non_blocking=True)
                source.record_stream(stream)  # the allocator must not reuse it before the copy ran
                sources.append(source)
            done = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]  # waiters sleep
            done.record(stream)
        return _EventCompletion(done, sources)
