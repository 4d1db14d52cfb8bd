"""tensorsink.checksum: zlib's CRC-32 values from every code path, and each file's CRC taken once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorsink import AsyncWriter, SaveFormat, checksum
from tensorsink.checksum import _python_combine, crc32, crc32_combine, crc32_of
from tensorsink.formats import format_for
from tensorsink.formats.base import Container, FileEntry
from tensorsink.manifest import JOURNAL_DIR

#: Lengths around each code path's edges: the table (< 64 bytes), the 16-byte lanes (< 1 KiB), the
#: 64-byte registers (256 bytes a step), and their tails.
EDGES = sorted(
    {n + d for n in (0, 16, 64, 128, 256, 512, 1024, 1280, 4096, 65536) for d in (-1, 0, 1, 15, 17)}
)
DATA = np.random.default_rng(7).integers(0, 256, (8 << 20) + 64, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("length", [n for n in EDGES if n >= 0])
def test_matches_zlib_at_the_code_paths_edges(length: int) -> None:
    for offset in (0, 1, 3, 8, 13):  # unaligned starts too
        view = memoryview(DATA)[offset : offset + length]
        for value in (0, 1, 0xFFFFFFFF, 0x12345678):
            assert crc32(view, value) == zlib.crc32(view, value), (length, offset, value)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1 << 20), st.integers(0, 63), st.integers(0, 0xFFFFFFFF))
def test_matches_zlib_on_any_slice(length: int, offset: int, value: int) -> None:
    view = memoryview(DATA)[offset : offset + length]
    assert crc32(view, value) == zlib.crc32(view, value)


def test_large_buffers_and_chained_calls() -> None:
    assert crc32(DATA) == zlib.crc32(DATA)
    pieces = [DATA[:1000], DATA[1000:70000], DATA[70000:]]
    assert crc32_of(pieces) == zlib.crc32(DATA)


def test_the_narrow_path_on_large_buffers_in_a_child() -> None:
    """Where the CPU has AVX-512 the 16-byte-lane code runs only below 1 KiB: run it on large ones too."""
    code = (
        "import os, zlib; from tensorsink import checksum as c; "
        "data = os.urandom((3 << 20) + 77); "
        "assert all(c.crc32(data[o:], 5) == zlib.crc32(data[o:], 5) for o in range(0, 40, 3)); "
        "print(c.IMPLEMENTATION)"
    )
    env = {**os.environ, "TENSORSINK_CRC_NARROW": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "vpclmulqdq" not in out.stdout


def test_imports_nothing_of_ours_but_its_extension() -> None:
    """A leaf: no import circle through the engine, which checksums with it (the package's own
    __init__ left out, to see what checksum alone pulls in)."""
    code = (
        "import importlib.util, sys, types\n"
        "package = types.ModuleType('tensorsink')\n"
        "package.__path__ = list(importlib.util.find_spec('tensorsink').submodule_search_locations)\n"
        "sys.modules['tensorsink'] = package\n"
        "import tensorsink.checksum\n"
        "print(' '.join(sorted(name for name in sys.modules if name.startswith('tensorsink.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) <= {"tensorsink.checksum", "tensorsink._crc"}, out.stdout


def test_refuses_what_zlib_refuses() -> None:
    with pytest.raises(TypeError):
        crc32("text")  # type: ignore[arg-type]
    strided = memoryview(np.arange(10, dtype=np.uint8)[::2])
    with pytest.raises((BufferError, TypeError, ValueError)):
        crc32(strided)


@pytest.mark.parametrize("combine", [crc32_combine, _python_combine], ids=["chosen", "python"])
def test_combine_is_the_crc_of_the_concatenation(combine: object) -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        cut, end = sorted(int(x) for x in rng.integers(0, 100_000, 2))
        a, b = DATA[:cut], DATA[cut:end]
        assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)  # type: ignore[operator]
    assert combine(zlib.crc32(b"abc"), 0, 0) == zlib.crc32(b"abc")  # type: ignore[operator]
    with pytest.raises(ValueError, match="a length from 0"):
        combine(1, 2, -1)  # type: ignore[operator]


def test_implementation_is_named() -> None:
    assert checksum.IMPLEMENTATION == "zlib" or checksum.IMPLEMENTATION.startswith("native (")


@pytest.mark.parametrize("save_format", [SaveFormat.NUMPY_NPZ, SaveFormat.PYTORCH_PT])
def test_zip_formats_know_their_files_crc(save_format: SaveFormat) -> None:
    """The CRC combined from the records' is the CRC of the bytes the format lays out."""
    fmt = format_for(save_format)
    arrays = (torch.arange(1000, dtype=torch.float32), torch.ones((3, 5), dtype=torch.int16), torch.zeros(0))
    entry = FileEntry("/x/f", Container.MAPPING, ("a", "b", "empty"), arrays, 4030)
    buffers, crc = fmt.encode_with_crc(entry)  # type: ignore[attr-defined]
    assert crc == zlib.crc32(b"".join(bytes(b) for b in buffers))


@pytest.mark.usefixtures("each_engine")
@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_records_carry_the_files_crc_in_each_engine(tmp_path: Path, save_format: SaveFormat) -> None:
    """A mapping in one file: several ZIP members (NPZ, .pt), several tensors otherwise."""
    value: object = {"field": torch.randn(64, 64), "mask": torch.arange(300, dtype=torch.int32)}
    if save_format is SaveFormat.NUMPY_NPY:
        value = torch.randn(64, 64)
    with AsyncWriter(tmp_path, save_format, manifest=True, durability="none") as writer:
        for i in range(6):
            writer.write(f"s/{i}", value)
    (journal,) = (tmp_path / JOURNAL_DIR).glob("journal-*.jsonl")
    records = [json.loads(line) for line in journal.read_text().splitlines() if "renaming" not in line]
    assert len(records) == 6
    for record in records:
        assert record["crc32"] == f"{zlib.crc32((tmp_path / record['path']).read_bytes()):08x}"


def test_without_the_extension_zlib_and_the_python_combine_serve(tmp_path: Path) -> None:
    """A build without the C extensions: crc32 is zlib's, and NPZ's file CRCs still come out right."""
    code = f"""
import sys, zlib, json
sys.modules["tensorsink._crc"] = sys.modules["tensorsink.engine._native"] = None  # as if not built
import torch
from tensorsink import AsyncWriter, checksum
assert checksum.crc32 is zlib.crc32 and checksum.IMPLEMENTATION == "zlib", checksum.IMPLEMENTATION
with AsyncWriter({str(tmp_path)!r}, "npz") as writer:
    writer.write("m", {{"a": torch.arange(5000), "b": torch.ones(7)}})
print(writer.stats().engine)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "python"
    (journal,) = (tmp_path / JOURNAL_DIR).glob("journal-*.jsonl")
    (record,) = [json.loads(line) for line in journal.read_text().splitlines() if "renaming" not in line]
    assert record["crc32"] == f"{zlib.crc32((tmp_path / 'm.npz').read_bytes()):08x}"
