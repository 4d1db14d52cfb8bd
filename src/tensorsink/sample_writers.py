"""Named ways to write one sample: the writer's own formats, PNG images, text; and a registry of them.

Format writers (each SaveFormat by its name: pt, npy, npz, safetensors; and tensor, the same as pt) go
through the AsyncWriter's own formats, with CUDA staging and zero-copy headers. Function writers are
called as `save(path, value)` in the writer's pool with the same atomic commit; `path` has the final
file's own name, in a private folder beside it, so `np.save(path, a)`, Pillow's `image.save(path)` and
`path.with_suffix(suffix)` write to it as they would to the final name. A writer is itself such a
function: `writers.get("image_2d")(path, value)` writes one file, and can be called or wrapped.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .formats import format_for
from .options import SaveFormat
from .plan import entry_at, validate_suffix

__all__ = ["SampleWriter", "WriterRegistry", "image_rows", "text_of", "writers"]

Save = Callable[[Path, Any], None]


@dataclass(frozen=True)
class SampleWriter:
    """How one sample becomes a file: one of the writer's formats, or a `save(path, value)` function."""

    name: str
    suffix: str
    save_format: SaveFormat | None = None
    save: Save | None = None
    #: Called on the caller's thread with each sample before it is queued, to refuse bad input there.
    check: Callable[[Any], None] | None = None
    #: Whether an empty file is a result (text of ""); else it means `save` wrote elsewhere, and fails.
    allow_empty: bool = False

    def __post_init__(self) -> None:
        if (self.save_format is None) == (self.save is None):
            raise ValueError(f"writer {self.name!r} needs exactly one of save_format and save")
        validate_suffix(self.suffix)

    def __call__(self, path: str | os.PathLike[str], value: Any) -> None:
        """Write `value` to `path` as this writer does (a format writer in its format, whole)."""
        if self.save is not None:
            self.save(Path(path), value)
            return
        assert self.save_format is not None  # one of the two, checked at construction
        fmt = format_for(self.save_format)
        entry = entry_at(os.fspath(path), value, fmt)
        entry = entry._replace(arrays=tuple(_on_host(a) for a in entry.arrays))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fmt.write(fd, entry)
        finally:
            os.close(fd)


class WriterRegistry:
    """Sample writers by name. `register(name)` decorates a `save(path, value)` function."""

    def __init__(self) -> None:
        self._writers: dict[str, SampleWriter] = {}

    def register(
        self,
        name: str,
        *,
        suffix: str | None = None,
        check: Callable[[Any], None] | None = None,
        allow_empty: bool = False,
    ) -> Callable[[Save], Save]:
        """Register the decorated function under `name`; a duplicate name is a ValueError.

        The file's suffix is `suffix`, else the function's own `suffix=` keyword default, else none.
        With `allow_empty`, an empty file is a result; else it fails the write (see SampleWriter).
        """

        def decorate(save: Save) -> Save:
            self.add(
                SampleWriter(name, _suffix_of(save, suffix), save=save, check=check, allow_empty=allow_empty)
            )
            return save

        return decorate

    def add(self, writer: SampleWriter) -> None:
        if writer.name in self._writers:
            raise ValueError(f"a writer named {writer.name!r} is already registered; choose another name")
        self._writers[writer.name] = writer

    def get(self, name: str) -> SampleWriter:
        """The writer registered as `name`, a callable `writer(path, value)` with its `suffix`; a
        ValueError lists the known names otherwise."""
        try:
            return self._writers[name]
        except KeyError:
            raise ValueError(f"no writer named {name!r}; known: {', '.join(sorted(self._writers))}") from None

    def resolve(self, writer: str | SaveFormat | Save | SampleWriter) -> SampleWriter:
        """A name, a SaveFormat, a SampleWriter, or a bare `save(path, value)` function (its suffix from
        its `suffix=` keyword default)."""
        if isinstance(writer, SampleWriter):
            return writer
        if isinstance(writer, SaveFormat):
            return self.get(writer.value)
        if isinstance(writer, str):
            return self.get(writer)
        if callable(writer):
            return SampleWriter(getattr(writer, "__name__", "custom"), _suffix_of(writer, None), save=writer)
        raise TypeError(
            f"writer must be a registered name, a SaveFormat, a SampleWriter or a callable, not {writer!r}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._writers

    def names(self) -> list[str]:
        return sorted(self._writers)


def _suffix_of(save: Save, given: str | None) -> str:
    if given is not None:
        return given
    try:
        default = inspect.signature(save).parameters["suffix"].default
    except (KeyError, TypeError, ValueError):
        return ""
    return default if isinstance(default, str) else ""


# Images. The rule, for both image writers: channels come first, as torch lays them out; uint8 is
# written as is, bool as 0/255, other integers must lie in 0..255, floats are taken as 0..1 (NaN as
# 0), clipped to it and scaled by 255 with rounding.

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _on_host(array: Any) -> Any:
    """A torch tensor in host memory (a format writer called directly takes CUDA tensors too)."""
    return array.cpu() if isinstance(array, torch.Tensor) else array


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        host: np.ndarray = value.numpy()
        return host
    return np.asarray(value)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values by the rule above; a ValueError names integers outside 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"integer image values must lie in 0..255, found {array.min()}..{array.max()}; "
                "scale them, or pass floats in 0..1"
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        scaled = np.clip(np.nan_to_num(array.astype(np.float32), nan=0.0), 0.0, 1.0) * 255.0
        pixels: np.ndarray = np.rint(scaled).astype(np.uint8)
        return pixels
    raise ValueError(f"an image cannot be made from dtype {array.dtype}")


def _check_image_2d(value: Any) -> None:
    shape = tuple(value.shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] in _MODES)):
        raise ValueError(
            f"image_2d takes (H, W) or (C, H, W) with C in 1, 3, 4 (channels first); got shape {shape}"
        )


def _check_image_3d(value: Any) -> None:
    shape = tuple(value.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)):
        raise ValueError(f"image_3d takes a volume (D, H, W) or (1, D, H, W); got shape {shape}")


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image  # the lightning extra; imported only when an image is written

    # uint8 (H, W) is gray, (H, W, 3) RGB, (H, W, 4) RGBA: Pillow infers the mode from the shape.
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG")


def write_image_2d(path: Path, value: Any, *, suffix: str = ".png") -> None:
    """A 2-D image as PNG: (H, W) gray, (1|3|4, H, W) gray, RGB or RGBA."""
    _check_image_2d(value)
    pixels = to_uint8(_as_numpy(value))
    if pixels.ndim == 3:
        pixels = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    _save_png(path, pixels)


def image_rows(volume: np.ndarray) -> np.ndarray:
    """A (D, H, W) volume as one (D*H, W) image: its slices stacked vertically, first on top."""
    return volume.reshape(volume.shape[0] * volume.shape[1], volume.shape[2])


def write_image_3d(path: Path, value: Any, *, suffix: str = ".png") -> None:
    """A 3-D volume (D, H, W) or (1, D, H, W) as one gray PNG of its slices stacked vertically."""
    _check_image_3d(value)
    volume = to_uint8(_as_numpy(value))
    _save_png(path, image_rows(volume.reshape(volume.shape[-3:])))


# Text. A str is written as it is; a number, tensor or array with every value in full (never torch's or
# numpy's summary with "..."), one value per line for 1-D, one row per line with its values separated by
# spaces for 2-D, as np.savetxt lays them out and np.loadtxt reads them back. Floats are written in the
# shortest form that reads back to the same value of their dtype.

_TEXT_MAX_DIMS = 2


def _text_array(value: Any) -> np.ndarray:
    """The values of a number, tensor, array or list of numbers; a TypeError names what is not."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()  # exact: every bfloat16 is a float32
        array: np.ndarray = value.numpy()
    elif isinstance(value, (np.ndarray, np.generic, int, float, complex, list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError as exc:  # a ragged list
            raise ValueError(f"the text writer takes lists of rows of one length: {exc}") from None
    else:
        array = np.asarray(None)  # refused just below, naming the type
    if array.dtype.kind not in "biufc":
        raise TypeError(
            "the text writer takes a str, a number, or a tensor, array or list of numbers of at most "
            f"{_TEXT_MAX_DIMS} dimensions; got {type(value).__name__}"
            + (f" of dtype {array.dtype}" if array.dtype.kind != "O" else "")
        )
    return array


def _check_text(value: Any) -> None:
    """Refuse, before anything is queued, what the text writer cannot write in full."""
    if isinstance(value, str):
        return
    if isinstance(value, torch.Tensor) or (isinstance(value, np.ndarray) and value.dtype.kind in "biufc"):
        shape = tuple(value.shape)  # a device tensor's shape, without copying it
    else:
        shape = _text_array(value).shape
    if len(shape) > _TEXT_MAX_DIMS:
        raise ValueError(
            f"the text writer writes at most {_TEXT_MAX_DIMS} dimensions (one row per line); got shape "
            f"{shape}: reshape each sample, or use writer='npy' for arrays of any shape"
        )


def text_of(value: Any) -> str:
    """The text the `text` writer stores for `value` (see the rule above)."""
    if isinstance(value, str):
        return value
    _check_text(value)
    array = _text_array(value)
    if array.ndim == 0:
        return f"{array.astype(str)}\n"
    if array.ndim == 1:
        return "".join(f"{v}\n" for v in array.astype(str))
    return "".join(" ".join(row) + "\n" for row in array.astype(str))


def write_text(path: Path, value: Any, *, suffix: str = ".txt") -> None:
    """A str as it is, or every value of a number, tensor or array (up to 2-D) as text, UTF-8."""
    path.write_text(text_of(value), encoding="utf-8")


def _default_registry() -> WriterRegistry:
    registry = WriterRegistry()
    # Every SaveFormat under its own name ("pt", "npy", "npz", "safetensors"), and "tensor" for .pt too.
    for name, save_format in [("tensor", SaveFormat.PYTORCH_PT), *((f.value, f) for f in SaveFormat)]:
        registry.add(SampleWriter(name, "." + save_format.value, save_format=save_format))
    registry.register("image_2d", check=_check_image_2d)(write_image_2d)
    registry.register("image_3d", check=_check_image_3d)(write_image_3d)
    registry.register("text", check=_check_text, allow_empty=True)(write_text)
    return registry


#: The registry PredictionWriter looks names up in; register your own writers here.
writers = _default_registry()
