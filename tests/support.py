"""Reading files back with the reference libraries, and comparing arrays bit for bit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import safetensors.torch
import torch

from tensorsink import SaveFormat
from tensorsink.formats import Buffer, BufferFormat, FileEntry, Format
from tensorsink.manifest import JOURNAL_DIR

NUMPY_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
]  # fmt: skip
NON_NUMPY_DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
SAFETENSORS_DTYPES = [d for d in NUMPY_DTYPES if d is not torch.complex128] + NON_NUMPY_DTYPES
PT_DTYPES = [*NUMPY_DTYPES, *NON_NUMPY_DTYPES]

SUPPORTED = {
    SaveFormat.PYTORCH_PT: PT_DTYPES,
    SaveFormat.NUMPY_NPY: NUMPY_DTYPES,
    SaveFormat.NUMPY_NPZ: NUMPY_DTYPES,
    SaveFormat.SAFETENSORS: SAFETENSORS_DTYPES,
}


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype`: every bit pattern, NaNs included, must survive."""
    generator = torch.Generator().manual_seed(seed)
    itemsize = dtype.itemsize
    count = int(np.prod(shape, dtype=np.int64))
    raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype is torch.bool:
        return (raw % 2).to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def fingerprint(array: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, C-order native bytes): equal fingerprints mean bit-identical arrays."""
    if isinstance(array, torch.Tensor):
        plain = array.detach().resolve_conj().resolve_neg()
        flat = plain.clone(memory_format=torch.contiguous_format).reshape(-1)  # unit strides, even at size 1
        return (
            str(array.dtype).removeprefix("torch."),
            tuple(array.shape),
            flat.view(torch.uint8).numpy().tobytes(),
        )
    host = np.ascontiguousarray(array)
    if not host.dtype.isnative:
        host = host.astype(host.dtype.newbyteorder("="))
    return str(host.dtype), tuple(array.shape), host.tobytes()


def read_back(path: Path, save_format: SaveFormat) -> Any:
    """The file's contents as its format's own reader sees them (a mapping for NPZ and safetensors)."""
    if save_format is SaveFormat.PYTORCH_PT:
        return torch.load(path, weights_only=True)
    if save_format is SaveFormat.NUMPY_NPY:
        return np.load(path, allow_pickle=False)
    if save_format is SaveFormat.NUMPY_NPZ:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    return safetensors.torch.load_file(path)


def assert_same(actual: Any, expected: Any) -> None:
    assert fingerprint(actual) == fingerprint(expected)


def wait_for_waiter(condition: threading.Condition) -> None:
    """Until some thread waits on `condition` (polls its waiters; no fixed sleep)."""
    waiters = condition._waiters  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not waiters:
        assert time.monotonic() < deadline, "nothing ever waited"
        time.sleep(0.001)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Until `condition()` holds (polled; no fixed sleep); fails with `what` after 10 s."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


class GatedFormat(BufferFormat):
    """Wraps a format so background writes wait at a gate (as they encode their files, on the writer's
    threads): lets tests hold writes in flight."""

    def __init__(self, inner: Format) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.save_format = inner.save_format  # type: ignore[misc]
        self.holds_collections = inner.holds_collections  # type: ignore[misc]
        self.suffix = inner.suffix  # type: ignore[misc]

    def dtype_tag(self, array: Any) -> object | None:
        return self.inner.dtype_tag(array)

    def check_file(self, path: str) -> None:
        self.inner.check_file(path)

    def held(self) -> None:
        if threading.current_thread().name.startswith("tensorsink"):
            self.entered.release()
            assert self.gate.wait(timeout=30), "gate never opened"

    def encode(self, entry: FileEntry) -> list[Buffer]:
        self.held()
        return cast(BufferFormat, self.inner).encode(entry)

    def encode_with_crc(self, entry: FileEntry) -> tuple[list[Buffer], int | None]:
        self.held()
        return cast(BufferFormat, self.inner).encode_with_crc(entry)


def outputs_under(root: Path) -> list[Path]:
    """Every path under `root` but the manifest's journals (written by default), sorted."""
    return sorted(p for p in root.rglob("*") if JOURNAL_DIR not in p.relative_to(root).parts)


def outputs_in(folder: Path) -> list[Path]:
    """The entries of `folder` but the manifest's journal folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.name != JOURNAL_DIR)
