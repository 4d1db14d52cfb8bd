"""ShardWriter with CUDA batches on a real GPU (marker `gpu`; skipped without CUDA): one copy per batch
through the pinned pool, ordered after the producer's kernels without the caller waiting for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensorsink.shards import ShardReader, ShardWriter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_batch_made_behind_a_busy_stream_is_written_as_it_was_made(tmp_path: Path) -> None:
    batch = torch.full((512, 256), -1.0, device="cuda")  # the poison, overwritten after the sleep
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # about 0.1 s of a busy stream before the values exist
    batch.copy_(torch.arange(512 * 256, device="cuda", dtype=torch.float32).reshape(512, 256))
    with ShardWriter(tmp_path, save_format="npy", shard_samples=200) as writer:
        handle = writer.write_batch([f"s/{i:04d}" for i in range(512)], batch)
        assert not torch.cuda.current_stream().query(), "the caller waited for the producer's stream"
        handle.result(timeout=60)
        assert handle.staged()
    reader = ShardReader(tmp_path)
    expected = torch.arange(512 * 256, dtype=torch.float32).reshape(512, 256)
    for i in (0, 199, 200, 511):
        assert torch.equal(torch.from_numpy(reader.load(f"s/{i:04d}")["npy"]), expected[i])


def test_copy_true_lets_the_producer_overwrite_a_cuda_batch_at_once(tmp_path: Path) -> None:
    batch = torch.arange(64 * 32, device="cuda", dtype=torch.float32).reshape(64, 32)
    expected = batch.cpu()
    with ShardWriter(tmp_path, save_format="safetensors") as writer:
        handle = writer.write_batch([f"k{i}" for i in range(64)], batch, copy=True)
        assert handle.staged()
        batch.fill_(-1.0)
    loaded = ShardReader(tmp_path).load("k9")["safetensors"]["arr_0"]
    assert torch.equal(loaded, expected[9])
