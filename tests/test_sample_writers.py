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
    assert writers.names() == ["image_2d", "image_3d", "npy", "npz", "pt", "safetensors", "tensor", "text"]
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
    with pytest.raises(TypeError, match="registered name, a SaveFormat, a SampleWriter or a callable"):
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


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_every_save_format_is_a_writer_by_its_name(save_format: SaveFormat) -> None:
    for given in (save_format.value, save_format):
        writer = writers.resolve(given)
        assert writer.save_format is save_format
        assert writer.suffix == "." + save_format.value


def test_text_writes_every_value(tmp_path: Path) -> None:
    text = writers.get("text")
    assert text.save is not None
    text.save(tmp_path / "a", torch.arange(5000))
    stored = (tmp_path / "a").read_text(encoding="utf-8")
    assert "..." not in stored
    assert stored.splitlines() == [str(i) for i in range(5000)]
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "a", dtype=np.int64), np.arange(5000))

    floats = torch.tensor([[0.1, 1 / 3, -2.5], [1e20, float("nan"), float("-inf")]])
    text.save(tmp_path / "b", floats)
    assert (tmp_path / "b").read_text() == "0.1 0.33333334 -2.5\n1e+20 nan -inf\n"
    back = np.loadtxt(tmp_path / "b", dtype=np.float32)
    np.testing.assert_array_equal(back, floats.numpy())  # bit for bit, NaN where NaN

    text.save(tmp_path / "c", "case.001")
    assert (tmp_path / "c").read_text() == "case.001"
    text.save(tmp_path / "d", torch.tensor(2.5, dtype=torch.bfloat16))
    assert (tmp_path / "d").read_text() == "2.5\n"
    text.save(tmp_path / "e", torch.tensor([True, False]))
    assert (tmp_path / "e").read_text() == "True\nFalse\n"


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [(torch.zeros(2, 3, 4), ValueError, r"at most 2 dimensions .* got shape \(2, 3, 4\).* writer='npy'"),
     ({"a": 1}, TypeError, "the text writer takes a str, a number, .* got dict"),
     (np.array(["x"]), TypeError, "got ndarray of dtype <U1"),
     ([[1], [2, 3]], ValueError, "lists of rows of one length")],
)  # fmt: skip
def test_text_refuses_what_it_cannot_write_in_full(
    tmp_path: Path, value: object, error: type[Exception], message: str
) -> None:
    text = writers.get("text")
    assert text.check is not None
    assert text.save is not None
    with pytest.raises(error, match=message):
        text.check(value)  # on the caller's thread, before the sample is queued
    with pytest.raises(error, match=message):
        text.save(tmp_path / "x", value)
    assert not (tmp_path / "x").exists()
