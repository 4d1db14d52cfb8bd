"""kvikio's device-direct path on a real GPU (marker `gpu`; `gds` where GPUDirect Storage works)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.backends import probe
from tests.support import random_tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("kvikio") is None, reason="needs the gpu extra (kvikio)"),
]


def _write(root: Path, save_format: SaveFormat, backend: str, value: object) -> tuple[bytes, dict[str, int]]:
    with AsyncWriter(root, save_format, align=4096, backend=backend, durability="file") as writer:
        (path,) = writer.write("x", value).result()
    return path.read_bytes(), writer.stats().bytes_by_backend


@pytest.mark.parametrize("save_format", [SaveFormat.NUMPY_NPY, SaveFormat.SAFETENSORS])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: random_tensor((1 << 20,), torch.float32, 1).cuda(), id="aligned"),
        pytest.param(lambda: random_tensor((1 << 20,), torch.float32, 2).cuda()[3:], id="unaligned"),
        pytest.param(lambda: random_tensor((512, 640), torch.bfloat16, 3).cuda().t(), id="transposed"),
    ],
)
def test_kvikio_and_pinned_paths_give_byte_identical_files(
    tmp_path: Path, save_format: SaveFormat, make
) -> None:  # type: ignore[no-untyped-def]
    value = make()
    if value.dtype is torch.bfloat16 and save_format is SaveFormat.NUMPY_NPY:
        pytest.skip("numpy has no bfloat16")
    kvikio_bytes, kvikio_backends = _write(tmp_path / "kvikio", save_format, "kvikio", value)
    posix_bytes, posix_backends = _write(tmp_path / "posix", save_format, "posix", value)
    assert kvikio_bytes == posix_bytes
    assert set(kvikio_backends) == {"kvikio"}
    assert set(posix_backends) == {"posix"}


def test_mapping_with_host_and_device_tensors_through_kvikio(tmp_path: Path) -> None:
    values = {
        "gpu": torch.randn(1000, device="cuda"),
        "cpu": torch.arange(7),
        "b": torch.ones(3, device="cuda"),
    }
    kvikio_bytes, _ = _write(tmp_path / "k", SaveFormat.SAFETENSORS, "kvikio", values)
    posix_bytes, _ = _write(tmp_path / "p", SaveFormat.SAFETENSORS, "posix", values)
    assert kvikio_bytes == posix_bytes


@pytest.mark.gds
def test_auto_chooses_kvikio_where_gds_carries_the_bytes(tmp_path: Path) -> None:
    verdict = probe.verdict_for(str(tmp_path))
    if not verdict.gds:
        pytest.skip(f"GPUDirect Storage does not carry bytes here: {verdict.reason}")
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, align=4096) as writer:
        writer.write("x", torch.randn(1 << 20, device="cuda")).result()
    assert writer.stats().bytes_by_backend == {"kvikio": 4 << 20}
