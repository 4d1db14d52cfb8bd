"""How the bytes reach the file: from host memory (posix) or from device memory through kvikio.

A writer's Route decides once: backend="posix" never probes; backend="kvikio" probes at construction
and raises BackendUnavailableError, with the reason, where kvikio cannot write; backend="auto" probes
on the first CUDA tensor and uses kvikio only where GPUDirect Storage carried the probe's bytes. The
decision is logged in one line.
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
        self.kvikio: KvikioWriter | None = None
        self.reason: str | None = None
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
                self._decide(self._kvikio_writer(), verdict.reason)
            else:
                self._decide(None, self._staged_format_reason())

    @property
    def name(self) -> str:
        return "kvikio" if self.kvikio is not None else "posix"

    def device_direct(self) -> bool:
        """Whether CUDA tensors go to the file from device memory (probing first, for backend='auto')."""
        if self.reason is None:
            with self._lock:
                if self.reason is None:
                    self._resolve_auto()
        return self.kvikio is not None

    def writer_for(self, entry: FileEntry) -> Callable[[int, str], None] | None:
        """kvikio's writer for a file whose device tensors were left on the device, else None."""
        if self.kvikio is None or not any(map(on_device, entry.arrays)):
            return None
        assert isinstance(self._format, HeaderFormat)  # kvikio is chosen only for these
        return partial(self.kvikio.write, fmt=self._format, entry=entry)

    def _staged_format_reason(self) -> str:
        return f"{self._format.save_format.name} is written from host memory (pinned staging)"

    def _resolve_auto(self) -> None:
        if not isinstance(self._format, HeaderFormat):
            self._decide(None, self._staged_format_reason())
            return
        verdict = probe.verdict_for(self._root)
        self._decide(self._kvikio_writer() if verdict.gds else None, verdict.reason)

    def _kvikio_writer(self) -> KvikioWriter:
        o = self._options
        return KvikioWriter(o.kvikio_threads, o.kvikio_task_size, o.kvikio_direct_io)

    def _decide(self, kvikio: KvikioWriter | None, reason: str) -> None:
        self.kvikio = kvikio
        self.reason = reason
        if self._options.backend is not Backend.POSIX:
            log.info("tensorsink: CUDA tensors into %s go by %s: %s", self._root, self.name, reason)
