"""A Lightning prediction writer that writes each sample's output through an AsyncWriter.

`Trainer.predict` calls it after every batch; it splits the batch into samples with one device-to-host
copy per batch, queues one file per sample (or, with shards=True, one tar member per sample through a
ShardWriter) and returns, so the predict loop never waits for the disk.
Needs the `lightning` extra; `import tensorsink` does not import Lightning.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

from .batches import Batch, has_no_samples, split_batch
from .formats import Container
from .options import DictMode, SaveFormat, ShardOptions, WriterOptions
from .sample_writers import SampleWriter, Save, WriterRegistry, writers
from .shards.writer import ShardWriter
from .stats import ShardStats, WriterStats
from .writer import AsyncWriter

__all__ = ["PredictionWriter", "SampleWriter", "WriterRegistry", "progress_postfix", "writers"]

log = logging.getLogger("tensorsink")


class PredictionWriter(BasePredictionWriter):
    """Write every sample's prediction to `directory/<name><suffix>`, asynchronously and atomically.

    - `value_key`: which entry of a dict prediction to write; None writes the whole prediction (a
      tensor, or a mapping of tensors, with the samples along the first dimension; or a sequence with
      one value per sample). For a batch of one, a 0-d tensor, a number or a str is that sample. A
      prediction with no samples (None, `{}`, `[]`, a tensor of 0 rows) is skipped.
    - `writer`: a name in `registry` (each SaveFormat's: "pt", "npy", "npz", "safetensors"; "tensor",
      the same as "pt"; "image_2d", "image_3d", "text"; or your own), a SaveFormat, a SampleWriter, or
      a function `save(path, value)`.
    - `name_key`: per-sample file names, taken from the prediction (when a dict) or else the batch
      (when a dict): a list of str or a tensor of ints (one str or int for a batch of one). By default
      the dataset indices Lightning gives (`batch_indices`), under `dataloader_<i>/` when predict() has
      several dataloaders.
    - `write_interval`: Lightning's own argument. "batch" (default) queues each batch as it ends;
      "epoch" writes every batch at the end of the predict epoch, from the predictions Lightning kept
      on the CPU until then (name_key must then be in the prediction: Lightning passes no batches).
      "batch_and_epoch" would write every sample twice and is refused.
    - `progress_bar`: show the writer's throughput (files, MiB/s, in flight, blocked time, errors) in
      the postfix of Lightning's TQDM predict bar.
    - `shards`: write the samples into WebDataset tar shards (a ShardWriter) instead of a file each:
      for millions of small predictions. Only the writer's formats go into shards, not save functions.
    - `writer_options`: AsyncWriter's options (workers, durability, max_inflight, dict_mode, ...), or
      with shards=True ShardWriter's (shard_bytes, shard_samples, durability, dict_mode, ...).

    Pass `return_predictions=False` to `Trainer.predict`: otherwise Lightning keeps every prediction
    in memory until predict() returns, which this writer cannot (and does not try to) prevent.
    """

    def __init__(
        self,
        directory: str | Path,
        value_key: str | None = None,
        writer: str | SaveFormat | Save | SampleWriter = "tensor",
        name_key: str | None = None,
        *,
        registry: WriterRegistry = writers,
        write_interval: str = "batch",
        progress_bar: bool = True,
        shards: bool = False,
        **writer_options: Any,
    ) -> None:
        super().__init__(write_interval=_write_interval(write_interval))
        self.shards = shards
        _check_option_names(writer_options, ShardWriter if shards else AsyncWriter)
        self.directory = Path(directory)
        _check_directory(self.directory)
        self.value_key = value_key
        self.name_key = name_key
        self.progress_bar = progress_bar
        try:
            self.sample_writer = registry.resolve(writer)
        except ValueError as exc:
            raise ValueError(f"PredictionWriter(writer={writer!r}): {exc}") from None
        except TypeError as exc:
            raise TypeError(f"PredictionWriter(writer={writer!r}): {exc}") from None
        if shards and self.sample_writer.save is not None:
            raise ValueError(
                f"PredictionWriter(writer={writer!r}, shards=True): shards hold the writer's formats "
                "('pt', 'npy', 'npz', 'safetensors'), not files a save function makes; pick a format, "
                "or leave shards=False"
            )
        save_format = self.sample_writer.save_format or SaveFormat.PYTORCH_PT
        if save_format is SaveFormat.NUMPY_NPY:
            writer_options.setdefault("dict_mode", DictMode.SPLIT)  # .npy holds one array per file
        self._options = {"save_format": save_format, **writer_options}
        try:  # bad options fail here, not in predict()
            (ShardOptions if shards else WriterOptions)(out_root=self.directory, **self._options)
        except ValueError as exc:
            raise ValueError(f"PredictionWriter: {exc}") from None
        except TypeError as exc:
            raise TypeError(f"PredictionWriter: {exc}") from None
        self._writer: AsyncWriter | ShardWriter | None = None
        self._last: AsyncWriter | ShardWriter | None = None

    # Lifecycle: a writer per predict() call, drained at its end, closed on every way out.

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(raise_errors=False)
        self._writer = self._last = (ShardWriter if self.shards else AsyncWriter)(
            self.directory, **self._options
        )

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)  # with write_interval="epoch": the writes
        if self._writer is not None:
            self._writer.flush()  # a background failure fails predict() here
            self._show_stats(trainer, refresh=True)  # the epoch's final counts

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

    def stats(self) -> WriterStats | ShardStats | None:
        """The current (or last) predict() call's writer statistics."""
        return self._last.stats() if self._last is not None else None

    # Per batch, or every batch at the epoch's end.

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.interval.on_batch:
            self._show_stats(trainer, refresh=False)  # shown at the bar's own next refresh

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
        self._write(trainer, prediction, batch, batch_indices, dataloader_idx)

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """With write_interval="epoch": every batch Lightning kept, per dataloader, at once."""
        # Lightning gives one dataloader's predictions as a list of batches, several as a list of lists.
        per_loader = [predictions] if len(trainer.num_predict_batches) <= 1 else predictions
        for loader, batches in enumerate(per_loader):
            indices = batch_indices[loader] if loader < len(batch_indices) else []
            for i, prediction in enumerate(batches):
                # No indices for a loader without a sampler that records them (an IterableDataset).
                self._write(trainer, prediction, None, indices[i] if i < len(indices) else None, loader)

    def _write(
        self,
        trainer: Trainer,
        prediction: Any,
        batch: Any,
        batch_indices: Sequence[int] | None,
        dataloader_idx: int,
    ) -> None:
        if self._writer is None:
            raise RuntimeError("PredictionWriter got a batch outside predict(); it writes only there")
        if has_no_samples(prediction):
            return  # a batch the model filtered out whole: nothing to write, as Lightning's FileWriter
        value = self._value(prediction)
        if has_no_samples(value):
            return
        names = self._names(trainer, prediction, batch, batch_indices, dataloader_idx)
        sample_writer = self.sample_writer
        if sample_writer.check is not None:
            for sample in _samples_for_check(split_batch(value, len(names))):
                sample_writer.check(sample)
        if isinstance(self._writer, ShardWriter):
            self._writer.write_batch(names, value)
            return
        self._writer.write_batch(
            names,
            value,
            save=sample_writer.save,
            suffix=sample_writer.suffix,
            allow_empty=sample_writer.allow_empty,
        )

    def _show_stats(self, trainer: Trainer, *, refresh: bool) -> None:
        """The writer's counters in the postfix of Lightning's TQDM predict bar, where there is one.

        Lightning refuses `self.log()` in predict hooks and its predict bars show no logged metrics
        (RichProgressBar renders metrics only while fitting), so the postfix is the one place left.
        """
        if not self.progress_bar or self._writer is None:
            return
        callback = trainer.progress_bar_callback
        if not isinstance(callback, TQDMProgressBar):
            return
        try:
            bar = callback.predict_progress_bar
        except TypeError:  # not made yet (it is made in the bar's own on_predict_start)
            return
        if bar is None or bar.disable:
            return
        bar.set_postfix(progress_postfix(self._writer.stats()), refresh=refresh)

    def _value(self, prediction: Any) -> Any:
        if self.value_key is None:
            return prediction
        if not isinstance(prediction, Mapping):
            raise TypeError(
                f"PredictionWriter(value_key={self.value_key!r}) needs a dict prediction, got "
                f"{type(prediction).__name__}; use value_key=None to write the whole prediction"
            )
        if self.value_key not in prediction:
            raise KeyError(
                f"PredictionWriter(value_key={self.value_key!r}) is not in the prediction; it has "
                f"{sorted(prediction)}"
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
            if batch is None:  # write_interval="epoch": Lightning keeps no batches
                raise KeyError(
                    f"PredictionWriter(name_key={self.name_key!r}, write_interval='epoch'): the name must "
                    "be an entry of the prediction (Lightning passes no batches at the epoch's end); "
                    "return it from predict_step, or use write_interval='batch'"
                )
            raise KeyError(
                f"PredictionWriter(name_key={self.name_key!r}) is in neither the prediction nor the "
                "batch (both must be dicts to hold it)"
            )
        if batch_indices is None:
            raise RuntimeError(
                "PredictionWriter: Lightning gave no batch_indices for this batch (an IterableDataset or "
                "a custom batch sampler?); pass name_key= to name the files"
            )
        names = [str(int(i)) for i in batch_indices]
        if len(trainer.num_predict_batches) > 1:
            names = [f"dataloader_{dataloader}/{name}" for name in names]
        return names


_INTERVALS = ("batch", "epoch")
_OWN_OPTIONS = ("registry", "write_interval", "progress_bar", "shards")
_OWN_PARAMETERS = ("directory", "value_key", "writer", "name_key")


def _write_interval(write_interval: object) -> Literal["batch", "epoch"]:
    """Lightning's write_interval, as a str ("batch" or "epoch"; its WriteInterval enum too)."""
    value = getattr(write_interval, "value", write_interval)
    if value == "batch_and_epoch":
        raise ValueError(
            "PredictionWriter(write_interval='batch_and_epoch') would write every sample twice; use "
            "'batch' (each batch as it ends) or 'epoch' (every batch at the epoch's end)"
        )
    if value not in _INTERVALS:
        raise ValueError(
            f"PredictionWriter(write_interval={write_interval!r}) is not valid; use 'batch' (each batch as "
            "it ends) or 'epoch' (every batch at the epoch's end)"
        )
    return cast(Literal["batch", "epoch"], str(value))


def _writer_options(writer: type[AsyncWriter] | type[ShardWriter] = AsyncWriter) -> list[str]:
    """The options PredictionWriter passes on to its writer: all of its own but the root and format."""
    names = inspect.signature(writer.__init__).parameters
    return [name for name in names if name not in ("self", "out_root", "save_format")]


def _check_option_names(options: Mapping[str, Any], writer: type[AsyncWriter] | type[ShardWriter]) -> None:
    known = _writer_options(writer)
    for name, value in options.items():
        if name == "save_format":
            raise TypeError(
                f"PredictionWriter(save_format={value!r}): save_format comes from writer= (e.g. "
                "writer='safetensors', or writer=SaveFormat.SAFETENSORS); leave save_format out"
            )
        if name == "out_root":
            raise TypeError(
                f"PredictionWriter(out_root={value!r}): the output folder is the first argument, directory"
            )
        if name not in known:
            close = difflib.get_close_matches(name, [*_OWN_PARAMETERS, *_OWN_OPTIONS, *known], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(
                f"PredictionWriter() got an unexpected keyword argument {name!r}; {hint}besides directory, "
                f"value_key, writer, name_key, {', '.join(_OWN_OPTIONS)} it takes {writer.__name__}'s "
                f"options: {', '.join(known)}"
            )


def progress_postfix(stats: WriterStats | ShardStats) -> dict[str, str]:
    """A writer's counters as the TQDM postfix shows them: files, MiB/s, in flight, blocked, errors
    (a shard writer's: samples, shards, MiB/s, blocked, errors)."""
    if isinstance(stats, ShardStats):
        return {
            "samples": f"{stats.samples:,}",
            "shards": f"{stats.shards:,}",
            "MiB/s": f"{stats.bytes / max(stats.elapsed_seconds, 1e-9) / 2**20:,.1f}",
            "blocked": f"{stats.blocked_seconds:.2f}s",
            "errors": str(stats.errors),
        }
    return {
        "files": f"{stats.files:,}",
        "MiB/s": f"{stats.bytes_per_second / 2**20:,.1f}",
        "in flight": str(stats.in_flight),
        "blocked": f"{stats.blocked_seconds:.2f}s",
        "errors": str(stats.errors),
    }


def _check_directory(directory: Path) -> None:
    """Refuse, at construction, a directory that is a file (or lies under one): else every predict()
    would fail at its first batch, after the model has run."""
    for folder in (directory, *directory.parents):  # the nearest one that exists decides
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                kind = "a file" if folder.exists() else "a symlink to nothing"
                where = "is" if folder == directory else f"lies under {str(folder)!r}, which is"
                raise NotADirectoryError(
                    f"PredictionWriter(directory={str(directory)!r}) {where} {kind}, not a folder; give "
                    "a folder (made if missing) for the prediction files"
                )
            return


def _as_names(found: Any, name_key: str) -> list[str]:
    """File names from a name_key entry: one per sample, or one str, int or 0-d tensor for a batch of one.
    Always a list (never a str, which write_batch would not take as keys)."""
    if isinstance(found, (torch.Tensor, np.ndarray)):
        if isinstance(found, torch.Tensor):
            named = not (found.is_floating_point() or found.is_complex())
        else:
            named = found.dtype.kind in "iuU"  # ints, or str
        if not named or found.ndim > 1:
            raise TypeError(
                f"PredictionWriter(name_key={name_key!r}) names a tensor of dtype {found.dtype} and shape "
                f"{tuple(found.shape)}; give a 1-D tensor of ints (one per sample) or a list of str"
            )
        return [str(i) for i in found.reshape(-1).tolist()]
    if isinstance(found, str):
        return [found]  # a batch of one: its name, not a name per character
    if isinstance(found, (int, np.integer)) and not isinstance(found, bool):
        return [str(int(found))]
    if isinstance(found, Sequence) and not isinstance(found, (bytes, bytearray, memoryview)):
        return [_name(name) for name in found]
    raise TypeError(
        f"PredictionWriter(name_key={name_key!r}) must name a list of str or a tensor of ints (one str or "
        f"int for a batch of one), got {type(found).__name__}"
    )


def _name(name: Any) -> str:
    """One sample's name: a 0-d tensor by its value (an int in decimal, not "tensor(3)"), else str()."""
    if isinstance(name, (torch.Tensor, np.ndarray)) and name.ndim == 0:
        name = name.item()
    return str(name)


def _samples_for_check(layout: Batch) -> list[Any]:
    """Samples to check before queueing, without touching device memory: each value of a sequence,
    and for a batched tensor its first sample (one shape for the whole batch)."""
    if layout.container is Container.SEQUENCE:
        return list(layout.values)
    if layout.container is Container.TENSOR:
        return [layout.arrays[0][0]]
    return []
