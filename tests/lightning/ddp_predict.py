"""Trainer.predict over two CPU processes (DDP over gloo) writing through PredictionWriter.

    python tests/lightning/ddp_predict.py OUT REPORTS SAMPLES

Each rank writes REPORTS/rank<r>.json with how many files its writer committed.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Trainer

from tensorsink.lightning import PredictionWriter
from tests.lightning.models import Doubler, loader


def main() -> None:
    out, reports, samples = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    warnings.simplefilter("ignore")  # Lightning's advice about workers and batch sizes
    callback = PredictionWriter(out / "preds" / "y", value_key="y", writer="safetensors")
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
    )  # fmt: skip
    trainer.predict(Doubler(), loader(samples, batch_size=4), return_predictions=False)
    stats = callback.stats()
    assert stats is not None
    reports.mkdir(parents=True, exist_ok=True)
    report = {"rank": trainer.global_rank, "files": stats.files, "errors": stats.errors}
    (reports / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
