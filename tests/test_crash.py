"""A writer killed with SIGKILL at random moments never leaves a torn file under a final name."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tensorsink import SaveFormat, sweep
from tensorsink.commit import is_temporary
from tests.support import assert_same, outputs_under, read_back

# Writes sample i of a deterministic stream forever, mixing synchronous and background writes.
CHILD = textwrap.dedent(
    """
    import sys, torch
    from tensorsink import AsyncWriter
    root, save_format, durability = sys.argv[1:4]

    def sample(i):
        g = torch.Generator().manual_seed(i)
        n = [16, 4_096, 60_000, 400_000, 2_000_000][i % 5]
        return {"x": torch.randn(n, generator=g), "i": torch.tensor([i])}

    with AsyncWriter(root, save_format, workers=4, durability=durability) as writer:
        i = 0
        while True:
            writer.write(f"s/{i:06d}", sample(i) if save_format != "npy" else sample(i)["x"])
            if i == 20:
                writer.flush()
                print("ready", flush=True)
            i += 1
    """
)


def _expected(i: int, save_format: SaveFormat) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    n = [16, 4_096, 60_000, 400_000, 2_000_000][i % 5]
    sample = {"x": torch.randn(n, generator=g), "i": torch.tensor([i])}
    return {"x": sample["x"]} if save_format is SaveFormat.NUMPY_NPY else sample


@pytest.mark.slow
@pytest.mark.usefixtures("each_engine")
@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_sigkill_at_random_moments_leaves_only_whole_files(tmp_path: Path, save_format: SaveFormat) -> None:
    rng = random.Random(f"crash-{save_format.value}")
    durability = "none" if save_format is not SaveFormat.PYTORCH_PT else "file"
    checked = 0
    for _round in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), save_format.value, durability],
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                assert child.stdout is not None
                assert child.stdout.readline().strip() == "ready"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=rng.uniform(0.05, 0.6))  # the moment of the kill
                child.send_signal(signal.SIGKILL)
            finally:
                child.kill()
        assert child.returncode == -signal.SIGKILL

        for path in sorted((tmp_path / "s").iterdir()):
            if is_temporary(path.name):
                continue
            i = int(path.name.split(".")[0])
            stored = read_back(path, save_format)
            expected = _expected(i, save_format)
            if save_format is SaveFormat.NUMPY_NPY:
                assert_same(stored, expected["x"])
            else:
                assert sorted(stored) == sorted(expected)
                for name, tensor in expected.items():
                    assert_same(stored[name], tensor)
            checked += 1
        finals = {p for p in (tmp_path / "s").iterdir() if not is_temporary(p.name)}
        removed = sweep(tmp_path)
        assert all(is_temporary(p.name) for p in removed)
        assert set((tmp_path / "s").iterdir()) == finals
    assert checked >= 60


def test_killed_child_leaves_temporaries_for_sweep(tmp_path: Path) -> None:
    """A kill inside the encoder, made deterministic, leaves a temporary and never a final name."""
    script = textwrap.dedent(
        """
        import os, signal, sys, torch
        from tensorsink import AsyncWriter
        from tensorsink.engine import python
        def die(*args): os.kill(os.getpid(), signal.SIGKILL)
        python.write_buffers = die  # killed with the temporary made, before its bytes are in
        with AsyncWriter(sys.argv[1], "npy", engine="python") as writer:
            writer.write("dead", torch.zeros(100_000))
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert result.returncode == -signal.SIGKILL
    left = outputs_under(tmp_path)  # and the journal, with no record
    assert len(left) == 1
    assert is_temporary(left[0].name)
    assert sweep(tmp_path) == left
    assert outputs_under(tmp_path) == []
    assert torch.zeros(1).sum() == 0
