"""What the journals say of shards: each sample's line, the shard list, and reading a sample by key.

A shard's journal line (the one written before its rename) lists its samples as
`[key, [[suffix, offset, size, crc32], ...]]`, each member's data at `offset` in the tar, so one sample
is read back with one pread per member, and verify checks each member without trusting the tar.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checksum import crc32
from ..formats import write_buffers
from ..manifest import SHARD_LIST_FORMAT, Journal, Manifest
from ..options import Durability

if TYPE_CHECKING:
    from ..commit import Committer

__all__ = ["ShardReader", "publish_journaled", "publish_shard_list", "sample_line", "shard_list"]

_text = json.encoder.encode_basestring_ascii  # a str as json.dumps writes it


def sample_line(key: str, members: list[tuple[str, int, int, int]]) -> str:
    """One sample in its shard's journal line: its key and each member's suffix, offset, size, CRC-32."""
    listed = ",".join(
        f'[{_text(suffix)},{offset},{size},"{crc:08x}"]' for suffix, offset, size, crc in members
    )
    return f"[{_text(key)},[{listed}]]"


def shard_list(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The shard list in wids' format of every shard the journals under `root` record, still whole in
    size, in name order; urls are relative to the root (where the list is written)."""
    manifest = Manifest.load(root, samples=False)
    listed = [
        {"url": path, "nsamples": count}
        for path, count in sorted(manifest.shard_sizes.items())
        if count and manifest.paths_done([path])
    ]
    return {"wids_version": 1, "shardlist": listed}


def publish_shard_list(
    root: str,
    name: str,
    committer: Committer,
    journal: Journal | None = None,
    shards: list[tuple[str, int]] | None = None,
) -> Path:
    """Write `<root>/<name>` atomically (journaled, so verify knows it): the list of `shards` (url
    relative to the root, samples), or by default shard_list(root); its path."""
    if shards is None:
        listing = shard_list(root)
    else:
        listing = {"wids_version": 1, "shardlist": [{"url": url, "nsamples": n} for url, n in sorted(shards)]}
    data = (json.dumps(listing, indent=1) + "\n").encode()
    final = f"{root}/{name}"
    fd, temporary = committer.create(final)
    journaled = None
    if journal is not None:
        head = journal.prefix(name, final, SHARD_LIST_FORMAT, [])

        def journaled(renaming: bool, when: float) -> None:
            journal.write_line(head, len(data), crc32(data), when, renaming=renaming)

    number = committer.order.reserve(final)

    def write(fd: int, _: str) -> None:
        write_buffers(fd, [data])

    committer.finish(final, number, temporary, fd, write, journaled)
    return Path(final)


def publish_journaled(
    root: str,
    name: str,
    durability: Durability,
    *,
    manifest: bool = True,
    shards: list[tuple[str, int]] | None = None,
) -> Path:
    """publish_shard_list() from outside a writer (the command line, Ray's driver): a committer of its
    own and, with `manifest`, a journal of its own that holds the list's line alone."""
    from ..commit import Committer

    journal = Journal(root, fsync=durability is not Durability.NONE) if manifest else None
    try:
        return publish_shard_list(root, name, Committer(durability, root), journal, shards)
    finally:
        if journal is not None:
            journal.close()


class ShardReader:
    """Samples read back by key from the shards under `root`, through the journals' offsets: no shard
    is scanned. `read(key)` gives each member's bytes by suffix ("npy", "image.npy" ...), checked
    against its CRC-32; `load(key)` decodes them (npy, npz, safetensors, pt)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._manifest = Manifest.load(root)

    def keys(self) -> list[str]:
        return sorted(self._manifest.shard_samples)

    def __contains__(self, key: object) -> bool:
        return key in self._manifest.shard_samples

    def __len__(self) -> int:
        return len(self._manifest.shard_samples)

    def read(self, key: str) -> dict[str, bytes]:
        try:
            path, members = self._manifest.shard_samples[key]
        except KeyError:
            raise KeyError(f"no shard under {self.root} holds key {key!r}") from None
        found = {}
        with open(self.root / path, "rb") as shard:
            for suffix, offset, size, crc in members:
                data = os.pread(shard.fileno(), size, offset)
                if len(data) != size or f"{crc32(data):08x}" != crc:
                    raise ValueError(
                        f"member {key}.{suffix} of {path} is not what the journal records (size {size}, "
                        f"CRC-32 {crc}); run verify"
                    )
                found[suffix] = data
        return found

    def load(self, key: str) -> dict[str, Any]:
        """read(key), each member decoded by its extension; torch files with weights_only=True."""
        return {suffix: _decode(suffix.rpartition(".")[2], data) for suffix, data in self.read(key).items()}


def _decode(ext: str, data: bytes) -> Any:
    if ext == "npy":
        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "npz":
        import numpy as np

        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return dict(archive)
    if ext == "safetensors":
        from safetensors.torch import load

        return load(data)
    if ext == "pt":
        import torch

        return torch.load(io.BytesIO(data), weights_only=True)
    return data
