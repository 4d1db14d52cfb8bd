"""What a benchmark ran on, for the header of its report: figures mean little without it."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from .. import __version__
from ..backends import probe

__all__ = ["describe", "filesystem_of"]


def filesystem_of(path: Path) -> str:
    """The type and mount point of the filesystem holding `path`, from /proc/self/mounts."""
    target = os.path.realpath(path)
    best = ("", "unknown")
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best[0]):
                    best = (mount_point, fields[2])
    except OSError:
        return "unknown"
    return f"{best[1]} on {best[0]}" if best[0] else "unknown"


def describe(out: Path, device: torch.device) -> dict[str, str | int]:
    """CPU count, GPU, the output folder's filesystem and whether kvikio/GDS can write there."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    verdict = probe.verdict_for(str(out))
    if verdict.gds:
        kvikio = "GDS works here"
    elif verdict.kvikio_works:
        kvikio = f"kvikio works, without GDS ({verdict.reason})"
    else:
        kvikio = f"not usable: {verdict.reason}"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count() or 1,
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tensorsink": __version__,
        "gpu": gpu,
        "filesystem": filesystem_of(out),
        "kvikio": kvikio,
        "engine": _engine(),
    }


def _engine() -> str:
    """Which write engine tensorsink runs here, and why when it is the Python one."""
    from ..engine import available_engines, engine_class

    name = engine_class("auto").name
    if name == "native":
        return "native (C threads)"
    if "native" not in available_engines():
        return "python (the C extension was not built: no C compiler at install?)"
    return "python (chosen by TENSORSINK_ENGINE)"
