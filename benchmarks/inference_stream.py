"""The main job: a stream of synthetic inference outputs written with tensorsink, with throughput.

Three output shapes of real jobs, interleaved as a predict loop would produce them:
a flow-field surrogate (a mapping of float32 fields per scene), a segmentation model (a uint8 mask and
float16 logits per scan), and an embedding model (a batch of float32 vectors). Prints progress lines
and a summary that read well in batch-job logs.

    python benchmarks/inference_stream.py --out bench-out --seconds 20
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from tensorsink import AsyncWriter, DictMode, Durability, SaveFormat


def outputs(generator: torch.Generator) -> dict[str, object]:
    """What one predict step emits, by key prefix: one output of each kind."""
    scene = {
        "velocity": torch.randn(3, 32, 64, 64, generator=generator),  # 1.5 MiB
        "pressure": torch.randn(32, 64, 64, generator=generator),  # 0.5 MiB
    }
    logits = torch.randn(4, 128, 128, generator=generator).to(torch.float16)
    scan = {"mask": logits.argmax(0).to(torch.uint8), "logits": logits}
    embeddings = torch.randn(256, 768, generator=generator)  # 0.75 MiB
    return {"surrogate/scene": scene, "segmentation/scan": scan, "embeddings/batch": embeddings}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (emptied first)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to produce outputs")
    parser.add_argument("--format", default="safetensors", choices=[f.value for f in SaveFormat])
    parser.add_argument("--durability", default="file", choices=[d.value for d in Durability])
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    dict_mode = DictMode.SPLIT if args.format == "npy" else DictMode.SINGLE
    generator = torch.Generator().manual_seed(0)
    pool = [outputs(generator) for _ in range(16)]  # made once: measure writing, not randn
    print(f"writing {args.format} with durability={args.durability}, {args.workers} workers, into {args.out}")
    start = time.perf_counter()
    last_report = start
    step = 0
    with AsyncWriter(args.out, args.format, dict_mode, args.workers, durability=args.durability) as writer:
        while time.perf_counter() - start < args.seconds:
            for prefix, value in pool[step % len(pool)].items():
                writer.write(f"{prefix}_{step:06d}", value)
            step += 1
            if time.perf_counter() - last_report >= 5:
                last_report = time.perf_counter()
                print(f"[{last_report - start:6.1f} s] step {step:,}: {writer.stats()}", flush=True)
        produced = time.perf_counter() - start
    total = time.perf_counter() - start
    stats = writer.stats()
    print(f"done: {stats}")
    print(
        f"{step:,} steps, {stats.files:,} files, {stats.bytes / 2**30:.2f} GiB in {total:.1f} s "
        f"(close() waited {total - produced:.2f} s): {stats.bytes / total / 2**20:,.0f} MiB/s, "
        f"{stats.files / total:,.0f} files/s, caller blocked {stats.blocked_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
