"""A benchmark's JSON, rewritten whole (through a temporary and a rename) each time a part is measured:
a run killed part-way keeps every figure measured before, and never a torn file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_whole(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    os.replace(temporary, path)
