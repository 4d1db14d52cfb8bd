"""The shard thread's side of a ShardWriter: samples packed into the open shard, shards committed.

The writer's thread hands over jobs (a write's keys, the rows of its arrays in host memory); the Packer
appends each sample's members to the open shard, a temporary beside its final name, through the C packer
(a run of samples a call, without the GIL) or its Python twin, and commits the shard like any file once
it is full or the writer flushes: the journal's line with its samples, the rename, then each handle
whose samples are all committed is settled. A shard that fails is removed and fails every write in it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..arrays import Array
from ..checksum import crc32, crc32_combine
from ..commit import Committer
from ..engine import engine_class
from ..formats import Buffer, BufferFormat, Container, write_buffers
from ..future import Callbacks, WriteFuture
from ..manifest import SHARD_FORMAT, Journal
from ..options import ShardOptions
from ..staging import Staged
from ..stats import ShardStats
from .index import sample_line
from .layout import Group, groups_of
from .tar import BLOCK, END, USTAR_SIZE_LIMIT, footprint, member_header

__all__ = ["Job", "Packer", "Ticket"]

_WRITE_AHEAD = 4 << 20  # bytes of members gathered before one writev into the shard
_KEYS_NAMED = 8  # keys a failed shard's error lists by name


class Ticket:
    """One write()'s or write_batch()'s handle, and how many of its samples are not committed yet."""

    __slots__ = ("failed", "handle", "paths", "remaining")

    def __init__(self, count: int, staged_apart: bool, callbacks: Callbacks | None = None) -> None:
        # Done-callbacks run on the writer's callback thread, never on the shard thread: one that
        # writes again on a full budget would otherwise wait for the thread that runs it.
        self.handle = WriteFuture(staged_apart=staged_apart, callbacks=callbacks)
        self.remaining = count
        self.paths: list[Path] = []
        self.failed = False


class Job(NamedTuple):
    ticket: Ticket
    keys: list[str]
    rows: list[int]  # the rows of `arrays` to write, one per key
    container: Container
    names: tuple[str, ...]
    arrays: tuple[Array, ...]
    batched: bool
    staged: Staged | None
    nbytes: int


class OpenShard:
    """The open shard: its temporary, where the next member goes, and what it holds so far."""

    def __init__(self, final: str, fd: int, temporary: str) -> None:
        self.final, self.fd, self.temporary = final, fd, temporary
        self.size = 0
        self.crc = 0
        self.keys: set[str] = set()
        self.lines: list[str] = []  # the samples' journal entries, one or a run of them each
        self.count = 0  # samples
        self.pieces: dict[Ticket, int] = {}
        self.pending: list[Buffer] = []
        self.pending_bytes = 0

    def add(self, buffers: list[Buffer], size: int) -> None:
        self.pending.extend(buffers)
        self.pending_bytes += size
        self.size += size

    def drain(self) -> None:
        if self.pending:
            write_buffers(self.fd, self.pending)
            self.pending, self.pending_bytes = [], 0


class Packer:
    """A ShardWriter's shard thread: the open shard, each job packed into it (by the C packer or its
    Python twin), and each shard committed whole, or abandoned with every write that had a sample in it."""

    def __init__(
        self,
        root: str,
        options: ShardOptions,
        fmt: BufferFormat,
        committer: Committer,
        journal: Journal | None,
        stats: ShardStats,
    ) -> None:
        self.root, self.options, self.format = root, options, fmt
        self.committer, self.journal, self.stats = committer, journal, stats
        self.name = f"{root}/{options.prefix}-{secrets.token_hex(4)}"  # shards apart from other writers'
        self.numbers = 0
        self.mtime = int(time.time())
        self.tar_pack = _native_packer() if engine_class(options.engine).name == "native" else None
        self.shard: OpenShard | None = None
        self.committed: set[str] = set()  # keys in committed shards, for is_done()
        self.shards: list[tuple[Path, int]] = []  # committed, with their samples
        self.error: BaseException | None = None  # the first failure

    def pack_job(self, job: Job) -> None:
        """Pack a job into the open shard (and the shards after it, as they fill). A failure fails the
        shard it happened in and every write with a sample there, or the job alone if it had none."""
        try:
            self._pack(job)
            if self.shard is not None:  # the job's bytes all in the file before its memory goes back
                self._drain(self.shard)
        except Exception as exc:  # a failure of the job itself (its staging copy, a refused value)
            if self.shard is not None and job.ticket in self.shard.pieces:
                self._abandon(self.shard, exc)
            else:
                self._fail_tickets([job.ticket], job.keys, exc)

    def _drain(self, shard: OpenShard) -> None:
        try:
            shard.drain()
        except OSError as exc:
            self._abandon(shard, exc)

    def _pack(self, job: Job) -> None:
        arrays = job.arrays
        if job.staged is not None:
            arrays = job.staged.wait()[0].arrays
            if not job.ticket.handle.staged():
                job.ticket.handle.set_staged()
        fmt = self.format
        assert isinstance(fmt, BufferFormat)
        groups = groups_of(
            job.keys[0], job.container, job.names, arrays, fmt, self.options.dict_mode, batched=job.batched
        )
        count = arrays[0].shape[0] if job.batched else 1
        fixed = [group.buffers(fmt, count) for group in groups]
        if (
            self.tar_pack is not None
            and all(plain is not None for plain in fixed)
            and sum(len(p[0]) + sum(stride for _, stride in p[1]) for p in fixed if p) < USTAR_SIZE_LIMIT
        ):  # a member of 8 GiB or more needs a pax size record: the Python packer writes those
            self._pack_natively(job, groups, fixed)  # type: ignore[arg-type]  # none is None
            return
        for key, row in zip(job.keys, job.rows, strict=True):
            members = [
                (f"{key}.{group.suffix}", _sample_buffers(group, plain, fmt, row))
                for group, plain in zip(groups, fixed, strict=True)
            ]
            sizes = [sum(map(len, buffers)) for _, buffers in members]
            try:
                each = sum(footprint(name, size) for (name, _), size in zip(members, sizes, strict=True))
                shard, _ = self._take([key], [each])  # one sample: all its members
            except OSError as exc:
                self._fail_tickets([job.ticket], [key], exc)
                continue
            shard.pieces[job.ticket] = shard.pieces.get(job.ticket, 0) + 1
            try:
                self._append(shard, key, members, sizes)
            except Exception as exc:
                shard.keys.add(key)
                self._abandon(shard, exc)

    def _pack_natively(
        self, job: Job, groups: list[Group], fixed: list[tuple[bytes, list[tuple[memoryview, int]]]]
    ) -> None:
        """Every sample of the job has the same members: runs of them go into the C packer, each run
        as many as the open shard takes."""
        assert self.tar_pack is not None
        keys, rows = job.keys, job.rows
        packed = tuple(
            (g.suffix.encode(), header, parts) for g, (header, parts) in zip(groups, fixed, strict=True)
        )
        sizes = [len(header) + sum(stride for _, stride in parts) for header, parts in fixed]
        longest = max(map(len, keys)) + 1 + max(len(g.suffix) for g in groups)
        each: int | list[int]
        if longest <= 100 and "".join(keys).isascii():  # ustar names: every sample takes as much
            each = sum(footprint("", size) for size in sizes)
        else:
            each = [
                sum(footprint(f"{key}.{g.suffix}", size) for g, size in zip(groups, sizes, strict=True))
                for key in keys
            ]
        i = 0
        while i < len(keys):
            try:
                shard, taken = self._take(keys[i:], each if isinstance(each, int) else each[i:])
            except OSError as exc:
                self._fail_tickets([job.ticket], keys[i:], exc)
                return
            run = slice(i, i + taken)
            i += taken
            shard.pieces[job.ticket] = shard.pieces.get(job.ticket, 0) + taken
            shard.keys.update(keys[run])
            try:
                shard.drain()
                shard.size, shard.crc, text = self.tar_pack(
                    shard.fd, shard.size, shard.crc, self.mtime, keys[run], rows[run], packed
                )
            except Exception as exc:  # the shard may hold part of the run: it is not committed
                self._abandon(shard, exc)
                continue
            shard.lines.append(text.decode())
            shard.count += taken

    def _take(self, keys: list[str], each: int | list[int]) -> tuple[OpenShard, int]:
        """The shard the next of `keys` go into, opened if need be, and how many of them it takes (at
        least one; `each`: the bytes each takes in a shard, or all alike): up to shard_samples, up to
        shard_bytes (a sample larger than that alone), and not a key it holds already."""
        o = self.options
        shard = self.shard
        while True:
            if shard is None:
                shard = self._open_shard()
            room = len(keys)
            if o.shard_samples is not None:
                room = min(room, o.shard_samples - shard.count)
            if shard.keys and not shard.keys.isdisjoint(keys[:room]):
                room = next(i for i, key in enumerate(keys[:room]) if key in shard.keys)
            space = o.shard_bytes - len(END) - shard.size
            if isinstance(each, int):
                taken = min(room, max(space, 0) // each)
            else:
                taken = 0
                while taken < room and each[taken] <= space:
                    space -= each[taken]
                    taken += 1
            if taken == 0 and shard.count == 0 and room:  # larger than a shard: alone in one
                taken = 1
            if taken:
                return shard, taken
            self.end_shard()
            shard = None

    def _open_shard(self) -> OpenShard:
        final = f"{self.name}-{self.numbers:06d}.tar"
        self.numbers += 1
        fd, temporary = self.committer.create(final)
        self.shard = OpenShard(final, fd, temporary)
        return self.shard

    def _append(
        self, shard: OpenShard, key: str, members: list[tuple[str, list[Buffer]]], sizes: list[int]
    ) -> None:
        records = []
        for (name, buffers), size in zip(members, sizes, strict=True):
            header = member_header(name, size, self.mtime)
            member_crc = 0
            for buffer in buffers:
                member_crc = crc32(buffer, member_crc)
            offset = shard.size + len(header)
            padding = bytes(-size % BLOCK)
            crc = (
                crc32_combine(crc32(header, shard.crc), member_crc, size)
                if size
                else crc32(header, shard.crc)
            )
            shard.crc = crc32(padding, crc)
            shard.add([header, *buffers, padding], len(header) + size + len(padding))
            records.append((name[len(key) + 1 :], offset, size, member_crc))
        shard.lines.append(sample_line(key, records))
        shard.count += 1
        shard.keys.add(key)
        if shard.pending_bytes >= _WRITE_AHEAD:
            shard.drain()

    def end_shard(self) -> None:
        """Commit the open shard, if any; a failure fails its writes and is the writer's failure."""
        shard, self.shard = self.shard, None
        if shard is None:
            return
        try:
            shard.add([END], len(END))
            shard.crc = crc32(END, shard.crc)
            shard.drain()
        except Exception as exc:
            self._abandon(shard, exc)
            return
        try:  # finish() closes the shard's descriptor, and removes its temporary on failure
            journal = self.journal
            journaled = None
            if journal is not None:
                relative = os.path.relpath(shard.final, self.root)
                head = (
                    journal.prefix(relative, shard.final, SHARD_FORMAT, []) + b',"nsamples":%d' % shard.count
                )
                full = head + f',"samples":[{",".join(shard.lines)}]'.encode()

                def journaled(renaming: bool, when: float) -> None:
                    line = full if renaming else head
                    journal.write_line(line, shard.size, shard.crc, when, renaming=renaming)

            number = self.committer.order.reserve(shard.final)
            self.committer.finish(shard.final, number, shard.temporary, shard.fd, None, journaled)
        except Exception as exc:
            self._abandon(shard, exc, closed=True)
            return
        path = Path(shard.final)
        self.committed.update(shard.keys)
        self.shards.append((path, shard.count))
        self.stats.add(shards=1, samples=shard.count, bytes=shard.size)
        for ticket, count in shard.pieces.items():
            ticket.paths.append(path)
            ticket.remaining -= count
            if ticket.remaining == 0 and not ticket.failed:
                ticket.handle.set_result(ticket.paths)
        if self.options.upload_queue is not None:
            try:
                self.options.upload_queue.put(path)
            except Exception as exc:  # the shard is committed; its upload is what failed
                self.note_failure(exc, f"tensorsink: while queueing the shard {path} for upload")

    def note_failure(self, exc: BaseException, note: str = "") -> None:
        """Count a failure and keep the first as the writer's, with `note` saying where it happened."""
        if note and hasattr(exc, "add_note"):
            exc.add_note(note)
        self.stats.add(errors=1)
        if self.error is None:
            self.error = exc

    def _abandon(self, shard: OpenShard, exc: BaseException, *, closed: bool = False) -> None:
        """A shard that failed: its temporary removed, each write with a sample in it failed."""
        if self.shard is shard:
            self.shard = None
        if not closed:
            with contextlib.suppress(OSError):
                os.close(shard.fd)
        with contextlib.suppress(OSError):
            os.unlink(shard.temporary)
        self._fail_tickets(list(shard.pieces), sorted(shard.keys), exc, shard.final)

    def _fail_tickets(
        self, tickets: list[Ticket], keys: list[str], exc: BaseException, where: str = ""
    ) -> None:
        shown = ", ".join(map(repr, keys[:_KEYS_NAMED])) + (
            f" and {len(keys) - _KEYS_NAMED} more" if len(keys) > _KEYS_NAMED else ""
        )
        for ticket in tickets:
            if not ticket.failed:
                ticket.failed = True
                ticket.handle.set_exception(exc)
        self.note_failure(exc, f"tensorsink: while writing the shard {where or 'of'} with keys {shown}")


def _native_packer() -> Callable[..., tuple[int, int, bytes]]:
    from ..engine._native import tar_pack

    return tar_pack


def _sample_buffers(
    group: Group, plain: tuple[bytes, list[tuple[memoryview, int]]] | None, fmt: BufferFormat, row: int
) -> list[Buffer]:
    if plain is None:
        return [memoryview(b).cast("B") if not isinstance(b, bytes) else b for b in group.encoded(fmt, row)]
    header, parts = plain
    return [header, *(view[row * stride : (row + 1) * stride] for view, stride in parts)]
