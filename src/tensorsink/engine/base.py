"""What an engine takes (a batch of FileJobs) and what it reports (a FileOutcome per file)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

from ..formats import Buffer
from ..manifest import Journal
from ..options import Durability

__all__ = ["Completion", "Engine", "FileJob", "FileOutcome"]


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


#: Called with finished batches, each as (token, one outcome per file in submission order).
Completion = Callable[[list[tuple[object, list[FileOutcome]]]], None]


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
    ) -> None:
        self.journal = journal
        self.threads = threads
        self.durability = durability
        self.root = root
        self.on_complete = on_complete
        self.follow_symlinks = follow_symlinks

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
