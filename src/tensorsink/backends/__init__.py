"""How the bytes reach the file: from host memory (posix) or from device memory through kvikio.

A writer's Route decides once: backend="posix" never probes; backend="kvikio" probes at construction
and raises BackendUnavailableError, with the reason, where kvikio cannot write; backend="auto" probes
in a background thread started by the first CUDA tensor, and uses kvikio only where GPUDirect Storage
carried the probe's bytes. write()
never waits for the probe: until its verdict, CUDA tensors take the pinned path. The decision is
logged in one line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

from ..errors import BackendUnavailableError
from ..formats import FileEntry, Format, HeaderFormat
from ..options import Backend, WriterOptions
from ..staging import on_device
from ..staging.cudart import before_cuda, own_thread
from . import probe
from .kvikio_writer import KvikioWriter
from .probe import Verdict, probe_kvikio

__all__ = ["KvikioWriter", "Route", "Verdict", "probe", "probe_kvikio"]

log = logging.getLogger("tensorsink")


class Route:
    """The backend one writer uses for CUDA tensors, and why."""

    def __init__(self, options: WriterOptions, root: str, fmt: Format) -> None:
        self._options = options
        self._root = root
        self._format = fmt
        self._lock = threading.Lock()
        self._decided = threading.Event()
        self._probing = False
        self.kvikio: KvikioWriter | None = None
        self.reason: str | None = None
        self.verdict: Verdict | None = None
        if options.backend is Backend.POSIX:
            self._decide(None, "backend='posix' was asked for")
        elif options.backend is Backend.KVIKIO:
            verdict = probe.verdict_for(root)
            if not verdict.kvikio_works:
                raise BackendUnavailableError(
                    f"backend='kvikio' cannot write into {root}: {verdict.reason}; "
                    "use backend='auto' (falls back by itself) or 'posix'"
                )
            if isinstance(fmt, HeaderFormat):
                self._decide(self._kvikio_writer(), verdict.reason, verdict)
            else:
                self._decide(None, self._staged_format_reason())
        elif not isinstance(fmt, HeaderFormat):
            self._decide(None, self._staged_format_reason())

    @property
    def name(self) -> str:
        return "kvikio" if self.kvikio is not None else "posix"

    @property
    def kvikio_label(self) -> str:
        """How this route's kvikio writes count in stats().bytes_by_backend: "gds" or "kvikio-posix"."""
        return "gds" if self.verdict is not None and self.verdict.gds else "kvikio-posix"

    def start_probe(self) -> None:
        """Start the probe in the background (backend='auto'); nothing if decided or started already."""
        with self._lock:
            if self._decided.is_set() or self._probing:
                return
            self._probing = True
        threading.Thread(target=self._resolve_auto, name="tensorsink-probe", daemon=True).start()

    def device_direct(self) -> bool:
        """Whether CUDA tensors go to the file from device memory now. Never waits: the first call
        starts the probe (backend='auto'), and until its verdict the answer is False."""
        if not self._decided.is_set():
            self.start_probe()
        return self.kvikio is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the backend is decided (starting the probe if needed); False on timeout."""
        self.start_probe()
        return self._decided.wait(timeout)

    def writer_for(self, entry: FileEntry) -> Callable[[int, str], None] | None:
        """kvikio's writer for a file whose device tensors were left on the device, else None."""
        if self.kvikio is None or not any(map(on_device, entry.arrays)):
            return None
        assert isinstance(self._format, HeaderFormat)  # kvikio is chosen only for these
        return partial(self.kvikio.write, fmt=self._format, entry=entry)

    def _staged_format_reason(self) -> str:
        return f"{self._format.save_format.name} is written from host memory (pinned staging)"

    def _resolve_auto(self) -> None:
        own_thread()
        before_cuda()  # the probe opens files with cuFile: no capture of the producer's may see it
        try:
            verdict = probe.verdict_for(self._root)
            kvikio = self._kvikio_writer() if verdict.gds else None
        except BaseException as exc:  # a probe that fails says so and leaves the pinned path
            self._decide(None, f"the GDS probe failed: {exc!r}")
            if not isinstance(exc, Exception):
                raise
            return
        self._decide(kvikio, verdict.reason, verdict)

    def _kvikio_writer(self) -> KvikioWriter:
        o = self._options
        return KvikioWriter(o.kvikio_threads, o.kvikio_task_size, o.kvikio_direct_io)

    def _decide(self, kvikio: KvikioWriter | None, reason: str, verdict: Verdict | None = None) -> None:
        self.verdict = verdict
        self.kvikio = kvikio
        self.reason = reason
        self._decided.set()
        if self._options.backend is not Backend.POSIX:
            label = f" ({self.kvikio_label})" if kvikio is not None else ""
            log.info("tensorsink: CUDA tensors into %s go by %s%s: %s", self._root, self.name, label, reason)
