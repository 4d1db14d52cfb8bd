"""Shards: many small samples as WebDataset tar files, each committed whole, journaled and resumable.

`ShardWriter` writes them; `ShardReader` reads one sample back by key through the journal's offsets;
`publish_shard_list` writes the list in wids' format of every shard under a root. Imported on first
use: the manifest reads shards' layout (`shards.tar`) without importing the writer and torch.
"""

from __future__ import annotations

import typing

__all__ = ["ShardReader", "ShardWriter", "publish_shard_list"]


def __getattr__(name: str) -> object:
    if name == "ShardWriter":
        from .writer import ShardWriter

        return ShardWriter
    if name in ("ShardReader", "publish_shard_list"):
        from . import index

        return getattr(index, name)
    raise AttributeError(f"module 'tensorsink.shards' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if typing.TYPE_CHECKING:
    from .index import ShardReader, publish_shard_list
    from .writer import ShardWriter
