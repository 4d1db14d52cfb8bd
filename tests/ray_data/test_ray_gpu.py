"""CommittedBatchWriter with CUDA outputs: in the process, and from a Ray actor holding a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
from safetensors.numpy import load_file  # noqa: E402

from tensorsink.manifest import verify  # noqa: E402
from tensorsink.ray import CommittedBatchWriter  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\.data\.context"),
]


def _outputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """CUDA outputs that the host could not guess: computed on the device from each id."""
    ids = ids.cuda()
    return {"y": ids[:, None].float() * torch.arange(1, 513, device="cuda"), "idx": ids}


def _check_files(rows: dict[str, np.ndarray] | list[dict[str, object]]) -> int:
    if isinstance(rows, dict):
        rows = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    items = rows
    for row in items:
        path = str(row["path"])
        assert Path(path).stat().st_size == row["bytes"]
        i = int(str(row["key"]).rsplit("/", 1)[-1])
        loaded = load_file(path)
        np.testing.assert_array_equal(loaded["y"], np.arange(1, 513, dtype=np.float32) * i)
        assert int(loaded["idx"]) == i
    return len(items)


def test_cuda_outputs_are_committed_before_write_returns(tmp_path: Path) -> None:
    writer = CommittedBatchWriter(tmp_path, durability="none")
    try:
        for start in range(0, 64, 16):
            ids = torch.arange(start, start + 16)
            rows = writer.write([f"p/{int(i)}" for i in ids], _outputs(ids))
            assert _check_files(rows) == 16  # committed already, before close()
        assert writer.writer.stats().files == 64
    finally:
        writer.close()
    report = verify(tmp_path)
    assert report.ok, report


class _GpuPredict:
    def __init__(self, root: str) -> None:
        self.writer = CommittedBatchWriter(root, durability="none")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(batch["id"])
        return self.writer.write([f"p/{int(i)}" for i in ids], _outputs(ids))


@pytest.mark.usefixtures("ray_session")
def test_gpu_actor_writes_through_the_helper(tmp_path: Path) -> None:
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    ds = ray.data.range(48, override_num_blocks=3).map_batches(
        _GpuPredict,
        fn_constructor_args=(str(tmp_path),),
        batch_size=16,
        num_gpus=1,
        compute=ray.data.ActorPoolStrategy(
            size=1, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
        ),
    )
    assert _check_files(ds.take_all()) == 48
    report = verify(tmp_path)
    assert report.ok, report
