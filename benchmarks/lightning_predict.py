"""Trainer.predict time with no writer, with PredictionWriter, and with a per-sample torch.save callback.

The synchronous callback does what the common FileWriter does: `.cpu()` and torch.save of each sample
inside the predict loop. Contenders run interleaved, round after round; medians and ratios are printed.
Runs on the CPU (or a GPU with --device cuda).

    python benchmarks/lightning_predict.py --batches 40 --rounds 5 --out /tmp/lp
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from tensorsink.lightning import PredictionWriter


class Segmenter(LightningModule):
    """A few matmuls per batch, then a (B, 4, 128, 128) float32 output: 256 KiB per sample."""

    def __init__(self, device_work: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(512, 512) / 23)
        self.device_work = device_work

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x,) = batch
        h = x
        for _ in range(self.device_work):
            h = torch.tanh(h @ self.weight)
        return {"logits": h.reshape(x.shape[0], 4, 128, 128)}


class SyncTorchSave(Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self.directory.mkdir(parents=True, exist_ok=True)
        logits = outputs["logits"]
        for j, sample in enumerate(logits):  # numbered in order, as the common FileWriter does
            torch.save(sample.cpu(), self.directory / f"{batch_idx * len(logits) + j}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", type=int, default=4, help="matmul layers per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("lightning-bench"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = TensorDataset(torch.randn(args.batches * args.batch_size, 128, 512))  # 256 KiB a sample

    def run(callback: Callback | None) -> float:
        trainer = Trainer(accelerator=args.device, devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False,
                          callbacks=[callback] if callback else [])  # fmt: skip
        model = Segmenter(args.work)
        start = time.perf_counter()
        trainer.predict(model, DataLoader(data, batch_size=args.batch_size), return_predictions=False)
        return time.perf_counter() - start

    contenders = {
        "no writer": lambda: None,
        "tensorsink PredictionWriter (.pt)": lambda: PredictionWriter(args.out / "ts", value_key="logits"),
        "tensorsink PredictionWriter (.safetensors)": lambda: PredictionWriter(
            args.out / "ts", value_key="logits", writer="safetensors"
        ),
        "per-sample .cpu() + torch.save": lambda: SyncTorchSave(args.out / "sync"),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            shutil.rmtree(args.out, ignore_errors=True)
            seconds = run(contenders[name]())
            if r:  # round 0 warms up
                times[name].append(seconds)
    shutil.rmtree(args.out, ignore_errors=True)
    samples = args.batches * args.batch_size
    base = statistics.median(times["no writer"])
    print(
        f"{samples} samples of 256 KiB, {args.work} matmul layers per batch, median of {args.rounds} rounds"
    )
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"  {name:<36} {median:7.3f} s  {samples / median:8.0f} samples/s  x{median / base:.2f} no writer"
        )


if __name__ == "__main__":
    main()
