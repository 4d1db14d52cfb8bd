"""The writer's settings: the enums users pass and the frozen options with every default in one place."""

from __future__ import annotations

import enum
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Backend",
    "DictMode",
    "Durability",
    "SaveFormat",
    "ShardOptions",
    "WriterOptions",
    "check_shard_list",
]


class _Choice(str, enum.Enum):
    """An enum whose members may also be given as their string values."""

    @classmethod
    def coerce(cls: type[_E], value: object, *, argument: str) -> _E:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(f"{cls.__name__}.{m.name} ({m.value!r})" for m in cls)
        raise ValueError(f"{argument}={value!r} is not valid; use one of {allowed}")

    def __str__(self) -> str:
        return str(self.value)


_E = TypeVar("_E", bound=_Choice)


class SaveFormat(_Choice):
    """The file format; the value is the extension that is appended to every key."""

    PYTORCH_PT = "pt"
    NUMPY_NPY = "npy"
    NUMPY_NPZ = "npz"
    SAFETENSORS = "safetensors"


class DictMode(_Choice):
    """How a mapping or sequence is stored: in one file (SINGLE) or one file per entry (SPLIT)."""

    SINGLE = "single"
    SPLIT = "split"


class Durability(_Choice):
    """What must reach stable storage before a write counts as committed.

    NONE survives a killed process, not a power cut; FILE fsyncs the file before the rename;
    FULL also fsyncs the directory after the rename, so the new name itself is durable.
    """

    NONE = "none"
    FILE = "file"
    FULL = "full"


class Backend(_Choice):
    """How the bytes reach the file.

    POSIX: from host memory with os.writev in the writer's threads (CUDA tensors staged through the
    pinned pool). KVIKIO: kvikio's CuFile writes CUDA tensors from device memory (NPY and SAFETENSORS;
    PYTORCH_PT and NPZ still go through the pool). AUTO: KVIKIO where a probe finds that GPUDirect
    Storage really carries the bytes into the output directory, else POSIX.
    """

    AUTO = "auto"
    POSIX = "posix"
    KVIKIO = "kvikio"


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; use an int >= {minimum}")
    return value


#: np.load refuses .npy headers longer than 10,000 bytes unless pickles are allowed.
NPY_MAX_ALIGN = 8192


def _check_align(align: object, save_format: SaveFormat) -> None:
    if isinstance(align, bool) or not isinstance(align, int) or align < 64 or align & (align - 1):
        raise ValueError(f"align={align!r} is not valid; use a power of two >= 64, e.g. 4096, or None")
    if save_format not in (SaveFormat.NUMPY_NPY, SaveFormat.SAFETENSORS):
        raise ValueError(
            f"align={align} applies to SaveFormat.NUMPY_NPY and SaveFormat.SAFETENSORS, "
            f"not {save_format.name}; leave it None"
        )
    if save_format is SaveFormat.NUMPY_NPY and align > NPY_MAX_ALIGN:
        raise ValueError(
            f"align={align} makes .npy headers np.load refuses; use at most {NPY_MAX_ALIGN} with NUMPY_NPY"
        )


def _coerce_common(options: WriterOptions | ShardOptions) -> None:
    """The settings both writers take, as their enums (given as strings too) and a Path."""
    set_ = object.__setattr__
    set_(options, "out_root", Path(options.out_root))
    set_(options, "save_format", SaveFormat.coerce(options.save_format, argument="save_format"))
    set_(options, "dict_mode", DictMode.coerce(options.dict_mode, argument="dict_mode"))
    set_(options, "durability", Durability.coerce(options.durability, argument="durability"))


@dataclass(frozen=True)
class WriterOptions:
    """Validated settings of an AsyncWriter; constructing one raises ValueError naming any bad value."""

    out_root: Path
    save_format: SaveFormat = SaveFormat.PYTORCH_PT
    dict_mode: DictMode = DictMode.SINGLE
    workers: int = 4
    max_inflight: int = 256
    small_sync_bytes: int = 64_000
    upload_queue: queue.Queue[Path] | None = None
    max_inflight_bytes: int = 1 << 30
    durability: Durability = Durability.FILE
    #: Pad NPY and safetensors headers so the payload starts at a multiple of this (e.g. 4096, for
    #: O_DIRECT and GPUDirect Storage readers); None keeps each format's own (64 and 8 bytes).
    align: int | None = None
    backend: Backend = Backend.AUTO
    #: kvikio's threads per write, the size of each of their pieces, and whether it may use O_DIRECT.
    kvikio_threads: int = 4
    kvikio_task_size: int = 4 << 20
    kvikio_direct_io: bool = True
    #: Page-locked host memory for staging device tensors, allocated on the first one; None: 1 GiB,
    #: or an eighth of the host's memory where that is less.
    pinned_pool_bytes: int | None = None
    #: Journal every committed file (path, size, CRC-32, arrays) under <root>/.tensorsink/.
    manifest: bool = True
    #: Load the journals at construction and skip writes whose files they record, still whole.
    skip_existing: bool = False
    #: Write through symlinked folders under the root (by default a symlink on a key's way is refused,
    #: so that no key can create or replace files outside the root).
    follow_symlinks: bool = False
    #: The write engine: "native" (C threads, off the interpreter), "python" (its pure-Python twin), or
    #: "auto": native where it was built at install.
    engine: str = "auto"
    #: Log one INFO line of progress (stats()) to the "tensorsink" logger at most this often, in
    #: seconds, while files are committed, and one at close(); None: no progress lines.
    progress_seconds: float | None = None

    def __post_init__(self) -> None:
        _coerce_common(self)
        object.__setattr__(self, "backend", Backend.coerce(self.backend, argument="backend"))
        _positive_int("kvikio_threads", self.kvikio_threads, 1)
        _positive_int("kvikio_task_size", self.kvikio_task_size, 4096)
        if self.kvikio_task_size % 4096:
            raise ValueError(
                f"kvikio_task_size={self.kvikio_task_size} must be a multiple of 4096, so that no two "
                "of kvikio's tasks share a block of the file"
            )
        _positive_int("workers", self.workers, 1)
        _positive_int("max_inflight", self.max_inflight, 1)
        _positive_int("small_sync_bytes", self.small_sync_bytes, 0)
        _positive_int("max_inflight_bytes", self.max_inflight_bytes, 1)
        if self.align is not None:
            _check_align(self.align, self.save_format)
        if self.pinned_pool_bytes is not None:
            _positive_int("pinned_pool_bytes", self.pinned_pool_bytes, 4096)
        if self.engine not in ("auto", "native", "python"):
            raise ValueError(f"engine={self.engine!r} is not valid; use 'auto', 'native' or 'python'")
        seconds = self.progress_seconds
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0
        ):
            raise ValueError(
                f"progress_seconds={seconds!r} is not valid; use a number of seconds > 0, or None"
            )
        if self.skip_existing and not self.manifest:
            raise ValueError("skip_existing=True needs manifest=True: skipping relies on the journals")
        if self.upload_queue is not None and not callable(getattr(self.upload_queue, "put", None)):
            raise TypeError(f"upload_queue={self.upload_queue!r} has no put(); pass a queue.Queue or None")

    def replace(self, **changes: Any) -> WriterOptions:
        """A copy with some settings changed, validated again."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields.update(changes)
        return WriterOptions(**fields)


def check_shard_list(name: object, *, argument: str) -> None:
    """ValueError unless `name` names a shard list in the root itself: wids resolves the list's urls
    (relative to the root) from the list's own folder."""
    if not isinstance(name, str) or not name.endswith(".json") or "/" in name:
        raise ValueError(
            f"{argument}={name!r} is not valid; use a file name ending in .json, in the root "
            "(wids reads the urls relative to the list)" + (", or None" if argument == "shard_list" else "")
        )


@dataclass(frozen=True)
class ShardOptions:
    """Validated settings of a ShardWriter; those it shares with AsyncWriter mean the same there."""

    out_root: Path
    save_format: SaveFormat = SaveFormat.PYTORCH_PT
    dict_mode: DictMode = DictMode.SINGLE
    #: A shard is committed once it holds this many bytes (a sample that would take it past them starts
    #: the next one; a sample larger than this alone is written in a shard of its own) ...
    shard_bytes: int = 1 << 30
    #: ... or this many samples (None: no limit by count).
    shard_samples: int | None = None
    durability: Durability = Durability.FILE
    manifest: bool = True
    skip_existing: bool = False
    max_inflight_bytes: int = 1 << 30
    pinned_pool_bytes: int | None = None
    upload_queue: queue.Queue[Path] | None = None
    follow_symlinks: bool = False
    #: Shards are named `<prefix>-<writer>-<number>.tar` under the root; the prefix may hold folders.
    prefix: str = "shard"
    #: The shard list in wids' format that close() writes under the root, of every shard committed
    #: there by every writer; None: none.
    shard_list: str | None = "shards.json"
    #: Who packs samples into the shard: "native" (C, without the GIL), "python", or "auto" (as
    #: AsyncWriter's engine).
    engine: str = "auto"

    def __post_init__(self) -> None:
        _coerce_common(self)
        _positive_int("shard_bytes", self.shard_bytes, 1)
        if self.shard_samples is not None:
            _positive_int("shard_samples", self.shard_samples, 1)
        _positive_int("max_inflight_bytes", self.max_inflight_bytes, 1)
        if self.pinned_pool_bytes is not None:
            _positive_int("pinned_pool_bytes", self.pinned_pool_bytes, 4096)
        if self.skip_existing and not self.manifest:
            raise ValueError("skip_existing=True needs manifest=True: skipping relies on the journals")
        if self.upload_queue is not None and not callable(getattr(self.upload_queue, "put", None)):
            raise TypeError(f"upload_queue={self.upload_queue!r} has no put(); pass a queue.Queue or None")
        if not isinstance(self.prefix, str) or not self.prefix or "." in self.prefix.rpartition("/")[2]:
            raise ValueError(
                f"prefix={self.prefix!r} is not valid; use a name without '.' in its last part, "
                "such as 'shard' or 'train/shard'"
            )
        if self.shard_list is not None:
            check_shard_list(self.shard_list, argument="shard_list")
