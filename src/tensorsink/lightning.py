"""A Lightning prediction writer that writes each sample's output through an AsyncWriter.

`Trainer.predict` calls it after every batch; it splits the batch into samples with one device-to-host
copy per batch, queues one file per sample and returns, so the predict loop never waits for the disk.
Needs the `lightning` extra; `import tensorsink` does not import Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from .options import DictMode, SaveFormat, WriterOptions
from .sample_writers import SampleWriter, Save, WriterRegistry, writers
from .stats import WriterStats
from .writer import AsyncWriter

__all__ = ["PredictionWriter", "SampleWriter", "WriterRegistry", "writers"]

log = logging.getLogger("tensorsink")


class PredictionWriter(BasePredictionWriter):
    """Write every sample's prediction to `directory/<name><suffix>`, asynchronously and atomically.

    - `value_key`: which entry of a dict prediction to write; None writes the whole prediction (a
      tensor, or a mapping of tensors, with the samples along the first dimension; or a list with
      one value per sample).
    - `writer`: a name in `registry` ("tensor", "npy", "npz", "safetensors", "image_2d", "image_3d",
      "text", or your own), a SampleWriter, or a function `save(path, value)`.
    - `name_key`: per-sample file names, taken from the prediction (when a dict) or else the batch
      (when a dict): a list of str or a tensor of ints. By default the dataset indices Lightning gives
      (`batch_indices`), under `dataloader_<i>/` when predict() has several dataloaders.
    - `writer_options`: AsyncWriter's options (workers, durability, max_inflight, dict_mode, ...).

    Pass `return_predictions=False` to `Trainer.predict`: otherwise Lightning keeps every prediction
    in memory until predict() returns, which this writer cannot (and does not try to) prevent.
    """

    def __init__(
        self,
        directory: str | Path,
        value_key: str | None = None,
        writer: str | Save | SampleWriter = "tensor",
        name_key: str | None = None,
        *,
        registry: WriterRegistry = writers,
        **writer_options: Any,
    ) -> None:
        super().__init__(write_interval="batch")
        if "save_format" in writer_options:
            raise TypeError("save_format comes from `writer` (e.g. writer='safetensors'); do not pass it")
        self.directory = Path(directory)
        self.value_key = value_key
        self.name_key = name_key
        self.sample_writer = registry.resolve(writer)
        save_format = self.sample_writer.save_format or SaveFormat.PYTORCH_PT
        if save_format is SaveFormat.NUMPY_NPY:
            writer_options.setdefault("dict_mode", DictMode.SPLIT)  # .npy holds one array per file
        self._options = {"save_format": save_format, **writer_options}
        WriterOptions(out_root=self.directory, **self._options)  # bad options fail here, not in predict()
        self._writer: AsyncWriter | None = None
        self._last: AsyncWriter | None = None

    # Lifecycle: a writer per predict() call, drained at its end, closed on every way out.

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(raise_errors=False)
        self._writer = self._last = AsyncWriter(self.directory, **self._options)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        if self._writer is not None:
            self._writer.flush()  # a background failure fails predict() here

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(raise_errors=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close(raise_errors=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close(raise_errors=False)  # the trainer is already failing with `exception`

    def _close(self, raise_errors: bool) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception:
            if raise_errors:
                raise
            log.exception("tensorsink: the prediction writer failed while predict() was failing")

    def stats(self) -> WriterStats | None:
        """The current (or last) predict() call's writer statistics."""
        return self._last.stats() if self._last is not None else None

    # Per batch.

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._writer is None:
            raise RuntimeError("PredictionWriter got a batch outside predict(); it writes only there")
        value = self._value(prediction)
        names = self._names(trainer, prediction, batch, batch_indices, dataloader_idx)
        sample_writer = self.sample_writer
        if sample_writer.check is not None:
            for sample in _samples_for_check(value, len(names)):
                sample_writer.check(sample)
        self._writer.write_batch(names, value, save=sample_writer.save, suffix=sample_writer.suffix)

    def _value(self, prediction: Any) -> Any:
        if self.value_key is None:
            return prediction
        if not isinstance(prediction, Mapping):
            raise TypeError(
                f"value_key={self.value_key!r} needs a dict prediction, got {type(prediction).__name__}; "
                "use value_key=None to write the whole prediction"
            )
        if self.value_key not in prediction:
            raise KeyError(
                f"value_key={self.value_key!r} is not in the prediction; it has {sorted(prediction)}"
            )
        return prediction[self.value_key]

    def _names(
        self,
        trainer: Trainer,
        prediction: Any,
        batch: Any,
        batch_indices: Sequence[int] | None,
        dataloader: int,
    ) -> list[str]:
        if self.name_key is not None:
            for source in (prediction, batch):
                if isinstance(source, Mapping) and self.name_key in source:
                    return _as_names(source[self.name_key], self.name_key)
            raise KeyError(
                f"name_key={self.name_key!r} is in neither the prediction nor the batch "
                "(both must be dicts to hold it)"
            )
        if batch_indices is None:
            raise RuntimeError(
                "Lightning gave no batch_indices for this batch (an IterableDataset or a custom batch "
                "sampler?); pass name_key= to name the files"
            )
        names = [str(int(i)) for i in batch_indices]
        if len(trainer.num_predict_batches) > 1:
            names = [f"dataloader_{dataloader}/{name}" for name in names]
        return names


def _as_names(found: Any, name_key: str) -> list[str]:
    if isinstance(found, torch.Tensor):
        if found.is_floating_point() or found.ndim != 1:
            raise TypeError(f"name_key={name_key!r} must be a 1-D integer tensor or a list of str")
        return [str(i) for i in found.tolist()]
    if isinstance(found, (list, tuple)):
        return [str(name) for name in found]
    raise TypeError(
        f"name_key={name_key!r} must be a list of str or a tensor of ints, got {type(found).__name__}"
    )


def _samples_for_check(value: Any, count: int) -> list[Any]:
    """Shapes to check before queueing: every sample's, without touching device memory."""
    if isinstance(value, torch.Tensor):
        return [value[0]] if count else []  # one shape for the whole batch
    if isinstance(value, (list, tuple)):
        return list(value)
    return []
