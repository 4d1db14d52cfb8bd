"""CUDA staging on a real GPU (marker `gpu`; skipped without CUDA)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter, SaveFormat
from tests.support import assert_same, random_tensor, read_back

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
POISON = 0xAB


def _writer(root: Path, save_format: SaveFormat = SaveFormat.SAFETENSORS, **kwargs: object) -> AsyncWriter:
    writer = AsyncWriter(root, save_format, durability="none", **kwargs)  # type: ignore[arg-type]
    writer._stager.pool.buffer.fill_(POISON)  # unwritten staging bytes would show in the files
    return writer


def _stored(path: Path, save_format: SaveFormat) -> object:
    stored = read_back(path, save_format)
    return stored["arr_0"] if isinstance(stored, dict) else stored


def _busy(stream: torch.cuda.Stream, cycles: int = 1_000_000_000) -> None:
    """Keep `stream` busy for a while (about half a second on an H100) before what is queued next."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)


def _produce(x: torch.Tensor) -> torch.Tensor:
    for _ in range(4):
        x = torch.tanh(x @ x)
    return x[:2048].float() * 3


def test_producer_still_computing_gives_final_values_and_write_does_not_wait(tmp_path: Path) -> None:
    producer = torch.cuda.Stream()
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    _produce(x)  # load the kernels and cuBLAS, and fill the allocator's cache, before timing matters
    torch.cuda.synchronize()
    with _writer(tmp_path, pinned_pool_bytes=256 << 20) as writer:
        with torch.cuda.stream(producer):
            _busy(producer)
            output = _produce(x)
            assert not producer.query(), "the producer finished before write(): the test proves nothing"
            future = writer.write("final", output)
            assert not producer.query(), "write() waited for the producer stream"
        (path,) = future.result()
    torch.cuda.synchronize()
    assert_same(_stored(path, SaveFormat.SAFETENSORS), output.cpu())


@pytest.mark.parametrize("save_format", list(SaveFormat))
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8]
)
def test_random_data_every_format(tmp_path: Path, save_format: SaveFormat, dtype: torch.dtype) -> None:
    if dtype is torch.bfloat16 and save_format in (SaveFormat.NUMPY_NPY, SaveFormat.NUMPY_NPZ):
        pytest.skip("numpy has no bfloat16")
    host = random_tensor((257, 33), dtype, seed=3)
    prepared = host.cuda()
    torch.cuda.synchronize()
    producer = torch.cuda.Stream()
    with _writer(tmp_path, save_format) as writer, torch.cuda.stream(producer):
        _busy(producer, 200_000_000)
        source = prepared.clone()[:, 1:]  # written by the producer stream, after its busy wait
        (path,) = writer.write("r", source).result()
    assert_same(_stored(path, save_format), host[:, 1:])


def test_mapping_mixes_device_and_host_tensors(tmp_path: Path) -> None:
    values = {
        "gpu": torch.randn(100, device="cuda"),
        "cpu": torch.arange(10),
        "half": torch.ones(3, device="cuda").half(),
    }
    with _writer(tmp_path) as writer:
        (path,) = writer.write("m", values).result()
    stored = read_back(path, SaveFormat.SAFETENSORS)
    for name, tensor in values.items():
        assert_same(stored[name], tensor.cpu())


def test_tensor_larger_than_the_pool(tmp_path: Path) -> None:
    source = torch.randn(5 << 20, device="cuda")  # 20 MiB through a 4 MiB pool
    with _writer(tmp_path, SaveFormat.NUMPY_NPY, pinned_pool_bytes=4 << 20) as writer:
        (path,) = writer.write("big", source).result()
    assert_same(_stored(path, SaveFormat.NUMPY_NPY), source.cpu())
    assert writer._stager.pool.in_use == 0


def test_copy_true_lets_a_static_buffer_be_overwritten_at_once(tmp_path: Path) -> None:
    static = torch.zeros(1 << 20, device="cuda")
    with _writer(tmp_path) as writer:
        futures = []
        for step in range(8):
            static.fill_(float(step))  # as a CUDA-graph replay would, on the same stream
            futures.append(writer.write(f"s{step}", static, copy=True))
        paths = [f.result()[0] for f in futures]
    for step, path in enumerate(paths):
        assert _stored(path, SaveFormat.SAFETENSORS).eq(float(step)).all()  # type: ignore[union-attr]


def test_several_writer_threads_each_on_its_own_stream(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with _writer(tmp_path, pinned_pool_bytes=32 << 20) as writer:

        def produce(thread: int) -> None:
            try:
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    for i in range(20):
                        value = torch.full((1 << 18,), float(thread * 100 + i), device="cuda") * 1
                        writer.write(f"t{thread}/{i}", value)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for thread in range(4):
        for i in range(20):
            stored = _stored(tmp_path / f"t{thread}/{i}.safetensors", SaveFormat.SAFETENSORS)
            assert stored.eq(float(thread * 100 + i)).all()  # type: ignore[union-attr]


def test_cuda_array_interface_object_is_ordered_after_its_stream(tmp_path: Path) -> None:
    producer = torch.cuda.Stream()
    (torch.arange(16, device="cuda", dtype=torch.float32) * 2).sum().item()  # load the kernels
    with _writer(tmp_path) as writer:
        with torch.cuda.stream(producer):
            _busy(producer)
            source = torch.arange(1 << 20, device="cuda", dtype=torch.float32) * 2

        class InterfaceOnly:
            @property
            def __cuda_array_interface__(self) -> dict[str, object]:
                interface = dict(source.__cuda_array_interface__)
                interface["stream"] = producer.cuda_stream
                return interface

        assert not producer.query(), "the producer finished before write(): the test proves nothing"
        (path,) = writer.write("cai", InterfaceOnly()).result()
    torch.cuda.synchronize()
    assert_same(_stored(path, SaveFormat.SAFETENSORS), source.cpu())


def test_cupy_array_on_its_current_stream(tmp_path: Path) -> None:
    cupy = pytest.importorskip("cupy")
    (cupy.arange(16, dtype=cupy.float32) * 3).sum().item()  # load the kernels
    with _writer(tmp_path) as writer:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            busy = torch.cuda.ExternalStream(stream.ptr)  # the busy wait runs on cupy's stream
            _busy(busy)
            array = cupy.arange(1 << 20, dtype=cupy.float32) * 3
            assert not busy.query(), "the producer finished before write(): the test proves nothing"
            (path,) = writer.write("cupy", array).result()
        stream.synchronize()
    assert_same(_stored(path, SaveFormat.SAFETENSORS), torch.from_numpy(cupy.asnumpy(array)))
