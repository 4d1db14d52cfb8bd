"""A stand-in device for the staging bookkeeping: chosen tensors count as 'on the device', and their
copies land late, from another thread, so code that reads staged memory too early sees poison."""

from __future__ import annotations

import ctypes
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


_WAIT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_SETUP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))
_CLEAR = ctypes.CFUNCTYPE(ctypes.c_int)


def _address(function: Any) -> int:
    return int(ctypes.cast(function, ctypes.c_void_p).value or 0)


class _LateCompletion:
    def __init__(self, thread: threading.Thread, engine: FakeEngine) -> None:
        self.thread = thread
        self._engine = engine
        self._wait: Any = None  # the C function native() hands out, alive as long as this

    def wait(self) -> None:
        self._engine.python_waits += 1
        self.thread.join()

    def native(self) -> tuple[int, int, int, int, int, int, int] | None:
        """The stand-in for a CUDA event's wait in C: a C function (ctypes) that joins the copy's
        thread, with the engine's shared setup and clear functions (as the runtime's are)."""
        engine = self._engine
        if not engine.native:
            return None

        def wait(argument: int | None) -> int:
            engine.waited.append(threading.get_ident())
            self.thread.join()
            return engine.wait_error

        self._wait = _WAIT(wait)
        return (_address(self._wait), 0, _address(engine._setup), 2, _address(engine._clear), 0, 0)


class FakeEngine:
    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self._device: dict[int, weakref.ref[torch.Tensor]] = {}
        self.copies: list[int] = []  # tensors per copy() call
        self.readies = 0
        self.snapshots = 0
        self.capture = False  # as if the caller's stream were capturing a CUDA graph
        self.land = threading.Event()  # set: copies land at once, not after `delay`
        # Completions the native engine's threads wait for themselves, through C functions; what
        # those threads did: waits (by thread), setups (thread, argument), clears; a wait's result.
        self.native = True
        self.waited: list[int] = []
        self.set_up: list[tuple[int, int]] = []
        self.cleared = 0
        self.wait_error = 0
        self.python_waits = 0  # completions waited for in Python

        def setup(mode: Any) -> int:
            self.set_up.append((threading.get_ident(), mode[0]))
            return 0

        def clear() -> int:
            self.cleared += 1
            return 0

        self._setup, self._clear = _SETUP(setup), _CLEAR(clear)

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

        def land() -> None:
            self.land.wait(self.delay)
            for destination, value in values:
                destination.copy_(value)

        thread = threading.Thread(target=land)
        thread.start()
        return _LateCompletion(thread, self)

    def fence(self, after: object, sources: Sequence[torch.Tensor]) -> _LateCompletion:
        thread = threading.Thread(target=lambda: None)
        thread.start()
        return _LateCompletion(thread, self)

    def aligned_like(self, source: torch.Tensor, alignment: int) -> torch.Tensor:
        return torch.empty_like(source, memory_format=torch.contiguous_format)
