"""A tiny model and dataset whose every prediction can be recomputed from its index."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Dataset


def expected(index: int) -> torch.Tensor:
    """What the model predicts for sample `index`: unique to it, so a misplaced file shows."""
    return torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 + index


class Indexed(Dataset[dict[str, Any]]):
    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": torch.full((3, 4), float(index)), "id": f"case.{index + self.offset:03d}"}


class Doubler(LightningModule):
    """Predicts {"y": expected(index), "mask": a uint8 image}; the "x" it gets is the index."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        index = batch["x"][:, :1, :1]
        y = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4) * 0.5 + index + self.weight
        return {"y": y, "mask": (y > 3).to(torch.uint8) * 255, "id": batch["id"]}


def loader(size: int, batch_size: int = 4, offset: int = 0) -> DataLoader[dict[str, Any]]:
    return DataLoader(Indexed(size, offset), batch_size=batch_size, shuffle=False)
