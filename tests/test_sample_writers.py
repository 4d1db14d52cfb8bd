"""The writer registry and the image writers' documented rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tensorsink import SaveFormat
from tensorsink.sample_writers import SampleWriter, WriterRegistry, image_rows, to_uint8, writers


def test_built_ins() -> None:
    assert writers.names() == ["image_2d", "image_3d", "npy", "npz", "safetensors", "tensor", "text"]
    assert writers.get("tensor").save_format is SaveFormat.PYTORCH_PT
    assert writers.get("tensor").suffix == ".pt"
    assert writers.get("image_3d").suffix == ".png"
    assert writers.get("text").suffix == ".txt"


def test_register_get_and_duplicates() -> None:
    registry = WriterRegistry()

    @registry.register("csv")
    def write_csv(path: Path, value: torch.Tensor, *, suffix: str = ".csv") -> None:
        np.savetxt(path, value.numpy(), delimiter=",")

    @registry.register("raw", suffix=".bin")
    def write_raw(path: Path, value: torch.Tensor) -> None:
        path.write_bytes(value.numpy().tobytes())

    assert registry.get("csv") == SampleWriter("csv", ".csv", save=write_csv)
    assert registry.get("raw").suffix == ".bin"
    with pytest.raises(ValueError, match="'csv' is already registered"):
        registry.register("csv")(write_raw)
    with pytest.raises(ValueError, match=r"no writer named 'tsv'; known: csv, raw"):
        registry.get("tsv")
    assert registry.resolve(write_raw).suffix == ""
    with pytest.raises(TypeError, match="registered name, a SampleWriter or a callable"):
        registry.resolve(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "dtype", "pixels"),
    [([0.0, 0.5, 1.0, 2.0, -1.0, float("nan")], np.float32, [0, 128, 255, 255, 0, 0]),
     ([0, 7, 255], np.int64, [0, 7, 255]),
     ([True, False], np.bool_, [255, 0]),
     ([3, 200], np.uint8, [3, 200])],
)  # fmt: skip
def test_pixel_rule(values: list[float], dtype: type, pixels: list[int]) -> None:
    np.testing.assert_array_equal(to_uint8(np.array(values, dtype=dtype)), np.array(pixels, np.uint8))


def test_integers_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.\.255, found -1\.\.300"):
        to_uint8(np.array([-1, 300]))


@pytest.mark.parametrize(
    ("shape", "mode"), [((5, 6), "L"), ((1, 5, 6), "L"), ((3, 5, 6), "RGB"), ((4, 5, 6), "RGBA")]
)
def test_image_2d_channels_first(tmp_path: Path, shape: tuple[int, ...], mode: str) -> None:
    value = torch.randint(0, 256, shape, dtype=torch.uint8)
    path = tmp_path / "image.partial"
    writers.get("image_2d").save(path, value)  # type: ignore[misc]
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", mode, (6, 5))
        stored = np.asarray(image)
    reference = value.numpy()
    reference = (
        reference[0] if shape[0] == 1 else reference if len(shape) == 2 else np.moveaxis(reference, 0, -1)
    )
    np.testing.assert_array_equal(stored, reference)


def test_image_3d_stacks_slices_top_down(tmp_path: Path) -> None:
    volume = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    writers.get("image_3d").save(tmp_path / "v", volume)  # type: ignore[misc]
    with Image.open(tmp_path / "v") as image:
        stored = np.asarray(image)
    assert stored.shape == (6, 4)
    np.testing.assert_array_equal(stored[:3], volume[0].numpy())
    np.testing.assert_array_equal(stored[3:], volume[1].numpy())
    np.testing.assert_array_equal(image_rows(volume.numpy()), stored)


@pytest.mark.parametrize(
    ("name", "shape"), [("image_2d", (2, 5, 6)), ("image_2d", (5,)), ("image_3d", (2, 2, 3, 4))]
)
def test_bad_shapes_are_named(name: str, shape: tuple[int, ...]) -> None:
    check = writers.get(name).check
    assert check is not None
    with pytest.raises(ValueError, match=rf"got shape \({shape[0]},"):
        check(torch.zeros(shape))
