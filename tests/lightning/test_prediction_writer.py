"""PredictionWriter with a real Trainer on the CPU: every sample's file, its content, its name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from PIL import Image

from tensorsink import SaveFormat
from tensorsink.lightning import PredictionWriter
from tests.lightning.models import Doubler, expected, loader
from tests.support import outputs_in, outputs_under

# Lightning's own warnings about this setup (few workers, tiny batches, its use of torch's pytree).
LIGHTNING_WARNINGS = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]
pytestmark = LIGHTNING_WARNINGS


def _trainer(*callbacks: Any) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks), enable_checkpointing=False,
    )  # fmt: skip


def test_every_sample_by_dataset_index(tmp_path: Path) -> None:
    callback = PredictionWriter(tmp_path, value_key="y", writer="tensor")
    _trainer(callback).predict(Doubler(), loader(10, batch_size=4), return_predictions=False)
    assert sorted(p.name for p in outputs_in(tmp_path)) == sorted(f"{i}.pt" for i in range(10))
    for i in range(10):
        stored = torch.load(tmp_path / f"{i}.pt", weights_only=True)
        assert torch.equal(stored, expected(i))
        assert stored.untyped_storage().nbytes() == expected(i).nbytes, "the file holds only its sample"
    stats = callback.stats()
    assert stats is not None
    assert stats.files == 10


def test_names_from_the_batch_keep_their_dots(tmp_path: Path) -> None:
    callback = PredictionWriter(tmp_path, value_key="y", writer="npy", name_key="id")
    _trainer(callback).predict(Doubler(), loader(5, batch_size=2), return_predictions=False)
    assert sorted(p.name for p in outputs_in(tmp_path)) == [f"case.{i:03d}.npy" for i in range(5)]
    np.testing.assert_array_equal(np.load(tmp_path / "case.003.npy"), expected(3).numpy())


def test_whole_dict_prediction_split_per_entry(tmp_path: Path) -> None:
    callback = PredictionWriter(tmp_path, writer="safetensors", name_key="id")
    model = Doubler()
    original = model.predict_step
    model.predict_step = lambda batch, *a: {k: v for k, v in original(batch, *a).items() if k != "id"}  # type: ignore[method-assign]
    _trainer(callback).predict(model, loader(3), return_predictions=False)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "case.002.safetensors")
    assert set(stored) == {"y", "mask"}
    assert torch.equal(stored["y"], expected(2))


def test_several_dataloaders_get_a_folder_each(tmp_path: Path) -> None:
    callback = PredictionWriter(tmp_path, value_key="y")
    _trainer(callback).predict(Doubler(), [loader(3), loader(2)], return_predictions=False)
    found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.pt"))
    assert found == ["dataloader_0/0.pt", "dataloader_0/1.pt", "dataloader_0/2.pt",
                     "dataloader_1/0.pt", "dataloader_1/1.pt"]  # fmt: skip


def test_image_and_text_writers(tmp_path: Path) -> None:
    images, texts = tmp_path / "png", tmp_path / "txt"
    _trainer(
        PredictionWriter(images, value_key="mask", writer="image_2d"),
        PredictionWriter(texts, value_key="id", writer="text"),
    ).predict(Doubler(), loader(4), return_predictions=False)
    with Image.open(images / "1.png") as image:
        assert image.format == "PNG"
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, (expected(1) > 3).numpy().astype(np.uint8) * 255)
    assert (texts / "3.txt").read_text(encoding="utf-8") == "case.003"


def test_a_custom_writer_callable(tmp_path: Path) -> None:
    def save(path: Path, value: torch.Tensor, *, suffix: str = ".sum") -> None:
        path.write_text(f"{float(value.sum()):.1f}")

    _trainer(PredictionWriter(tmp_path, value_key="y", writer=save)).predict(
        Doubler(), loader(2), return_predictions=False
    )
    assert (tmp_path / "1.sum").read_text() == f"{float(expected(1).sum()):.1f}"


def test_a_bad_image_shape_fails_predict_at_the_batch(tmp_path: Path) -> None:
    callback = PredictionWriter(tmp_path, value_key="y", writer="image_3d")
    model = Doubler()
    original = model.predict_step
    model.predict_step = lambda batch, *a: {"y": original(batch, *a)["y"].reshape(-1, 2, 2, 3, 1)}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="image_3d takes a volume"):
        _trainer(callback).predict(model, loader(2), return_predictions=False)
    assert not list(tmp_path.rglob("*.png"))


def test_a_background_failure_fails_predict(tmp_path: Path) -> None:
    def save(path: Path, value: Any) -> None:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        _trainer(PredictionWriter(tmp_path, value_key="y", writer=save)).predict(
            Doubler(), loader(3), return_predictions=False
        )
    assert not [p for p in outputs_under(tmp_path) if p.is_file()], "no file, no temporary"


def test_bad_options_fail_when_the_callback_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no writer named 'jpeg'; known: image_2d, image_3d, npy, npz, pt"):
        PredictionWriter(tmp_path, writer="jpeg")
    with pytest.raises(ValueError, match="workers"):
        PredictionWriter(tmp_path, workers=0)
    with pytest.raises(TypeError, match="save_format comes from"):
        PredictionWriter(tmp_path, save_format="npy")
    assert not tmp_path.joinpath("x").exists()


def test_predict_twice_writes_the_same_names_again(tmp_path: Path) -> None:
    callback = PredictionWriter(tmp_path, value_key="y")
    trainer = _trainer(callback)
    trainer.predict(Doubler(), loader(3), return_predictions=False)
    trainer.predict(Doubler(), loader(5), return_predictions=False)
    assert sorted(p.name for p in outputs_in(tmp_path)) == [f"{i}.pt" for i in range(5)]


def test_import_tensorsink_does_not_import_lightning() -> None:
    code = "import sys, tensorsink; assert not [m for m in sys.modules if m.startswith(('lightning', 'PIL'))]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_ddp_on_two_processes_writes_each_sample_once(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    samples = 37  # not a multiple of 2 ranks x 4 per batch: the sampler must not pad with repeats
    script = Path(__file__).with_name("ddp_predict.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), str(tmp_path / "reports"), str(samples)],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "reports").iterdir())]
    assert [r["rank"] for r in reports] == [0, 1]
    assert sum(r["files"] for r in reports) == samples, "a sample was written twice, or not at all"
    assert all(r["files"] > 0 and r["errors"] == 0 for r in reports), "both ranks wrote"
    files = outputs_in(tmp_path / "out" / "preds" / "y")
    assert [p.name for p in files] == sorted(f"{i}.safetensors" for i in range(samples))
    for i in range(samples):
        assert torch.equal(
            load_file(tmp_path / "out" / "preds" / "y" / f"{i}.safetensors")["arr_0"], expected(i)
        )


@pytest.mark.parametrize(("writer", "suffix"), [("pt", ".pt"), (SaveFormat.SAFETENSORS, ".safetensors")])
def test_every_save_format_name_is_a_writer(tmp_path: Path, writer: Any, suffix: str) -> None:
    _trainer(PredictionWriter(tmp_path, value_key="y", writer=writer)).predict(
        Doubler(), loader(3), return_predictions=False
    )
    assert sorted(p.name for p in outputs_in(tmp_path)) == [f"{i}{suffix}" for i in range(3)]
    if suffix == ".pt":
        assert torch.equal(torch.load(tmp_path / "2.pt", weights_only=True), expected(2))


def test_write_interval_epoch_writes_every_batch_at_the_epochs_end(tmp_path: Path) -> None:
    seen: list[int] = []  # files on disk when each batch was predicted
    model = Doubler()
    original = model.predict_step

    def predict_step(batch: dict[str, Any], *args: Any) -> dict[str, Any]:
        seen.append(len(list(tmp_path.rglob("*.npy"))))
        return original(batch, *args)

    model.predict_step = predict_step  # type: ignore[method-assign]
    callback = PredictionWriter(tmp_path, value_key="y", writer="npy", write_interval="epoch")
    _trainer(callback).predict(model, [loader(5, batch_size=2), loader(3)], return_predictions=False)
    assert seen == [0] * 4, "nothing is written before the epoch ends"
    found = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npy"))
    assert found == [f"dataloader_0/{i}.npy" for i in range(5)] + [f"dataloader_1/{i}.npy" for i in range(3)]
    np.testing.assert_array_equal(np.load(tmp_path / "dataloader_0" / "4.npy"), expected(4).numpy())


def test_write_interval_epoch_takes_names_from_the_prediction(tmp_path: Path) -> None:
    callback = PredictionWriter(tmp_path, value_key="y", name_key="id", write_interval="epoch")
    _trainer(callback).predict(Doubler(), loader(3), return_predictions=False)
    assert sorted(p.name for p in outputs_in(tmp_path)) == [f"case.{i:03d}.pt" for i in range(3)]

    model = Doubler()
    original = model.predict_step
    model.predict_step = lambda batch, *a: {"y": original(batch, *a)["y"]}  # type: ignore[method-assign]
    with pytest.raises(KeyError, match=r"PredictionWriter\(name_key='id', write_interval='epoch'\)"):
        _trainer(
            PredictionWriter(tmp_path / "b", value_key="y", name_key="id", write_interval="epoch")
        ).predict(model, loader(3), return_predictions=False)


def test_errors_name_prediction_writer_and_the_argument_typed(tmp_path: Path) -> None:
    with pytest.raises(
        TypeError, match="unexpected keyword argument 'worker'; did you mean 'workers'"
    ) as bad:
        PredictionWriter(tmp_path, worker=3)
    assert "PredictionWriter()" in str(bad.value)
    assert "WriterOptions" not in str(bad.value)
    with pytest.raises(ValueError, match=r"^PredictionWriter: workers=0 is not valid; use an int >= 1"):
        PredictionWriter(tmp_path, workers=0)
    with pytest.raises(ValueError, match=r"^PredictionWriter: durability='sometimes' is not valid"):
        PredictionWriter(tmp_path, durability="sometimes")
    with pytest.raises(ValueError, match=r"^PredictionWriter\(writer='jpeg'\): no writer named 'jpeg'"):
        PredictionWriter(tmp_path, writer="jpeg")
    with pytest.raises(TypeError, match=r"^PredictionWriter\(save_format='npy'\): .* writer="):
        PredictionWriter(tmp_path, save_format="npy")
    with pytest.raises(TypeError, match=r"^PredictionWriter\(out_root=.*directory"):
        PredictionWriter(tmp_path, out_root=tmp_path)
    with pytest.raises(ValueError, match=r"PredictionWriter\(write_interval='batch_and_epoch'\) would write"):
        PredictionWriter(tmp_path, write_interval="batch_and_epoch")
    with pytest.raises(ValueError, match=r"PredictionWriter\(write_interval='step'\) is not valid"):
        PredictionWriter(tmp_path, write_interval="step")
    with pytest.raises(TypeError, match=r"PredictionWriter\(value_key='y'\) needs a dict prediction"):
        _trainer(PredictionWriter(tmp_path, value_key="y")).predict(
            _TensorModel(), loader(2), return_predictions=False
        )


class _TensorModel(Doubler):
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return super().predict_step(batch, batch_idx, dataloader_idx)["y"]


def _tqdm_trainer(*callbacks: Any) -> tuple[Trainer, TQDMProgressBar]:
    bar = TQDMProgressBar(refresh_rate=1)
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[*callbacks, bar],
    )  # fmt: skip
    return trainer, bar


def test_the_progress_bar_shows_the_writers_throughput(tmp_path: Path) -> None:
    trainer, bar = _tqdm_trainer(PredictionWriter(tmp_path, value_key="y"))
    postfixes: list[str] = []
    original = TQDMProgressBar.on_predict_batch_end

    def record(self: TQDMProgressBar, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        postfixes.append(self.predict_progress_bar.postfix or "")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TQDMProgressBar, "on_predict_batch_end", record)
        trainer.predict(Doubler(), loader(10, batch_size=4), return_predictions=False)
    assert len(postfixes) == 3
    assert all("files=" in p and "MiB/s=" in p and "in flight=" in p and "blocked=" in p for p in postfixes)
    final = bar.predict_progress_bar.postfix
    assert "files=10," in final, final  # after the epoch's flush: every file
    assert final.endswith("errors=0")


def test_progress_bar_false_leaves_the_bar_alone(tmp_path: Path) -> None:
    trainer, bar = _tqdm_trainer(PredictionWriter(tmp_path, value_key="y", progress_bar=False))
    trainer.predict(Doubler(), loader(3), return_predictions=False)
    assert not bar.predict_progress_bar.postfix


class _Returns(Doubler):
    """Predicts whatever `make(batch, batch_idx)` returns: Doubler's outputs, or something odd."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.make(super().predict_step(batch, batch_idx, dataloader_idx), batch_idx)


@pytest.mark.parametrize(
    ("value_key", "empty"),
    [(None, torch.zeros(0, 3, 4)), (None, {}), (None, []), (None, None), ("y", {}),
     ("y", {"y": torch.zeros(0, 3, 4), "id": []}), ("y", {"y": []})],
    ids=["tensor", "dict", "list", "none", "dict-with-value-key", "entry-of-0-rows", "empty-entry"],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:predict returned None:UserWarning")  # Lightning's, for the None case
def test_a_prediction_without_samples_is_skipped(tmp_path: Path, value_key: str | None, empty: Any) -> None:
    """A model that filters a whole batch out returns no samples: nothing to write, not a failed predict."""

    def make(out: dict[str, Any], batch_idx: int) -> Any:
        if batch_idx == 1:
            return empty
        return out if value_key else out["y"]

    callback = PredictionWriter(tmp_path, value_key=value_key)
    _trainer(callback).predict(_Returns(make), loader(10, batch_size=4), return_predictions=False)
    assert sorted(p.name for p in outputs_in(tmp_path)) == sorted(f"{i}.pt" for i in [0, 1, 2, 3, 8, 9])
    assert torch.equal(torch.load(tmp_path / "9.pt", weights_only=True), expected(9))


@pytest.mark.parametrize(
    ("value", "writer", "stored"),
    [(torch.tensor(7.5), "tensor", torch.tensor(7.5)), (torch.tensor(7.5), "text", "7.5\n"),
     (42, "text", "42\n"), ("a whole sentence", "text", "a whole sentence")],
    ids=["0-d-tensor", "0-d-tensor-as-text", "number", "str"],
)  # fmt: skip
def test_one_value_for_a_batch_of_one_is_its_sample(
    tmp_path: Path, value: Any, writer: str, stored: Any
) -> None:
    _trainer(PredictionWriter(tmp_path, writer=writer)).predict(
        _Returns(lambda out, i: value), loader(3, batch_size=1), return_predictions=False
    )
    suffix = ".pt" if writer == "tensor" else ".txt"
    assert sorted(p.name for p in outputs_in(tmp_path)) == [f"{i}{suffix}" for i in range(3)]
    if writer == "tensor":
        assert torch.equal(torch.load(tmp_path / "2.pt", weights_only=True), stored)
    else:
        assert (tmp_path / "2.txt").read_text(encoding="utf-8") == stored


@pytest.mark.parametrize(
    "values", [range(4), (0, 1, 2, 3), ["0", "1", "2", "3"]], ids=["range", "tuple", "list"]
)
def test_a_sequence_holds_a_value_per_sample(tmp_path: Path, values: Any) -> None:
    _trainer(PredictionWriter(tmp_path, writer="text")).predict(
        _Returns(lambda out, i: values), loader(4, batch_size=4), return_predictions=False
    )
    assert [(tmp_path / f"{i}.txt").read_text(encoding="utf-8").strip() for i in range(4)] == list("0123")


def test_a_str_is_never_split_into_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"one str \('ab'\), one sample's value, but 2 keys were given"):
        _trainer(PredictionWriter(tmp_path, writer="text")).predict(
            _Returns(lambda out, i: "ab"), loader(2, batch_size=2), return_predictions=False
        )
    assert not list(tmp_path.rglob("*.txt")), "no file per character"


@pytest.mark.parametrize(
    ("name", "file"), [("case.7", "case.7.txt"), (torch.tensor(7), "7.txt"), (7, "7.txt"), (["n"], "n.txt")]
)
def test_names_for_a_batch_of_one(tmp_path: Path, name: Any, file: str) -> None:
    _trainer(PredictionWriter(tmp_path, value_key="y", writer="text", name_key="n")).predict(
        _Returns(lambda out, i: {"y": "text", "n": name}), loader(1, batch_size=1), return_predictions=False
    )
    assert [p.name for p in outputs_in(tmp_path)] == [file]


def test_names_of_0d_tensors_in_a_list_are_their_values(tmp_path: Path) -> None:
    _trainer(PredictionWriter(tmp_path, value_key="y", name_key="n")).predict(
        _Returns(lambda out, i: {"y": out["y"], "n": [torch.tensor(5), torch.tensor(6)]}),
        loader(2, batch_size=2),
        return_predictions=False,
    )
    assert sorted(p.name for p in outputs_in(tmp_path)) == ["5.pt", "6.pt"]


def test_a_directory_that_is_a_file_fails_at_construction(tmp_path: Path) -> None:
    file = tmp_path / "preds"
    file.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=rf"PredictionWriter\(directory='{file}'\) is a file, not a"):
        PredictionWriter(file)
    with pytest.raises(NotADirectoryError, match=rf"lies under '{file}', which is a file, not a folder"):
        PredictionWriter(file / "sub" / "dir")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="is a symlink to nothing, not a folder"):
        PredictionWriter(tmp_path / "dangling")
    assert file.read_text() == "not a folder"
    PredictionWriter(tmp_path / "new" / "folder")  # a folder that does not exist yet is made at predict()
    assert not (tmp_path / "new").exists()


def test_shards_hold_every_prediction_as_a_webdataset_sample(tmp_path: Path) -> None:
    from tensorsink.shards import ShardReader

    callback = PredictionWriter(tmp_path, value_key="y", writer="npy", shards=True, shard_samples=4)
    _trainer(callback).predict(Doubler(), loader(10, batch_size=3), return_predictions=False)
    listing = json.loads((tmp_path / "shards.json").read_text())["shardlist"]
    assert [s["nsamples"] for s in listing] == [4, 4, 2]
    reader = ShardReader(tmp_path)
    assert sorted(reader.keys(), key=int) == [str(i) for i in range(10)]
    for i in (0, 5, 9):
        np.testing.assert_array_equal(reader.load(str(i))["npy"], expected(i).numpy())
    stats = callback.stats()
    assert stats is not None
    assert (stats.samples, stats.shards) == (10, 3)


def test_shards_refuse_save_functions_and_asyncwriter_only_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shards hold the writer's formats"):
        PredictionWriter(tmp_path, writer="image_2d", shards=True)
    with pytest.raises(TypeError, match=r"'workers'.*ShardWriter's options"):
        PredictionWriter(tmp_path, shards=True, workers=2)
    with pytest.raises(ValueError, match="shard_samples=0"):
        PredictionWriter(tmp_path, shards=True, shard_samples=0)


def test_a_misspelt_argument_is_matched_against_its_own_parameters_too(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="did you mean 'writer'"):
        PredictionWriter(tmp_path, wrtier="npy")
    with pytest.raises(TypeError, match="did you mean 'value_key'"):
        PredictionWriter(tmp_path, valu_key="y")
