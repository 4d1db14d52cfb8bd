"""Workloads shaped like inference outputs, and the size notation the command line takes.

Importing this module does not import torch (the command line's help lists the presets): the outputs
are made, with torch, only when a benchmark asks for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch

    #: One output: a tensor, or a mapping of names to tensors (several outputs of one sample).
    Item: TypeAlias = torch.Tensor | dict[str, torch.Tensor]

__all__ = ["PRESETS", "Item", "Workload", "format_size", "item_bytes", "parse_size", "size_label"]


def __getattr__(name: str) -> Any:
    """`Item` at run time, for the modules that build on it (and import torch anyway)."""
    if name == "Item":
        import torch

        return torch.Tensor | dict[str, torch.Tensor]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # fmt: skip


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
#: How each unit is written back: "64mb" is shown as "64 MB", "2k" as "2 KB", "4096" as "4096 B".
_UNIT_NAMES = {"": "B", "B": "B", "K": "KB", "M": "MB", "G": "GB", "KB": "KB", "MB": "MB", "GB": "GB",
               "KIB": "KiB", "MIB": "MiB", "GIB": "GiB"}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes in a size written like "64MiB", "4 KiB", "1.5GB" or "4096"; a ValueError names bad ones."""
    return _parse(text)[0]


def size_label(text: str) -> str:
    """A size as the user wrote it, tidied: "64MB" is "64 MB", "64mib" is "64 MiB"; checked as parse_size."""
    return _parse(text)[1]


def _parse(text: str) -> tuple[int, str]:
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"size {text!r} is not understood: write it like 64MiB, 512KiB, 1GB or 4096")
    nbytes = int(float(match.group(1)) * _UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"size {text!r} must be more than 0 bytes")
    return nbytes, f"{match.group(1)} {_UNIT_NAMES[unit]}"


#: Largest first; at equal magnitude the binary unit first, so 2**20 is "1 MiB" and 10**6 is "1 MB".
_SHOWN_UNITS = (("GiB", 2**30), ("GB", 10**9), ("MiB", 2**20), ("MB", 10**6), ("KiB", 2**10), ("KB", 10**3))


def format_size(nbytes: int) -> str:
    """A size in the largest unit, binary or decimal, that gives it exactly in at most three decimals
    (2**26 is "64 MiB", 64 * 10**6 "64 MB", 1.5 * 10**9 "1.5 GB"), else in bytes."""
    for unit, scale in _SHOWN_UNITS:
        if nbytes >= scale and (nbytes * 1000) % scale == 0:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:,} B"


def item_bytes(item: Item) -> int:
    tensors = item.values() if isinstance(item, dict) else [item]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Workload:
    """`count` outputs of `item_size` bytes each, either one float32 tensor or a mapping of four.

    A producer workload is a loop instead: `count` steps, each `ops` tiny torch ops, a GIL-free wait of
    `wait_us` microseconds standing in for device time, then one output of `item_size` bytes. It measures
    how much a writer slows the loop it serves, not how fast the bytes reach the disk.
    """

    name: str
    item_size: int
    count: int
    mapping: bool = False
    producer: bool = False
    ops: int = 0
    wait_us: int = 0
    #: How the item size is shown, as the user gave it ("64 MB"); by default `format_size(item_size)`.
    size_text: str | None = None

    def __post_init__(self) -> None:
        if self.item_size < 1 or self.count < 1:
            raise ValueError(f"workload {self.name!r}: item_size and count must be at least 1")
        if self.ops < 0 or self.wait_us < 0:
            raise ValueError(f"workload {self.name!r}: ops and wait_us must be 0 or more")
        if self.producer and self.mapping:
            raise ValueError(f"workload {self.name!r}: a producer writes single tensors, not mappings")

    def describe(self) -> str:
        size = self.size_text or format_size(self.item_size)
        if self.producer:
            steps = f"{self.count:,} steps of {self.ops} ops + {self.wait_us} us wait"
            return f"{self.name}: {steps} + a {size} output"
        shape = "mappings of 4 tensors" if self.mapping else "tensors"
        return f"{self.name}: {self.count:,} {shape} of {size}"

    def items(self, device: torch.device, seed: int = 0) -> list[Item]:
        """The outputs, made once before timing starts; identical for every contender."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        made = [self._item(generator) for _ in range(self.count)]
        if device.type == "cpu":
            return made
        return [_to(item, device) for item in made]

    def _item(self, generator: torch.Generator) -> Item:
        import torch

        if not self.mapping:
            return torch.rand(max(1, self.item_size // 4), generator=generator)
        # A surrogate/segmentation-like sample: float32 fields, float16 logits and a uint8 mask,
        # in shares of 1/2, 1/8, 1/4 and 1/8 of the item's bytes.
        eighth = max(1, self.item_size // 8)
        return {
            "velocity": torch.rand(eighth, generator=generator),
            "pressure": torch.rand(max(1, eighth // 4), generator=generator),
            "logits": torch.rand(eighth, generator=generator).to(torch.float16),
            "mask": (torch.rand(eighth, generator=generator) * 4).to(torch.uint8),
        }


def _to(item: Item, device: torch.device) -> Item:
    if isinstance(item, dict):
        return {name: tensor.to(device) for name, tensor in item.items()}
    return item.to(device)


#: The workloads `--workload` names; `--size` and `--count` override their item size and count (steps,
#: for a producer), `--ops` and `--wait-us` a producer's ops and wait.
PRESETS: dict[str, Workload] = {
    "large": Workload("large", 256 << 20, 4),
    "mid": Workload("mid", 2 << 20, 64),
    "small": Workload("small", 16 << 10, 1000),
    "mapping": Workload("mapping", 1 << 20, 64, mapping=True),
    # A launch-bound step waiting on ~1 ms of device time, and one with no device time to hide the writes in.
    "producer": Workload("producer", 64 << 10, 2000, producer=True, ops=20, wait_us=1000),
    "producer-nowait": Workload("producer-nowait", 16 << 10, 2000, producer=True, ops=40, wait_us=0),
}
