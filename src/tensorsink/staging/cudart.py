"""The CUDA runtime calls torch does not wrap, on the writer's own threads only.

A producer may be capturing a CUDA graph (`torch.compile(mode="reduce-overhead")`) while the writer's
threads wait for copy events, pin or unpin the pool: under the default (global) capture mode such a
call from another thread invalidates the capture. So each of the writer's threads switches itself to
relaxed capture mode (`cudaThreadExchangeStreamCaptureMode`) before its first CUDA call; the caller's
threads are never switched. And a failed runtime call (a refused `cudaHostRegister`) leaves its error
as the thread's last error, which torch's wrapper does not clear: `clear_last_error()` does.

The runtime is the one torch loaded (found among the process's libraries); nothing is loaded or
called where CUDA is not in use.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

__all__ = ["before_cuda", "clear_last_error", "event_wait", "own_thread", "own_thread_now"]

log = logging.getLogger("tensorsink")

#: cudaStreamCaptureModeRelaxed in the runtime's enum (Global 0, ThreadLocal 1, Relaxed 2).
CAPTURE_MODE_RELAXED = 2

_state = threading.local()


def own_thread() -> None:
    """Mark the calling thread as the writer's own: before_cuda() may relax its capture mode. Call at
    the start of a thread tensorsink made (a ThreadPoolExecutor's initializer)."""
    _state.owned = True


def own_thread_now() -> bool:
    """Whether the calling thread is one of a writer's own (see own_thread)."""
    return bool(getattr(_state, "owned", False))


def before_cuda() -> None:
    """Called before a CUDA call that a thread of the writer's makes (event waits, pinning): puts an
    own thread in relaxed capture mode, once. Does nothing on any other thread."""
    if not getattr(_state, "owned", False) or getattr(_state, "relaxed", False):
        return
    library = runtime()
    if library is None:  # not loaded yet: asked again at the next call
        return
    _state.relaxed = True
    mode = ctypes.c_int(CAPTURE_MODE_RELAXED)
    error = library.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    if error:
        log.warning("tensorsink: cudaThreadExchangeStreamCaptureMode failed (CUDA error %d)", error)


def clear_last_error() -> int:
    """Clear (and return) the calling thread's last CUDA runtime error, after a failure handled here."""
    library = runtime()
    return int(library.cudaGetLastError()) if library is not None else 0


def event_wait(event: int, device: int) -> tuple[int, int, int, int, int, int, int] | None:
    """How a C thread waits for the CUDA event `event` (a cudaEvent_t) of `device` itself, as the
    native engine's threads do (engine.base.CopyWait): cudaEventSynchronize, after relaxing the
    thread's capture mode once and making `device` its current one (as torch's Event.synchronize
    does: no context is made on another device), and cudaGetLastError after a failure. None where
    the runtime is not loaded."""
    library = runtime()
    if library is None or not event:
        return None

    def address(name: str) -> int:
        return int(ctypes.cast(getattr(library, name), ctypes.c_void_p).value or 0)

    return (
        address("cudaEventSynchronize"),
        event,
        address("cudaThreadExchangeStreamCaptureMode"),
        CAPTURE_MODE_RELAXED,
        address("cudaGetLastError"),
        address("cudaSetDevice"),
        device,
    )


_found: list[Any] = []  # the runtime, once found (not finding it is not remembered: it may load later)


def runtime() -> Any:
    """The CUDA runtime library torch loaded into this process, or None (no CUDA in use yet)."""
    if _found:
        return _found[0]
    for path in _loaded_libraries():
        if "libcudart.so" in path.rsplit("/", 1)[-1]:
            try:
                _found.append(ctypes.CDLL(path))
            except OSError as exc:
                log.warning("tensorsink: cannot open the CUDA runtime %s: %s", path, exc)
                return None
            return _found[0]
    return None


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line and "/" in line})
    except OSError:
        return []
