"""What an engine takes (a batch of FileJobs) and what it reports (a FileOutcome per file)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

from ..commit import Committer
from ..formats import Buffer, Format
from ..manifest import Journal
from ..options import Durability

__all__ = [
    "BudgetLike",
    "Completion",
    "CopyWait",
    "Due",
    "Engine",
    "FileJob",
    "FileOutcome",
    "PlainRoute",
    "PlainWrite",
    "ReadyFile",
    "Settled",
]


class FileJob(NamedTuple):
    """One file to commit: its bytes as buffers, or (buffers None) a temporary already written at `fd`."""

    final: str
    temporary: str
    buffers: Sequence[Buffer] | None
    fd: int
    #: Whether to take the file's CRC-32 (from the buffers, or by reading the written file back).
    checksum: bool
    #: From reserve(): the file is renamed only if no later number for its path was renamed already.
    number: int
    #: Journal.prefix() of the file's journal lines, written around its rename; None: not journaled.
    record: bytes | None = None
    #: The file's CRC-32 where encoding computed it (a ZIP format, from its members' CRCs): with
    #: `checksum`, the engine takes it instead of reading the buffers a second time.
    crc: int | None = None


class FileOutcome(NamedTuple):
    """What became of one file: renamed into place (or superseded by a later write), or failed."""

    replaced: bool
    size: int
    crc: int
    #: time.time() of the rename: the manifest orders records of one path by it.
    renamed_at: float
    error: BaseException | None


#: A copy into host memory that the engine's threads wait for themselves (staging.Completion.native):
#: (wait, argument, setup, setup_argument, clear, set_device, device), the addresses of C functions
#: `int wait(void *argument)`, `setup(int *)` (run once per thread before its first wait),
#: `int clear(void)` (after a failed wait) and `int set_device(int device)` (before a wait, where the
#: thread's device differs), 0 for none but wait, and their arguments.
CopyWait = tuple[int, int, int, int, int, int, int]


class Settled:
    """A write's first done-callback, which the engine runs itself as the write settles, before the
    writer's own callbacks and never behind them (the staging's pool blocks go back even while a
    user's callback is slow); given to write_ready, which also calls it, with None, for a write it
    refuses."""

    __slots__ = ("_run",)

    def __init__(self, run: Callable[[Any], object]) -> None:
        self._run = run

    def __call__(self, handle: Any) -> None:
        self._run(handle)


#: Called with finished batches, each as (token, one outcome per file in submission order).
Completion = Callable[[list[tuple[object, list[FileOutcome]]]], None]
#: Called with a settled write_ready() handle and the done-callbacks added to it while it was pending.
Due = Callable[[Any, list[Callable[[Any], object]]], None]
#: A plain route's call, write(key, value) or write_batch(keys, batch): the write's handle, or None
#: where Python decides the write.
PlainWrite = Callable[[object, object], Any]


class PlainRoute(NamedTuple):
    """write() and write_batch() of host arrays in one call into the engine (see open_plain)."""

    write: PlainWrite
    write_batch: PlainWrite


class ReadyFile(NamedTuple):
    """One file of the ready route: its bytes are in host memory (a header and views of the arrays)."""

    final: str
    temporary: str
    buffers: Sequence[Buffer]
    checksum: bool
    record: bytes | None
    crc: int | None
    #: The arrays' bytes, for the statistics.
    payload: int


class BudgetLike(Protocol):
    """Backpressure: room for a write is taken before it is queued and given back when it is done."""

    @property
    def waiting(self) -> int: ...

    def acquire(self, nbytes: int) -> float: ...

    def release(self, nbytes: int, count: int = 1) -> None: ...


class Engine(ABC):
    """Commits batches of files under `root` with `threads` threads, at `durability`.

    Files are numbered by reserve() in the order of write() calls; a file is renamed into place only
    if no file numbered later for the same path was renamed already (latest write wins). A temporary
    is removed on any failure; a folder on the way that is a symlink fails the file unless
    `follow_symlinks`.
    """

    name: ClassVar[str]

    def __init__(
        self,
        threads: int,
        durability: Durability,
        root: str,
        on_complete: Completion,
        *,
        follow_symlinks: bool = False,
        journal: Journal | None = None,
        max_count: int = 1 << 62,
        max_bytes: int = 1 << 62,
        on_due: Due | None = None,
    ) -> None:
        self.journal = journal
        self.threads = threads
        self.durability = durability
        self.root = root
        self.on_complete = on_complete
        self.follow_symlinks = follow_symlinks
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.on_due = on_due
        #: The writer's one committer: it names and creates temporaries (for both routes) and, in
        #: the Python engine, commits them.
        self.committer = Committer(durability, root, follow_symlinks=follow_symlinks)

    #: Whether write_ready() is here: a write whose bytes are in host memory goes to the engine's
    #: threads in one call and is completed, counted and given its budget back without Python.
    ready_route: ClassVar[bool] = False

    @property
    @abstractmethod
    def budget(self) -> BudgetLike:
        """The writer's budget (max_count writes, max_bytes bytes in flight)."""

    def write_ready(
        self,
        keys: list[str],
        files: list[ReadyFile],
        nbytes: int,
        waits: list[CopyWait] | None = None,
        settled: Settled | None = None,
        staged: bool = False,
    ) -> tuple[Any, float]:
        """Number, admit (under the budget) and queue one write on the ready route; its handle and the
        seconds it waited for room. Only where `ready_route`. `waits`: the copies from a device that
        its bytes are still on their way with, which the engine's threads wait for before writing;
        `settled`: the handle's first done-callback (see Settled); `staged`: the handle is staged at
        once (its arrays are the writer's own copies)."""
        raise NotImplementedError(f"the {self.name} engine has no ready route")

    def drain(self) -> None:
        """Wait for every write_ready() so far, and for the hand-off of their done-callbacks."""
        return None

    def failure(self) -> BaseException | None:
        """The first failed write_ready(), as an exception (the same each time), or None."""
        return None

    def counters(self) -> tuple[int, int, int, float, int, float, tuple[int, float, float, float]]:
        """write_ready()'s files committed, their payload bytes, files failed, the time.perf_counter()
        of the latest, writes in flight, and the time of the first failure; then the plain route's
        (calls that wrote, the seconds spent in them, of those the seconds waiting for room, the
        time.perf_counter() of the first)."""
        return 0, 0, 0, 0.0, 0, 0.0, (0, 0.0, 0.0, 0.0)

    def open_plain(self, fmt: Format) -> PlainRoute | None:
        """Open the plain route for `fmt`, where the engine has one for it: write(key, value) of one
        host array, and write_batch(keys, batch) of one array of samples, each in one call that runs
        no Python (see engine/_native/plain.c); a call returns the write's handle, or None where Python
        must decide the write. None: no plain route (closed, if it was open for another format)."""
        return None

    def folder_checked(self, folder: str) -> None:
        """The writer found `folder` free of symlinks: plain writes may go there."""
        return None

    def plain_off(self, wait: bool = False) -> None:
        """Close the plain route (the writer failed, or closes); with `wait`, wait for calls inside it."""
        return None

    @abstractmethod
    def reserve(self, paths: list[str]) -> list[int]:
        """Number each path, in the order of the calls (of write()): the latest number wins."""

    @abstractmethod
    def release(self, paths: list[str]) -> None:
        """Give back reserved numbers whose files will never be submitted."""

    @abstractmethod
    def submit(self, token: object, files: list[FileJob]) -> None:
        """Queue a batch of reserved files; `on_complete` receives (token, outcomes) once every file
        is done (each file's number is given back then)."""

    @abstractmethod
    def close(self) -> None:
        """Finish every batch submitted (each reported to on_complete), then stop the threads."""
