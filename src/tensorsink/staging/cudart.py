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
from typing import Any, cast

import torch

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
    native engine's threads do (engine.base.CopyWait): cudaEventSynchronize, after making `device`
    its current one (so that no context is made on another device) and relaxing the thread's capture
    mode once, and cudaGetLastError after a failure. None where the runtime is not loaded."""
    library = runtime()
    if library is None or not event:
        return None
    synchronize, exchange_mode, last_error, set_device = _addresses(library)
    return (synchronize, event, exchange_mode, CAPTURE_MODE_RELAXED, last_error, set_device, device)


_address_cache: list[tuple[Any, tuple[int, int, int, int]]] = []  # (library, its functions' addresses)


def _addresses(library: Any) -> tuple[int, int, int, int]:
    """The addresses event_wait hands out, looked up once per library (a CUDA write asks each time)."""
    if _address_cache and _address_cache[0][0] is library:
        return _address_cache[0][1]
    names = (
        "cudaEventSynchronize",
        "cudaThreadExchangeStreamCaptureMode",
        "cudaGetLastError",
        "cudaSetDevice",
    )
    found = tuple(int(ctypes.cast(getattr(library, name), ctypes.c_void_p).value or 0) for name in names)
    _address_cache[:] = [(library, cast(tuple[int, int, int, int], found))]
    return _address_cache[0][1]


_found: list[Any] = []  # the runtime, once found (not finding it is not remembered: it may load later)


def runtime() -> Any:
    """The CUDA runtime library torch loaded into this process, or None (no CUDA in use yet, or no
    runtime of torch's CUDA version to be found by name, or more than one)."""
    if _found:
        return _found[0]
    path = _torchs_runtime(_loaded_libraries(), torch.version.cuda)
    if path is None:
        return None
    try:
        _found.append(ctypes.CDLL(path))
    except OSError as exc:
        log.warning("tensorsink: cannot open the CUDA runtime %s: %s", path, exc)
        return None
    return _found[0]


def _torchs_runtime(loaded: list[str], cuda: str | None) -> str | None:
    """Among the libraries loaded, the one runtime of torch's CUDA major version (libcudart.so.12 for
    12.x): another package may have loaded another version's, which would not be torch's."""
    if not cuda:
        return None
    suffix = f".so.{cuda.split('.')[0]}"
    found = [
        path
        for path in loaded
        if (name := path.rsplit("/", 1)[-1]).startswith("libcudart.so")
        and (name.endswith(suffix) or suffix + "." in name)
    ]
    return found[0] if len(found) == 1 else None


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line and "/" in line})
    except OSError:
        return []
